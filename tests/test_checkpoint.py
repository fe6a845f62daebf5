"""Hugging Face checkpoint I/O: logits parity with transformers both ways, shards, errors,
fingerprints."""

from __future__ import annotations

import copy
import dataclasses
import json
import sys

import pytest
import torch

from sdpo.engine.checkpoint import (
    CheckpointError,
    architecture_differences,
    architecture_text,
    checkpoint_fingerprint,
    earlier_model_fingerprints,
    fingerprint_with,
    load_pretrained,
    model_fingerprint,
    save_pretrained,
)
from sdpo.engine.model import CausalLM, ModelConfig, init_model
from tests.conftest import tiny_hf_dict

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

LENGTHS = [5, 11, 1, 8]  # odd sizes, one single-token sequence
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}


def _random_model(d: dict, *, seed: int) -> CausalLM:
    """init_model plus non-trivial norm weights and biases (init sets them to 1 and 0)."""
    model = init_model(ModelConfig.from_hf_dict(d), seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return model


def _packed(lengths, *, vocab: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (sum(lengths),), generator=g)
    pos = torch.cat([torch.arange(n) for n in lengths])
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return ids, pos, cu


@torch.no_grad()
def _our_logits(model: CausalLM, ids, pos, cu) -> torch.Tensor:
    hidden = model(ids, pos, cu, int((cu[1:] - cu[:-1]).max()))  # (N, H)
    return hidden @ model.lm_head_weight.T  # (N, V)


@torch.no_grad()
def _hf_logits_per_sequence(hf_model, ids, cu) -> torch.Tensor:
    bounds = cu.tolist()
    return torch.cat(
        [hf_model(ids[s:e][None]).logits[0] for s, e in zip(bounds[:-1], bounds[1:])]
    )  # (N, V)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


PARITY_CASES = {
    "llama-untied": tiny_hf_dict(),
    "llama-tied": tiny_hf_dict(tie_word_embeddings=True),
    "llama-all-attention-bias": tiny_hf_dict(attention_bias=True, mlp_bias=True),
    "qwen2-qkv-bias-tied": tiny_hf_dict(model_type="qwen2", tie_word_embeddings=True),
    "mistral-head-dim": tiny_hf_dict(model_type="mistral", head_dim=24, sliding_window=None),
    "qwen3-qk-norm-head-dim-tied": tiny_hf_dict(
        model_type="qwen3", head_dim=24, tie_word_embeddings=True
    ),
    "llama3-rope-scaling": tiny_hf_dict(rope_theta=500000.0, rope_scaling=LLAMA3_ROPE),
    "rope-parameters-llama3": tiny_hf_dict(
        rope_theta=None, rope_parameters={**LLAMA3_ROPE, "rope_theta": 70000.0}
    ),
    "rope-parameters-default": tiny_hf_dict(
        rope_theta=None, rope_parameters={"rope_type": "default", "rope_theta": 1234.0}
    ),
    "linear-rope-scaling": tiny_hf_dict(rope_scaling={"type": "linear", "factor": 3.0}),
}


@pytest.mark.parametrize("case", PARITY_CASES)
def test_saved_checkpoint_loads_in_transformers_with_same_logits(case, tmp_path):
    model = _random_model(PARITY_CASES[case], seed=len(case))
    save_pretrained(model, tmp_path / "ckpt")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.float32)
    ids, pos, cu = _packed(LENGTHS, vocab=131, seed=1)
    ours = _our_logits(model, ids, pos, cu)
    assert ours.shape == (sum(LENGTHS), 131)
    assert _max_diff(ours, _hf_logits_per_sequence(hf, ids, cu)) <= 1e-4


