"""Single-node data parallelism: process group set-up from the torchrun environment, collectives
and the rules that divide work among ranks.

Launch: ``torchrun --nproc_per_node=N -m sdpo.cli train --config run.toml``. torchrun sets
``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (with ``MASTER_ADDR``/``MASTER_PORT``);
``init_from_env`` joins the group: NCCL with device ``cuda:LOCAL_RANK`` on CUDA, gloo on CPU.
Without those variables (a plain ``sdpo train``) nothing here touches ``torch.distributed``:
every helper answers as a world of one (``world() == 1``, ``rank() == 0``, collectives return
their input), and the single-process code paths run unchanged, bit for bit.

Gradient reduction (see ``DPOTrainer.train_step``): an explicit SUM all-reduce of every
gradient after a step's last micro-batch, not ``DistributedDataParallel``. Reasons: (1) exact
and simple: each rank accumulates its share of the step's micro-batches with the loss divided by
the step's *global* pair count, so the summed gradient is the single-process gradient, whatever
the number of micro-batches per rank (ranks may even have none); DDP averages (divides by the
world size) and needs the same number of backward calls on every rank; (2) the lm_head weight's
gradient is written by a custom ``autograd.Function`` (the fused log-prob head) and the model is
called through attributes (``lm_head_weight``, ``attn_backend``) that a DDP wrapper hides; an
explicit reduction sees ``p.grad`` whatever produced it; (3) checkpoints and the optimizer keep
the plain module. The cost: no overlap of communication with the backward pass. The gradients
are flattened into one buffer per dtype, so a step costs one all-reduce (per dtype), plus one
small all-reduce of the step's metric sums and stop flag.
"""

from __future__ import annotations

import datetime
import os
import pickle
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def launched() -> bool:
    """Whether this process was started by torchrun (or the like) as part of a larger world."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def _dist():
    import torch.distributed as dist

    return dist


def initialized() -> bool:
    """Whether a process group is up (this module's or the caller's)."""
    return _dist().is_available() and _dist().is_initialized()


def world() -> int:
    return _dist().get_world_size() if initialized() else 1


def rank() -> int:
    return _dist().get_rank() if initialized() else 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0")) if initialized() else 0


def is_main() -> bool:
    return rank() == 0


def active() -> bool:
    """Data parallelism is on: a process group with more than one rank."""
    return world() > 1


def device() -> torch.device:
    """This rank's device: ``cuda:LOCAL_RANK`` on CUDA, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank()) if initialized() else torch.device("cuda")
    return torch.device("cpu")


def init_from_env(*, timeout_minutes: float = 30.0) -> bool:
    """Join the process group described by the torchrun environment; returns whether one is up.

    Idempotent; without ``WORLD_SIZE``/``RANK`` in the environment it does nothing (returns
    False unless the caller initialised a group itself). A ``WORLD_SIZE`` of 1 still forms a
    group of one, which behaves like a plain run."""
    if initialized():
        return True
    if not launched():
        return False
    dist = _dist()
    missing = [v for v in ENV_VARS if v not in os.environ]
    if missing:
        raise RuntimeError(
            f"distributed launch: {', '.join(missing)} not set; start with "
            "`torchrun --nproc_per_node=N -m sdpo.cli train ...`"
        )
    if torch.cuda.is_available():
        lr = int(os.environ["LOCAL_RANK"])
        if lr >= torch.cuda.device_count():
            raise RuntimeError(
                f"LOCAL_RANK {lr} but only {torch.cuda.device_count()} CUDA device(s) are "
                "visible: use --nproc_per_node <= the number of GPUs of the node"
            )
        torch.cuda.set_device(lr)
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    return True


def shutdown(*, wait: bool = False) -> None:
    """Leave the process group. ``wait``: first a barrier, so that no rank tears its group down
    while a peer still finishes its last collectives (gloo aborts the process when that races);
    only on a clean exit, where every rank reaches this point."""
    if initialized():
        if wait:
            barrier()
        _dist().destroy_process_group()


# -- collectives (identity in a world of one) -------------------------------------------------
def barrier() -> None:
    if active():
        _dist().barrier()


def all_reduce_sum(tensors: Sequence[Tensor], *, bucket_bytes: int = 256 * 2**20) -> None:
    """Sum each tensor over ranks, in place. Tensors of one dtype and device are flattened into
    buckets of at most ``bucket_bytes`` (a larger tensor goes alone), one collective each."""
    if not active() or not tensors:
        return
    groups: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    for group in groups.values():
        bucket: list[Tensor] = []
        size = 0
        for t in group:
            nbytes = t.numel() * t.element_size()
            if bucket and size + nbytes > bucket_bytes:
                _reduce_bucket(bucket)
                bucket, size = [], 0
            bucket.append(t)
            size += nbytes
        if bucket:
            _reduce_bucket(bucket)


def _reduce_bucket(bucket: list[Tensor]) -> None:
    dist = _dist()
    if len(bucket) == 1 and bucket[0].is_contiguous():
        dist.all_reduce(bucket[0], op=dist.ReduceOp.SUM)
        return
    flat = torch.cat([t.reshape(-1) for t in bucket])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for t in bucket:
        n = t.numel()
        t.copy_(flat[offset : offset + n].view_as(t))
        offset += n


def any_rank(flag: bool) -> bool:
    """Whether ``flag`` is true on any rank (a collective: every rank must call it)."""
    if not active():
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device())
    _dist().all_reduce(value, op=_dist().ReduceOp.MAX)
    return bool(value.item() > 0)


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (picklable objects; tensors should be on the CPU)."""
    if not active():
        return [obj]
    out: list[Any] = [None] * world()
    _dist().all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not active():
        return obj
    box = [obj if is_main() else None]
    _dist().broadcast_object_list(box, src=0)
    return box[0]


def same_on_all_ranks(obj: Any) -> bool:
    """Whether ``obj`` pickles to the same bytes on every rank (a consistency check)."""
    if not active():
        return True
    blobs = all_gather_object(pickle.dumps(obj))
    return all(b == blobs[0] for b in blobs)


# -- shard rules -------------------------------------------------------------------------------
def balanced_owners(sizes: Sequence[int], world_size: int) -> list[int]:
    """The rank that owns each item: largest first, each to the rank with the fewest units so
    far (ties: the lower rank; equal sizes: the earlier item). Deterministic, so every rank
    computes the same assignment without communicating."""
    load = [0] * world_size
    owners = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        r = min(range(world_size), key=lambda r: (load[r], r))
        owners[i] = r
        load[r] += sizes[i]
    return owners


def contiguous_bounds(sizes: Sequence[int], world_size: int) -> list[tuple[int, int]]:
    """``world_size`` contiguous ranges ``[start, end)`` over the items, about equal in total
    size: item i goes to rank ``floor(world_size * m_i / total)`` where ``m_i`` is the running
    total at the item's middle (non-decreasing, so the ranges are contiguous; some may be
    empty when there are fewer items than ranks)."""
    total = sum(sizes)
    counts = [0] * world_size
    running = 0
    for i, s in enumerate(sizes):
        middle = running + s / 2
        running += s
        r = int(world_size * middle / total) if total > 0 else i * world_size // len(sizes)
        counts[min(r, world_size - 1)] += 1
    bounds, start = [], 0
    for c in counts:
        bounds.append((start, start + c))
        start += c
    return bounds
