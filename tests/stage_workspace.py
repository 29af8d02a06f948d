"""A workspace where an analysis stage can run: prepare + extract on the tiny model and corpus, and a saved SAE
initialised from the data standing in for `sae train` (tested elsewhere)."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from stages.cli import main


def invoke(*args: str) -> None:
    """Run ``sae <args>`` in process; it must succeed."""
    res = CliRunner().invoke(main, list(args))
    assert res.exit_code == 0, (res.output, res.exception)


def sets(overrides: list[str]) -> list[str]:
    """``["a=1", "b=2"]`` -> ``["--set", "a=1", "--set", "b=2"]``."""
    return [a for o in overrides for a in ("--set", o)]


def prepared_workspace(ws: Path, tiny_llama: Path, labelled_corpus: Path, hook: str, **sae_cfg: object) -> Path:
    """``ws`` with params, tokens, activations and ``models/sae/<hook>`` (an SAE of ``sae_cfg``, d_in 32,
    d_sae 64, initialised from a batch of the train activations). The caller chdirs into ``ws`` first."""
    from pipeline.activations import open_activations
    from pipeline.sae import SAEConfig, make_sae, save_sae
    from pipeline.testing import tiny_params, write_params

    write_params(ws / "params.yaml", tiny_params(tiny_llama, labelled_corpus))
    invoke("prepare")
    invoke("extract")
    sae = make_sae(SAEConfig(d_in=32, d_sae=64, hook=hook, **sae_cfg), seed=0)  # type: ignore[arg-type]
    sae.init_from_data(next(open_activations(Path("data/activations/train") / hook).iter_batches(512)).acts)
    save_sae(sae, Path("models/sae") / hook)
    return ws