def test_rope_scaling_changes_the_logits_so_parity_checks_it():
    """Guards the parity cases above: the scaled variants differ from the default rotary."""
    base = _random_model(tiny_hf_dict(rope_theta=500000.0), seed=3)
    ids, pos, cu = _packed(LENGTHS, vocab=131, seed=2)
    plain = _our_logits(base, ids, pos, cu)
    for scaling in (LLAMA3_ROPE, {"rope_type": "linear", "factor": 3.0}):
        scaled = CausalLM(
            ModelConfig.from_hf_dict(tiny_hf_dict(rope_theta=500000.0, rope_scaling=scaling))
        )
        scaled.load_state_dict(base.state_dict())
        assert _max_diff(_our_logits(scaled, ids, pos, cu), plain) > 1e-3


# windows shorter than LENGTHS' longest sequence, which no layer applies (max_window_layers
# defaults to 28; layer_types names none) or some layers apply, and bias flags the type's model
# ignores (Mistral, Qwen2's and Qwen3's MLP) or honours (Qwen3's attention_bias)
HF_CONFIGS = {
    "qwen2-window-on-the-second-layer": (
        "Qwen2Config",
        {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1},
    ),
    "llama-untied": ("LlamaConfig", {}),
    "llama-tied": ("LlamaConfig", {"tie_word_embeddings": True}),
    "qwen2-tied": ("Qwen2Config", {"tie_word_embeddings": True}),
    "qwen3-tied": ("Qwen3Config", {"tie_word_embeddings": True}),
    "qwen2-window-on-no-layer": ("Qwen2Config", {"use_sliding_window": True, "sliding_window": 4}),
    "qwen3-window-on-no-layer-type": (
        "Qwen3Config",
        {
            "use_sliding_window": True,
            "sliding_window": 4,
            "max_window_layers": 0,
            "layer_types": ["full_attention"] * 2,
        },
    ),
    "mistral-bias-flags": ("MistralConfig", {"attention_bias": True, "mlp_bias": True}),
    "qwen2-bias-flags": ("Qwen2Config", {"attention_bias": True, "mlp_bias": True}),
    "qwen3-bias-flags": ("Qwen3Config", {"attention_bias": True, "mlp_bias": True}),
}


@pytest.mark.parametrize("case", HF_CONFIGS)
def test_transformers_checkpoint_loads_with_same_logits(case, tmp_path):
    config_cls, extra = HF_CONFIGS[case]
    tied = extra.get("tie_word_embeddings", False)
    cfg = getattr(transformers, config_cls)(
        vocab_size=131,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rope_theta=20000.0,
        **{"tie_word_embeddings": tied, **extra},
    )
    torch.manual_seed(11)
    hf = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.normal_(1.0 if "norm" in name else 0.0, 0.3)
    hf.save_pretrained(tmp_path / "hf")
    model = load_pretrained(tmp_path / "hf")
    assert model.config.tie_word_embeddings == tied
    if tied:
        assert not hasattr(model, "lm_head")
    ids, pos, cu = _packed(LENGTHS, vocab=131, seed=4)
    assert _max_diff(_our_logits(model, ids, pos, cu), _hf_logits_per_sequence(hf, ids, cu)) <= 1e-4


# sliding windows of 5 tokens on every layer (Mistral), on the layers from max_window_layers on
# (Qwen2) and on the layers layer_types names (Qwen3), with odd layer counts
WINDOWED = {
    "mistral": tiny_hf_dict(model_type="mistral", sliding_window=5, num_hidden_layers=3),
    "qwen2-max-window-layers": tiny_hf_dict(
        model_type="qwen2",
        num_hidden_layers=3,
        use_sliding_window=True,
        sliding_window=5,
        max_window_layers=1,
    ),
    "qwen3-layer-types": tiny_hf_dict(
        model_type="qwen3",
        num_hidden_layers=3,
        head_dim=16,
        use_sliding_window=True,
        sliding_window=5,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
    ),
}
WINDOWED_LENGTHS = [13, 3, 9]  # longer and shorter than the window


