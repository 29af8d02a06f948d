"""SAEBench result files (pipeline/saebench/results.py): every file validates against the JSON schema
shipped in the sae-bench package, and SAEBench's own reading code (graphing_utils) loads them."""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.saebench import core, probing, results, run

jsonschema = pytest.importorskip("jsonschema")
sae_bench = pytest.importorskip("sae_bench")
EVALS = Path(sae_bench.__file__).parent / "evals"
SCHEMAS = {"core": "core/eval_output_schema_core.json",
           "sparse_probing": "sparse_probing/eval_output_schema_sparse_probing.json",
           "absorption": "absorption/eval_output_schema_absorption_first_letter.json",
           "autointerp": "autointerp/eval_output_schema_autointerp.json"}
HOOK = "layers.1.resid_post"


def _sae():
    from pipeline.sae import SAEConfig, make_sae

    return make_sae(SAEConfig(arch="topk", d_in=8, d_sae=32, k=4, hook=HOOK), seed=0).eval()


def _payloads() -> dict[str, dict]:
    sae = _sae()
    cfg_dict = results.sae_cfg_dict({"architecture": "topk", "d_in": 8, "d_sae": 32, "k": 4, "hook": HOOK,
                                     "training": {"n_tokens": 1000}}, "tiny", "float32")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=g)
    stats = core.reconstruction_stats([(x, torch.arange(64))], sae.encode, sae.decode, 32, {0}, 1000)
    splice = {"ce_loss_without_sae": 2.0, "ce_loss_with_sae": 2.2, "ce_loss_with_ablation": 6.0, "ce_loss_score": 0.95,
              "kl_div_with_sae": 0.1, "kl_div_with_ablation": 3.0, "kl_div_score": 0.967, "n_predictions": 120}
    rng = np.random.default_rng(0)
    labels = np.repeat(["a", "b"], 20)
    split = np.tile([0, 0, 0, 1, 2], 8)
    llm = rng.normal(size=(40, 8)) + 2 * (labels == "a")[:, None]
    probe = probing.sparse_probing(llm, sae.encode(torch.from_numpy(llm).float()).detach().numpy(), labels, split,
                                   [1, 2], 0, 50)
    absorb = {"mean": {"mean_absorption_fraction_score": 0.1, "mean_full_absorption_score": 0.05,
                       "mean_num_split_features": 1.2, "std_dev_absorption_fraction_score": 0.02,
                       "std_dev_full_absorption_score": 0.01, "std_dev_num_split_features": 0.4},
              "letters": {"a": {"present": True, "mean_absorption_fraction": 0.1, "full_absorption_rate": 0.05,
                                "num_full_absorption": 1, "num_probe_true_positives": 20, "split_feats": [3]},
                          "b": {"present": False}}}
    return {
        "core": results.core_file(stats, splice, run.feature_metrics(sae), {"model_name": "tiny"}, HOOK, cfg_dict),
        "sparse_probing": results.sparse_probing_file(probe, {"model_name": "tiny", "k_values": [1, 2]}, HOOK,
                                                      cfg_dict, [1, 2]),
        "absorption": results.absorption_file(absorb, {"model_name": "tiny"}, HOOK, cfg_dict),
        "autointerp": results.autointerp_file(0.7, 0.1, 30, "stats", "simulator", {"model_name": "tiny"}, HOOK, cfg_dict),
    }


def test_every_file_validates_against_the_saebench_schema():
    for eval_dir, payload in _payloads().items():
        schema = json.loads((EVALS / SCHEMAS[eval_dir]).read_text())
        jsonschema.validate(json.loads(json.dumps(payload)), schema)
        assert payload["sae_cfg_dict"]["architecture"] == "topk" and payload["sae_cfg_dict"]["d_sae"] == 32


def test_schema_rejects_a_missing_metric():
    """The check has teeth: a core file without its L0 does not validate."""
    payload = _payloads()["core"]
    del payload["eval_result_metrics"]["sparsity"]["l0"]
    schema = json.loads((EVALS / SCHEMAS["core"]).read_text())
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(payload, schema)


def test_absorption_not_evaluated_writes_no_file():
    assert results.absorption_file({"mean": None, "letters": {}}, {}, HOOK, {}) is None


def _graphing_utils(monkeypatch: pytest.MonkeyPatch):
    """SAEBench's reader, imported with its plotting-only dependencies stubbed when they are not installed."""
    for name in ("plotly", "plotly.graph_objects", "seaborn"):
        try:
            __import__(name)
        except ImportError:
            monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    path = Path(sae_bench.__file__).parent / "sae_bench_utils" / "graphing_utils.py"
    spec = importlib.util.spec_from_file_location("saebench_graphing_utils", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def test_saebench_reader_loads_the_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    files = {e: results.write(tmp_path, e, HOOK, p) for e, p in _payloads().items()}
    assert files["core"] == tmp_path / "core" / f"sae-pipeline_{HOOK}_eval_results.json"
    gu = _graphing_utils(monkeypatch)
    got = gu.get_eval_results([str(f) for f in files.values()])
    key = f"sae-pipeline_{HOOK}"
    assert got[key]["sae_class"] == "topk" and got[key]["train_tokens"] == 1000
    core_res = gu.get_core_results([str(files["core"])])
    assert core_res[key]["ce_loss_score"] == 0.95 and core_res[key]["l0"] > 0
    sp = gu.get_eval_results([str(files["sparse_probing"])])[key]
    assert 0 <= sp["sae_top_1_test_accuracy"] <= 1
