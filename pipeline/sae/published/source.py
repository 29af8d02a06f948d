"""``sae.source``: where the pipeline's SAE comes from when it is not trained here.

Forms: ``train`` (train it, the default), a local folder, ``hf:<owner>/<repo>[/<path>][@<revision>]`` (the hub),
or ``saelens:<release>/<sae id>`` (a release of SAELens' registry). ``sae.source_format`` names the files'
layout, or ``auto`` tells it from the file names. :func:`import_published` reads the files, maps the
source's hook and model onto this pipeline's and checks them (and d_model) against the params, each
mismatch one line naming both sides, and writes a native SAE folder with a ``provenance.json`` beside it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import UserError
from pipeline.io import atomic_write_json, json_digest, sha256_file
from pipeline.sae.published.common import Foreign
from pipeline.sae.published.hooknames import check_gemma_site, map_hook, map_pair, why_not_ours

log = logging.getLogger(__name__)

FORMATS = ("auto", "native", "saelens", "gemmascope", "sparsify", "dictionary_learning")
PROVENANCE = "provenance.json"


def _reader(fmt: str) -> Callable[[Path], Foreign]:
    if fmt == "saelens":
        from pipeline.sae.published.saelens import read_saelens as r
    elif fmt == "gemmascope":
        from pipeline.sae.published.gemmascope import read_gemmascope as r
    elif fmt == "sparsify":
        from pipeline.sae.published.sparsify import read_sparsify as r
    elif fmt == "dictionary_learning":
        from pipeline.sae.published.dictlearn import read_dictionary_learning as r
    else:
        r = _read_native
    return r


def _read_native(d: Path) -> Foreign:
    from pipeline.sae.io import CFG, WEIGHTS, load_sae

    sae = load_sae(d)
    return Foreign(sae, "native", sae.cfg.hook or None, None, [d / CFG, d / WEIGHTS])


def detect_format(d: Path) -> str:
    """The layout of SAE folder ``d`` from its file names (``sae.source_format: auto``)."""
    names = {p.name for p in d.iterdir()} if d.is_dir() else set()
    if "sae_weights.safetensors" in names:
        return "saelens"
    if names & {"params.npz", "params.safetensors"}:
        return "gemmascope"
    if "ae.pt" in names:
        return "dictionary_learning"
    if {"cfg.json", "sae.safetensors"} <= names:
        from pipeline.sae.io import _read_json

        return "native" if "format_version" in _read_json(d / "cfg.json") else "sparsify"
    raise UserError(f"sae.source: {d}: no SAE files recognised (SAELens cfg.json + sae_weights.safetensors, Gemma "
                    "Scope params.npz / params.safetensors, sparsify cfg.json + sae.safetensors, dictionary_learning "
                    "ae.pt + config.json); set sae.source_format if the layout is one of these")


@dataclass
class Resolved:
    folder: Path  # where the files are on this machine
    format: str  # auto resolved later
    reference: dict[str, Any]  # machine-independent description of the source (goes into the provenance)
    model: str | None = None  # the model a registry entry names


def resolve(source: str, fmt: str, cache_dir: str | Path | None = None) -> Resolved:
    """``sae.source`` -> the local folder holding the SAE (downloaded when a hub reference is not cached)."""
    from pipeline.sae.published import hub

    if fmt not in FORMATS:
        raise UserError(f"sae.source_format: {fmt!r} is not allowed (allowed: {', '.join(FORMATS)})")
    if source.startswith("saelens:"):
        from pipeline.sae.published.saelens import resolve_release

        release, _, sae_id = source[len("saelens:"):].partition("/")
        if not release or not sae_id:
            raise UserError(f"sae.source: {source!r} needs saelens:<release>/<sae id>")
        repo, path, rfmt, model = resolve_release(release, sae_id)
        folder = hub.download(repo, path, None, cache_dir)
        return Resolved(folder, rfmt if fmt == "auto" else fmt,
                        {"kind": "saelens", "release": release, "id": sae_id, "repo_id": repo, "path": path,
                         "commit": _commit(folder)}, model)
    if source.startswith("hf:"):
        repo, path, revision = hub.parse_ref(source[3:])
        folder = hub.download(repo, path, revision, cache_dir)
        return Resolved(folder, fmt, {"kind": "hub", "repo_id": repo, "path": path, "revision": revision,
                                      "commit": _commit(folder)})
    folder = Path(source).expanduser()
    if not folder.is_dir():
        raise UserError(f"sae.source: {source!r} is neither 'train', an existing folder, hf:<owner>/<repo>[/<path>] "
                        "nor saelens:<release>/<id>")
    return Resolved(folder, fmt, {"kind": "local", "path": source})


def _commit(folder: Path) -> str | None:
    m = re.search(r"/snapshots/([0-9a-f]{40})(/|$)", folder.as_posix())
    return m.group(1) if m else None


def model_key(name: str) -> str:
    """A model name compared across tools: the last path component, lower case, TransformerLens aliases resolved."""
    base = name.lower().rstrip("/").split("/")[-1]
    return {"gpt2-small": "gpt2", "smollm2-135m": "smollm2-135m-instruct"}.get(base, base)


def check_and_map(f: Foreign, hooks: list[str], model_name: str, d_model: dict[str, int], source: str) -> str:
    """This pipeline's hook for the imported SAE, after checking hook, model and d_model against the params (a
    transcoder: the hook it reads; :func:`check_transcoder` sets the one it predicts as ``cfg.hook_out``)."""
    if getattr(f.sae, "is_transcoder", False):
        return check_transcoder(f, hooks, model_name, d_model, source)
    ours = map_hook(f.hook)
    if f.hook and ours is None:
        raise UserError(f"sae.source: {source}: the SAE's hook {f.hook!r} has no equivalent among this pipeline's "
                        "hooks (layers.{i}.resid_post | mlp_out | attn_out | embed)")
    if ours is None:
        if len(hooks) != 1:
            raise UserError(f"sae.source: {source}: the files do not name a hook; set extract.hooks to the one it reads")
        ours = hooks[0]
        log.warning("%s: the files do not name a hook; taking extract.hooks' %s", source, ours)
    shown = f" ({f.hook})" if f.hook and f.hook != ours else ""
    if hooks != [ours]:
        raise UserError(f"sae.source: {source} reads {ours}{shown}, extract.hooks is {hooks}: set extract.hooks: [{ours}]")
    if f.model and model_key(f.model) != model_key(model_name):
        raise UserError(f"sae.source: {source} was trained on {f.model}, model.name is {model_name}: set model.name "
                        "to the SAE's model")
    check_gemma_site(ours, f.model or model_name, f"sae.source: {source}")
    have = d_model.get(ours)
    if have is not None and have != f.sae.cfg.d_in:
        raise UserError(f"sae.source: {source} has d_in {f.sae.cfg.d_in}, the activations of {ours} have d_model {have} "
                        f"(model.name {model_name})")
    return ours


def _pair_from(hooks: list[str], f: Foreign, source: str) -> tuple[str, str]:
    """A transcoder's hooks when its files name only one side (or none): the other from the same block."""
    ours_in, ours_out = map_pair(f.hook, f.hook_out)
    if ours_in is None and ours_out is None:
        ins = [h for h in hooks if h.endswith(".mlp_in")]
        if len(ins) != 1:
            raise UserError(f"sae.source: {source}: the files do not name the transcoder's hooks; set extract.hooks to "
                            "the pair it reads and predicts, [layers.{i}.mlp_in, layers.{i}.mlp_out]")
        ours_in = ins[0]
        log.warning("%s: the files do not name the transcoder's hooks; taking extract.hooks' %s", source, ours_in)
    if ours_in is None:
        ours_in = ours_out[: -len("mlp_out")] + "mlp_in"
    return ours_in, ours_out or ours_in[: -len("mlp_in")] + "mlp_out"


