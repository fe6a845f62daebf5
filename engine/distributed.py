"""Single-node data parallelism: process group set-up from the torchrun environment, collectives
and the rules that divide work among ranks.

Launch: ``torchrun --nproc_per_node=N -m sdpo.cli train --config run.toml``. torchrun sets
``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (with ``MASTER_ADDR``/``MASTER_PORT``);
``init_from_env`` joins the group: NCCL with device ``cuda:LOCAL_RANK`` on CUDA, gloo on CPU.
Without those variables (a plain ``sdpo train``) nothing here touches ``torch.distributed``:
every helper answers as a world of one (``world() == 1``, ``rank() == 0``, collectives return
their input), and the single-process code paths run unchanged, bit for bit.

Gradient reduction (see ``DPOTrainer.train_step``): an explicit SUM all-reduce of every
gradient, not ``DistributedDataParallel``. Reasons: (1) exact and simple: each rank accumulates
its share of the step's micro-batches with the loss divided by the step's *global* pair count,
so the summed gradient is the single-process gradient, whatever the number of micro-batches per
rank (ranks may even have none); DDP averages (divides by the world size) and needs the same
number of backward calls on every rank; (2) the lm_head weight's gradient is written by a custom
``autograd.Function`` (the fused log-prob head) and the model is called through attributes
(``lm_head_weight``, ``attn_backend``) that a DDP wrapper hides; an explicit reduction sees
``p.grad`` whatever produced it; (3) checkpoints and the optimizer keep the plain module.

``GradReducer`` overlaps that reduction with the backward pass of a rank's last micro-batch, as
DDP does: the parameters are grouped into buckets of about 25 MB in reverse registration order
(the order in which the backward finishes their gradients), and a bucket's asynchronous
all-reduce starts as soon as the last of its gradients has been accumulated (a
post-accumulate-grad hook). Buckets start strictly in index order, so every rank issues the same
sequence of collectives whatever order its own backward produced them in; a rank with no
micro-batch (or a parameter that got no gradient: an expert no token was routed to) sends zeros
when the step's reduction is finished, a bucket waiting for a gradient that never comes holding
back the buckets after it until then. The gradients end as views into the reduced buckets (no
copy back). Sums are elementwise, so the result is the same as one all-reduce after the backward
(bitwise with two ranks). A step's metric sums and stop flag follow in one small all-reduce,
with a count per parameter of the ranks that had no gradient for it: one that no rank had is
left without a gradient, as in one process (``DPOTrainer._reduce_over_ranks``).
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import importlib
import os
import pickle
import sys
import threading
from collections.abc import Iterable, Mapping, Sequence
from functools import partial
from typing import Any, NoReturn

import numpy as np
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


def backend() -> str | None:
    """The process group's backend ("nccl", "gloo"), or None without a group."""
    return str(_dist().get_backend()) if initialized() else None


def is_main() -> bool:
    return rank() == 0


def active() -> bool:
    """Data parallelism is on: a process group with more than one rank."""
    return world() > 1


