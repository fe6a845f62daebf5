"""LoRA (engine/lora.py and the runner's per-step adapter): the adapter layer against float64
truth, a fresh adapter changes no bit, merging equals the adapter model, the adapter keeps fp32
under bf16 parameters, PEFT's file layout, and whole sDPO runs through the CLI and
``run_training``: only the adapter trains, frozen weights stay bitwise, each step's PEFT adapter
merged onto M_{t-1} gives M_t, and a run stopped inside a step resumes to the same bits."""

from __future__ import annotations

import json
import math
from functools import partial
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import sdpo.engine.resume as resume_mod
from sdpo.cli import main
from sdpo.config import ConfigError, config_from_dict
from sdpo.engine.checkpoint import load_pretrained
from sdpo.engine.compile import compile_decoder_layers
from sdpo.engine.lora import (
    LORA_TARGETS,
    LoRALinear,
    adapter_parameters,
    attach_lora,
    load_lora_state_dict,
    lora_modules,
    lora_state_dict,
    merge_lora,
    merge_rounding_loss,
    peft_adapter_files,
)
from sdpo.engine.model import ModelConfig, init_model
from sdpo.engine.trainer import TrainConfig, TrainingStopped
from sdpo.kernels import sequence_logprobs
from sdpo.runner import OutputDirError, run_training
from tests.conftest import (
    assert_no_worse,
    dpo_trainer,
    tiny_hf_dict,
    two_source_config,
    write_pairs,
)

LENGTHS = [7, 13, 1, 10]  # odd sizes, one single-token sequence


def _model(*, dtype=torch.float64, seed=0, **overrides):
    d = tiny_hf_dict(hidden_size=48, intermediate_size=72, head_dim=12, **overrides)
    return init_model(ModelConfig.from_hf_dict(d), seed=seed, dtype=dtype)


def _packed(*, seed: int, vocab: int = 131):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (sum(LENGTHS),), generator=g)
    pos = torch.cat([torch.arange(n) for n in LENGTHS])
    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32)
    labels = torch.full_like(ids, -100)
    bounds = cu.tolist()
    for s, e in zip(bounds[:-1], bounds[1:], strict=True):
        labels[s : e - 1] = ids[s + 1 : e]
    seq_ids = torch.repeat_interleave(torch.arange(len(LENGTHS)), torch.tensor(LENGTHS))
    return ids, pos, cu, labels, seq_ids


def _forward(model, batch):
    ids, pos, cu, labels, seq_ids = batch
    hidden = model(ids, pos, cu, max(LENGTHS))  # (N, H)
    logps = sequence_logprobs(
        hidden, model.lm_head_weight, labels, seq_ids, len(LENGTHS), impl="torch"
    )
    return hidden, logps


