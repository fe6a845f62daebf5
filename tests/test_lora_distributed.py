"""LoRA under data parallelism (two gloo processes on CPU): only the adapter's gradients are
reduced, and two optimizer steps on two ranks give the single process's adapter, with the frozen
weights untouched on every rank. Sharded (``train.fsdp``): the adapter attached to an FSDP2 base
and merged into its row shards matches a float64 merge (uneven shards, fp32 and bf16 weights);
two optimizer steps (fp32, bf16-mixed, fp32 in compiled layers; the memory probe first) equal one
process's (for compiled layers, its plain eager model's); a two-step sDPO run writes what one
process writes, and resumed inside step 2 ends bitwise where the uninterrupted sharded run ends."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sdpo.config import config_from_dict
from sdpo.engine import distributed, sharding
from sdpo.engine.checkpoint import load_pretrained
from sdpo.engine.compile import compile_decoder_layers
from sdpo.engine.lora import (
    adapter_parameters,
    attach_lora,
    lora_modules,
    lora_state_dict,
    merge_lora,
)
from sdpo.engine.model import ModelConfig, init_model
from sdpo.engine.scoring import score_pairs
from sdpo.engine.tiny import write_tiny_model
from sdpo.engine.trainer import TrainConfig, plan_steps
from sdpo.runner import run_training
from tests.conftest import WORDS, dpo_trainer, tiny_hf_dict, write_pairs
from tests.test_distributed import _alongside, _close, _pairs, _run_config, _strip
from tests.test_fsdp import _interrupt_in_step_2, _one_process_reference, _shifted
from tests.test_lora import _randomize_adapter

LR = 1e-2


def _two_lora_steps(model_dir: Path, data: Path) -> dict:
    """Two optimizer steps of a rank-3 adapter (the first moves B off zero, so the second
    gives A a gradient too); runs the same way in one process and in every rank."""
    pairs = _pairs(model_dir, data)
    model = load_pretrained(model_dir)
    ref = score_pairs(model, pairs, max_tokens_per_batch=4096, impl="torch", data_parallel=False)
    params = attach_lora(model, rank=3, alpha=6.0, seed=4)
    config = TrainConfig(learning_rate=LR, seed=3, pairs_per_step=9, max_tokens_per_batch=60)
    trainer = dpo_trainer(model, config)
    reduced = [] if trainer.grad_reducer is None else trainer.grad_reducer.buckets
    plan = plan_steps(pairs, config, epoch=0)
    for step in plan[:2]:
        trainer.train_step(pairs, step, ref)
    return {
        "adapter": lora_state_dict(model),
        "grads": [p.grad.clone() for p in params],
        "frozen": {
            n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad
        },
        "reduced": {id(p) for bucket in reduced for p in bucket} == {id(p) for p in params},
        "world": distributed.world(),
        "adapter_count": len(adapter_parameters(model)),
    }


def test_two_lora_steps_on_two_ranks_equal_one_process(tmp_path):
    model_dir = write_tiny_model(tmp_path / "model", words=WORDS, hidden_size=32, seed=1)
    data = write_pairs(tmp_path / "d.jsonl", n=23, seed=11)
    single, ranks = _alongside(
        lambda: _two_lora_steps(model_dir, data), tmp_path, _two_lora_steps, model_dir, data
    )
    initial = load_pretrained(model_dir).state_dict()
    for r, got in enumerate(ranks):
        assert got["world"] == 2 and got["reduced"], r  # the reducer holds the adapter only
        for name, w in single["adapter"].items():
            scale = w.abs().max().item()
            assert (w - got["adapter"][name]).abs().max().item() <= 1e-3 * LR + 1e-6 * scale
        for g, h in zip(single["grads"], got["grads"], strict=True):
            assert (g - h).abs().max().item() <= 1e-5 * (g.abs().max().item() + 1e-12), r
        for name, w in got["frozen"].items():
            assert torch.equal(w, initial[name]), (r, name)
    for name, w in ranks[0]["adapter"].items():
        assert torch.equal(w, ranks[1]["adapter"][name]), name
    # the steps moved both A and B, so the comparison is not vacuous
    moved = [name for name, w in single["adapter"].items() if w.abs().sum() > 0]
    assert any(n.endswith("lora_B") for n in moved)
    assert all(g.abs().sum() > 0 for g in single["grads"])


# -- sharded (train.fsdp): the base split over the ranks, the adapter whole on each --------
def _odd_model(dtype: torch.dtype) -> torch.nn.Module:
    """gate/up projections of 45 rows (23 and 22 per rank), biases on the attention's
    projections."""
    d = tiny_hf_dict(hidden_size=48, intermediate_size=45, head_dim=12, attention_bias=True)
    return init_model(ModelConfig.from_hf_dict(d), seed=5, dtype=dtype)


def _merges(fsdp: bool) -> dict:
    """A random adapter (B nonzero) on a model with odd-sized MLP projections (gate/up: 45
    rows, 23 and 22 per rank) and q/k/v biases, merged; fp32 and bf16 weights. Sharded: the
    adapter is attached after sharding and merged into the shards, then gathered."""
    out = {}
    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        model = _odd_model(dtype)
        if fsdp:
            model = sharding.shard_model(model, precision=precision)
        attach_lora(model, rank=5, alpha=12.0, seed=3)
        _randomize_adapter(model, seed=4)
        gate = model.model.layers[1].mlp.gate_proj
        out[precision] = {
            "adapter": lora_state_dict(model),
            "sharded_base": sharding.is_dtensor(gate.weight),
            "plain_adapter": not sharding.is_dtensor(gate.lora_A),
        }
        merge_lora(model)
        weights = sharding.full_state_dict(model) if fsdp else model.state_dict()
        out[precision]["merged"] = {k: v.detach().clone() for k, v in weights.items()}
        out[precision]["wrappers_left"] = bool(lora_modules(model))
    return out


def _sharded_lora_steps(model_dir: Path, data: Path, fsdp: bool) -> dict:
    """Two optimizer steps of a fresh adapter (fp32 with gradient checkpointing, bf16-mixed,
    and fp32 with gradient checkpointing in compiled layers: compiled, then sharded, as the
    runner does), the memory probe first, then the merge; in one process or sharded on every
    rank. One process's truth for the compiled layers is its plain eager model (the fp32
    variant's steps): tracing and partitioning must change no number beyond rounding."""
    pairs = _pairs(model_dir, data)
    ref = _shifted(
        _one_process_reference(model_dir, pairs), len(pairs)
    )  # rewards off zero from the first step
    out = {}
    for variant in ("fp32", "bf16-mixed", "fp32-compiled"):
        precision = variant.removesuffix("-compiled")
        if variant.endswith("-compiled") and not fsdp:
            out[variant] = out[precision]
            continue
        model = load_pretrained(model_dir)
        # fp32 with gradient checkpointing: each layer's forward (the adapter's included) is
        # recomputed inside FSDP's backward, from the gathered weight
        model.gradient_checkpointing = precision == "fp32"
        if variant.endswith("-compiled"):  # traced and partitioned, no code generation
            compile_decoder_layers(model, backend="aot_eager_decomp_partition")
        if fsdp:
            model = sharding.shard_model(model, precision=precision)
        # a pass before the adapter exists (the step's reference scoring): FSDP builds its
        # gathered parameters then, trainable; they must not get gradients once frozen
        score_pairs(model, pairs[:5], max_tokens_per_batch=4096, impl="torch", precision=precision)
        params = attach_lora(model, rank=3, alpha=6.0, seed=4)
        config = TrainConfig(
            learning_rate=LR,
            seed=3,
            fsdp=fsdp,
            precision=precision,
            adam_eps=1e-3,
            pairs_per_step=9,
            max_tokens_per_batch=60,  # 3 micro-batches a step: 2 + 1 and a filler pass
        )
        trainer = dpo_trainer(model, config)
        plan = plan_steps(pairs, config, epoch=0)
        trainer.probe_memory(pairs, ref, plan[0])
        metrics = []
        for step in plan[:2]:
            values = trainer.train_step(pairs, step, ref)
            metrics.append({k: float(v) for k, v in values.items()})
        frozen_grads = [p.grad for p in model.parameters() if not p.requires_grad]
        result = {
            "metrics": metrics,
            "adapter": lora_state_dict(model),
            "grads": [p.grad.clone() for p in params],
            "grad_dtypes": {p.grad.dtype for p in params},
            "overlapped": trainer.grad_reducer is not None,
            "frozen_without_grads": all(g is None for g in frozen_grads),
            "optimizer": trainer.state_dict()["optimizer"],
        }
        merge_lora(model)
        weights = sharding.full_state_dict(model) if fsdp else model.state_dict()
        result["merged"] = {k: v.detach().clone() for k, v in weights.items()}
        out[variant] = result
    return out


