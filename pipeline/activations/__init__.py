"""Activation datasets: a directory of Parquet shards + ``manifest.json``. Public API.

Layout of one dataset (one hook, one split)::

    manifest.json          model, tokenizer, corpus, hook, d_model, dtype, shards (rows, sha256)
    shard-00000.parquet    rows: context_id:int32, position:int16|int32, token_id:int32, act:fixed_size_binary
    shard-00000.parquet.sha256   sha256 of the shard's bytes as written (extract's resume keeps a shard only if it matches)
    shard-00001.parquet    ...

The activation vector is stored as ``fixed_size_binary(d_model * itemsize)``: measured on the
development CPU, it streams ~10x faster than ``list<float16>`` because decoding is a
zero-copy ``np.frombuffer`` of the column's data buffer. Shards appear only complete
(temp name -> fsync -> ``os.replace``); readers ignore temp names and check each shard's sha256
against the manifest before using any of its rows.

Users can bring their own activations: :func:`write_activations` (one call) or
:class:`ActivationWriter` (shard by shard), then :func:`open_activations` and ``iter_batches``.
"""

from pipeline.activations.format import FORMAT_VERSION, MANIFEST, Manifest, ShardInfo, sha256_file, shard_name
from pipeline.activations.reader import ActivationBatch, ActivationDataset, open_activations
from pipeline.activations.writer import ActivationWriter, write_activations

__all__ = ["ActivationBatch", "ActivationDataset", "ActivationWriter", "FORMAT_VERSION", "MANIFEST", "Manifest",
           "ShardInfo", "open_activations", "sha256_file", "shard_name", "write_activations"]
