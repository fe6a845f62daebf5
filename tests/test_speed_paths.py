"""Speed paths change no results: the optimised training path (fused loss, regionally compiled
decoder layers, activation checkpointing) and the plain path (per-sequence log-probs, eager,
no checkpointing) give the same gradients and losses, both equal to float64 truth; and the
end-to-end benchmark's CPU smoke mode runs (its TRL comparison too, when trl is installed), also
under torchrun on two gloo processes, data parallel and sharded."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib.util
import json
import math
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.distributed
import torch.nn.functional as F
import torch.utils._python_dispatch
import torch.utils._pytree

from sdpo.engine.compile import compile_decoder_layers
from sdpo.engine.model import ModelConfig, init_model
from sdpo.engine.packing import TokenizedPair, pack_pairs
from sdpo.engine.scoring import PairLogps, score_pairs
from sdpo.engine.trainer import DPOTrainer, TrainConfig, plan_steps
from sdpo.losses import LossConfig, dpo_loss
from tests.conftest import torchrun_env

BETA = 0.5
ROOT = Path(__file__).resolve().parents[1]


def tiny_config(*, tied: bool) -> ModelConfig:
    return ModelConfig.from_hf_dict(
        {
            "model_type": "llama",
            "vocab_size": 97,
            "hidden_size": 40,
            "intermediate_size": 72,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 10,
            "tie_word_embeddings": tied,
        }
    )


def make_pairs(count: int, *, vocab: int, seed: int) -> list[TokenizedPair]:
    """Odd sequence lengths; every pair has 2 x 7 prompt + 14 completion tokens = 28, so a
    60-token budget always holds exactly two pairs (two micro-batches per 4-pair step)."""
    gen = torch.Generator().manual_seed(seed)

    def ids(n: int) -> list[int]:
        return torch.randint(4, vocab, (n,), generator=gen).tolist()

    pairs = []
    for i in range(count):
        c = int(torch.randint(3, 12, (1,), generator=gen))
        pairs.append(
            TokenizedPair(index=i, prompt_ids=ids(7), chosen_ids=ids(c), rejected_ids=ids(14 - c))
        )
    return pairs


def shifted_reference(model, pairs: list[TokenizedPair], *, seed: int) -> PairLogps:
    """The model's own log-probs moved by random offsets, so the DPO margins are far from 0 and
    the loss depends on every log-prob (with the model's own values it is log 2 whatever the
    model computes)."""
    ref = score_pairs(model, pairs, max_tokens_per_batch=10_000, impl="torch", precision="fp32")
    gen = torch.Generator().manual_seed(seed)
    ref.chosen_logps = ref.chosen_logps + 3 * torch.randn(len(pairs), generator=gen)
    ref.rejected_logps = ref.rejected_logps + 3 * torch.randn(len(pairs), generator=gen)
    return ref


def truth_loss_and_grads(model, pairs, ref: PairLogps) -> tuple[float, dict[str, torch.Tensor]]:
    """Mean sigmoid-DPO loss of ``pairs`` and its gradients, all in float64."""
    m64 = copy.deepcopy(model).to(torch.float64)
    batch = pack_pairs(pairs)
    hidden = m64(batch.input_ids, batch.position_ids, batch.cu_seqlens, batch.max_seqlen)
    logits = hidden @ m64.lm_head_weight.t()  # (N, V) float64
    logp = torch.log_softmax(logits, dim=-1).gather(1, batch.labels.clamp(min=0)[:, None])[:, 0]
    logp = torch.where(batch.labels != -100, logp, 0.0)
    seq = torch.zeros(batch.num_seqs, dtype=torch.float64).index_add(0, batch.seq_ids, logp)
    rows = ref.rows_for(batch.pair_indices)
    rc, rr = ref.chosen_logps[rows].double(), ref.rejected_logps[rows].double()
    z = (seq[0::2] - rc) - (seq[1::2] - rr)
    loss = -F.logsigmoid(BETA * z).mean()
    loss.backward()
    return float(loss.detach()), {n: p.grad for n, p in m64.named_parameters()}


def run_steps(model, pairs, ref, *, loss_path: str, steps: int):
    config = TrainConfig(
        learning_rate=1e-3,
        pairs_per_step=4,
        max_tokens_per_batch=60,
        shuffle=False,
        warmup_ratio=0.0,
        schedule="constant",
        max_grad_norm=0.0,
        precision="fp32",
        loss_path=loss_path,
    )
    trainer = DPOTrainer(
        model,
        config=config,
        loss_fn=partial(dpo_loss, config=LossConfig(beta=BETA)),
        kernels_impl="torch",
        progress=False,
    )
    plan = plan_steps(pairs, config, epoch=0)
    assert all(len(step) == 2 for step in plan), "each step should be two micro-batches"
    losses, first_grads = [], None
    for micro_batches in plan[:steps]:
        losses.append(float(trainer.train_step(pairs, micro_batches, ref)["loss"]))
        if first_grads is None:  # grads stay until the next step's zero_grad
            first_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return losses, first_grads


@pytest.mark.parametrize("tied", [False, True])
def test_optimised_and_plain_paths_give_the_same_gradients_and_losses(one_thread, tied):
    config = tiny_config(tied=tied)
    pairs = make_pairs(12, vocab=config.vocab_size, seed=11 + tied)
    plain = init_model(config, seed=3)
    fast = copy.deepcopy(plain)
    ref = shifted_reference(plain, pairs, seed=5)
    truth, truth_grads = truth_loss_and_grads(plain, pairs[:4], ref)

    compile_decoder_layers(fast, backend="aot_eager")
    fast.gradient_checkpointing = True
    fast_losses, fast_grads = run_steps(fast, pairs, ref, loss_path="fused", steps=3)
    plain_losses, plain_grads = run_steps(plain, pairs, ref, loss_path="plain", steps=3)

    assert abs(truth - math.log(2)) > 0.05, "margins too small for a meaningful check"
    for losses in (fast_losses, plain_losses):
        assert losses[0] == pytest.approx(truth, rel=1e-5)
    assert fast_losses[2] != pytest.approx(fast_losses[0], rel=1e-3), "training did not move"
    assert fast_losses == pytest.approx(plain_losses, rel=1e-5)
    for name, g64 in truth_grads.items():
        scale = float(g64.abs().max())
        for grads in (fast_grads, plain_grads):
            torch.testing.assert_close(
                grads[name].double(), g64, rtol=1e-4, atol=1e-5 * scale, msg=name
            )
    for (name, a), b in zip(fast.named_parameters(), plain.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=3e-5, msg=name)


# -- host reads of device values in a training step -----------------------------------------
# On a GPU, reading a device value on the host (.item(), bool(), .tolist(), nonzero, ...) makes
# the host wait for the device. The step is meant to make one such read: whether the update was
# finite, after the update has been queued. There is no device on the CPU, so the audit below
# marks what would live on it (the weights, the optimizer state, what `to_device` returns and
# every value computed from those) and records each host read of a marked value. The functions
# below run only on CPU tensors; their GPU counterparts make no host read.
_CPU_ONLY_READS = {
    "_sdpa_per_sequence",  # the CPU attention loop (GPUs run the varlen kernels)
    "check_labels_in_vocab",  # labels checked on the host for CPU tensors only
    "check_seq_ids_in_range",  # likewise the sequence indices
    "_check_pair_tokens_on_cpu",  # on a GPU: asserted on the device, asynchronously
}
_READ_OPS = {"_local_scalar_dense", "nonzero", "equal", "is_nonzero", "masked_select"}


class _HostReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Marks values derived from marked ones and records host reads of marked values."""

    def __init__(self):
        super().__init__()
        self.ids: set[int] = set()
        self.keep: list[torch.Tensor] = []  # marked tensors stay alive: ids are not reused
        self.reads: list[tuple[str, str]] = []

    def mark(self, t):
        if isinstance(t, torch.Tensor):
            self.ids.add(id(t))
            self.keep.append(t)
            if t._base is not None:  # written through a view: the base holds device values
                self.mark(t._base)

    def marked(self, t) -> bool:
        return isinstance(t, torch.Tensor) and id(t) in self.ids

    def record(self, what: str) -> None:
        import traceback

        frames = [f for f in traceback.extract_stack() if f.filename.startswith(str(ROOT))]
        frames = [f for f in frames if "/tests/" not in f.filename and ".venv" not in f.filename]
        if not any(f.name in _CPU_ONLY_READS for f in frames):
            where = frames[-1]
            path = Path(where.filename).relative_to(ROOT)
            self.reads.append((what, f"{path}:{where.name}"))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = torch.utils._pytree.tree_leaves((args, kwargs))
        on_device = any(self.marked(t) for t in inputs)
        if on_device and func._schema.name.split("::")[-1] in _READ_OPS:
            self.record(func._schema.name)
        out = func(*args, **kwargs)
        if on_device:
            for t in torch.utils._pytree.tree_leaves(out):
                self.mark(t)
        return out