def _sharded_lora_run(config: dict, whole: Path) -> int:
    """A two-step sDPO run with LoRA, sharded; rank 0 keeps a copy of it in ``whole``, then the
    run is cut back to a mid-step checkpoint of step 2 and resumed (on every rank)."""
    calls = run_training(config_from_dict(config), progress=False).scoring_calls
    out = Path(config["output_dir"])
    if distributed.is_main():
        shutil.copytree(out, whole)
        _interrupt_in_step_2(out)
    distributed.barrier()
    resumed = run_training(config_from_dict(config), progress=False, resume=True)
    assert resumed.scoring_calls <= calls
    return calls


def _task(tmp: Path, model_dir: Path, data: Path, fsdp: bool) -> dict:
    # the run's data files in a folder of its own: the one-process task runs alongside the ranks
    inputs = tmp / ("inputs-two" if fsdp else "inputs-one")
    inputs.mkdir(exist_ok=True)
    config = _run_config(inputs, model_dir, tmp / ("two" if fsdp else "one"))
    config["lora"] = {"rank": 3, "alpha": 6.0, "targets": ["q_proj", "v_proj", "down_proj"]}
    if fsdp:
        config["train"] = {**config["train"], "fsdp": True, "async_save": True}
        run = _sharded_lora_run(config, tmp / "two-whole")
    else:
        run = run_training(config_from_dict(config), progress=False).scoring_calls
    return {
        "merges": _merges(fsdp),
        "steps": _sharded_lora_steps(model_dir, data, fsdp),
        "run": run,
    }


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """(folder, one process's results, each rank's results)."""
    tmp = tmp_path_factory.mktemp("fsdp_lora")
    model_dir = write_tiny_model(tmp / "model", words=WORDS, hidden_size=32, seed=1)
    data = write_pairs(tmp / "d.jsonl", n=23, seed=11)
    single, ranks = _alongside(
        lambda: _task(tmp, model_dir, data, False), tmp, _task, tmp, model_dir, data, True
    )
    return tmp, single, ranks


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_merge_into_row_shards_matches_a_float64_merge(sharded, precision):
    _, single, ranks = sharded
    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    eps = torch.finfo(dtype).eps
    initial = _odd_model(dtype).state_dict()
    got = ranks[0]["merges"][precision]
    assert got["sharded_base"] and got["plain_adapter"] and not got["wrappers_left"]
    assert ranks[1]["merges"][precision]["merged"] == {}  # rank 0 gathers
    for name, t in got["adapter"].items():  # the same adapter on every rank and in one process
        assert torch.equal(t, ranks[1]["merges"][precision]["adapter"][name]), name
        assert torch.equal(t, single["merges"][precision]["adapter"][name]), name
    merged, plain = got["merged"], single["merges"][precision]["merged"]
    assert merged.keys() == initial.keys()
    targets = 0
    for name, w in initial.items():
        assert merged[name].dtype == dtype, name
        key = name.removesuffix(".weight")
        if f"{key}.lora_A" not in got["adapter"]:  # biases, norms, embeddings: untouched
            assert torch.equal(merged[name], w), name
            continue
        targets += 1
        a, b = (got["adapter"][f"{key}.lora_{x}"].double() for x in "AB")
        update = (12.0 / 5) * b @ a  # (out, in)
        truth = w.double() + update
        # one rounding of the wide sum, plus the fp32 rounding of the update's products
        bound = eps * truth.abs() + 4 * torch.finfo(torch.float32).eps * (b.abs() @ a.abs())
        assert ((merged[name].double() - truth).abs() <= bound + 1e-30).all(), name
        # and the one-process merge to its last bit or one rounding step
        assert ((merged[name].double() - plain[name].double()).abs() <= bound).all(), name
        assert not torch.equal(merged[name], w), name
    assert targets == 7 * 2