def device() -> torch.device:
    """This rank's device: on CUDA the index :func:`cuda_index` picks (``LOCAL_RANK`` in a
    process group, else the current device), else the CPU. sdpo's own runs (``sdpo train``)
    place their model there; ``run_sdpo``, ``DPOTrainer`` and ``score_pairs`` work on the device
    of the model's parameters instead, whatever this says."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    index = cuda_index(
        local_rank=os.environ.get("LOCAL_RANK"),
        in_group=initialized(),
        current=torch.cuda.current_device(),
        count=torch.cuda.device_count(),
    )
    return torch.device("cuda", index)


def cuda_index(*, local_rank: str | None, in_group: bool, current: int, count: int) -> int:
    """The CUDA device index of this process, from ``LOCAL_RANK`` (``local_rank``, the raw
    environment value or None), whether a process group is up, the current device's index and
    the number of visible devices.

    In a process group with ``LOCAL_RANK`` set (torchrun, or a launcher that sets it like
    torchrun): ``LOCAL_RANK``, as ``init_from_env`` made it current. Otherwise the current
    device, which is what a caller that formed its group by hand chose with
    ``torch.cuda.set_device(k)`` before ``init_process_group``; with one GPU per process and no
    such call it is that GPU, 0. A ``LOCAL_RANK`` past the visible devices gives the current
    device where one GPU is visible (a launcher that shows each process only its own GPU,
    ``CUDA_VISIBLE_DEVICES``, numbers it 0 whatever the rank's local index), and is refused
    where several are, as ``init_from_env`` refuses it: there it is a launch of more ranks than
    GPUs, and any fallback would put two ranks on one GPU."""
    if not in_group or local_rank is None:
        return current
    try:
        index = int(local_rank)
    except ValueError:
        raise ValueError(
            f"LOCAL_RANK is {local_rank!r}, not a whole number: set it to this process's index "
            "on its node (torchrun does), or unset it to use the current CUDA device"
        ) from None
    if index < 0:
        raise ValueError(
            f"LOCAL_RANK is {index}: set it to this process's index on its node (0 or more), "
            "or unset it to use the current CUDA device"
        )
    if index < count or count == 1:
        return index if index < count else current
    raise ValueError(
        f"LOCAL_RANK is {index} but only {count} CUDA devices are visible: start at most "
        f"{count} ranks on this node, or show each process its own GPU (CUDA_VISIBLE_DEVICES)"
    )


def init_from_env(*, timeout_minutes: float = 30.0, backend: str | None = None) -> bool:
    """Join the process group described by the torchrun environment; returns whether one is up.

    Idempotent; without ``WORLD_SIZE``/``RANK`` in the environment it does nothing (returns
    False unless the caller initialised a group itself). A ``WORLD_SIZE`` of 1 still forms a
    group of one, which behaves like a plain run. ``backend``: ``"nccl"`` (each rank on
    ``cuda:LOCAL_RANK``) or ``"gloo"`` (CPU tensors, also on a machine with GPUs); default:
    NCCL when CUDA is available, else gloo."""
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
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"backend must be 'nccl' or 'gloo', got {backend!r}")
    if backend == "nccl":
        lr = int(os.environ["LOCAL_RANK"])
        if lr >= torch.cuda.device_count():
            raise RuntimeError(
                f"LOCAL_RANK {lr} but only {torch.cuda.device_count()} CUDA device(s) are "
                "visible: use --nproc_per_node <= the number of GPUs of the node"
            )
        torch.cuda.set_device(lr)
    # torch.distributed.nn.functional takes ``group.WORLD`` as default arguments when it is
    # imported, and torch._dynamo imports it lazily (the model's first init or compile does). Once
    # the group is up, such an import would pin it for the life of the process:
    # destroy_process_group could not free it, and gloo's worker threads would outlive the
    # interpreter's finalization, where one dropping its last tensor aborts the process (see
    # shutdown). Imported first, its defaults hold None.
    importlib.import_module("torch.distributed.nn")

    dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    return True


def shutdown(*, wait: bool = False) -> None:
    """Leave the process group. ``wait``: first a barrier, so that no rank tears its group down
    while a peer still finishes its last collectives (gloo aborts the process when that races);
    only on a clean exit, where every rank reaches this point.

    The group's backend is freed here only if nothing else still holds it (see init_from_env;
    after an FSDP2 run, something in torch's FSDP2/DTensor machinery still does). A backend left
    alive keeps its worker threads into the interpreter's finalization; one of them releasing a
    tensor's Python object then needs the GIL of a dying interpreter and aborts the process
    ("terminate called without an active exception") after all its work is done. A program
    therefore ends with :func:`exit_process`."""
    global _left_group
    if initialized():
        if wait:
            barrier()
        _dist().destroy_process_group()
        _left_group = True


_left_group = False  # this process has left a process group (shutdown)


def exit_process(code: int) -> NoReturn:
    """End the program with exit status ``code``: ``sys.exit(code)``, except in a process that
    has left a process group (see shutdown), which exits without the interpreter's finalization
    so that the communication backend's threads cannot abort it there. Python's own exit steps
    before finalization still run: non-daemon threads are joined (executors shut down), atexit
    handlers run and the standard streams are flushed; then ``os._exit(code)``. Whatever must be
    on disk must be written and closed before this is called."""
    if not _left_group:
        sys.exit(code)
    join_threads = getattr(threading, "_shutdown", None)  # what an interpreter's exit does first
    if join_threads is not None:
        join_threads()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # closed or broken: nothing to keep
            stream.flush()
    os._exit(code)


def unwrap_data_parallel(model: torch.nn.Module, who: str) -> torch.nn.Module:
    """The module to train for a model the caller passed wrapped in
    ``DistributedDataParallel``: the module it wraps. sdpo sums the gradients over ranks
    itself (module docstring), so the wrapper's own reduction would add a second one; called
    directly, the wrapped module runs no hook of DDP's (its reducer acts only on a backward
    after a forward through the wrapper), so each gradient is summed once, and the wrapper
    works as before for the caller after sdpo returns. A wrapper over another process group
    than the default one (the data-parallel group of a larger mesh) is refused: sdpo deals the
    work over all the default group's ranks. So is one built with ``find_unused_parameters`` or
    ``static_graph``: its reducer marks every parameter a backward touches as used, the passes
    through the module included, and its next iteration with an unused parameter fails (torch's
    "Encountered gradient which is undefined, but still allreduced"); its state is reset only by
    its own iteration, so it cannot be trained through before one. A model wrapped (whole or in
    part) in FSDP1's ``FullyShardedDataParallel`` is refused: sdpo gathers, sums and saves the
    parameters of FSDP2's ``fully_shard`` alone. Any other model is returned as it is."""
    from torch.nn.parallel import DistributedDataParallel

    _refuse_fsdp1(model, who)
    if not isinstance(model, DistributedDataParallel):
        return model
    ranks = _dist().get_world_size(model.process_group)
    if ranks != world():
        raise ValueError(
            f"{who}: the DistributedDataParallel model reduces over a process group of {ranks} "
            f"rank(s), and sdpo shares the work over all {world()} ranks of the default group: "
            "pass the wrapped module (model.module), every rank of the default group calling "
            "with its replica"
        )
    options = [o for o in ("find_unused_parameters", "static_graph") if getattr(model, o, False)]
    if options:
        named = " and ".join(f"{o}=True" for o in options)
        raise ValueError(
            f"{who}: the DistributedDataParallel model was built with {named}: sdpo trains its "
            "module with backward passes of its own, outside the wrapper's forward, and DDP "
            "counts the parameters they touch as used in the wrapper's next iteration, whose "
            'backward then fails wherever a parameter goes unused ("Encountered gradient which '
            f'is undefined"). Pass a DDP built without {named}, or wrap the model with it '
            "after sdpo returns"
        )
    return model.module