@pytest.mark.parametrize("case", WINDOWED)
def test_sliding_window_layers_give_transformers_logits_on_sequences_longer_than_the_window(
    case, tmp_path
):
    """sdpo's decoder applies each layer's window to packed sequences longer than it; the
    checkpoint it writes loads in transformers with the same windows on the same layers and
    gives each sequence alone the same logits, and loads back in sdpo to the same config."""
    model = _random_model(WINDOWED[case], seed=7)
    save_pretrained(model, tmp_path / "ckpt")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.float32)
    layers = range(model.config.num_hidden_layers)
    hf_windows = [
        hf.config.sliding_window
        if case == "mistral" or hf.config.layer_types[i] == "sliding_attention"
        else None
        for i in layers
    ]
    assert hf_windows == [model.config.layer_window(i) for i in layers]
    assert hf_windows.count(5) == {"mistral": 3}.get(case, 2)
    assert load_pretrained(tmp_path / "ckpt").config == model.config
    ids, pos, cu = _packed(WINDOWED_LENGTHS, vocab=131, seed=8)
    ours = _our_logits(model, ids, pos, cu)
    assert _max_diff(ours, _hf_logits_per_sequence(hf, ids, cu)) <= 1e-4
    unwindowed = CausalLM(dataclasses.replace(model.config, sliding_window=None))
    unwindowed.load_state_dict(model.state_dict())
    assert _max_diff(_our_logits(unwindowed, ids, pos, cu), ours) > 1e-2  # the window counts


def test_the_layers_that_slide_are_part_of_the_model_fingerprint():
    """The fingerprint (the reference caches' key, the resume check) changes with the window
    and with the layers it applies to; a model whose layers all slide, or none, fingerprints
    as before sliding layers were part of the config (its caches stay valid)."""
    config = ModelConfig.from_hf_dict(WINDOWED["qwen2-max-window-layers"])
    model = init_model(config, seed=0)
    prints = set()
    for changes in (
        {},
        {"sliding_layers": (0, 2)},
        {"sliding_layers": None},
        {"sliding_window": 6},
        {"sliding_window": None},
    ):
        other = CausalLM(dataclasses.replace(config, **changes))
        other.load_state_dict(model.state_dict())
        prints.add(model_fingerprint(other))
    assert len(prints) == 5
    assert (
        "sliding_layers" not in dataclasses.replace(config, sliding_layers=None).architecture_dict()
    )


def test_earlier_fingerprints_are_those_of_the_one_window_the_qwen_was_read_with():
    """Earlier releases fingerprinted a Qwen by one window (no sliding layers), taken from
    use_sliding_window even where no layer slides: the weights' fingerprint under a config of
    that window on every layer, which those releases ran identically (every sequence within
    the window). Mistral and Llama, read the same way then, and other weights have none."""
    qwen = WINDOWED["qwen2-max-window-layers"]  # window 5 on layers 1 and 2 of 3
    for d in (qwen, {**qwen, "max_window_layers": 3}):  # the second: no layer slides
        model = init_model(ModelConfig.from_hf_dict(d), seed=0)
        one_window = CausalLM(
            dataclasses.replace(model.config, sliding_window=5, sliding_layers=None)
        )
        one_window.load_state_dict(model.state_dict())
        earlier = earlier_model_fingerprints(model)
        assert earlier == [model_fingerprint(one_window)]
        assert model_fingerprint(model) not in earlier
        other = init_model(model.config, seed=1)
        assert model_fingerprint(one_window) not in earlier_model_fingerprints(other)
    for d in (WINDOWED["mistral"], tiny_hf_dict()):
        assert earlier_model_fingerprints(init_model(ModelConfig.from_hf_dict(d), seed=0)) == []