@contextlib.contextmanager
def _auditing(monkeypatch, module, marks):
    """Record host reads of device values while the block runs: ``marks`` (and their tensors)
    are on the device, and so is what ``module.to_device`` returns, a copy of its input (on a
    CPU it would hand back the host tensors themselves, which stay on the host on a GPU)."""
    audit = _HostReads()
    for leaf in torch.utils._pytree.tree_leaves(marks):
        audit.mark(leaf)
    to_device = module.to_device

    def marking_to_device(value, device):
        out = to_device(copy.deepcopy(value), device)
        for leaf in [out] if isinstance(out, torch.Tensor) else [out, *vars(out).values()]:
            audit.mark(leaf)
        return out

    monkeypatch.setattr(module, "to_device", marking_to_device)
    # a tensor made from host data on a named device: on a GPU, a copy from pageable memory,
    # which waits for the device's queued work
    for name in ("tensor", "as_tensor"):
        make = getattr(torch, name)

        def making(*a, _make=make, _name=name, **k):
            if k.get("device") is not None:
                audit.record(f"torch.{_name}(device=...)")
            return _make(*a, **k)

        monkeypatch.setattr(torch, name, making)
    for name in ("tolist", "item", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__"):
        method = getattr(torch.Tensor, name)

        def reading(self, *a, _method=method, _name=name, **k):
            if audit.marked(self):
                audit.record(_name)
            return _method(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, reading)
    try:
        with audit:
            yield audit
    finally:
        monkeypatch.undo()


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"loss_path": "plain"},
        {"share_prompt": True},
        {"max_grad_norm": 0.0},
        {"ld_alpha": 0.5, "rpo_alpha": 0.3, "use_weighting": True, "max_chunk_tokens": 16},
        {"lora_rank": 4},
        {"recompute": True},
    ],
    ids=["fused", "plain", "shared_prompt", "no_clipping", "ld_rpo_wpo_split", "lora", "recompute"],
)
def test_a_training_step_reads_no_device_value_on_the_host(one_thread, monkeypatch, settings):
    """Fused AdamW (as on a GPU; torch runs it on a CPU too): the step reads no device value
    on the host, the finite flag included (it gates the update inside the optimizer)."""
    from sdpo.engine import trainer as trainer_module
    from sdpo.engine.trainer import build_optimizer

    settings = dict(settings)
    ld_alpha = settings.pop("ld_alpha", None)
    loss = {k: settings.pop(k) for k in ("rpo_alpha", "use_weighting") if k in settings}
    max_chunk_tokens = settings.pop("max_chunk_tokens", None)
    lora_rank = settings.pop("lora_rank", None)
    config = tiny_config(tied=False)
    pairs = make_pairs(8, vocab=config.vocab_size, seed=4)
    model = init_model(config, seed=2)
    model.gradient_checkpointing = settings.pop("recompute", False)
    if lora_rank:
        from sdpo.engine.lora import attach_lora

        attach_lora(model, rank=lora_rank, alpha=8.0, dropout=0.1, seed=1)
    ref = score_pairs(model, pairs, max_tokens_per_batch=10_000, impl="torch", ld_alpha=ld_alpha)
    train = TrainConfig(
        learning_rate=1e-3, pairs_per_step=8, max_tokens_per_batch=60, warmup_ratio=0.0
    )
    train = dataclasses.replace(train, **settings)
    trainer = DPOTrainer(
        model,
        config=train,
        loss_fn=partial(dpo_loss, config=LossConfig(beta=BETA, ld_alpha=ld_alpha, **loss)),
        kernels_impl="torch",
        max_chunk_tokens=max_chunk_tokens,
        progress=False,
        optimizer=build_optimizer(model, train, fused=True),
        ld_alpha=ld_alpha,
    )
    step = plan_steps(pairs, train, epoch=0)[0]
    assert len(step) > 1  # several micro-batches
    trainer.train_step(pairs, step, ref)  # the optimizer state exists from here on

    marks = [*model.parameters(), *trainer.optimizer.state_dict()["state"].values()]
    with _auditing(monkeypatch, trainer_module, marks) as audit:
        metrics = trainer.train_step(pairs, step, ref)
    assert audit.reads == []
    assert math.isfinite(float(metrics["loss"])) and trainer.last_step_finite


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=[
                pytest.mark.gpu,
                pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
            ],
        ),
    ],
)
def test_fit_reads_each_step_once_after_queueing_the_next(
    one_thread, monkeypatch, tmp_path, device
):
    """Fused AdamW: ``fit`` reads a step's values (metrics and flags, one host copy) only
    after it has queued the next step, so on a GPU the host never waits for the device between
    steps; the last step is read when it is done. The logged values are the steps' own: a
    trainer stepping and reading one step at a time logs the same numbers. On CUDA the device
    is kept busy after each step, so each copy to the host is still queued when ``fit`` reads
    it: a read that did not wait for it would log unwritten memory."""
    from sdpo.engine import trainer as trainer_module
    from sdpo.engine.trainer import build_optimizer

    config = tiny_config(tied=False)
    pairs = make_pairs(16, vocab=config.vocab_size, seed=6)
    logs = []
    for deferred in (True, False):
        model = init_model(config, seed=3).to(device)
        ref = score_pairs(model, pairs, max_tokens_per_batch=10_000, impl="torch")
        train = TrainConfig(
            learning_rate=1e-3, pairs_per_step=4, max_tokens_per_batch=60, save_every=0
        )
        trainer = DPOTrainer(
            model,
            config=train,
            loss_fn=partial(dpo_loss, config=LossConfig(beta=BETA)),
            kernels_impl="torch",
            progress=False,
            optimizer=build_optimizer(model, train, fused=True),
            output_dir=tmp_path / str(deferred),
        )
        (tmp_path / str(deferred)).mkdir()
        events: list[str] = []
        step, read = trainer.train_step, trainer_module._HostValues.read

        def stepping(*a, _step=step, _events=events):
            _events.append(f"step {len(_events)}")
            metrics = _step(*a)
            if device == "cuda":  # about 0.1 s of device time before the step's values' copy
                torch.cuda._sleep(200_000_000)
            return metrics

        def reading(self, _read=read, _events=events):
            _events.append("read")
            return _read(self)

        trainer.train_step = stepping
        monkeypatch.setattr(trainer_module._HostValues, "read", reading)
        if not deferred:  # reading each step at once: as if every step were a checkpoint's
            trainer.save_checkpoint = lambda trainer: None
            trainer.config = dataclasses.replace(train, save_every=1)
        marks = list(model.parameters())
        with _auditing(monkeypatch, trainer_module, marks) as audit:
            result = trainer.fit(pairs, ref)
        monkeypatch.undo()
        assert result.optimizer_steps == 4
        kinds = [e.split()[0] for e in events]
        if deferred:
            assert kinds == ["step", "step", "read", "step", "read", "step", "read", "read"]
        else:
            assert kinds == ["step", "read"] * 4
        assert {where for _, where in audit.reads} == {"engine/trainer.py:read"}, audit.reads
        assert len(audit.reads) == 4  # one host copy's list per step
        rows = (tmp_path / str(deferred) / "metrics.jsonl").read_text().splitlines()
        logs.append([json.loads(row) for row in rows])
    assert [r["step"] for r in logs[0]] == [1, 2, 3, 4]
    assert all(0 < r["loss"] < 10 and r["grad_norm"] > 0 for r in logs[0]), logs[0]
    for a, b in zip(*logs, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            if key != "tokens_per_s":
                assert a[key] == b[key], key


def _audited_data_parallel_step(overlap: bool) -> list[tuple[str, str]]:
    """One rank of a gloo group: an audited training step (after a first one)."""
    from sdpo.engine import trainer as trainer_module
    from sdpo.engine.trainer import build_optimizer

    torch.manual_seed(0)
    config = tiny_config(tied=False)
    pairs = make_pairs(8, vocab=config.vocab_size, seed=4)
    model = init_model(config, seed=2)
    ref = score_pairs(model, pairs, max_tokens_per_batch=10_000, impl="torch")
    train = TrainConfig(
        learning_rate=1e-3,
        pairs_per_step=8,
        max_tokens_per_batch=60,
        warmup_ratio=0.0,
        overlap_grad_reduce=overlap,
    )
    trainer = DPOTrainer(
        model,
        config=train,
        loss_fn=partial(dpo_loss, config=LossConfig(beta=BETA)),
        kernels_impl="torch",
        progress=False,
        optimizer=build_optimizer(model, train, fused=True),
    )
    assert trainer.data_parallel
    step = plan_steps(pairs, train, epoch=0)[0]
    trainer.train_step(pairs, step, ref)
    marks = [*model.parameters(), *trainer.optimizer.state_dict()["state"].values()]
    with (
        pytest.MonkeyPatch.context() as monkeypatch,
        _auditing(monkeypatch, trainer_module, marks) as audit,
    ):
        trainer.train_step(pairs, step, ref)
    return audit.reads


@pytest.mark.parametrize("overlap", [True, False], ids=["overlapped", "after_backward"])
def test_a_data_parallel_step_reads_no_device_value_on_the_host(tmp_path, overlap):
    """Two gloo ranks: the gradients and the metrics are summed over ranks on the device (the
    gradient all-reduce overlapped with the last backward, or after it), and the step still
    reads no device value on the host."""
    from tests.test_distributed import _spawn

    for reads in _spawn(tmp_path, _audited_data_parallel_step, overlap):
        assert reads == []


@pytest.mark.parametrize(
    "settings",
    [{}, {"share_prompt": True}, {"ld_alpha": 0.5, "return_aligned": True, "return_raw": True}],
    ids=["plain", "shared_prompt", "ld_wpo_raw"],
)
def test_the_scoring_pass_reads_device_values_once_at_its_end(one_thread, monkeypatch, settings):
    """The no-grad scoring pass keeps its values on the device and copies them to the host
    once, after its last batch."""
    from sdpo.engine import scoring as scoring_module

    config = tiny_config(tied=False)
    pairs = make_pairs(8, vocab=config.vocab_size, seed=4)
    model = init_model(config, seed=2)
    with _auditing(monkeypatch, scoring_module, list(model.parameters())) as audit:
        scores = score_pairs(model, pairs, max_tokens_per_batch=60, impl="torch", **settings)
    assert len(scores.chosen_logps) == len(pairs)
    assert audit.reads == [("cpu", "engine/scoring.py:_score_local")], audit.reads


def test_compiled_layers_keep_parameter_names_and_outputs(one_thread):
    config = tiny_config(tied=False)
    model = init_model(config, seed=1)
    names = list(model.state_dict())
    batch = pack_pairs(make_pairs(3, vocab=config.vocab_size, seed=2))
    args = (batch.input_ids, batch.position_ids, batch.cu_seqlens, batch.max_seqlen)
    with torch.no_grad():
        eager = model(*args)
        compile_decoder_layers(model, backend="eager")
        compiled = model(*args)
    assert list(model.state_dict()) == names  # checkpoints read and write the same keys
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)