def _refuse_fsdp1(model: torch.nn.Module, who: str) -> None:
    """A TypeError for a model of which any module is FSDP1's ``FullyShardedDataParallel``
    (its flat parameters, hooks and state dicts are not those of FSDP2 that sdpo reads)."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # a torch built without distributed
        return
    for name, module in model.named_modules():
        if isinstance(module, FullyShardedDataParallel):
            where = "the model" if not name else f"its module {name!r}"
            raise TypeError(
                f"{who}: {where} is wrapped in FullyShardedDataParallel (FSDP1), which sdpo "
                "does not train: shard the model with FSDP2 instead (torch.distributed.fsdp."
                "fully_shard of each decoder layer, then of the model), or wrap it in "
                "DistributedDataParallel, or pass the plain model (the runner's train.fsdp "
                "shards the models it loads itself)"
            )


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


class GradReducer:
    """Sums the gradients of ``params`` over ranks while the backward pass runs.

    Use: ``begin()`` before the backward of a rank's last micro-batch of a step (earlier
    micro-batches accumulate as usual), ``finish()`` after it, on every rank, also on a rank
    that ran no backward at all. After ``finish()`` every parameter's ``.grad`` holds the sum
    over ranks (parameters with no gradient on a rank count as zeros, and ``zero_filled`` holds
    their ids: whether any rank had one is for the caller to find out). ``bucket_bytes`` bounds a
    bucket (a larger parameter goes alone and is reduced in place, without a copy)."""

    def __init__(self, params: Iterable[Tensor], *, bucket_bytes: int = 25 * 2**20) -> None:
        params = [p for p in params if p.requires_grad]
        # the backward finishes the last parameters' gradients first: bucket in reverse order
        self.buckets: list[list[Tensor]] = []
        size = 0
        for p in reversed(params):
            nbytes = p.numel() * p.element_size()
            last = self.buckets[-1] if self.buckets else None
            same_kind = last is not None and (last[0].dtype, last[0].device) == (p.dtype, p.device)
            if last is None or not same_kind or size + nbytes > bucket_bytes:
                self.buckets.append([p])
                size = nbytes
            else:
                last.append(p)
                size += nbytes
        self._ready: list[set[int]] = []
        self._next = 0  # the next bucket to start; buckets before it are in flight
        self._works: list[Any] = []
        self._hooks: list[Any] = []
        self._armed = False
        self.started_in_backward = 0  # buckets whose reduction overlapped the backward
        # ids of the parameters that had no gradient on this rank in the last reduction
        self.zero_filled: set[int] = set()

    def begin(self) -> None:
        if self._armed:
            raise RuntimeError("GradReducer.begin() called twice without finish()")
        self._armed = True
        self._ready = [set() for _ in self.buckets]
        self._next = 0
        self._works = []
        self.started_in_backward = 0
        self.zero_filled = set()
        self._hooks = [
            p.register_post_accumulate_grad_hook(partial(self._on_grad, i))
            for i, bucket in enumerate(self.buckets)
            for p in bucket
        ]

    def _on_grad(self, index: int, param: Tensor) -> None:
        if index < self._next:
            raise RuntimeError(
                "a gradient was accumulated again after its bucket's all-reduce had started "
                "(a parameter used by two backward passes inside one overlapped micro-batch)"
            )
        self._ready[index].add(id(param))
        while self._next < len(self.buckets) and len(self._ready[self._next]) == len(
            self.buckets[self._next]
        ):
            self._start(self._next)
            self.started_in_backward += 1

    def _start(self, index: int) -> None:
        bucket = self.buckets[index]
        for p in bucket:
            if p.grad is None:  # no gradient on this rank: it adds zeros
                p.grad = torch.zeros_like(p)
                self.zero_filled.add(id(p))
        if len(bucket) == 1 and bucket[0].grad.is_contiguous():
            flat = bucket[0].grad
        else:
            flat = torch.cat([p.grad.reshape(-1) for p in bucket])
            offset = 0
            for p in bucket:  # the gradients become views of the reduced buffer
                n = p.numel()
                p.grad = flat[offset : offset + n].view_as(p)
                offset += n
        dist = _dist()
        self._works.append(dist.all_reduce(flat, op=dist.ReduceOp.SUM, async_op=True))
        self._next = index + 1

    def finish(self) -> None:
        """Start the buckets the backward did not (every rank, same order) and wait for all:
        on CUDA the wait orders the current stream after the collectives (no host sync)."""
        if not self._armed:  # this rank ran no backward: all buckets are zeros
            self.begin()
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self._armed = False
        while self._next < len(self.buckets):
            self._start(self._next)
        for work in self._works:
            work.wait()
        self._works = []


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


def broadcast_arrays(arrays: Mapping[str, np.ndarray] | None) -> dict[str, np.ndarray]:
    """Rank 0's ``arrays`` on every rank (the other ranks pass None): each array is sent as one
    tensor on this rank's device, after a small pickled header of names, dtypes and shapes, so
    the contents are never pickled (pickling millions of token ids costs seconds and several
    copies of them in memory). Rank 0 gets its own arrays back."""
    if not active():
        return dict(arrays or {})
    specs = broadcast_object(
        [(name, a.dtype.str, a.shape) for name, a in arrays.items()] if is_main() else None
    )
    out: dict[str, np.ndarray] = {}
    for name, dtype, shape in specs:
        if is_main():
            out[name] = arrays[name]
            contiguous = np.require(arrays[name], requirements=["C", "W"])  # a tensor's needs
            tensor = torch.from_numpy(contiguous).to(device())
        else:
            empty = torch.from_numpy(np.empty(0, dtype=np.dtype(dtype)))
            tensor = torch.empty(shape, dtype=empty.dtype, device=device())
        if tensor.numel():
            _dist().broadcast(tensor, src=0)
        if not is_main():
            out[name] = tensor.cpu().numpy()
        del tensor
    return out


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
