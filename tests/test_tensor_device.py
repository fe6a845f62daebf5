"""sdpo's GPU work runs on the GPU its tensors (the model) live on, not on the current device.

An embedder may keep a model on ``cuda:1`` while ``cuda:0`` is the current device. Triton
launches on the current device and its current stream, and several ``torch.cuda`` queries
(memory counters, synchronisation, properties) default to the current device. Without a GPU
these are source rules: every Triton launch in sdpo.kernels runs under the device guard
``on_device`` of a tensor's device, and every such ``torch.cuda`` call in sdpo names its device.
With two GPUs (``pytest -m gpu``) the kernels and a training step run with the model on
``cuda:1`` and ``cuda:0`` current, against the same on ``cuda:0``.
"""

from __future__ import annotations

import ast
import functools
import gc
import os
from pathlib import Path

import torch

if not torch.cuda.is_available():  # Triton's mode is fixed at its first import (see kernels/)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# torch.cuda functions that act on the current device unless given one
DEVICE_DEFAULTING = {
    "current_stream",
    "get_device_capability",
    "get_device_name",
    "get_device_properties",
    "max_memory_allocated",
    "max_memory_reserved",
    "mem_get_info",
    "memory_allocated",
    "memory_reserved",
    "memory_stats",
    "reset_peak_memory_stats",
    "synchronize",
}


def _parents(tree: ast.AST) -> dict[ast.AST, ast.AST]:
    return {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}