@pytest.mark.parametrize("windowed", [False, True])
def test_compiled_layers_on_the_sdpa_path_take_new_sequence_counts_without_recompiling(
    one_thread, monkeypatch, windowed
):
    """On the per-sequence SDPA path (CPU, fp32) the compiled layers run the attention loop
    eagerly: batches of 2, 3 and 5 pairs (4, 6 and 10 sequences) reuse the first batch's graphs
    and give eager's outputs, with gradients and without; so do layers of which one slides
    (a window of 5 shorter than every sequence, a constant of its layer), whose masked
    attention runs in blocks of 4 queries: a number of blocks that differs from sequence to
    sequence and batch to batch, which no graph may be specialised on."""
    from torch._dynamo.utils import counters

    from sdpo.engine import attention

    config = tiny_config(tied=False)
    if windowed:
        config = dataclasses.replace(
            config, model_type="qwen3", sliding_window=5, sliding_layers=(1,)
        )
        monkeypatch.setattr(attention, "QUERY_BLOCK", 4)
    model = init_model(config, seed=5)
    eager = copy.deepcopy(model)
    compile_decoder_layers(model, backend="eager")
    graphs = None
    for count in (2, 3, 5):
        batch = pack_pairs(make_pairs(count, vocab=config.vocab_size, seed=30 + count))
        args = (batch.input_ids, batch.position_ids, batch.cu_seqlens, batch.max_seqlen)
        with torch.no_grad():
            torch.testing.assert_close(model(*args), eager(*args), rtol=0, atol=0)
        got, want = model(*args), eager(*args)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        if graphs is None:
            graphs = counters["stats"]["unique_graphs"]
    assert counters["stats"]["unique_graphs"] == graphs, "a new sequence count recompiled"