def test_architecture_differences_name_the_fields_of_a_config_read_otherwise():
    """A Mistral whose config.json has no sliding_window, read once without a window and now
    with one (a default a newer reading gives it), or with another rotary base: the fields are
    named as they are now and were then; the weights hashed
    under the recorded text give the recorded fingerprint (so the tensors are the same)."""
    d = tiny_hf_dict(model_type="mistral", sliding_window=None)
    model = init_model(ModelConfig.from_hf_dict(d), seed=0)
    before = architecture_text(model)
    now = CausalLM(dataclasses.replace(model.config, sliding_window=64, rope_theta=500.0))
    now.load_state_dict(model.state_dict())
    assert architecture_differences(before, architecture_text(now)) == [
        "rope_theta (now 500.0, then 10000.0)",
        "sliding_window (now 64, then null)",
    ]
    assert fingerprint_with(now, before) == model_fingerprint(model) != model_fingerprint(now)
    assert architecture_differences(before, before) == []
    added = {"transformers": "X", "config": {"a": 1, "text_config": {"b": list(range(30))}}}
    assert architecture_differences(
        json.dumps({"transformers": "X", "config": {"a": 1}}), json.dumps(added)
    ) == [f"text_config.b (now {json.dumps(list(range(30)))[:57]}..., then absent)"]
    assert architecture_differences("", before) == []  # a module without a description


# config.json spellings a checkpoint can have, which transformers resolves one way
CONFIG_SPELLINGS = {
    # a non-empty rope_scaling wins over rope_parameters
    "rope-scaling-over-rope-parameters": {
        "rope_parameters": {"rope_type": "default", "rope_theta": 3000.0},
        "rope_scaling": {"rope_type": "linear", "factor": 2.0},
    },
    "empty-rope-scaling-beside-rope-parameters": {
        "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 3000.0},
        "rope_scaling": {},
    },
    # a top-level original_max_position_embeddings wins over the rope dict's own
    "top-level-original-max-position-embeddings": {
        "rope_parameters": {
            **LLAMA3_ROPE,
            "original_max_position_embeddings": 64,
            "rope_theta": 5e5,
        },
        "original_max_position_embeddings": 8,
    },
}


@pytest.mark.parametrize("case", CONFIG_SPELLINGS)
def test_config_spellings_are_read_as_transformers_reads_them(case, tmp_path):
    save_pretrained(_random_model(tiny_hf_dict(), seed=15), tmp_path / "m")
    config_path = tmp_path / "m" / "config.json"
    config = json.loads(config_path.read_text())
    config.pop("rope_theta", None)
    config.update(CONFIG_SPELLINGS[case])
    config_path.write_text(json.dumps(config))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32)
    ids, pos, cu = _packed([40, 3], vocab=131, seed=6)
    ours = _our_logits(load_pretrained(tmp_path / "m"), ids, pos, cu)
    assert _max_diff(ours, _hf_logits_per_sequence(hf, ids, cu)) <= 1e-4


def test_sharded_save_round_trips_and_loads_in_transformers(tmp_path):
    model = _random_model(tiny_hf_dict(), seed=7)
    save_pretrained(model, tmp_path / "sharded", max_shard_bytes=40_000)
    folder = tmp_path / "sharded"
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and not (folder / "model.safetensors").exists()
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    state = model.state_dict()
    assert set(index["weight_map"]) == set(state)
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in state.values())

    loaded = load_pretrained(folder)
    for name, t in state.items():
        assert torch.equal(loaded.state_dict()[name], t), name
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    ids, pos, cu = _packed(LENGTHS, vocab=131, seed=5)
    assert _max_diff(_our_logits(model, ids, pos, cu), _hf_logits_per_sequence(hf, ids, cu)) <= 1e-4


def test_bfloat16_checkpoint_records_its_dtype_and_loads_in_any_dtype(tmp_path):
    model = _random_model(tiny_hf_dict(tie_word_embeddings=True), seed=8).to(torch.bfloat16)
    save_pretrained(model, tmp_path / "bf16")
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config["torch_dtype"] == "bfloat16"
    as_bf16 = load_pretrained(tmp_path / "bf16", dtype=torch.bfloat16)
    as_fp32 = load_pretrained(tmp_path / "bf16", dtype=torch.float32)
    for name, t in model.state_dict().items():
        assert torch.equal(as_bf16.state_dict()[name], t), name
        assert as_fp32.state_dict()[name].dtype == torch.float32
        assert torch.equal(as_fp32.state_dict()[name], t.float()), name


