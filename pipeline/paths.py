"""Where stages hand data to each other (the layout dvc.yaml declares), relative to the repository root.

The locations one stage writes and others read live here, once, in the library: the stages
(``stages/``) and the library's readers that gather every stage's outputs (``pipeline.report.inputs``,
``pipeline.tracking.record``, ``pipeline.frontier``) import them from this module, so the library
never reaches up into the CLI. A file only its own stage touches keeps its name next to that stage.
"""

from pathlib import Path

TOKENS = Path("data/tokens")  # prepare -> contexts.parquet, documents.parquet
CONTEXTS = TOKENS / "contexts.parquet"
ACTIVATIONS = Path("data/activations")  # extract -> <split>/<hook>/ (manifest.json + shards)
MODELS = Path("models/sae")  # train -> <hook>/sae.safetensors + cfg.json
INTERPRET = Path("data/interpret")  # interpret -> <hook>/features.parquet, examples.parquet
METRICS = Path("metrics")  # every stage -> <stage>.json: its headline numbers, the DVC metric (pipeline.headline)
RESULTS = Path("results")  # every stage -> <stage>.json: everything it measured (report, MLflow, sae verify)
PLOTS = Path("plots")  # DVC plots: train/<hook>.csv (training curves), evaluate/, steer/
TRAIN_CURVES = PLOTS / "train"
DASHBOARD = Path("reports/features")  # interpret -> index.html
STEER_FIGURES = Path("reports/steer")  # steer -> *.png