def _saved_activation_bytes(model, args) -> int:
    """Bytes the forward keeps for the backward, parameters left out."""
    params = {p.data_ptr() for p in model.parameters()}
    total = 0

    def pack(t):
        nonlocal total
        if t.data_ptr() not in params:
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        hidden = model(*args)
    return total, hidden


def test_activation_memory_budget_keeps_less_and_gives_the_same_numbers(one_thread):
    """The min-cut partitioner (run here without code generation) keeps less for the backward
    under a budget and recomputes the rest: outputs and gradients stay those of eager float64."""
    import torch._functorch.config as functorch_config

    config = tiny_config(tied=False)
    base = init_model(config, seed=3, dtype=torch.float64)
    batch = pack_pairs(make_pairs(3, vocab=config.vocab_size, seed=4))
    args = (batch.input_ids, batch.position_ids, batch.cu_seqlens, batch.max_seqlen)
    probe = torch.randn(config.hidden_size, dtype=torch.float64)
    results = {}
    before = functorch_config.activation_memory_budget
    try:
        for budget in (None, 1.0, 0.2):
            torch._dynamo.reset()
            model = copy.deepcopy(base)
            if budget is not None:
                compile_decoder_layers(
                    model,
                    backend="aot_eager_decomp_partition",
                    dynamic=False,
                    activation_memory_budget=budget,
                )
            kept, hidden = _saved_activation_bytes(model, args)
            (hidden @ probe).sum().backward()
            grads = [p.grad for p in model.parameters()]
            results[budget] = (kept, hidden.detach(), grads)
    finally:
        functorch_config.activation_memory_budget = before
        torch._dynamo.reset()
    eager, full, budgeted = results[None], results[1.0], results[0.2]
    assert budgeted[0] < 0.75 * full[0], (budgeted[0], full[0])
    for got in (full, budgeted):
        torch.testing.assert_close(got[1], eager[1], rtol=1e-12, atol=1e-12)
        for g, e in zip(got[2], eager[2]):
            torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match=r"activation_memory_budget must be in \[0, 1\]"):
        compile_decoder_layers(copy.deepcopy(base), activation_memory_budget=1.5)