@pytest.mark.parametrize("precision", ["fp32", "bf16-mixed", "fp32-compiled"])
def test_sharded_lora_steps_equal_one_process(sharded, precision):
    _, single, ranks = sharded
    want = single["steps"][precision]
    # fp32: within float rounding. bf16-mixed: FSDP gathers the weights in bf16 and casts each
    # decoder layer's input to bf16 (one process keeps the residual stream in fp32 under
    # autocast), so the two differ by bf16 roundings
    tol = 1e-6 if precision.startswith("fp32") else 8 * torch.finfo(torch.bfloat16).eps
    initial = load_pretrained(sharded[0] / "model").state_dict()
    for r, got in enumerate(ranks):
        got = got["steps"][precision]
        assert not got["overlapped"] and got["frozen_without_grads"], r
        assert got["grad_dtypes"] == {torch.float32}  # the adapter stays fp32
        for step, (m, n) in enumerate(zip(want["metrics"], got["metrics"], strict=True)):
            for k, v in m.items():
                assert n[k] == pytest.approx(v, rel=tol, abs=1e-6), (r, step, k)
        for g, h in zip(want["grads"], got["grads"], strict=True):
            assert _close(g, h, rel=tol), r
        for name, w in want["adapter"].items():
            scale = w.abs().max().item()
            assert (w - got["adapter"][name]).abs().max().item() <= 1e-3 * LR + tol * scale
        # the optimizer state is the adapter's, whole on every rank, in the plain form
        state = got["optimizer"]
        assert state["param_groups"] == want["optimizer"]["param_groups"]
        for i, s in want["optimizer"]["state"].items():
            assert s["exp_avg"].dtype == state["state"][i]["exp_avg"].dtype == torch.float32
            assert _close(s["exp_avg"], state["state"][i]["exp_avg"], rel=tol), (r, i)
    for name, t in ranks[0]["steps"][precision]["adapter"].items():
        assert torch.equal(t, ranks[1]["steps"][precision]["adapter"][name]), name
    # merged and gathered on rank 0: the targets moved, every other weight bitwise the initial
    merged = ranks[0]["steps"][precision]["merged"]
    assert merged.keys() == want["merged"].keys() and ranks[1]["steps"][precision]["merged"] == {}
    for name, w in want["merged"].items():
        assert merged[name].dtype == torch.float32
        diff = (w - merged[name]).abs().max().item()
        assert diff <= 1e-3 * LR + tol * w.abs().max().item(), name
        target = name.removesuffix(".weight") + ".lora_A" in want["adapter"]
        assert torch.equal(merged[name], initial[name]) != target, name
    moved = [n for n, w in want["adapter"].items() if n.endswith("lora_B") and w.abs().sum() > 0]
    assert moved and all(g.abs().sum() > 0 for g in want["grads"])