def check_transcoder(f: Foreign, hooks: list[str], model_name: str, d_model: dict[str, int], source: str) -> str:
    """:func:`check_and_map` for a transcoder: it reads ``layers.{i}.mlp_in`` and predicts the same block's
    ``layers.{i}.mlp_out``, both of which extract.hooks must list (and nothing else)."""
    ours_in, ours_out = map_pair(f.hook, f.hook_out)
    if f.hook and ours_in is None:
        why = why_not_ours(f.hook)
        raise UserError(f"sae.source: {source}: the transcoder's input hook {f.hook!r} has no equivalent among this "
                        f"pipeline's hooks (layers.{{i}}.mlp_in, the MLP's input after its norm){': ' + why if why else ''}")
    if f.hook_out and (ours_out is None or not ours_out.endswith(".mlp_out")):
        raise UserError(f"sae.source: {source}: the transcoder's output hook {f.hook_out!r} is not an MLP output this "
                        "pipeline records (layers.{i}.mlp_out)")
    ours_in, ours_out = _pair_from(hooks, f, source)
    if ours_in[: -len("mlp_in")] != ours_out[: -len("mlp_out")]:
        raise UserError(f"sae.source: {source} reads {ours_in} but predicts {ours_out}: this pipeline's transcoders "
                        "predict the MLP output of the block whose MLP input they read")
    shown = f" ({f.hook})" if f.hook and f.hook != ours_in else ""
    shown_out = f" ({f.hook_out})" if f.hook_out and f.hook_out != ours_out else ""
    if sorted(hooks) != sorted([ours_in, ours_out]):
        raise UserError(f"sae.source: {source} is a transcoder reading {ours_in}{shown} and predicting "
                        f"{ours_out}{shown_out}, extract.hooks is {hooks}: set extract.hooks: [{ours_in}, {ours_out}]")
    if f.model and model_key(f.model) != model_key(model_name):
        raise UserError(f"sae.source: {source} was trained on {f.model}, model.name is {model_name}: set model.name "
                        "to the SAE's model")
    check_gemma_site(ours_out, f.model or model_name, f"sae.source: {source}")
    for h in (ours_in, ours_out):
        have = d_model.get(h)
        if have is not None and have != f.sae.cfg.d_in:
            raise UserError(f"sae.source: {source} has width {f.sae.cfg.d_in}, the activations of {h} have d_model "
                            f"{have} (model.name {model_name})")
    f.sae.cfg.hook_out = ours_out
    return ours_in