def test_compile_decoder_layers_rejects_a_model_without_decoder_layers():
    with pytest.raises(TypeError, match="model.model.layers"):
        compile_decoder_layers(torch.nn.Linear(3, 5))


def load_throughput():
    spec = importlib.util.spec_from_file_location(
        "sdpo_bench_throughput", ROOT / "benchmarks" / "throughput.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def test_step_benchmark_smoke_reports_every_section(one_thread, tmp_path):
    throughput = load_throughput()
    out = tmp_path / "step.json"
    throughput.main(
        ["step", "--smoke", "--sdpo-run", "--torch-profile-steps", "1", "--json", str(out)]
    )
    payload = json.loads(out.read_text())
    assert payload["complete"] and payload["section"] == "step"
    rows = {r["variant"]: r for r in payload["results"]}
    prof = rows["sdpo train step under torch.profiler"]  # host ops only on a CPU
    assert prof["steps"] == 1 and prof["device_kernels"] == [] and prof["wall_ms_per_step"] > 0
    host = {op["name"]: op for op in prof["host_ops"]}
    assert "aten::mm" in host and host["aten::mm"]["calls_per_step"] >= 1
    train = rows["sdpo train step"]
    assert train["tokens_per_s"] > 0 and train["mfu"] > 0
    assert all(math.isfinite(v) for v in train["losses"])
    phases = rows["phases of one step (median, instrumented)"]
    parts = [phases[k] for k in throughput.PhaseRecorder.PHASES[:-1]]
    assert all(p >= 0 for p in parts) and sum(parts) <= phases["step_ms"] * 1.001
    run = rows["sdpo 2-step run (score+train, score+train)"]
    assert run["ratio_vs_train"] > 1.0 and len(run["train_s"]) == 2
    # the runner's extra passes: the initial model over chunk 2, a report pass per step
    assert run["initial_extra_s"] > 0 and len(run["report_s"]) == 2
    train = sum(run["train_s"])
    no_report = (run["total_s"] + run["initial_extra_s"]) / train
    assert run["ratio_runner_no_report"] == pytest.approx(no_report)
    assert run["ratio_runner_default"] == pytest.approx(no_report + sum(run["report_s"]) / train)
    assert run["ratio_vs_train"] < run["ratio_runner_no_report"] < run["ratio_runner_default"]


def test_every_benchmark_section_says_what_it_does_and_every_option_its_default():
    """``throughput.py SECTION --help``: a description, and each option that takes a value and
    has a default states it (several had no help at all)."""
    import argparse

    (sections,) = [
        a for a in load_throughput().build_parser()._actions if isinstance(a.choices, dict)
    ]
    silent = [
        f"{name} {action.option_strings[0]}"
        for name, section in sections.choices.items()
        for action in section._actions
        if action.nargs != 0
        and action.default not in (None, [], argparse.SUPPRESS)
        and "default" not in (action.help or "")
    ]
    assert silent == []
    assert all(section.description for section in sections.choices.values())


def test_step_benchmark_warns_of_a_bf16_the_gpu_only_emulates(monkeypatch, capsys):
    """The step section resolves --precision as sdpo train resolves train.precision: on a GPU
    before compute capability 8.0 (bf16_support answers as for a V100) a bf16 or bf16-mixed
    says once that it runs emulated, naming --precision and the values that avoid it (auto
    among them, which the flag takes); fp32 and auto say nothing there."""
    throughput = load_throughput()
    monkeypatch.setattr("sdpo.engine.precision.bf16_support", lambda device: "emulated")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    parser = throughput.build_parser()
    for precision in ("bf16", "bf16-mixed"):
        args = parser.parse_args(["step", "--precision", precision])
        assert throughput.step_precision(args, torch.device("cuda")) == precision
        out = capsys.readouterr().out.splitlines()
        assert out == [
            f"warning: --precision {precision} on this GPU (compute capability 7.0; bf16 "
            "arithmetic needs 8.0 or later) runs emulated bf16, slower than fp32; a run with "
            "--precision fp32 or --precision auto (fp32 on this GPU) avoids it"
        ]
    for precision, resolved in (("fp32", "fp32"), ("auto", "fp32")):
        args = parser.parse_args(["step", "--precision", precision])
        assert throughput.step_precision(args, torch.device("cuda")) == resolved
        assert capsys.readouterr().out == ""


def test_prep_benchmark_smoke_times_every_stage_on_data_of_the_paper_s_two_shapes(tmp_path):
    from sdpo.engine.data import read_preference_file

    throughput = load_throughput()
    out, data = tmp_path / "prep.json", tmp_path / "data"
    throughput.main(["prep", "--smoke", "--data", str(data), "--json", str(out)])
    payload = json.loads(out.read_text())
    assert payload["pairs"] == {"plain": 10, "chat": 20} and payload["tokens"] > 0
    stages = {r["stage"]: r["s"] for r in payload["stages"]}
    assert all(s >= 0 for s in stages.values())
    for stage in (
        "read + validate orca",
        "read + validate ultrafeedback",
        "render chat template (60 texts)",
        "tokenize_pairs (render + encode + cut)",
        "first run: load_pairs, cache cold (read, tokenize, write)",
        "second run: load_pairs, cache warm",
    ):
        assert stage in stages
    # the data kept in --data: plain rows, and chat rows whose completions repeat the prompt
    plain = read_preference_file(data / "plain.jsonl")
    chat = read_preference_file(data / "chat.jsonl")
    assert len(plain) == 10 and all(isinstance(r["prompt"], str) for r in plain)
    assert len(chat) == 20 and all(r["chosen"][0]["role"] == "assistant" for r in chat)
    assert (data / "tokens-train.safetensors").is_file()


def _torchrun_step_smoke(out: Path, *extra: str) -> dict:
    """``torchrun --nproc-per-node 2 benchmarks/throughput.py step --smoke ...`` (gloo, CPU)."""
    env = torchrun_env()
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # a free port of its own
        "--nproc-per-node=2",
        str(ROOT / "benchmarks" / "throughput.py"),
        *["step", "--smoke", "--pairs-per-step", "4", "--profile-steps", "1", *extra],
        *["--json", str(out)],
    ]
    # the timeout is a safety net against a hang, not a timing assertion (a run takes seconds)
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    table_rows = [line for line in done.stdout.splitlines() if line.startswith("sdpo train step ")]
    assert len(table_rows) == 1  # one table: rank 0 alone prints
    return json.loads(out.read_text())


