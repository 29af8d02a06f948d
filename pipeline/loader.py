"""The training data stream: seeded epochs over an activation dataset, read ahead by a thread.

The stream is a pure function of (dataset, batch_size, seed): step ``s`` is batch ``s % B`` of
epoch ``s // B`` (``B`` full batches per epoch; the last partial batch is dropped so every step
sees the same number of tokens), and each epoch reshuffles with a seed derived from
``(seed, epoch)``. So a checkpoint only needs the step to resume the data exactly. Its batches are read in
lanes (:mod:`pipeline.lanes`): a data-parallel process reads, hashes and decodes only the
shards and row groups that hold its rows, and the batches are those of one process.

Reading and decoding Parquet happens in a background thread (pyarrow and numpy release the GIL),
``prefetch`` batches ahead, with bounded memory: at most ``prefetch`` batches plus the dataset's
shuffle buffer are in host memory, whatever the dataset size. On CUDA the thread pins each batch
and the copy to the GPU is issued one batch ahead on a side stream, so it overlaps the current step.

A transcoder's stream is paired (``target``: the MLP-output dataset of an MLP-input ``dataset``,
:mod:`pipeline.pairs`): both datasets are cut by the same lanes with the same seeds, so batch ``b`` of
the target holds the targets of batch ``b``'s input rows in the same order (checked row by row); a
batch is then ``[B, 2·d_model]``, input columns then target columns.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Generator, Iterable, Iterator

import numpy as np
import torch

from pipeline.activations import ActivationDataset
from pipeline.activations.reader import ActivationBatch
from pipeline.errors import UserError
from pipeline.lanes import LoaderWork, lane_batches
from pipeline.pairs import check_rows, joined

_DONE = object()


def epoch_seed(seed: int, epoch: int) -> int:
    """Independent shuffle seed per epoch (SeedSequence mixes the pair, so nearby seeds don't collide)."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def batches_per_epoch(dataset: ActivationDataset, batch_size: int, key: str = "train.batch_size") -> int:
    n = dataset.n_tokens // batch_size
    if n == 0:
        raise UserError(f"{key}: {batch_size} is larger than the {dataset.n_tokens} tokens in {dataset.root}")
    return n


def _paired(inputs: Iterator[ActivationBatch], targets: Iterator[ActivationBatch], dataset: ActivationDataset,
            target: ActivationDataset) -> Iterator[ActivationBatch]:
    """Two aligned streams in lockstep -> batches of ``[rows, 2·d_model]`` (input then target columns)."""
    for x, y in zip(inputs, targets, strict=True):
        check_rows(x, y, dataset.root, target.root)
        yield ActivationBatch(joined(x, y), x.context_id, x.position, x.token_id)


def _epoch_batches(dataset: ActivationDataset, batch_size: int, epoch_seed_: int, start_batch: int,
                   part: tuple[int, int], dtype: torch.dtype, work: LoaderWork | None,
                   target: ActivationDataset | None) -> Iterator[ActivationBatch]:
    stream = lane_batches(dataset, batch_size, epoch_seed_, start_batch=start_batch, part=part, dtype=dtype, work=work)
    if target is None:
        return stream
    return _paired(stream, lane_batches(target, batch_size, epoch_seed_, start_batch=start_batch, part=part,
                                        dtype=dtype, work=work), dataset, target)


def _host_batches(dataset: ActivationDataset, batch_size: int, seed: int, start_step: int, total_steps: int,
                  dtype: torch.dtype, pin: bool, part: tuple[int, int] = (0, 1),
                  work: LoaderWork | None = None, target: ActivationDataset | None = None) -> Iterator[torch.Tensor]:
    """CPU tensors [batch_size / world, d_model] (``part=(rank, world)``) for steps start_step..total_steps-1
    (with ``target``: [batch_size / world, 2·d_model], input then target columns)."""
    per_epoch = batches_per_epoch(dataset, batch_size)
    step = start_step
    while step < total_steps:
        epoch, first = divmod(step, per_epoch)
        stream = _epoch_batches(dataset, batch_size, epoch_seed(seed, epoch), first, part, dtype, work, target)
        for batch in stream:
            acts = batch.acts.pin_memory() if pin else batch.acts
            yield acts
            step += 1
            if step >= total_steps or step % per_epoch == 0:
                break
        else:  # the dataset yielded fewer batches than its manifest promises
            raise UserError(f"{dataset.root}: stream ended at batch {step % per_epoch} of {per_epoch}; "
                            f"the manifest's token count does not match the shards")


class _Prefetcher:
    """Run a generator in a daemon thread, ``depth`` items ahead; re-raise its exceptions in the consumer."""

    def __init__(self, gen: Iterator[torch.Tensor], depth: int):
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(gen,), daemon=True, name="sae-prefetch")
        self._thread.start()

    def _put(self, item: object) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, gen: Iterator[torch.Tensor]) -> None:
        try:
            for item in gen:
                if not self._put(item):
                    return
            self._put(_DONE)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which re-raises it
            self._put(e)

    def __iter__(self) -> Iterator[torch.Tensor]:
        try:
            while True:
                item = self._q.get()
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def first_batch(dataset: ActivationDataset, batch_size: int, seed: int,
                target: ActivationDataset | None = None) -> ActivationBatch:
    """Step 0's whole batch (every row, whatever the process): what the data-dependent initialisation sees
    (with ``target``: acts ``[B, 2·d_model]``, input then target columns)."""
    return next(_epoch_batches(dataset, batch_size, epoch_seed(seed, 0), 0, (0, 1), torch.float32, None, target))