def _guard_of(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> ast.Call | None:
    """The ``on_device(...)`` call of the innermost ``with`` whose body holds ``node``."""
    while node in parents:
        parent = parents[node]
        if isinstance(parent, ast.With) and node in parent.body:
            for item in parent.items:
                call = item.context_expr
                if isinstance(call, ast.Call):
                    name = getattr(call.func, "attr", getattr(call.func, "id", None))
                    if name == "on_device":
                        return call
        node = parent
    return None


def _launches(path: Path) -> list[tuple[int, ast.Call | None]]:
    """Every Triton launch ``kernel[grid](...)`` in ``path`` (a call of a subscripted object;
    a Triton grid is a tuple or a callable, so ``fns[0](...)`` is not one), with its guard."""
    tree = ast.parse(path.read_text(), filename=str(path))
    parents = _parents(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript):
            grid = node.func.slice
            if isinstance(grid, ast.Constant) and isinstance(grid.value, int):
                continue
            found.append((node.lineno, _guard_of(node, parents)))
    return found


def test_every_triton_launch_in_the_kernels_runs_under_its_tensors_device_guard():
    launches = {
        f"{path.name}:{line}": guard
        for path in sorted((ROOT / "kernels").glob("*.py"))
        for line, guard in _launches(path)
    }
    # the row kernels' forward and backward, the fused head autotuned and with pinned tiles
    files = sorted({site.partition(":")[0] for site in launches})
    assert files == ["fused_head.py", "logprobs.py"] and len(launches) >= 4, launches
    unguarded = [site for site, guard in launches.items() if guard is None]
    assert not unguarded, (
        f"Triton launches outside `with on_device(<tensor>.device):` at {unguarded}: Triton "
        "launches on the current CUDA device and stream, not the tensors'"
    )
    for site, guard in launches.items():
        arg = guard.args[0] if len(guard.args) == 1 else None
        assert isinstance(arg, ast.Attribute) and arg.attr == "device", (
            f"{site}: on_device must take the launched tensors' .device, got {ast.unparse(guard)}"
        )


def test_every_current_device_defaulting_cuda_call_in_sdpo_names_its_device():
    bare = []
    for folder in ("engine", "sdpo", "kernels"):
        for path in sorted((ROOT / folder).glob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                    continue
                owner = ast.unparse(node.func.value)
                named = node.args or any(k.arg == "device" for k in node.keywords)
                if owner == "torch.cuda" and node.func.attr in DEVICE_DEFAULTING and not named:
                    bare.append(f"{folder}/{path.name}:{node.lineno} {ast.unparse(node)}")
    assert not bare, f"torch.cuda calls that act on the current device, not the model's: {bare}"


def test_the_device_guard_is_nothing_on_cpu_and_the_named_gpu_on_cuda():
    from sdpo.kernels.triton_rows import on_device

    guard = on_device(torch.device("cpu"))
    assert guard is on_device(torch.device("cpu"))  # one shared no-op, nothing made per launch
    with guard:  # entering it touches no CUDA state (this machine may have none)
        pass
    # built without CUDA calls: the GPU is taken from the device, not from the current one
    assert on_device(torch.device("cuda", 1)).idx == 1


# ---------------------------------------------------------------------------------------------
# On GPUs: the model on cuda:1 while cuda:0 is current
# ---------------------------------------------------------------------------------------------


def _needs_two_gpus() -> None:
    found = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if found < 2:
        pytest.skip(
            f"needs two CUDA devices (a model on cuda:1 while cuda:0 is current); found {found}"
        )
    torch.cuda.set_device(0)


# cycles torch.cuda._sleep spins: about 0.2 s on an H100, far longer than queueing a launch
BUSY_CYCLES = 400_000_000


def _kernel_outputs(device: torch.device, *, busy: bool) -> dict[str, torch.Tensor]:
    """Row kernels (forward and backward), the chunked head (forward and backward) and the
    fused head on ``device`` with ``cuda:0`` current, fp32, 131 tokens, vocabulary 1031.
    ``busy``: the logits and hidden states are written on the device's own stream behind a long
    sleep, so a kernel queued on another device's stream would read them before they land."""
    from sdpo.kernels import fused_sequence_logprobs, logprobs_from_logits, sequence_logprobs
    from tests.conftest import packed_labels

    gen = torch.Generator().manual_seed(7)
    labels, seq_ids = packed_labels(lengths=[61, 22, 48], prompts=[17, 20, 5], vocab=1031, gen=gen)
    n, s = labels.shape[0], 3
    logits_src = torch.randn(n, 1031, generator=gen).to(device)
    hidden_src = torch.randn(n, 64, generator=gen).to(device)
    weight = (torch.randn(1031, 64, generator=gen) * 0.1).to(device)
    labels, seq_ids = labels.to(device), seq_ids.to(device)
    logits = torch.zeros(n, 1031, device=device)
    hidden = torch.zeros(n, 64, device=device)
    torch.cuda.synchronize(device)
    with torch.cuda.device(device):  # on the device's own stream, as the model's ops would be
        if busy:
            torch.cuda._sleep(BUSY_CYCLES)
        logits.copy_(logits_src)
        hidden.copy_(hidden_src)
    assert torch.cuda.current_device() == 0
    g = torch.linspace(-1.0, 1.0, s, device=device)
    x = logits.clone().requires_grad_(True)
    seq, token = logprobs_from_logits(x, labels, seq_ids, s, impl="triton")
    (seq * g).sum().backward()
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    head = sequence_logprobs(h, w, labels, seq_ids, s, impl="triton", chunk_tokens=48)
    (head * g).sum().backward()
    with torch.no_grad():
        fused = fused_sequence_logprobs(hidden, weight, labels, seq_ids, s)
    assert torch.cuda.current_device() == 0, "a kernel call left another device current"
    out = {
        "seq": seq,
        "token": token,
        "grad_logits": x.grad,
        "head": head,
        "grad_hidden": h.grad,
        "grad_weight": w.grad,
        "fused": fused,
    }
    for name, value in out.items():
        assert value.device == device, f"{name} on {value.device}, not {device}"
    return {name: value.detach().cpu() for name, value in out.items()}


@pytest.mark.gpu
def test_kernels_on_cuda1_with_cuda0_current_match_the_same_on_cuda0():
    """Every kernel path on cuda:1 while cuda:0 is current gives what it gives on cuda:0,
    though its inputs land on cuda:1's stream only after a long sleep there."""
    _needs_two_gpus()
    here = _kernel_outputs(torch.device("cuda", 0), busy=False)
    there = _kernel_outputs(torch.device("cuda", 1), busy=True)
    for name in here:
        torch.testing.assert_close(there[name], here[name], msg=lambda m, n=name: f"{n}: {m}")


def _one_training_step(model_dir: Path, data: Path, device: torch.device) -> dict:
    """Score the pairs, probe the memory and take one SGD step with the Triton kernels on
    ``device`` (cuda:0 current); the reference values, the step's metrics and the weights."""
    from sdpo.engine.checkpoint import load_pretrained
    from sdpo.engine.data import read_preference_file
    from sdpo.engine.scoring import score_pairs
    from sdpo.engine.tokenize import PairTokenizer, tokenize_pairs
    from sdpo.engine.trainer import DPOTrainer, TrainConfig
    from sdpo.losses import LossConfig, dpo_loss

    rows = read_preference_file(str(data), source="s")
    pairs, _ = tokenize_pairs(
        rows, PairTokenizer.from_dir(model_dir), max_length=32, max_prompt_length=16
    )
    model = load_pretrained(model_dir, device=device)
    ref = score_pairs(model, pairs, max_tokens_per_batch=1024, impl="triton", precision="fp32")
    config = TrainConfig(learning_rate=1e-2, pairs_per_step=8, precision="fp32")
    trainer = DPOTrainer(
        model,
        config=config,
        loss_fn=functools.partial(dpo_loss, config=LossConfig(beta=0.1)),
        kernels_impl="triton",
        progress=False,
        # SGD: an update proportional to the gradient, so the two devices' weights agree to
        # the gradients' rounding (Adam's first step is lr * sign(g) wherever g is near 0)
        optimizer=torch.optim.SGD(model.parameters(), lr=1e-2),
    )
    batch = list(range(len(pairs)))
    probe = trainer.probe_memory(pairs, ref, [batch])
    metrics = trainer.train_step(pairs, [batch], ref)
    assert torch.cuda.current_device() == 0, "a step left another device current"
    return {
        "probe_peak_gib": probe["peak_gib"],
        "ref": ref.chosen_logps.cpu(),
        "loss": metrics["loss"].cpu(),
        **{name: p.detach().cpu() for name, p in model.named_parameters()},
    }


@pytest.mark.gpu
def test_a_training_step_on_cuda1_with_cuda0_current_matches_the_same_on_cuda0(tmp_path):
    """score_pairs, the memory probe and a DPOTrainer step with the model on cuda:1 (cuda:0
    current) give cuda:0's values, allocate nothing on cuda:0, and the probe's peak is that of
    cuda:1 (not cuda:0's counters, which see nothing of the step)."""
    _needs_two_gpus()
    from sdpo.engine.tiny import write_tiny_model
    from tests.conftest import WORDS, write_pairs

    model_dir = write_tiny_model(tmp_path / "m", words=WORDS, hidden_size=32, seed=1)
    data = write_pairs(tmp_path / "d.jsonl", n=8, seed=3)
    here = _one_training_step(model_dir, data, torch.device("cuda", 0))
    gc.collect()  # the cuda:0 run's model and trainer, freed before cuda:0 is measured
    torch.cuda.synchronize(0)
    torch.cuda.reset_peak_memory_stats(0)
    before = torch.cuda.memory_allocated(0)
    there = _one_training_step(model_dir, data, torch.device("cuda", 1))
    torch.cuda.synchronize(0)
    grown = torch.cuda.max_memory_allocated(0) - before
    assert grown == 0, f"the cuda:1 run allocated {grown} bytes on cuda:0"
    assert there["probe_peak_gib"] > 0
    for name in here:
        if name != "probe_peak_gib":
            torch.testing.assert_close(there[name], here[name], msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.gpu
def test_the_run_device_is_a_numbered_gpu_so_its_memory_counters_stay_on_it():
    """Without a process group the run's device is the current GPU by its index, so that the
    memory counters asked of it later are that GPU's whichever device is current then."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from sdpo.runner import select_device

    assert select_device() == torch.device("cuda", torch.cuda.current_device())