@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
def test_step_benchmark_under_torchrun_reports_every_rank_and_trains_as_one_process(
    one_thread, tmp_path
):
    throughput = load_throughput()
    single = tmp_path / "single.json"
    # the two launches (independent runs, each of its own port and files) side by side, and the
    # single process meanwhile: they share the cores but no state
    with ThreadPoolExecutor(max_workers=2) as pool:
        launches = {
            "dp": pool.submit(_torchrun_step_smoke, tmp_path / "dp.json", "--sdpo-run"),
            "fsdp": pool.submit(_torchrun_step_smoke, tmp_path / "fsdp.json", "--fsdp"),
        }
        throughput.main(
            ["step", "--smoke", "--pairs-per-step", "4", "--profile-steps", "0"]
            + ["--json", str(single)]
        )
        runs = {mode: launch.result() for mode, launch in launches.items()}
    one = {r["variant"]: r for r in json.loads(single.read_text())["results"]}
    assert one["sdpo train step"]["ranks"][0]["rank"] == 0  # a world of one has the same rows
    args = throughput.build_parser().parse_args(["step", "--smoke"])
    for mode, payload in runs.items():
        assert payload["complete"] and payload["world_size"] == 2
        assert payload["backend"] == "gloo" and payload["mode"] == mode
        assert payload["overlap_grad_reduce"] is (True if mode == "dp" else None)
        assert payload["pairs_per_step"] == 4 and len(payload["matmul_tflops_per_rank"]) == 2
        pairs = throughput.synthetic_pairs(
            4 * (payload["warmup_steps"] + payload["timed_steps"]),
            vocab_size=payload["model_config"]["vocab_size"],
            **throughput.SMOKE_LENGTHS,
            seed=args.seed,
        )
        rows = {r["variant"]: r for r in payload["results"]}
        train, scoring = rows["sdpo train step"], rows["sdpo scoring pass (no grad)"]
        timed = pairs[4 * payload["warmup_steps"] :]
        for row, work in ((train, timed), (scoring, pairs)):
            ranks = row["ranks"]
            assert [r["rank"] for r in ranks] == [0, 1]
            # every pair is worked on by exactly one rank; the totals are global
            assert sum(r["tokens"] for r in ranks) == throughput.real_tokens(work)
            assert all(r["tokens"] > 0 for r in ranks)
            slowest = max(r["seconds"] for r in ranks)
            assert row["tokens_per_s"] == pytest.approx(throughput.real_tokens(work) / slowest)
            assert row["tokens_per_s_per_gpu"] == pytest.approx(row["tokens_per_s"] / 2)
            assert 0 < row["mfu_min"] <= row["mfu"]
        # the step's loss is reduced over ranks: both ranks agree to the bit, and it is the
        # single-process loss (the reference values differ by the scoring batches' rounding)
        losses = [r["losses"] for r in train["ranks"]]
        assert losses[0] == losses[1] == train["losses"]
        assert all(math.isfinite(v) for v in train["losses"])
        assert train["losses"] == pytest.approx(one["sdpo train step"]["losses"], rel=1e-5)
        phases = rows["phases of one step (median, instrumented)"]
        assert len(phases["ranks"]) == 2 and phases["decoder_bwd_ms"] > 0
    run = {r["variant"]: r for r in runs["dp"]["results"]}[
        "sdpo 2-step run (score+train, score+train)"
    ]
    assert "error" not in run and len(run["train_s"]) == 2


def test_model_flops_count_matmuls_and_attention_squares():
    throughput = load_throughput()
    config = tiny_config(tied=True)
    pair = TokenizedPair(index=0, prompt_ids=[5] * 3, chosen_ids=[6] * 4, rejected_ids=[7] * 2)
    # matmul params: 2 layers x (q 40x40 + k,v 2 x 40x20 + o 40x40 + mlp 3 x 40x72) + lm_head 97x40
    p = 2 * (1600 + 1600 + 1600 + 8640) + 3880
    assert throughput.matmul_params(config) == p
    tokens, squares = 7 + 5, 7**2 + 5**2
    expected = 3 * (2 * p * tokens + 4 * 2 * 40 * squares)
    assert throughput.model_flops([pair], config, training=True) == expected
    assert throughput.real_tokens([pair]) == tokens


