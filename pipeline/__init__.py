"""sae-pipeline: sparse-autoencoder dictionary learning on language-model activations.

The library is pure and typed; it never reads ``params.yaml`` (stages do, see ``stages/``).
"""

__version__ = "0.1.0"
