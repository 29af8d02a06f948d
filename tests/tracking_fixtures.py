"""A fabricated workspace with every file the report stage reads (shared by test_tracking and test_report).

Small hand-written values, so the tests can assert on exact numbers in the MLflow run and the report.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import yaml

from pipeline.headline import headline
from pipeline.testing import default_params

HOOK = "layers.1.resid_post"
CURVE = [(0, 1.0, 100.0, 0.9, 0.0), (10, 0.7, 50.0, 0.5, 0.1), (20, 0.5, 32.0, 0.3, 0.05)]
METRICS = {
    "prepare": {"n_contexts": 100, "n_tokens@1": 12800},
    "extract": {HOOK: {"n_tokens": 12800, "tokens_per_s": 1500.0}},
    "train": {HOOK: {"loss": 0.5, "l0@1": 31.5, "fvu@2": 0.3, "tokens_per_s": 1000.0}},
    "evaluate": {HOOK: {"fvu@1": 0.99, "fvu@2": 0.25, "l0@1": 32.0, "ce_loss_recovered@1": 0.9, "mse@1": 0.01}},
    "interpret": {HOOK: {"alive_features": 400, "median_topic_auroc@1": 0.71}},
    "steer": {"overall": {"sae_concept@1": 0.7, "diffmean_concept@1": 0.6, "random_concept@1": 0.1},
              "verdict": "SAE steering beats the random baseline"},
}
FEATURES = [  # feature, frequency, explanation, score, topic_auroc, best_topic
    (i, 0.01 * (i + 1), f"explanation {i}" if i != 3 else "<script>alert(1)</script>", 0.05 * i, 0.5 + 0.01 * i,
     "music") for i in range(12)
]


def write_json(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def minimal_params(root: Path, **sections: dict) -> Path:
    """A complete params file (load_params rejects missing keys): defaults, this hook, ``sections`` on top."""
    data = default_params(extract={"hooks": [HOOK]}, train={"lr": 0.0005})
    for name, values in sections.items():
        data[name].update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(data))
    return root / "params.yaml"


def fabricate_workspace(root: Path, git: bool = False) -> Path:
    """Write every input of the report stage under ``root``; optionally make it a committed git repo."""
    import polars as pl

    root.mkdir(parents=True, exist_ok=True)
    minimal_params(root)
    for stage, values in METRICS.items():  # what the stages write: everything, and its DVC headline
        write_json(root / "results" / f"{stage}.json", values)
        write_json(root / "metrics" / f"{stage}.json", headline(stage, values, [HOOK]))
    curve = root / "plots" / "train" / f"{HOOK}.csv"
    curve.parent.mkdir(parents=True, exist_ok=True)
    curve.write_text("step,loss,l0,fvu,dead_fraction\n" + "".join(",".join(map(str, r)) + "\n" for r in CURVE))
    write_json(root / "data" / "activations" / "train" / HOOK / "manifest.json",
               {"model_id": "tiny/llama", "revision": "main", "weights_hash": "abc123def456", "n_tokens": 12800})
    write_json(root / "models" / "sae" / HOOK / "cfg.json",
               {"architecture": "topk", "d_in": 64, "d_sae": 512, "k": 32, "hook": HOOK})
    feats = root / "data" / "interpret" / HOOK / "features.parquet"
    feats.parent.mkdir(parents=True, exist_ok=True)
    cols = ["feature", "frequency", "explanation", "score", "topic_auroc", "best_topic"]
    pl.DataFrame([dict(zip(cols, r, strict=True)) for r in FEATURES]).write_parquet(feats)
    (root / "reports" / "features").mkdir(parents=True, exist_ok=True)
    (root / "reports" / "features" / "index.html").write_text("<html>dashboard</html>")
    (root / "reports" / "steer").mkdir(parents=True, exist_ok=True)
    (root / "reports" / "steer" / "concept.png").write_bytes(b"\x89PNG\r\n\x1a\nfake")
    if git:
        env = ["-c", "user.email=t@example.com", "-c", "user.name=t"]
        subprocess.run(["git", "init", "-q"], cwd=root, check=True)
        subprocess.run(["git", "add", "-A"], cwd=root, check=True)
        subprocess.run(["git", *env, "commit", "-qm", "init"], cwd=root, check=True)
    return root