@pytest.mark.parametrize(
    "model_type,window,sliding_layers",
    [("mistral", 4, None), ("qwen2", 3, (1,)), ("qwen3", 5, (0, 2)), ("qwen2", 40, None)],
)
def test_model_flops_count_only_the_keys_a_sliding_layer_sees(model_type, window, sliding_layers):
    """A sliding layer counts the band of the square its window leaves (the pairs query i
    attends to, i - window < j <= i, mirrored as the full square mirrors the causal triangle),
    a full layer the whole square; brute force over odd and even lengths, shorter and longer
    than the window."""
    throughput = load_throughput()
    base = tiny_config(tied=False)
    config = dataclasses.replace(
        base,
        model_type=model_type,
        num_hidden_layers=3,
        sliding_window=window,
        sliding_layers=sliding_layers,
    )
    pairs = [
        TokenizedPair(index=0, prompt_ids=[5] * 3, chosen_ids=[6] * 6, rejected_ids=[7] * 2),
        TokenizedPair(index=1, prompt_ids=[5] * 7, chosen_ids=[6] * 10, rejected_ids=[7]),
    ]
    lengths = [9, 5, 17, 8]
    counted = 0
    for layer in range(3):
        slides = sliding_layers is None or layer in sliding_layers
        for s in lengths:
            attended = sum(
                1 for i in range(s) for j in range(s) if j <= i and (not slides or i - j < window)
            )
            band = sum(1 for i in range(s) for j in range(s) if not slides or abs(i - j) < window)
            assert band == 2 * attended - s
            counted += band
    matmuls = 2 * throughput.matmul_params(config) * sum(lengths)
    for training, factor in ((False, 1), (True, 3)):
        expected = factor * (matmuls + 4 * 40 * counted)
        assert throughput.model_flops(pairs, config, training=training) == expected
    if window >= max(lengths):  # a window no sequence fills counts as no window
        plain = dataclasses.replace(config, model_type="llama", sliding_window=None)
        assert throughput.model_flops(pairs, config, training=True) == throughput.model_flops(
            pairs, plain, training=True
        )


def test_trl_comparison_trains_on_the_same_weights_and_batches_as_ours(one_thread, tmp_path):
    pytest.importorskip("trl")
    throughput = load_throughput()
    out = tmp_path / "step.json"
    argv = ["step", "--smoke", "--compare-trl", "--trl-profile-steps", "1", "--json", str(out)]
    throughput.main(argv)
    payload = json.loads(out.read_text())
    trl_row = payload["results"][-1]
    assert "error" not in trl_row, trl_row.get("traceback", trl_row.get("error"))
    # TRL's precomputed reference log-probs equal our scoring pass: same weights, same tokens.
    assert trl_row["ref_logps_max_abs_diff"] < 1e-2
    # Both timed passes train on the pairs of our timed steps, in order: exactly their real
    # tokens (the run checks each step's attention-mask sum against its pairs).
    args = throughput.build_parser().parse_args(argv)
    warmup, steps, pps = payload["warmup_steps"], payload["timed_steps"], payload["pairs_per_step"]
    pairs = throughput.synthetic_pairs(
        pps * (warmup + steps),
        vocab_size=payload["model_config"]["vocab_size"],
        **throughput.SMOKE_LENGTHS,
        seed=args.seed,
    )
    timed_tokens = throughput.real_tokens(pairs[pps * warmup :])
    for name in throughput.TRL_PASSES:
        run = trl_row[name]
        assert run["tokens"] == timed_tokens and run["padded_tokens"] >= timed_tokens
        assert len(run["step_ms"]) == steps and all(ms > 0 for ms in run["step_ms"])
    assert trl_row["tokens_timed"] == timed_tokens and trl_row["tokens_per_s"] > 0
    assert not trl_row["gradient_checkpointing"] and trl_row["attn_implementation"] == "sdpa"
    assert trl_row["profile"]["steps"] == 1 and trl_row["profile"]["host_ops"]
    assert payload["vs_trl"]["tokens_per_s_ratio"] > 0


def test_trl_run_order_repeats_the_timed_batches_after_the_warmup():
    throughput = load_throughput()
    pairs = list(range(2 * (3 + 4)))  # stand-ins: 2 pairs per step, 3 warm-up + 4 timed steps
    rows, windows = throughput.trl_dataset_rows(
        pairs, pairs_per_step=2, warmup=3, steps=4, profile=5
    )
    timed = pairs[6:]
    assert rows == pairs + timed + (timed + timed)[:10]
    assert windows == {"first_pass": (3, 7), "repeat_pass": (7, 11), "profile": (11, 16)}
    with pytest.raises(ValueError, match="need 14 pairs"):
        throughput.trl_dataset_rows(pairs[:-1], pairs_per_step=2, warmup=3, steps=4, profile=0)


def test_hf_copy_holds_our_weights_with_fp32_rotary_tables():
    pytest.importorskip("transformers")
    throughput = load_throughput()
    config = tiny_config(tied=False)
    model = init_model(config, seed=3, dtype=torch.bfloat16)
    state = model.state_dict()
    hf = throughput.hf_model_from_state(
        config, dict(state), dtype=torch.bfloat16, device=torch.device("cpu")
    )
    assert hf.config._attn_implementation == "sdpa"
    hf_state = hf.state_dict()
    assert all(torch.equal(hf_state[name], tensor) for name, tensor in state.items())
    assert {p.dtype for p in hf.parameters()} == {torch.bfloat16}
    # a bf16 cast of the rotary frequencies would shift the angles of late positions
    assert {b.dtype for n, b in hf.named_buffers() if "inv_freq" in n} == {torch.float32}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("checkpointing,window", [(False, None), (True, None), (False, 9)])