def test_config_round_trip_keeps_unknown_keys_and_rope_spelling(tmp_path):
    d = tiny_hf_dict(
        rope_theta=None,
        rope_parameters={"rope_type": "default", "rope_theta": 321.0},
        bos_token_id=1,
        eos_token_id=[2, 3],
        custom_field={"kept": True},
    )
    save_pretrained(_random_model(d, seed=9), tmp_path / "c")
    written = json.loads((tmp_path / "c" / "config.json").read_text())
    assert written["eos_token_id"] == [2, 3] and written["custom_field"] == {"kept": True}
    assert written["rope_parameters"] == {"rope_type": "default", "rope_theta": 321.0}
    assert "rope_scaling" not in written
    assert ModelConfig.from_hf_dict(written) == ModelConfig.from_hf_dict(d)


def test_tied_checkpoint_that_stores_lm_head_loads(tmp_path):
    from safetensors.torch import load_file, save_file

    model = _random_model(tiny_hf_dict(tie_word_embeddings=True), seed=10)
    save_pretrained(model, tmp_path / "t")
    file = tmp_path / "t" / "model.safetensors"
    tensors = load_file(file)
    assert "lm_head.weight" not in tensors  # stored once, as HF does
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, file, metadata={"format": "pt"})
    loaded = load_pretrained(tmp_path / "t")
    assert torch.equal(loaded.lm_head_weight, model.lm_head_weight)


def test_missing_shard_error_names_the_file(tmp_path):
    save_pretrained(_random_model(tiny_hf_dict(), seed=12), tmp_path / "s", max_shard_bytes=40_000)
    index = json.loads((tmp_path / "s" / "model.safetensors.index.json").read_text())
    second = sorted(set(index["weight_map"].values()))[1]
    (tmp_path / "s" / second).unlink()
    with pytest.raises(CheckpointError, match=rf"{second}.*is missing"):
        load_pretrained(tmp_path / "s")


def test_shape_mismatch_error_names_tensor_and_both_shapes(tmp_path):
    save_pretrained(_random_model(tiny_hf_dict(), seed=13), tmp_path / "m")
    config_path = tmp_path / "m" / "config.json"
    config = json.loads(config_path.read_text())
    config["intermediate_size"] = 80
    config_path.write_text(json.dumps(config))
    with pytest.raises(
        CheckpointError, match=r"'model.layers.0.mlp.gate_proj.weight'.*\(96, 64\).*\(80, 64\)"
    ):
        load_pretrained(tmp_path / "m")


def test_missing_and_unexpected_tensors_are_named(tmp_path):
    save_pretrained(_random_model(tiny_hf_dict(tie_word_embeddings=True), seed=14), tmp_path / "u")
    config_path = tmp_path / "u" / "config.json"
    config = json.loads(config_path.read_text())
    config.update(tie_word_embeddings=False, model_type="qwen2")
    config_path.write_text(json.dumps(config))
    with pytest.raises(
        CheckpointError, match=r"missing tensors \['model.layers.0.self_attn.q_proj.bias'"
    ):
        load_pretrained(tmp_path / "u")
    config.update(num_hidden_layers=1, model_type="llama")
    config_path.write_text(json.dumps(config))
    with pytest.raises(
        CheckpointError,
        match=r"missing tensors \['lm_head.weight'\].*unexpected tensors \['model.layers.1",
    ):
        load_pretrained(tmp_path / "u")


