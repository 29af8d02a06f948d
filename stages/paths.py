"""Where stages hand data to each other (the layout dvc.yaml declares), relative to the repository root.

Each stage keeps the names of its own metrics/plots/report files next to its code; the locations
one stage writes and others read live here, once.
"""

from pathlib import Path

TOKENS = Path("data/tokens")  # prepare -> contexts.parquet, documents.parquet
CONTEXTS = TOKENS / "contexts.parquet"
ACTIVATIONS = Path("data/activations")  # extract -> <split>/<hook>/
MODELS = Path("models/sae")  # train -> <hook>/sae.safetensors + cfg.json
INTERPRET = Path("data/interpret")  # interpret -> <hook>/features.parquet, examples.parquet