def test_inductor_compiled_layers_on_cuda_match_eager(checkpointing, window):
    """Compiled bf16 layers (optionally recomputed in backward) match eager bf16 against an
    fp32 truth. Without checkpointing there are no graph breaks and no recompiles across batch
    shapes. With non-reentrant checkpointing around the compiled layers, dynamo breaks the graph
    at the recompute (seen on an H100, torch 2.11: 10 breaks in this test); the numbers still
    match, which is what this case checks. With a window of 9 on the first and last layer
    (shorter than every sequence) the layers of each kind share their graphs."""
    from torch._dynamo.utils import counters

    windows = {}
    if window is not None:
        kinds = ["sliding_attention", "full_attention", "sliding_attention"]
        windows = {"use_sliding_window": True, "sliding_window": window, "layer_types": kinds}
    config = ModelConfig.from_hf_dict(
        {
            "model_type": "llama" if window is None else "qwen3",
            "vocab_size": 1000,
            "hidden_size": 256,
            "intermediate_size": 688,
            "num_hidden_layers": 3,
            "num_attention_heads": 8,
            "num_key_value_heads": 2,
            "head_dim": 32,
            **windows,
        }
    )
    eager = init_model(config, seed=0, dtype=torch.bfloat16).cuda()
    fast = copy.deepcopy(eager)
    truth = copy.deepcopy(eager).float()  # fp32 copy of the same bf16 weights
    probe = torch.randn(
        4096, config.hidden_size, device="cuda", generator=torch.Generator("cuda").manual_seed(0)
    )
    torch._dynamo.reset()
    counters.clear()
    compile_decoder_layers(fast)
    fast.gradient_checkpointing = checkpointing
    for seed in range(3):  # three batch shapes: dynamic shapes must not recompile
        batch = pack_pairs(make_pairs(2 + seed, vocab=config.vocab_size, seed=seed)).to("cuda")
        args = (batch.input_ids, batch.position_ids, batch.cu_seqlens, batch.max_seqlen)
        outs = []
        for model in (eager, fast):
            model.zero_grad(set_to_none=True)
            hidden = model(*args)  # (N, H) bf16
            # a fixed random projection: mean(hidden**2) would be constant after the final
            # RMSNorm, leaving gradients of pure rounding noise to compare
            (hidden.float() * probe[: hidden.shape[0]]).sum().backward()
            grad = model.model.layers[0].mlp.down_proj.weight.grad.float()
            outs.append((hidden.float(), grad))
        (h0, g0), (h1, g1) = outs
        with torch.no_grad():
            ref = truth(*args)  # (N, H) fp32
        # dtype-aware: the compiled bf16 layers are no worse than eager bf16 plus a margin
        err_eager = (h0 - ref).abs().max().item()
        err_fast = (h1 - ref).abs().max().item()
        assert err_fast <= 1.5 * err_eager + 1e-2 * ref.abs().max().item(), (err_fast, err_eager)
        cosine = F.cosine_similarity(g0.flatten(), g1.flatten(), dim=0)
        assert cosine > 0.99, f"batch {seed}: gradient cosine {float(cosine):.4f}"
        with torch.no_grad():
            fast(*args)
    if not checkpointing:
        assert not counters["graph_break"], dict(counters["graph_break"])
        # one graph with gradients, one without, shared by every layer (of a window) and
        # batch shape
        kinds = 1 if window is None else 2
        assert counters["stats"]["unique_graphs"] <= 2 * kinds, dict(counters["stats"])


def test_step_benchmark_runs_transformers_code_on_the_same_weights_to_the_same_losses(
    one_thread, tmp_path
):
    """``step --implementation transformers``: the same weights and pairs run by transformers'
    model in ``PackedCausalLM`` (as ``model.implementation`` does) train to the losses of
    sdpo's decoder."""
    throughput = load_throughput()
    losses = {}
    for implementation in ("sdpo", "transformers"):
        out = tmp_path / f"{implementation}.json"
        throughput.main(["step", "--smoke", "--implementation", implementation, "--json", str(out)])
        payload = json.loads(out.read_text())
        assert payload["complete"] and payload["implementation"] == implementation
        rows = {r["variant"]: r for r in payload["results"]}
        assert rows["sdpo train step"]["tokens_per_s"] > 0
        losses[implementation] = rows["sdpo train step"]["losses"]
    assert losses["transformers"] == pytest.approx(losses["sdpo"], rel=1e-4, abs=1e-5)
    with pytest.raises(SystemExit, match="--compile"):
        throughput.main(["step", "--smoke", "--implementation", "transformers", "--compile"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_step_benchmark_runs_transformers_code_on_cuda_to_finite_losses(tmp_path):
    """``step --implementation transformers`` on CUDA (``--smoke`` runs on the CPU): the tiny
    preset at the smoke lengths in bf16, uncompiled, with the PyTorch head (no Triton compile):
    every timed step's loss is finite and near ln 2, the policy being its own reference but
    for one warm-up step at the default learning rate (5e-7)."""
    pytest.importorskip("transformers")
    throughput = load_throughput()
    out = tmp_path / "step.json"
    argv = ["step", "--preset", "tiny", "--implementation", "transformers", "--no-compile"]
    argv += ["--precision", "bf16", "--impl", "torch", "--json", str(out)]
    argv += ["--prompt-len", "8", "--completion-min", "5", "--completion-max", "13"]
    throughput.main([*argv, "--warmup-steps", "1", "--steps", "2", "--profile-steps", "1"])
    payload = json.loads(out.read_text())
    assert payload["complete"] and payload["implementation"] == "transformers"
    assert payload["device"] == torch.cuda.get_device_name(0) and not payload["smoke"]
    assert payload["precision"] == "bf16" and payload["kernels_impl"] == "torch"
    rows = {r["variant"]: r for r in payload["results"]}
    step = rows["sdpo train step"]
    assert step["tokens_per_s"] > 0 and len(step["losses"]) == 2
    assert all(math.isfinite(v) for v in step["losses"])
    assert step["losses"] == pytest.approx([math.log(2)] * 2, abs=1e-2)