def _randomize_adapter(model, *, seed: int, scale: float = 0.3) -> None:
    """A trained-looking adapter: B nonzero (a fresh one is all zeros)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_parameters(model):
            p.copy_(scale * torch.randn(p.shape, generator=g, dtype=torch.float64))


# -- the layer -----------------------------------------------------------------------------
@pytest.mark.parametrize("bias", [False, True])
def test_lora_linear_forward_and_gradients_match_float64_truth(bias):
    g = torch.Generator().manual_seed(5)
    base = torch.nn.Linear(37, 23, bias=bias)
    with torch.no_grad():
        base.weight.copy_(torch.randn(23, 37, generator=g))
        if bias:
            base.bias.copy_(torch.randn(23, generator=g))
    w64 = base.weight.detach().double().clone()
    b64 = base.bias.detach().double().clone() if bias else torch.zeros(23, dtype=torch.float64)
    layer = LoRALinear(base, rank=5, alpha=7.0, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(23, 5, generator=g))
    x = torch.randn(19, 37, generator=g, requires_grad=True)
    grad_out = torch.randn(19, 23, generator=g)
    y = layer(x)
    y.backward(grad_out)

    x64 = x.detach().double().requires_grad_(True)
    a64 = layer.lora_A.detach().double().requires_grad_(True)
    b64_lora = layer.lora_B.detach().double().requires_grad_(True)
    y64 = x64 @ w64.T + b64 + (7.0 / 5) * (x64 @ a64.T) @ b64_lora.T
    y64.backward(grad_out.double())
    torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.lora_A.grad.double(), a64.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.lora_B.grad.double(), b64_lora.grad, rtol=1e-5, atol=1e-5)
    assert layer.weight.grad is None and not layer.weight.requires_grad
    # A is kaiming-uniform as PEFT draws it: |A| <= 1/sqrt(in_features), not all tiny
    bound = 1 / math.sqrt(37)
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.abs().max() > 0.8 * bound


@pytest.mark.parametrize("use_rslora", [False, True])
def test_scaling_is_peft_s_with_and_without_rslora(use_rslora):
    """alpha / r, or alpha / sqrt(r) with rsLoRA: the layer against float64 and against PEFT's
    own LoRA layer holding the same A and B; the written adapter_config says which."""
    peft = pytest.importorskip("peft")
    g = torch.Generator().manual_seed(3)
    holder = torch.nn.Module()
    holder.q_proj = torch.nn.Linear(29, 17, bias=False, dtype=torch.float64)
    ours = LoRALinear(holder.q_proj, rank=4, alpha=6.0, use_rslora=use_rslora)
    assert ours.scale == (6.0 / 2 if use_rslora else 6.0 / 4)
    holder = peft.get_peft_model(
        torch.nn.Sequential(torch.nn.Linear(29, 17, bias=False, dtype=torch.float64)),
        peft.LoraConfig(r=4, lora_alpha=6, target_modules=["0"], use_rslora=use_rslora),
    )
    theirs = holder.base_model.model[0]
    w = torch.randn(17, 29, generator=g, dtype=torch.float64)
    a = torch.randn(4, 29, generator=g, dtype=torch.float64)
    b = torch.randn(17, 4, generator=g, dtype=torch.float64)
    with torch.no_grad():
        ours.weight.copy_(w)
        ours.lora_A.copy_(a)
        ours.lora_B.copy_(b)
        theirs.base_layer.weight.copy_(w)
        theirs.lora_A["default"].weight.copy_(a)
        theirs.lora_B["default"].weight.copy_(b)
    x = torch.randn(5, 29, generator=g, dtype=torch.float64)
    truth = x @ (w + ours.scale * b @ a).T
    torch.testing.assert_close(ours(x).double(), truth, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(theirs(x), truth, rtol=1e-12, atol=1e-12)
    _, config = peft_adapter_files(
        {},
        rank=4,
        alpha=6.0,
        dropout=0.0,
        targets=["q_proj"],
        base_model="m",
        use_rslora=use_rslora,
    )
    assert config["use_rslora"] is use_rslora


def test_dropout_acts_in_training_only():
    g = torch.Generator().manual_seed(2)
    base = torch.nn.Linear(29, 17)
    layer = LoRALinear(base, rank=3, alpha=16.0, dropout=0.5)
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(17, 3, generator=g))
    x = torch.randn(11, 29, generator=g)
    plain = base(x) + (16.0 / 3) * (x @ layer.lora_A.T) @ layer.lora_B.T
    layer.eval()
    torch.testing.assert_close(layer(x), plain, rtol=1e-5, atol=1e-5)
    assert torch.equal(layer(x), layer(x))
    layer.train()
    assert not torch.allclose(layer(x), plain, rtol=1e-3, atol=1e-3)


def test_fresh_adapter_leaves_outputs_bitwise_unchanged_and_freezes_the_rest():
    model = _model(dtype=torch.float32, seed=3)
    batch = _packed(seed=4)
    names_before = list(model.state_dict())
    with torch.no_grad():
        before = _forward(model, batch)
    params = attach_lora(model, rank=4, alpha=16.0, seed=9)
    with torch.no_grad():
        after = _forward(model, batch)
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])
    assert len(params) == 2 * len(LORA_TARGETS) * model.config.num_hidden_layers
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in params}
    # the base names are kept while attached; the adapter adds *.lora_A / *.lora_B only
    names = list(model.state_dict())
    assert [n for n in names if ".lora_" not in n] == names_before
    # the same seed draws the same adapter
    other = _model(dtype=torch.float32, seed=3)
    attach_lora(other, rank=4, alpha=16.0, seed=9)
    for a, b in zip(lora_state_dict(model).values(), lora_state_dict(other).values(), strict=True):
        assert torch.equal(a, b)


def test_gradient_checkpointing_with_dropout_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        model = _model(dtype=torch.float32, seed=3)
        attach_lora(model, rank=3, alpha=8.0, dropout=0.25, seed=1)
        _randomize_adapter(model, seed=2, scale=0.1)
        model.gradient_checkpointing = checkpointing
        model.train()
        torch.manual_seed(0)  # the dropout masks; checkpointing replays them in recompute
        _, logps = _forward(model, _packed(seed=6))
        logps.sum().backward()
        grads.append([p.grad.clone() for p in adapter_parameters(model)])
    for a, b in zip(*grads, strict=True):
        assert torch.equal(a, b)


def test_regionally_compiled_layers_with_adapters_match_eager_and_reuse_graphs(one_thread):
    outs = []
    for compiled in (False, True):
        model = _model(dtype=torch.float32, seed=3)
        if compiled:  # traced by Dynamo, run eagerly: tracing must change no number
            compile_decoder_layers(model, backend="eager")
        attach_lora(model, rank=3, alpha=8.0, seed=1)
        _randomize_adapter(model, seed=2, scale=0.1)
        _, logps = _forward(model, _packed(seed=6))
        logps.sum().backward()
        outs.append([logps.detach(), *(p.grad.clone() for p in adapter_parameters(model))])
    for a, b in zip(*outs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # the next sDPO step's fresh adapter on the merged model reuses the compiled graphs
    merge_lora(model)
    attach_lora(model, rank=3, alpha=8.0, seed=2)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    _, logps = _forward(model, _packed(seed=7))
    logps.sum().backward()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs


# -- merging -------------------------------------------------------------------------------
def test_merge_gives_the_adapter_models_outputs_and_the_base_names():
    batch = _packed(seed=8)
    model64 = _model(seed=11)
    names = list(model64.state_dict())
    attach_lora(model64, rank=5, alpha=12.0, seed=3)
    _randomize_adapter(model64, seed=4)
    with torch.no_grad():
        truth_h, truth_lp = _forward(model64, batch)  # float64 adapter model: the truth
        merge_lora(model64)
        merged_h, merged_lp = _forward(model64, batch)
    assert list(model64.state_dict()) == names
    assert all(type(m) is not LoRALinear for m in model64.modules())
    torch.testing.assert_close(merged_h, truth_h, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(merged_lp, truth_lp, rtol=1e-10, atol=1e-10)
    # fp32: merged is as close to the float64 truth as the fp32 adapter model is
    model32 = _model(dtype=torch.float32, seed=11)
    attach_lora(model32, rank=5, alpha=12.0, seed=3)
    _randomize_adapter(model32, seed=4)
    with torch.no_grad():
        adapter_h, adapter_lp = _forward(model32, batch)
        merge_lora(model32)
        merged32_h, merged32_lp = _forward(model32, batch)
    assert_no_worse("hidden", merged32_h, adapter_h, truth_h, rel_margin=1e-5, factor=2.0)
    assert_no_worse("logps", merged32_lp, adapter_lp, truth_lp, rel_margin=1e-5, factor=2.0)
    assert all(p.requires_grad for p in model32.parameters())  # flags restored


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_merge_reports_the_share_of_the_update_that_rounding_dropped(dtype):
    """bf16 weights hold no update smaller than half a bf16 step: a merge into them drops it,
    and merge_lora says how much (against float64); fp32 weights keep it."""
    model = _model(dtype=dtype, seed=5)
    attach_lora(model, rank=2, alpha=4.0, targets=["q_proj", "down_proj"], seed=1)
    _randomize_adapter(model, seed=6, scale=3e-4)  # scale * B @ A ~ 1e-7 .. 1e-6
    before = {n: m.weight.detach().double().clone() for n, m in lora_modules(model)}
    updates = {n: m.scale * m.lora_B.double() @ m.lora_A.double() for n, m in lora_modules(model)}
    rounding = merge_lora(model)
    dropped = update = 0.0
    for name, delta in updates.items():
        merged = model.get_submodule(name).weight.double()
        dropped += ((merged - before[name]) - delta).square().sum().item()
        update += delta.square().sum().item()
    torch.testing.assert_close(
        rounding, torch.tensor([dropped, update], dtype=torch.float64), rtol=1e-4, atol=1e-30
    )
    lost = merge_rounding_loss(rounding)
    if dtype == torch.bfloat16:
        assert lost > 0.9  # the weights are ~1e-2: nearly all of the update is gone
    else:
        assert lost < 1e-2  # fp32 rounds the sum too, by 2^-24 of the weight


def test_a_lora_merge_that_rounds_away_the_update_is_reported(tiny_model_dir, tmp_path, capsys):
    """precision = "bf16" with LoRA at a low learning rate: M_t keeps little of the step's
    update, which the run says; bf16-mixed (fp32 base weights) keeps it and says nothing."""
    for precision in ("bf16", "bf16-mixed"):
        train = {"precision": precision, "learning_rate": 1e-6, "warmup_ratio": 0.0}
        d = two_source_config(tmp_path, tiny_model_dir, out=precision, train=train)
        d["lora"] = {"rank": 2}
        d["sdpo"]["steps"] = 1
        d["data"]["sources"] = d["data"]["sources"][:1]
        run_training(config_from_dict(d), progress=False)
        out = capsys.readouterr().out
        said = "merging step 1's LoRA adapter into the torch.bfloat16 weights rounded away"
        assert (said in out) == (precision == "bf16"), out
        if precision == "bf16":
            assert 'train.precision = "bf16-mixed" keeps fp32 base weights' in out
            m0 = load_pretrained(tiny_model_dir, dtype=torch.bfloat16).state_dict()
            m1 = load_file(tmp_path / precision / "step-1" / "model.safetensors")
            targets = [k for k in m0 if k.endswith(tuple(f"{t}.weight" for t in LORA_TARGETS))]
            changed = sum(int((m1[k] != m0[k]).sum()) for k in targets)
            assert changed < 0.5 * sum(m0[k].numel() for k in targets)  # most entries kept M0's


def test_bf16_parameters_keep_the_adapter_and_its_optimizer_states_in_fp32(
    tiny_model_dir, tmp_path
):
    from sdpo.engine.data import read_preference_file
    from sdpo.engine.tokenize import PairTokenizer, tokenize_pairs

    rows = read_preference_file(str(write_pairs(tmp_path / "d.jsonl", n=5, seed=3)), source="s")
    pairs, _ = tokenize_pairs(
        rows, PairTokenizer.from_dir(tiny_model_dir), max_length=32, max_prompt_length=16
    )
    model = load_pretrained(tiny_model_dir)  # fp32; the trainer casts the base to bf16
    params = attach_lora(model, rank=2, alpha=4.0, seed=0)
    trainer = dpo_trainer(
        model, TrainConfig(learning_rate=1e-2, pairs_per_step=5, precision="bf16")
    )
    from sdpo.engine.scoring import score_pairs

    ref = score_pairs(model, pairs, max_tokens_per_batch=512, impl="torch", precision="bf16")
    trainer.train_step(pairs, [list(range(len(pairs)))], ref)
    assert all(p.dtype == torch.float32 for p in params)
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
    groups = [p for g in trainer.optimizer.param_groups for p in g["params"]]
    assert {id(p) for p in groups} == {id(p) for p in params}
    for p in params:
        state = trainer.optimizer.state[p]
        assert state["exp_avg"].dtype == torch.float32
    assert any(p.abs().sum() > 0 for p in params[1::2])  # B moved off zero


def test_adapter_state_round_trip_and_peft_layout():
    model = _model(dtype=torch.float32, seed=1)
    targets = ["q_proj", "down_proj", "v_proj"]
    attach_lora(model, rank=3, alpha=6.0, targets=targets, seed=2)
    _randomize_adapter(model, seed=3)
    state = lora_state_dict(model)
    other = _model(dtype=torch.float32, seed=1)
    attach_lora(other, rank=3, alpha=6.0, targets=targets, seed=99)
    load_lora_state_dict(other, state)
    for name, t in lora_state_dict(other).items():
        assert torch.equal(t, state[name])
    tensors, config = peft_adapter_files(
        state, rank=3, alpha=6.0, dropout=0.0, targets=targets, base_model="m"
    )
    h, i = model.config.hidden_size, model.config.intermediate_size
    q = model.config.num_attention_heads * model.config.head_dim
    kv = model.config.num_key_value_heads * model.config.head_dim
    want = {}
    for layer in range(model.config.num_hidden_layers):
        for mod, (out_f, in_f) in {
            "self_attn.q_proj": (q, h),
            "self_attn.v_proj": (kv, h),
            "mlp.down_proj": (h, i),
        }.items():
            key = f"base_model.model.model.layers.{layer}.{mod}"
            want[f"{key}.lora_A.weight"] = (3, in_f)
            want[f"{key}.lora_B.weight"] = (out_f, 3)
    assert {k: tuple(t.shape) for k, t in tensors.items()} == want
    assert all(t.dtype == torch.float32 for t in tensors.values())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert (config["r"], config["lora_alpha"], config["bias"]) == (3, 6.0, "none")
    assert config["target_modules"] == sorted(targets) and config["base_model_name_or_path"] == "m"
    with pytest.raises(ValueError, match="rank"):
        bad = _model(dtype=torch.float32, seed=1)
        attach_lora(bad, rank=2, alpha=6.0, targets=targets, seed=2)
        load_lora_state_dict(bad, state)
    with pytest.raises(ValueError, match="valid targets are q_proj"):
        attach_lora(_model(seed=1), rank=2, alpha=1.0, targets=["qkv"], seed=0)


# -- whole runs ----------------------------------------------------------------------------
def _config_dict(tmp_path: Path, model_dir: Path, *, out: str, **sections) -> dict:
    d = two_source_config(
        tmp_path,
        model_dir,
        out=out,
        train={"learning_rate": 3e-2, "warmup_ratio": 0.0, "schedule": "constant"},
    )
    for name, values in sections.items():
        d.setdefault(name, {}).update(values)
    return d


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_cli_lora_run_trains_only_the_adapter_and_writes_peft_adapters(tiny_model_dir, tmp_path):
    d = _config_dict(tmp_path, tiny_model_dir, out="full")
    (tmp_path / "run.toml").write_text(
        f'output_dir = "{tmp_path / "lora"}"\n'
        + "".join(
            f"[{section}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items())
            for section, values in d.items()
            if section not in ("output_dir", "data")
        )
        + f'[data]\nmax_length = 32\nmax_prompt_length = 16\n[[data.sources]]\nname = "far"\n'
        f'path = "{d["data"]["sources"][0]["path"]}"\n[[data.sources]]\nname = "near"\n'
        f'path = "{d["data"]["sources"][1]["path"]}"\n'
    )
    args = ["train", "--config", str(tmp_path / "run.toml"), "--no-progress"]
    assert main([*args, "--set", "lora.rank=4", "--set", "train.save_every=2"]) == 0
    out = tmp_path / "lora"
    assert "[lora]\nrank = 4\nalpha = 16.0" in (out / "config.toml").read_text()
    m0 = load_pretrained(tiny_model_dir)
    m1, m2 = (load_pretrained(out / f"step-{t}") for t in (1, 2))
    for name, w in m2.state_dict().items():
        changed = not torch.equal(w, m0.state_dict()[name])
        # embeddings, norms and lm_head are frozen: bitwise the initial model's
        assert changed == name.endswith(tuple(f"{t}.weight" for t in LORA_TARGETS)), name
    # each step's PEFT adapter merged onto M_{t-1} gives M_t (the same fp32 arithmetic)
    for t, (before, after) in enumerate(((m0, m1), (m1, m2)), start=1):
        folder = out / f"step-{t}" / "adapter"
        config = json.loads((folder / "adapter_config.json").read_text())
        assert (config["r"], config["lora_alpha"]) == (4, 16.0)
        base_dir = tiny_model_dir if t == 1 else out / "step-1"
        assert config["base_model_name_or_path"] == str(base_dir)
        tensors = load_file(folder / "adapter_model.safetensors")
        assert len(tensors) == 2 * len(LORA_TARGETS) * m0.config.num_hidden_layers
        for name, w in before.state_dict().items():
            key = f"base_model.model.{name.removesuffix('.weight')}"
            if f"{key}.lora_A.weight" in tensors:
                a, b = tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"]
                assert torch.equal(w + (16.0 / 4) * b @ a, after.state_dict()[name]), name
    # the mid-step checkpoint holds the adapter, not the weights, and an optimizer of the
    # adapter only
    ckpt = out / "checkpoints" / "ckpt-00000005"
    assert not (ckpt / "model").exists()
    adapter = load_file(ckpt / "adapter.safetensors")
    state = torch.load(ckpt / "trainer_state.pt", weights_only=True)["optimizer"]
    shapes = sorted(tuple(s["exp_avg"].shape) for s in state["state"].values())
    assert shapes == sorted(tuple(t.shape) for t in adapter.values())
    # metrics: the same schema as full fine-tuning; rewards start at 0 (policy == reference);
    # the loss falls at this high learning rate
    lora_metrics = _metrics(out)
    assert main([*args, "--set", f"output_dir={tmp_path / 'full'}"]) == 0
    full_metrics = _metrics(tmp_path / "full")
    assert [sorted(m) for m in lora_metrics] == [sorted(m) for m in full_metrics]
    first = lora_metrics[0]
    assert abs(first["rewards/chosen"]) < 1e-5 and abs(first["rewards/rejected"]) < 1e-5
    assert abs(first["loss"] - math.log(2)) < 1e-5
    step1 = [m["loss"] for m in lora_metrics if m["sdpo_step"] == 1]
    assert step1[-1] < step1[0] - 0.01


def test_lora_run_stopped_inside_steps_resumes_bitwise(tiny_model_dir, tmp_path, monkeypatch):
    targets = {"targets": ["q_proj", "v_proj", "down_proj"], "rank": 3, "dropout": 0.1}
    make = partial(_config_dict, tmp_path, tiny_model_dir, lora=targets)
    baseline = config_from_dict(make(out="baseline", train={"save_every": 2}))
    run_training(baseline, progress=False)
    cfg = config_from_dict(make(out="cut", train={"save_every": 2}))
    # SIGTERM at the 2nd optimizer step (inside sDPO step 1), then at the 3rd after resuming
    # (inside step 2, whose frozen base step-1/ comes from disk)
    for fault in ("train_step:2:TERM", "train_step:3:TERM"):
        monkeypatch.setattr(resume_mod, "_fault_counts", {})
        monkeypatch.setenv("SDPO_FAULT_AT", fault)
        with pytest.raises(TrainingStopped):
            run_training(cfg, progress=False, resume=True)
    monkeypatch.delenv("SDPO_FAULT_AT")
    run_training(cfg, progress=False, resume=True)
    a, b = Path(baseline.output_dir), Path(cfg.output_dir)
    for rel in ("step-1/model.safetensors", "step-2/model.safetensors"):
        wa, wb = load_file(a / rel), load_file(b / rel)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), rel
    for t in (1, 2):
        rel = f"step-{t}/adapter/adapter_model.safetensors"
        assert (a / rel).read_bytes() == (b / rel).read_bytes()
    m0, m2 = load_pretrained(tiny_model_dir), load_pretrained(a / "step-2")
    for name, w in m2.state_dict().items():
        if not name.endswith(("q_proj.weight", "v_proj.weight", "down_proj.weight")):
            assert torch.equal(w, m0.state_dict()[name]), name
    timing = {"tokens_per_s"}
    strip = [{k: v for k, v in m.items() if k not in timing} for m in _metrics(a)]
    assert strip == [{k: v for k, v in m.items() if k not in timing} for m in _metrics(b)]
    # changing the adapter between a run and its resume is refused, naming the key
    changed = config_from_dict(make(out="cut", train={"save_every": 2}, lora={"rank": 5}))
    with pytest.raises(OutputDirError, match=r"lora\.rank \(3 -> 5\)"):
        run_training(changed, progress=False, resume=True)


def test_resume_inside_step_one_refuses_a_changed_initial_model(
    tiny_model_dir, tmp_path, monkeypatch
):
    from sdpo.engine.tiny import write_tiny_model
    from tests.conftest import WORDS

    cfg = config_from_dict(_config_dict(tmp_path, tiny_model_dir, out="run", lora={"rank": 2}))
    monkeypatch.setattr(resume_mod, "_fault_counts", {})
    monkeypatch.setenv("SDPO_FAULT_AT", "train_step:1:TERM")
    with pytest.raises(TrainingStopped):
        run_training(cfg, progress=False)
    monkeypatch.delenv("SDPO_FAULT_AT")
    # the adapter's frozen base (model.path) is not in the checkpoint: other weights there now
    # (refused as other initial weights, before the adapter's own base check)
    write_tiny_model(tiny_model_dir, words=WORDS, hidden_size=32, seed=2)
    with pytest.raises(OutputDirError, match=r"model\.path \(.*\) holds other weights"):
        run_training(cfg, progress=False, resume=True)


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        ({"lora": {"rank": 4, "targets": ["q_proj", "qkv"]}}, r"\['qkv'\].*valid targets are"),
        ({"lora": {"rank": -1}}, r"lora\.rank must be >= 0"),
        ({"lora": {"rank": 4, "dropout": 1.0}}, r"lora\.dropout"),
        (
            {"lora": {"rank": 4}, "sdpo": {"reset_optimizer": False}},
            r"reset_optimizer = false does not go with LoRA",
        ),
        ({"lora": {"ranks": 4}}, r"unknown key 'lora\.ranks'.*lora\.rank"),
    ],
)
def test_bad_lora_settings_are_refused_with_a_clear_message(
    tiny_model_dir, tmp_path, sections, message
):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(_config_dict(tmp_path, tiny_model_dir, out="x", **sections))


@pytest.mark.parametrize("targets", ["all-linear", ["all-linear"]])
def test_all_linear_targets_every_projection_as_peft_s_shorthand(tiny_model_dir, tmp_path, targets):
    cfg = config_from_dict(
        _config_dict(tmp_path, tiny_model_dir, out="x", lora={"rank": 2, "targets": targets})
    )
    assert cfg.lora.targets == list(LORA_TARGETS)
    model = _model(dtype=torch.float32, seed=1)
    attach_lora(model, rank=2, alpha=4.0, targets=targets, seed=0)
    wrapped = {name.rsplit(".", 1)[1] for name, _ in lora_modules(model)}
    assert wrapped == set(LORA_TARGETS)
    _, config = peft_adapter_files(
        lora_state_dict(model), rank=2, alpha=4.0, dropout=0.0, targets=targets, base_model="m"
    )
    assert config["target_modules"] == sorted(LORA_TARGETS)


def test_step_benchmark_smoke_runs_with_a_lora_adapter(one_thread, tmp_path):
    from tests.test_speed_paths import load_throughput

    throughput = load_throughput()
    out = tmp_path / "step.json"
    throughput.main(["step", "--smoke", "--lora-rank", "3", "--sdpo-run", "--json", str(out)])
    payload = json.loads(out.read_text())
    assert payload["complete"] and payload["lora_rank"] == 3
    config = ModelConfig(**payload["model_config"])
    h, d = config.hidden_size, config.head_dim
    q, kv, i = (
        config.num_attention_heads * d,
        config.num_key_value_heads * d,
        config.intermediate_size,
    )
    per_layer = 3 * ((h + q) + 2 * (h + kv) + (q + h) + 2 * (h + i) + (i + h))
    assert payload["lora_params"] == config.num_hidden_layers * per_layer
    rows = {r["variant"]: r for r in payload["results"]}
    train = rows["sdpo train step"]
    assert train["mfu"] > 0 and all(math.isfinite(v) for v in train["losses"])
    assert len(rows["sdpo 2-step run (score+train, score+train)"]["train_s"]) == 2