def train_batches(dataset: ActivationDataset, batch_size: int, seed: int, start_step: int, total_steps: int,
                  device: torch.device, prefetch: int, part: tuple[int, int] = (0, 1),
                  work: LoaderWork | None = None,
                  target: ActivationDataset | None = None) -> Generator[torch.Tensor, None, None]:
    """Float32 (CPU) or storage-dtype-then-float32 (CUDA) batches ``acts [batch_size, d_model]`` on ``device``.

    ``part=(rank, world)``: this data-parallel process's ``batch_size / world`` rows of each batch (see
    :mod:`pipeline.lanes`): the global stream, hence resume, does not depend on the world size.
    ``work`` counts what this process's reader read and decoded. ``target`` pairs the stream (module docstring):
    batches ``[batch_size, 2·d_model]``."""
    on_cuda = device.type == "cuda"
    # On CUDA ship the storage dtype (half the bytes for fp16) and widen on the GPU.
    host_dtype = torch.float16 if (on_cuda and dataset.manifest.dtype == "float16") else torch.float32
    gen = _host_batches(dataset, batch_size, seed, start_step, total_steps, host_dtype, pin=on_cuda, part=part,
                        work=work, target=target)
    prefetcher = _Prefetcher(gen, prefetch) if prefetch > 0 else None
    host = prefetcher if prefetcher is not None else gen
    try:
        yield from (_side_stream_copies(host, device) if on_cuda else host)
    finally:  # the consumer stopped (finished, raised, or was killed): stop the reader thread now
        if prefetcher is not None:
            prefetcher.close()


def _side_stream_copies(host: Iterable[torch.Tensor], device: torch.device) -> Iterator[torch.Tensor]:
    """Pinned host batches -> float32 device batches, each copy issued one batch ahead on a side stream.

    A non-blocking copy on the compute stream would still queue behind the current step's kernels; on its own
    stream the copy of batch i+1 runs while step i computes. The compute stream waits on the copy's event before
    using the batch, and ``record_stream`` tells the caching allocator the batch is used there.
    """
    copy_stream = torch.cuda.Stream(device)
    compute = torch.cuda.current_stream(device)

    def issue(acts: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event]:
        with torch.cuda.stream(copy_stream):
            on_dev = acts.to(device, non_blocking=True)  # the pinned block is not reused before this copy ends
            done = torch.cuda.Event()
            done.record(copy_stream)
        return on_dev, done

    it = iter(host)
    first = next(it, None)
    pending = issue(first) if first is not None else None
    while pending is not None:
        on_dev, done = pending
        following = next(it, None)
        pending = issue(following) if following is not None else None
        compute.wait_event(done)
        on_dev.record_stream(compute)
        yield on_dev.float()


__all__ = ["train_batches", "first_batch", "batches_per_epoch", "epoch_seed", "LoaderWork"]