def test_sharded_lora_run_writes_what_one_process_writes_and_resumes_bitwise(sharded):
    tmp, single, ranks = sharded
    one, two, whole = tmp / "one", tmp / "two", tmp / "two-whole"
    assert ranks[0]["run"] == ranks[1]["run"] == single["run"]
    for t in (1, 2):
        a = load_file(str(one / f"step-{t}" / "model.safetensors"))
        b = load_file(str(whole / f"step-{t}" / "model.safetensors"))
        assert a.keys() == b.keys()
        for name, w in a.items():
            assert (w - b[name]).abs().max().item() <= 1e-5, (t, name)
        # the step's adapter in PEFT's layout, as one process writes it
        x = load_file(str(one / f"step-{t}" / "adapter" / "adapter_model.safetensors"))
        y = load_file(str(whole / f"step-{t}" / "adapter" / "adapter_model.safetensors"))
        assert x.keys() == y.keys() and len(x) == 2 * 3 * 2
        for name, v in x.items():
            assert (v - y[name]).abs().max().item() <= 1e-4 * (v.abs().max().item() + 1), name
        config = json.loads((whole / f"step-{t}" / "adapter" / "adapter_config.json").read_text())
        assert config["target_modules"] == ["down_proj", "q_proj", "v_proj"]
    # a mid-step checkpoint holds the adapter and the adapter's optimizer state only
    mid = sorted((whole / "checkpoints").iterdir())[0]
    assert not (mid / "model").exists()
    adapter = load_file(str(mid / "adapter.safetensors"))
    state = torch.load(mid / "trainer_state.pt", weights_only=True)["optimizer"]
    shapes = sorted(tuple(s["exp_avg"].shape) for s in state["state"].values())
    assert shapes == sorted(tuple(t.shape) for t in adapter.values())
    # resumed inside step 2 (sharded, from the adapter checkpoint): the uninterrupted run's bits
    for rel in ("step-2/model.safetensors", "step-2/adapter/adapter_model.safetensors"):
        a, b = load_file(str(whole / rel)), load_file(str(two / rel))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), rel
    lines = [_strip(x) for x in (whole / "metrics.jsonl").read_text().splitlines()]
    assert [_strip(x) for x in (two / "metrics.jsonl").read_text().splitlines()] == lines