def import_published(source: str, fmt: str, hooks: list[str], model_name: str, d_model: dict[str, int],
                     out_root: Path, cache_dir: str | Path | None = None) -> dict[str, Any]:
    """Import ``source`` as ``out_root/<hook>/`` (``sae.safetensors`` + ``cfg.json`` + ``provenance.json``).

    ``d_model``: {hook: width of its activations} as extracted (the check of the SAE's d_in). Returns the
    provenance (source reference, format, the files' sha256, the source's own hook / model names).
    """
    from pipeline.sae.io import save_sae

    r = resolve(source, fmt, cache_dir)
    fmt = detect_format(r.folder) if r.format == "auto" else r.format
    f = _reader(fmt)(r.folder)
    if f.model is None and r.model:
        f.model = r.model
    hook = check_and_map(f, hooks, model_name, d_model, source)
    f.sae.cfg.hook = hook
    files = {_rel(p, r.folder): sha256_file(p) for p in f.files}
    prov = {"source": source, "format": fmt, "reference": r.reference, "hook": hook,
            "source_hook": f.hook, "source_model": f.model, "files_sha256": files,
            "digest": json_digest(files), "architecture": f.sae.cfg.arch, "d_in": f.sae.cfg.d_in,
            "d_sae": f.sae.cfg.d_sae, "notes": f.notes}
    if getattr(f.sae, "is_transcoder", False):  # the hook it predicts, ours and the source's
        prov |= {"hook_out": f.sae.cfg.hook_out, "source_hook_out": f.hook_out}
    out = out_root / hook
    save_sae(f.sae, out, training={"imported": prov})
    atomic_write_json(out / PROVENANCE, prov)
    log.info("imported %s (%s, %s %d -> %d) as %s", source, fmt, f.sae.cfg.arch, f.sae.cfg.d_in, f.sae.cfg.d_sae, out)
    return prov


def source_versions() -> dict[str, str]:
    """``versions.<package>`` of the packages behind the import (the hub client, and the source libraries when
    installed: their files' layouts are what the importers follow)."""
    from importlib import metadata

    out = {}
    for name in ("huggingface-hub", "safetensors", "sae-lens", "eai-sparsify", "dictionary-learning"):
        try:
            out[f"versions.{name}"] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[f"versions.{name}"] = "not installed"
    return out


def _rel(p: Path, folder: Path) -> str:
    try:
        return p.relative_to(folder).as_posix()
    except ValueError:
        return "../" + p.name  # a run config one folder up (sparsify)