def test_missing_config_and_missing_weights_errors_say_what_a_folder_needs(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="has no config.json"):
        load_pretrained(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text(json.dumps(tiny_hf_dict()))
    (tmp_path / "empty" / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match="neither model.safetensors.*pytorch_model.bin"):
        load_pretrained(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text(
        json.dumps(tiny_hf_dict(rope_scaling={"rope_type": "yarn", "factor": 2.0}))
    )
    with pytest.raises(CheckpointError, match=r"config.json: .*'rope_scaling'.*'yarn'"):
        load_pretrained(tmp_path / "empty")


def test_a_peft_adapter_folder_given_as_a_model_says_which_model_to_give(tmp_path):
    step = tmp_path / "step-1"  # sdpo's layout: the merged model with its adapter inside
    save_pretrained(init_model(ModelConfig.from_hf_dict(tiny_hf_dict()), seed=0), step)
    adapter = step / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "base_model_name_or_path": "org/base"})
    )
    with pytest.raises(CheckpointError) as ours:
        load_pretrained(adapter)
    assert "holds a PEFT adapter" in str(ours.value)
    assert f"merged in is {step.resolve()}; give that folder" in str(ours.value)
    lone = tmp_path / "lone"  # an adapter alone: merged onto its base first
    lone.mkdir()
    (lone / "adapter_config.json").write_text((adapter / "adapter_config.json").read_text())
    with pytest.raises(CheckpointError, match=r"merge it onto its base model \(org/base\)"):
        load_pretrained(lone)


def test_a_null_transformers_refuses_is_an_error_naming_config_json_and_the_key(tmp_path):
    from sdpo.engine.checkpoint import check_model

    folder = tmp_path / "nulls"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(tiny_hf_dict(rms_norm_eps=None)))
    message = r"nulls/config.json: config key 'rms_norm_eps' is null.*write the RMSNorm epsilon"
    with pytest.raises(CheckpointError, match=message):
        check_model(folder, "auto")


def test_a_model_for_transformers_without_transformers_installed_says_to_install_it(
    tmp_path, monkeypatch
):
    """transformers is not one of sdpo's own requirements: a model only it runs (here a Gemma
    config) is an error naming the file and the package, not a ModuleNotFoundError."""
    from sdpo.engine.checkpoint import check_model

    folder = tmp_path / "gemma"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(tiny_hf_dict(model_type="gemma")))
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` fails
    message = r"gemma/config.json: this model runs with transformers' code .* not installed"
    with pytest.raises(CheckpointError, match=message):
        check_model(folder, "auto")


def test_save_replaces_an_existing_checkpoint_and_copies_extra_files(tmp_path):
    first = _random_model(tiny_hf_dict(), seed=15)
    second = _random_model(tiny_hf_dict(), seed=16)
    extra = tmp_path / "tokenizer_config.json"
    extra.write_text('{"eos_token": "</s>"}')
    save_pretrained(first, tmp_path / "ck", max_shard_bytes=40_000)
    save_pretrained(second, tmp_path / "ck", extra_files=[extra])
    folder = tmp_path / "ck"
    assert (folder / "tokenizer_config.json").read_text() == extra.read_text()
    assert not (folder / "model.safetensors.index.json").exists()  # old shards are gone
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    assert model_fingerprint(load_pretrained(folder)) == model_fingerprint(second)


def test_fingerprints_follow_the_weights(tmp_path):
    model = _random_model(tiny_hf_dict(), seed=17)
    fp = model_fingerprint(model)
    assert fp == model_fingerprint(_random_model(tiny_hf_dict(), seed=17))
    save_pretrained(model, tmp_path / "a")
    assert model_fingerprint(load_pretrained(tmp_path / "a")) == fp
    ckpt_fp = checkpoint_fingerprint(tmp_path / "a")

    with torch.no_grad():  # one element nudged: same names, shapes and file sizes
        model.model.layers[1].mlp.down_proj.weight[3, 5] += 1e-3
    assert model_fingerprint(model) != fp
    save_pretrained(model, tmp_path / "b")
    assert (tmp_path / "a" / "model.safetensors").stat().st_size == (
        tmp_path / "b" / "model.safetensors"
    ).stat().st_size
    assert checkpoint_fingerprint(tmp_path / "b") != ckpt_fp
    assert model_fingerprint(copy.deepcopy(model).to(torch.bfloat16)) != model_fingerprint(model)
