"""What makes ``fit: finetune`` practical on a CPU (issue 16): length-bucketed batches and a resumable checkpoint.

- ``bucket_batches``: each epoch, rows are shuffled, cut into windows of ``window`` batches, sorted by token
  length within a window and cut into batches, whose order is shuffled again. A batch then pads to a length
  close to its rows' own (the label stage sorts likewise), while every epoch still sees a new order.
- ``save_checkpoint`` / ``load_checkpoint``: after each epoch, everything the next epoch depends on (trainable
  weights, head, optimiser, schedule, both random generators, early-stopping state) goes into one file, written
  atomically. A run started again with the same inputs and settings (``fingerprint``) continues after the last
  finished epoch and ends with the same weights as a run never stopped; a checkpoint of other inputs is ignored.
"""

from __future__ import annotations

import io
import logging
import os

from slimflow.storage.fs import atomic_write_bytes, join

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
BUCKET_WINDOW = 50  # batches sorted together: long enough to pad little, short enough to keep epochs varied


def bucket_batches(lengths, batch_size: int, generator, window: int = BUCKET_WINDOW) -> list[list[int]]:
    """Row indices in batches of ``batch_size``, length-bucketed as the module says; every row exactly once."""
    import torch

    n = len(lengths)
    perm = torch.randperm(n, generator=generator).tolist()
    batches: list[list[int]] = []
    span = batch_size * window
    for start in range(0, n, span):
        chunk = sorted(perm[start : start + span], key=lambda i: lengths[i])
        batches += [chunk[j : j + batch_size] for j in range(0, len(chunk), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


def random_batches(n: int, batch_size: int, generator) -> list[list[int]]:
    """The recipe before issue 16: a random permutation cut into batches (each padded to its longest row)."""
    import torch

    return [b.tolist() for b in torch.randperm(n, generator=generator).split(batch_size)]


def trainable_state(model, buffers: bool = False) -> dict:
    """A CPU copy of the parameters that train (a frozen embedding table is left out: it is the base model's);
    with ``buffers``, the whole state dict (a head's standardisation buffers included)."""
    if buffers:
        return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return {k: v.detach().cpu().clone() for k, v in model.named_parameters() if v.requires_grad}


def save_checkpoint(folder: str, state: dict) -> None:
    """``state`` (tensors, numbers, lists, dicts) as ``folder/checkpoint.pt``, atomically."""
    import torch

    os.makedirs(folder, exist_ok=True)
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(join(folder, CHECKPOINT), buf.getvalue())


def load_checkpoint(folder: str, fingerprint: str) -> dict | None:
    """The checkpoint in ``folder`` if it was written by a run with this ``fingerprint``, else None."""
    import torch

    path = join(folder, CHECKPOINT)
    if not os.path.isfile(path):
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain data: no pickled code
    except (OSError, RuntimeError, ValueError, EOFError) as e:
        log.warning("ignoring the fine-tuning checkpoint %s (%s): starting from the first epoch", path, e)
        return None
    if state.get("fingerprint") != fingerprint:
        log.warning("the fine-tuning checkpoint %s is of other data or settings: starting from the first epoch", path)
        return None
    return state
