"""Host-device ordering on CUDA: every asynchronous copy is read only after it has landed, and a
copy reads the values its source held when it was queued, however far the device lags behind
the host.

On a CPU these copies are synchronous, so only a GPU can show a missing wait. Each test first
queues a kernel that keeps the device busy (``torch.cuda._sleep``), then the copy under test,
then what a careless host would do next (read the destination, rewrite the source, queue the
next optimizer step); an event recorded behind the copy shows that it was still pending at that
point, so the test cannot pass merely because the device happened to be quick. Warm-up rounds
first allocate the pinned and device blocks the measured round reuses (a fresh allocation may
wait for the device and hide the race).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from sdpo.engine.async_save import HostSnapshot
from sdpo.engine.packing import TokenizedPair, pack_pairs, to_device
from sdpo.engine.trainer import _HostValues

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

# cycles torch.cuda._sleep spins: about 0.2 s at an H100's 1.98 GHz, more than a hundred times
# what the host needs to queue what each test does behind it
BUSY_CYCLES = 400_000_000


def _busy_then(record_after) -> torch.cuda.Event:
    """Keep the current stream busy, queue ``record_after()`` behind it and return an event
    recorded after that: not yet complete while the copies queued by it are pending."""
    torch.cuda._sleep(BUSY_CYCLES)
    record_after()
    event = torch.cuda.Event()
    event.record()
    return event


def test_step_values_are_read_only_after_their_copy_has_landed():
    """``_HostValues`` (a training step's metrics and flags): ``read`` waits for the copy into
    pinned memory, which here is still queued behind slow work when ``read`` is called."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(6, device="cuda", dtype=torch.float64, generator=gen)
    keys = [f"v{i}" for i in range(6)]
    _HostValues({k: x[i] for i, k in enumerate(keys)}).read()  # warm-up: the same blocks
    torch.cuda.synchronize()
    box: list[_HostValues] = []
    pending = _busy_then(lambda: box.append(_HostValues({k: 3 * x[i] for i, k in enumerate(keys)})))
    assert not pending.query(), "the device finished too soon to show a missing wait"
    got = box[0].read()
    assert got == dict(zip(keys, (3 * x).tolist(), strict=True))


def test_host_snapshot_holds_the_state_before_the_next_step_queued_behind_it():
    """An async checkpoint's snapshot (``HostSnapshot``, buffers reused from the save before)
    of the weights and the fused AdamW state: ``ready()`` waits for the copies, and they hold
    the values of the save point although the next optimizer step, queued right after them,
    changes every one of those tensors in place."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.Linear(512, 96)).cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)

    def optimizer_step() -> None:
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        optimizer.step()

    optimizer_step()  # the optimizer state exists from here on
    state = {"weights": model.state_dict(), "optimizer": optimizer.state_dict()}
    snapshot = HostSnapshot()
    snapshot.copy(state, key="ckpt")  # warm-up: the buffers the next save reuses
    snapshot.ready()
    optimizer_step()
    torch.cuda.synchronize()
    want = {
        "weights": {k: v.cpu() for k, v in state["weights"].items()},
        "optimizer": {
            i: {k: v.cpu() for k, v in s.items()} for i, s in state["optimizer"]["state"].items()
        },
    }
    box: list = []
    pending = _busy_then(lambda: box.append(snapshot.copy(state, key="ckpt")))
    optimizer_step()  # training goes on: weights and optimizer state change in place
    assert not pending.query(), "the device finished too soon to show a missing wait"
    snapshot.ready()
    assert pending.query()
    copy = box[0]
    for name, value in want["weights"].items():
        assert copy["weights"][name].is_pinned()
        assert torch.equal(copy["weights"][name], value), name
        assert not torch.equal(model.state_dict()[name].cpu(), value), name  # it did change
    for i, values in want["optimizer"].items():
        for k, value in values.items():
            assert torch.equal(copy["optimizer"]["state"][i][k], value), (i, k)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_host_snapshot_waits_for_a_gpu_that_is_not_the_current_one():
    """A copy from cuda:1 runs on cuda:1's stream; ``ready()`` with cuda:0 current still waits
    for it (synchronising the current device only would not)."""
    x = torch.randn(1 << 20, device="cuda:1")
    snapshot = HostSnapshot()
    with torch.cuda.device(0):
        snapshot.copy({"x": x}, key="s")  # warm-up: the buffer holds x now
        snapshot.ready()
        box: list = []
        with torch.cuda.device(1):
            pending = _busy_then(lambda: box.append(snapshot.copy({"x": 2 * x}, key="s")))
        assert not pending.query(), "the device finished too soon to show a missing wait"
        snapshot.ready()
    assert torch.equal(box[0]["x"], (2 * x).cpu())


@pytest.mark.parametrize("pinned", [False, True], ids=["pageable", "pinned"])
def test_to_device_copies_what_a_tensor_held_at_the_call(pinned):
    """The host may rewrite a tensor as soon as ``to_device`` returns (it packs the next
    micro-batch) while the copy is still queued behind the device's work; the device gets the
    values of the call, also from an input that was pinned already."""
    host = torch.randn(1 << 16)
    if pinned:
        host = host.pin_memory()
    want = host.clone()
    to_device(host, torch.device("cuda"))  # warm-up: the blocks the measured call reuses
    torch.cuda.synchronize()
    box: list[torch.Tensor] = []
    pending = _busy_then(lambda: box.append(to_device(host, torch.device("cuda"))))
    host.fill_(float("nan"))
    assert not pending.query(), "the device finished too soon to show a missing wait"
    assert torch.equal(box[0].cpu(), want)


def test_to_device_copies_what_a_packed_batch_held_at_the_call():
    """The same for a packed micro-batch whose tensors are pinned (a caller's own pinned
    staging): rewriting them after the call changes nothing on the device."""
    pairs = [
        TokenizedPair(index=i, prompt_ids=[5, 6, 7], chosen_ids=[8] * (i + 2), rejected_ids=[9])
        for i in range(4)
    ]
    host = pack_pairs(pairs)
    pinned = {
        f.name: getattr(host, f.name).pin_memory()
        for f in dataclasses.fields(host)
        if isinstance(getattr(host, f.name), torch.Tensor)
    }
    host = dataclasses.replace(host, **pinned)
    want = {name: t.clone() for name, t in pinned.items()}
    to_device(host, torch.device("cuda"))  # warm-up
    torch.cuda.synchronize()
    box: list = []
    pending = _busy_then(lambda: box.append(to_device(host, torch.device("cuda"))))
    for t in pinned.values():
        t.fill_(-1)
    assert not pending.query(), "the device finished too soon to show a missing wait"
    for name, value in want.items():
        assert torch.equal(getattr(box[0], name).cpu(), value), name
