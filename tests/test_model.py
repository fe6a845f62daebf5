"""The Llama-family model: config parsing, float64 truth, packed vs padded parity,
activation checkpointing."""

from __future__ import annotations

import copy
import dataclasses
import functools

import pytest
import torch

from sdpo.engine.model import (
    CausalLM,
    ConfigError,
    ModelConfig,
    init_model,
    rope_inverse_frequencies,
)
from tests.conftest import tiny_hf_dict

LENGTHS = [6, 13, 1, 9, 4]
_LLAMA3 = ("low_freq_factor", "high_freq_factor")  # odd sizes, one single-token sequence
VOCAB = 131


def _random_model(d: dict, *, seed: int) -> CausalLM:
    """init_model with larger weights (std 0.2, so the layers do more than pass the residual
    through) and random norm weights and biases."""
    model = init_model(ModelConfig.from_hf_dict(d), seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
            elif "embed" not in name:
                p.mul_(10.0)
    return model


def _packed(lengths, *, seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (sum(lengths),), generator=g)
    pos = torch.cat([torch.arange(n) for n in lengths])
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return ids, pos, cu


def _next_token_labels(ids: torch.Tensor, cu: torch.Tensor) -> torch.Tensor:
    """labels[i] = ids[i+1] inside a sequence, -100 on each sequence's last token."""
    labels = torch.full_like(ids, -100)
    bounds = cu.tolist()
    for s, e in zip(bounds[:-1], bounds[1:]):
        labels[s : e - 1] = ids[s + 1 : e]
    return labels


def _sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor, cu: torch.Tensor):
    """(S,) summed log p(label) per packed sequence, with a plain log_softmax + gather."""
    logp = logits.log_softmax(-1)
    mask = labels != -100
    token = logp.gather(-1, labels.clamp(min=0)[:, None])[:, 0] * mask  # (N,)
    seq = torch.repeat_interleave(torch.arange(len(cu) - 1), (cu[1:] - cu[:-1]).long())
    return torch.zeros(len(cu) - 1, dtype=logits.dtype).index_add_(0, seq, token)


# ---------------------------------------------------------------- config


def test_config_defaults_head_dim_and_kv_heads_from_the_attention_heads():
    d = tiny_hf_dict(head_dim=None)
    del d["num_key_value_heads"]
    cfg = ModelConfig.from_hf_dict(d)
    assert cfg.head_dim == 16 and cfg.num_key_value_heads == 4
    assert ModelConfig.from_hf_dict(tiny_hf_dict(head_dim=24)).head_dim == 24


def test_config_bias_rules_for_qwen2_and_llama():
    qwen = ModelConfig.from_hf_dict(tiny_hf_dict(model_type="qwen2"))
    assert qwen.attention_bias and not qwen.o_proj_bias
    llama = ModelConfig.from_hf_dict(tiny_hf_dict(attention_bias=True))
    assert llama.attention_bias and llama.o_proj_bias
    model = CausalLM(qwen)
    names = set(dict(model.named_parameters()))
    assert "model.layers.1.self_attn.k_proj.bias" in names
    assert "model.layers.1.self_attn.o_proj.bias" not in names
    assert "lm_head.weight" in names


def test_config_reads_every_rope_spelling():
    llama3 = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    from_parameters = ModelConfig.from_hf_dict(
        tiny_hf_dict(
            rope_theta=None, rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, **llama3}
        )
    )
    from_scaling = ModelConfig.from_hf_dict(
        tiny_hf_dict(rope_theta=5e5, rope_scaling={"rope_type": "llama3", **llama3})
    )
    assert from_parameters.rope_theta == from_scaling.rope_theta == 5e5
    assert from_parameters.rope_scaling == from_scaling.rope_scaling
    # original_max_position_embeddings falls back to max_position_embeddings (as HF)
    assert from_scaling.rope_scaling["original_max_position_embeddings"] == 256
    legacy = ModelConfig.from_hf_dict(tiny_hf_dict(rope_scaling={"type": "linear", "factor": 2.0}))
    assert legacy.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    default = ModelConfig.from_hf_dict(
        tiny_hf_dict(rope_parameters={"rope_type": "default", "rope_theta": 77.0})
    )
    assert default.rope_scaling is None and default.rope_theta == 77.0


def _read_by_both(extra: dict, model_type: str):
    """sdpo's and transformers' reading of a config.json with the required keys and ``extra``:
    each a tuple of the settings that shape the computation (each layer's sliding window among
    them) and the model's parameter shapes ({name: shape}), or the exception that refuses the config (transformers refuses in its
    config class or when it builds the model)."""
    transformers = pytest.importorskip("transformers")
    from huggingface_hub.errors import StrictDataclassError

    d = {
        "model_type": model_type,
        "vocab_size": 131,
        "hidden_size": 128,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 32,  # a multiple of each type's default key/value heads
        **copy.deepcopy(extra),
    }

    def shapes(model):
        return {name: tuple(p.shape) for name, p in model.named_parameters()}

    try:
        ours = ModelConfig.from_hf_dict(copy.deepcopy(d))
        with torch.device("meta"):
            ours_shapes = shapes(CausalLM(ours))
    except ConfigError as e:
        ours_read = e
    else:
        ours_read = (
            ours.head_dim,
            ours.num_key_value_heads,
            ours.rms_norm_eps,
            ours.rope_theta,
            ours.tie_word_embeddings,
            tuple(ours.layer_window(i) for i in range(ours.num_hidden_layers)),
            ours.max_position_embeddings,
            (ours.rope_scaling or {}).get("original_max_position_embeddings"),
            ours_shapes,
        )
    try:
        hf = transformers.AutoConfig.for_model(**copy.deepcopy(d))
        with torch.device("meta"):
            hf_shapes = shapes(transformers.AutoModelForCausalLM.from_config(hf))
    except (StrictDataclassError, TypeError, KeyError) as e:  # strict fields, or no model
        return ours_read, e
    # each layer's window as transformers' attention modules take it: Mistral's every layer
    # the config's, Qwen2/Qwen3 that of the layers layer_types names sliding_attention, and
    # Llama none
    window = getattr(hf, "sliding_window", None)
    kinds = getattr(hf, "layer_types", None) or [None] * hf.num_hidden_layers
    if model_type == "mistral":
        windows = (window,) * hf.num_hidden_layers
    else:
        windows = tuple(window if kind == "sliding_attention" else None for kind in kinds)
    rope = hf.rope_parameters
    hf_read = (
        getattr(hf, "head_dim", None) or 128 // 32,
        hf.num_key_value_heads,
        hf.rms_norm_eps,
        rope["rope_theta"],
        hf.tie_word_embeddings,
        windows,
        hf.max_position_embeddings,
        rope.get("original_max_position_embeddings"),
        hf_shapes,
    )
    return ours_read, hf_read


_TYPES = ["llama", "mistral", "qwen2", "qwen3"]


@pytest.mark.parametrize("model_type", _TYPES)
@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"use_sliding_window": True, "max_window_layers": 1},
        # max_window_layers (28 by default) >= the layers, or layer_types all full: no window
        {"use_sliding_window": True},
        {"use_sliding_window": True, "max_window_layers": 0, "layer_types": ["full_attention"] * 2},
        {"use_sliding_window": True, "layer_types": ["sliding_attention", "attention"]},
        {"attention_bias": True, "mlp_bias": True},  # Mistral, Qwen2: ignored; Qwen3: attention
        {"rope_scaling": {"rope_type": "llama3", **dict.fromkeys(_LLAMA3, 2.0), "factor": 8.0}},
    ],
)
def test_keys_a_config_lacks_take_transformers_defaults_for_its_type(model_type, extra):
    """A config.json with the required keys alone (or a few more): every setting that shapes
    the computation, and every parameter's shape, is the one transformers gives the type
    (Mistral's 4096-token window, Qwen3's head_dim 128, windows only where a layer slides, the
    biases the type's model has)."""
    extra = copy.deepcopy(extra)
    if "rope_scaling" in extra:
        extra["rope_scaling"]["high_freq_factor"] = 4.0
    ours, hf = _read_by_both(extra, model_type)
    if "attention" in extra.get("layer_types", ()) and not _transformers_reads_legacy_attention():
        # sdpo reads the legacy "attention" as full_attention, as transformers 5.24 does; 5.17
        # refuses it in its config class, so this transformers is asked about the new name
        assert isinstance(hf, Exception), hf
        renamed = ["full_attention" if t == "attention" else t for t in extra["layer_types"]]
        _, hf = _read_by_both({**extra, "layer_types": renamed}, model_type)
    assert ours == hf


@functools.cache
def _transformers_reads_legacy_attention() -> bool:
    """Whether the installed transformers reads a layer_types entry "attention" (the legacy
    name of full_attention) in the config classes sdpo mirrors: 5.24 does, 5.17 refuses it."""
    transformers = pytest.importorskip("transformers")
    try:
        transformers.Qwen2Config(num_hidden_layers=1, layer_types=["attention"])
    except Exception:
        return False
    return True


@pytest.mark.parametrize("model_type", _TYPES)
@pytest.mark.parametrize(
    "key",
    [
        "num_key_value_heads",
        "head_dim",
        "rms_norm_eps",
        "max_position_embeddings",
        "rope_theta",
        "tie_word_embeddings",
        "attention_bias",
        "mlp_bias",
        "sliding_window",
        "use_sliding_window",
        "max_window_layers",
        "partial_rotary_factor",
        "hidden_act",
    ],
)
def test_a_null_in_config_json_is_a_default_or_a_refusal_as_in_transformers(model_type, key):
    """A null where transformers takes the default (a key/value head per head, no window...)
    reads the same; one transformers refuses is a ConfigError naming the key."""
    ours, hf = _read_by_both({key: None}, model_type)
    if isinstance(hf, Exception):
        assert isinstance(ours, ConfigError) and f"{key!r} is null" in str(ours), (ours, hf)
    else:
        assert ours == hf


@pytest.mark.parametrize(
    "model_type,extra,refused",
    [
        ("llama", {"rms_norm_eps": "1e-6"}, "'rms_norm_eps' is '1e-6'"),
        ("llama", {"hidden_size": 128.0}, "'hidden_size' is 128.0"),
        ("llama", {"hidden_size": "128"}, "'hidden_size' is '128'"),  # was a bare TypeError
        ("llama", {"num_hidden_layers": True}, "'num_hidden_layers' is True"),
        ("llama", {"max_position_embeddings": "256"}, "'max_position_embeddings' is '256'"),
        ("qwen2", {"tie_word_embeddings": "false"}, "'tie_word_embeddings' is 'false'"),  # truthy
        ("llama", {"attention_bias": "false"}, "'attention_bias' is 'false'"),
        ("qwen3", {"attention_bias": 1}, "'attention_bias' is 1"),
        ("llama", {"initializer_range": 1}, "'initializer_range' is 1"),
        ("mistral", {"sliding_window": "4096"}, "'sliding_window' is '4096'"),  # was the window
        ("qwen2", {"use_sliding_window": "false"}, "'use_sliding_window' is 'false'"),
        ("qwen3", {"max_window_layers": 1.0}, "'max_window_layers' is 1.0"),
        ("llama", {"rope_theta": "10000"}, "'rope_theta' is '10000'"),
        (
            "llama",
            {"rope_parameters": {"rope_type": "linear", "rope_theta": 5e5, "factor": "2.0"}},
            "'rope_parameters.factor' is '2.0'",
        ),
        # keys the type's model does not read, and an integer rotary base, are as transformers
        ("llama", {"sliding_window": "4096", "rope_theta": 500000}, None),
        ("mistral", {"attention_bias": "false", "max_window_layers": 1.0}, None),
        ("qwen2", {"attention_bias": "false", "mlp_bias": 1}, None),
    ],
)
def test_a_value_of_another_json_type_is_refused_naming_the_key_as_in_transformers(
    model_type, extra, refused
):
    """A string, a float for an integer, an integer for a bool... is a ConfigError naming the
    key, the value and what to write, where transformers refuses it (or fails on it later);
    it was read as a wrong value ("false" as true, "4096" as a window) or failed deep inside."""
    ours, hf = _read_by_both(extra, model_type)
    if refused is None:
        assert ours == hf
    else:
        assert isinstance(hf, Exception), hf
        assert isinstance(ours, ConfigError) and refused in str(ours) and "write" in str(ours)


_LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
}


@pytest.mark.parametrize(
    "extra,named",
    [
        ({"rope_parameters": {"rope_type": "default", "rope_theta": None}}, "rope_theta"),
        ({"rope_scaling": {"rope_type": None, "factor": 2.0}}, "rope_type"),
        ({"rope_scaling": {"rope_type": "linear", "factor": None}}, "factor"),
        ({"rope_scaling": {**_LLAMA3_ROPE, "low_freq_factor": None}}, "low_freq_factor"),
        ({"rope_scaling": {**_LLAMA3_ROPE, "original_max_position_embeddings": None}}, "original"),
        ({"rope_scaling": _LLAMA3_ROPE, "original_max_position_embeddings": None}, "original"),
        ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}, "rope_theta": None}, "theta"),
        ({"rope_parameters": {"rope_theta": 5e5, "partial_rotary_factor": None}}, None),
        ({"rope_scaling": None, "rope_parameters": None}, None),
    ],
)
def test_a_null_in_a_rotary_setting_is_a_default_or_a_refusal_as_in_transformers(extra, named):
    ours, hf = _read_by_both(extra, "llama")
    if named is None:
        assert ours == hf
    else:
        assert isinstance(hf, Exception)
        assert isinstance(ours, ConfigError) and named in str(ours) and "null" in str(ours)


@pytest.mark.parametrize(
    "extra",
    [
        {"layer_types": ["sliding_attention"] * 2},  # use_sliding_window is false by default
        {
            "use_sliding_window": True,
            "sliding_window": None,
            "layer_types": ["sliding_attention"] * 2,
        },
        {"use_sliding_window": True, "layer_types": ["sliding_attention"]},  # one of 2 layers
    ],
)
def test_qwen_layer_types_transformers_cannot_run_are_refused_naming_the_key(extra):
    transformers = pytest.importorskip("transformers")
    from huggingface_hub.errors import StrictDataclassError

    d = tiny_hf_dict(model_type="qwen2", **extra)
    with pytest.raises(ConfigError, match="'layer_types'"):
        ModelConfig.from_hf_dict(copy.deepcopy(d))
    with pytest.raises((StrictDataclassError, ValueError, TypeError)):
        hf = transformers.AutoConfig.for_model(**d)
        transformers.AutoModelForCausalLM.from_config(hf)(torch.arange(3)[None])


def test_a_window_written_to_config_json_is_the_one_transformers_applies():
    """A Qwen window written back slides every layer in transformers (use_sliding_window alone
    slides none in a model of fewer than max_window_layers layers); a source's window keys that
    give the model's window stay as they are."""
    transformers = pytest.importorskip("transformers")
    windowed = dataclasses.replace(
        ModelConfig.from_hf_dict(tiny_hf_dict(model_type="qwen2")), sliding_window=8
    )
    written = windowed.to_hf_dict()
    hf = transformers.AutoConfig.for_model(**copy.deepcopy(written))
    assert hf.layer_types == ["sliding_attention"] * 2 and hf.sliding_window == 8
    assert ModelConfig.from_hf_dict(written) == windowed
    source = tiny_hf_dict(
        model_type="qwen3", use_sliding_window=True, sliding_window=8, max_window_layers=2
    )
    kept = ModelConfig.from_hf_dict(source).to_hf_dict()
    assert {k: kept[k] for k in ("use_sliding_window", "sliding_window", "max_window_layers")} == {
        "use_sliding_window": True,
        "sliding_window": 8,
        "max_window_layers": 2,
    }


def test_llama3_inverse_frequencies_match_a_float64_scalar_reference():
    import math

    cfg = ModelConfig.from_hf_dict(
        tiny_hf_dict(
            head_dim=32,
            rope_theta=5e5,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        )
    )
    expected = []
    for i in range(0, 32, 2):
        f = 5e5 ** (-i / 32)
        wavelen = 2 * math.pi / f
        if wavelen < 64 / 4:
            expected.append(f)
        elif wavelen > 64 / 1:
            expected.append(f / 8)
        else:
            smooth = (64 / wavelen - 1) / (4 - 1)
            expected.append((1 - smooth) * f / 8 + smooth * f)
    got = rope_inverse_frequencies(cfg)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), torch.tensor(expected, dtype=torch.float64))
    # all three regimes are exercised
    plain = 5e5 ** (-torch.arange(0, 32, 2, dtype=torch.float64) / 32)
    ratio = got.double() / plain
    assert (ratio > 0.99).any() and (ratio < 0.13).any() and ((ratio > 0.13) & (ratio < 0.99)).any()


@pytest.mark.parametrize(
    "overrides,pattern",
    [
        ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, r"'rope_parameters'.*'yarn'"),
        ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, r"'rope_scaling'.*'dynamic'"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 2.0}}, r"missing \['low_freq_factor'"),
        ({"vocab_size": None}, r"'vocab_size' is null.*write the number of rows"),
        ({"num_key_value_heads": 3}, r"multiple of num_key_value_heads \(3\)"),
        (
            {"model_type": "gemma"},
            r"model_type 'gemma' is not one sdpo's own decoder implements.*model.implementation",
        ),
        ({"hidden_act": "gelu"}, r"'hidden_act' is 'gelu'"),
        ({"hidden_size": -64}, r"'hidden_size' must be a positive integer"),
    ],
)
def test_unsupported_configs_are_rejected_naming_the_key(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        ModelConfig.from_hf_dict(tiny_hf_dict(**overrides))


def test_a_config_without_a_required_key_is_refused_naming_it():
    d = tiny_hf_dict()
    del d["intermediate_size"]
    with pytest.raises(ConfigError, match=r"missing required key\(s\) \['intermediate_size'\]"):
        ModelConfig.from_hf_dict(d)


# ---------------------------------------------------------------- numerics


def test_float32_forward_matches_float64_truth_and_bfloat16_is_close():
    model = _random_model(tiny_hf_dict(model_type="qwen2", tie_word_embeddings=True), seed=1)
    ids, pos, cu = _packed(LENGTHS, seed=2)
    with torch.no_grad():
        truth = copy.deepcopy(model).double()(ids, pos, cu, max(LENGTHS))
        fp32 = model(ids, pos, cu, max(LENGTHS))
        bf16 = copy.deepcopy(model).to(torch.bfloat16)(ids, pos, cu, max(LENGTHS))
    assert fp32.shape == (sum(LENGTHS), 64) and fp32.dtype == torch.float32
    assert bf16.dtype == torch.bfloat16
    scale = truth.abs().max().item()
    assert scale > 1.0  # non-trivial hidden states
    assert (fp32.double() - truth).abs().max().item() <= 1e-5 * scale
    bf16_err = (bf16.double() - truth).abs().max().item()
    assert bf16_err <= 5e-2 * scale
    assert bf16_err > 10 * (fp32.double() - truth).abs().max().item()  # the check sees dtype


def test_packed_forward_equals_each_sequence_run_alone_in_float64():
    model = _random_model(tiny_hf_dict(), seed=3).double()
    ids, pos, cu = _packed(LENGTHS, seed=4)
    with torch.no_grad():
        packed = model(ids, pos, cu, max(LENGTHS))
        bounds = cu.tolist()
        for s, e in zip(bounds[:-1], bounds[1:]):
            one = torch.tensor([0, e - s], dtype=torch.int32)
            alone = model(ids[s:e], pos[s:e], one, e - s)
            torch.testing.assert_close(packed[s:e], alone, atol=1e-12, rtol=1e-12)


def test_packed_and_left_padded_batches_give_the_same_sequence_logprobs():
    """Ours on a packed stream vs transformers on a left-padded (S, T) batch with a mask."""
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    model = _random_model(tiny_hf_dict(tie_word_embeddings=True), seed=5)
    hf_cfg = transformers.LlamaConfig(
        **{**model.config.to_hf_dict(), "attn_implementation": "eager"}
    )
    hf = transformers.LlamaForCausalLM(hf_cfg)
    result = hf.load_state_dict(model.state_dict(), strict=False)
    assert result.missing_keys == ["lm_head.weight"] and not result.unexpected_keys
    hf.tie_weights()
    ids, pos, cu = _packed(LENGTHS, seed=6)
    labels = _next_token_labels(ids, cu)
    with torch.no_grad():
        hidden = model(ids, pos, cu, max(LENGTHS))
        packed = _sequence_logprobs(hidden @ model.lm_head_weight.T, labels, cu)

        t = max(LENGTHS)
        padded_ids = torch.zeros(len(LENGTHS), t, dtype=torch.long)
        padded_labels = torch.full((len(LENGTHS), t), -100)
        mask = torch.zeros(len(LENGTHS), t, dtype=torch.long)
        bounds = cu.tolist()
        for i, (s, e) in enumerate(zip(bounds[:-1], bounds[1:])):
            padded_ids[i, t - (e - s) :] = ids[s:e]
            padded_labels[i, t - (e - s) :] = labels[s:e]
            mask[i, t - (e - s) :] = 1
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = hf(padded_ids, attention_mask=mask, position_ids=position_ids).logits  # (S, T, V)
        flat_cu = torch.arange(0, (len(LENGTHS) + 1) * t, t, dtype=torch.int32)
        padded = _sequence_logprobs(logits.reshape(-1, VOCAB), padded_labels.reshape(-1), flat_cu)
    assert packed[1].abs().item() > 1.0
    assert packed[2].item() == 0.0  # a single token has nothing to predict
    torch.testing.assert_close(packed, padded, atol=1e-4, rtol=1e-5)


def _counting(fn, calls: list):
    def counted(*args, **kwargs):
        calls.append(1)
        return fn(*args, **kwargs)

    return counted


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    ids, pos, cu = _packed(LENGTHS, seed=7)
    labels = _next_token_labels(ids, cu)
    results = []
    for checkpointing in (False, True):
        model = _random_model(tiny_hf_dict(attention_bias=True), seed=8)
        model.gradient_checkpointing = checkpointing
        calls = []
        layer = model.model.layers[1]
        layer.forward = _counting(layer.forward, calls)
        hidden = model(ids, pos, cu, max(LENGTHS))
        loss = -_sequence_logprobs(hidden @ model.lm_head_weight.T, labels, cu).sum()
        loss.backward()
        assert len(calls) == (2 if checkpointing else 1)  # recomputed in backward
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b, atol=0, rtol=1e-6)
    assert all(g.abs().sum() > 0 for g in grads_a.values())
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=1e-7, rtol=1e-5, msg=name)


# ---------------------------------------------------------------- structure


def test_init_model_is_seeded_with_the_configured_std():
    cfg = ModelConfig.from_hf_dict(tiny_hf_dict(model_type="qwen2"))
    a, b = init_model(cfg, seed=3), init_model(cfg, seed=3)
    c = init_model(cfg, seed=4, dtype=torch.bfloat16)
    assert c.lm_head_weight.dtype == torch.bfloat16
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.lm_head_weight, c.lm_head_weight.float())
    w = a.model.layers[0].mlp.up_proj.weight
    assert abs(w.std().item() - 0.02) < 0.002
    assert torch.equal(a.model.layers[0].input_layernorm.weight, torch.ones(64))
    assert torch.equal(a.model.layers[0].self_attn.q_proj.bias, torch.zeros(64))


def test_tied_model_uses_the_embedding_as_lm_head():
    model = init_model(ModelConfig.from_hf_dict(tiny_hf_dict(tie_word_embeddings=True)), seed=0)
    assert model.lm_head_weight is model.model.embed_tokens.weight
    assert "lm_head.weight" not in model.state_dict()


def test_sliding_window_gradients_equal_transformers_on_packed_sequences():
    """A Qwen2 whose layers from max_window_layers = 2 on slide (window 5), on packed sequences
    longer and shorter than the window: the summed log-probs and every parameter's gradient
    are transformers' on each sequence alone."""
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    d = tiny_hf_dict(
        model_type="qwen2",
        num_hidden_layers=4,
        use_sliding_window=True,
        sliding_window=5,
        max_window_layers=2,
    )
    model = _random_model(d, seed=11)
    assert [layer.self_attn.window for layer in model.model.layers] == [None, None, 5, 5]
    hf_cfg = transformers.AutoConfig.for_model(
        **model.config.to_hf_dict(), attn_implementation="eager"
    )
    assert hf_cfg.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 2
    hf = transformers.AutoModelForCausalLM.from_config(hf_cfg)
    hf.load_state_dict(model.state_dict())
    lengths = [13, 3, 9]
    ids, pos, cu = _packed(lengths, seed=12)
    labels = _next_token_labels(ids, cu)
    ours = _sequence_logprobs(model(ids, pos, cu, 13) @ model.lm_head_weight.T, labels, cu)
    ours.sum().backward()
    bounds = cu.tolist()
    theirs = torch.cat(
        [
            _sequence_logprobs(hf(ids[s:e][None]).logits[0], labels[s:e], torch.tensor([0, e - s]))
            for s, e in zip(bounds[:-1], bounds[1:])
        ]
    )
    theirs.sum().backward()
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-5)
    hf_params = dict(hf.named_parameters())
    for name, p in model.named_parameters():
        want = hf_params[name].grad
        scale = want.abs().max().item()
        assert scale > 0, name
        torch.testing.assert_close(p.grad, want, atol=1e-4 * scale, rtol=1e-4, msg=name)


@pytest.mark.parametrize(
    "extra,sliding",
    [
        ({"model_type": "mistral"}, None),
        ({"model_type": "qwen2", "max_window_layers": 1}, (1, 2)),
        (
            {"model_type": "qwen3", "layer_types": ["sliding_attention", "full_attention"] * 2},
            (0, 2),
        ),
        ({"model_type": "qwen3", "max_window_layers": 4}, ()),  # no layer slides: no window
    ],
)
def test_per_layer_windows_round_trip_through_config_json(extra, sliding):
    """The config.json sdpo writes gives transformers the same window on the same layers, and
    sdpo reads it back to an equal config; a source's max_window_layers or layer_types, and
    sliding layers set in code, are both written so."""
    transformers = pytest.importorskip("transformers")
    d = tiny_hf_dict(num_hidden_layers=3, use_sliding_window=True, sliding_window=5, **extra)
    if "layer_types" in d:
        d["layer_types"] = d["layer_types"][:3]
    config = ModelConfig.from_hf_dict(d)
    assert config.sliding_layers == (sliding or None)
    assert (config.sliding_window is None) == (sliding == ())
    variants = [config]
    if config.model_type != "mistral":
        variants.append(dataclasses.replace(config, sliding_window=7, sliding_layers=(0, 2)))
    for variant in variants:
        written = variant.to_hf_dict()
        hf = transformers.AutoConfig.for_model(**copy.deepcopy(written))
        hf_windows = [
            hf.sliding_window
            if variant.model_type == "mistral" or hf.layer_types[i] == "sliding_attention"
            else None
            for i in range(3)
        ]
        assert hf_windows == [variant.layer_window(i) for i in range(3)]
        assert ModelConfig.from_hf_dict(written) == variant


@pytest.mark.parametrize(
    "changes,refused",
    [
        ({"model_type": "mistral", "sliding_layers": (0,)}, "slides every layer or none"),
        ({"model_type": "llama", "sliding_window": 8}, "a llama model has no sliding-window"),
        ({"model_type": "qwen2", "sliding_window": 0}, "'sliding_window' must be a positive"),
        ({"model_type": "qwen2", "sliding_layers": (0, 5)}, "indices of the model's 2 layers"),
    ],
)
def test_windows_transformers_cannot_express_for_the_type_are_refused(changes, refused):
    base = ModelConfig.from_hf_dict(tiny_hf_dict(model_type="qwen2"))
    with pytest.raises(ConfigError, match=refused):
        dataclasses.replace(base, **{"sliding_window": 4, **changes})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(
    "window", [{}, {"use_sliding_window": True, "sliding_window": 17, "max_window_layers": 1}]
)
def test_bfloat16_model_on_cuda_matches_float64_truth_with_every_attention_backend(window):
    """With a window of 17 on the second layer, shorter than two of the sequences, too."""
    from sdpo.engine.attention import available_attention_backends

    model = _random_model(tiny_hf_dict(model_type="qwen2", **window), seed=9)
    ids, pos, cu = _packed([37, 1, 64, 5], seed=10)
    with torch.no_grad():
        truth = copy.deepcopy(model).double()(ids, pos, cu, 64)
        gpu = copy.deepcopy(model).to("cuda", torch.bfloat16)
        errors = {}
        backends = available_attention_backends("cuda", sliding_window=bool(window))
        for backend in ["sdpa", *backends]:
            gpu.attn_backend = backend
            out = gpu(ids.cuda(), pos.cuda(), cu.cuda(), 64)
            errors[backend] = (out.double().cpu() - truth).abs().max().item()
    # Dtype-aware rule: every backend is no worse than bf16 SDPA (the same-dtype PyTorch path)
    # plus a margin, and bf16 SDPA itself is within bf16's reach of the truth.
    scale = truth.abs().max().item()
    assert errors["sdpa"] <= 0.1 * scale, errors
    for backend, err in errors.items():
        assert err <= 1.5 * errors["sdpa"] + 1e-2 * scale, (backend, errors)


def test_selective_checkpointing_recomputes_every_kth_layer_with_equal_gradients():
    config = ModelConfig.from_hf_dict(tiny_hf_dict(num_hidden_layers=4))
    ids, pos, cu = _packed([7, 5], seed=3)
    grads = []
    for every in (None, 1, 2):
        model = init_model(config, seed=4)
        counted = [[] for _ in model.model.layers]
        for layer, c in zip(model.model.layers, counted):
            layer.forward = _counting(layer.forward, c)
        if every is not None:
            model.gradient_checkpointing, model.checkpoint_every = True, every
        model(ids, pos, cu, 7).square().sum().backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
        expected = {None: [1, 1, 1, 1], 1: [2, 2, 2, 2], 2: [2, 1, 2, 1]}[every]
        calls = [len(c) for c in counted]
        assert calls == expected, (every, calls)
    for g_plain, g1, g2 in zip(*grads):
        torch.testing.assert_close(g1, g_plain, rtol=0, atol=1e-6)
        torch.testing.assert_close(g2, g_plain, rtol=0, atol=1e-6)


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_attention_sees_bf16_queries_and_keys_under_bf16_autocast(monkeypatch, model_type):
    """fp32 master weights + bf16 autocast (precision "bf16-mixed"): the rotary tables are fp32
    (they follow the fp32 residual stream) and so are Qwen3's q/k norm weights, but q/k must
    stay bf16, or attention would leave the flash/varlen kernels for the per-sequence fallback
    (and a named varlen backend would refuse fp32)."""
    import sdpo.engine.model as model_mod

    seen = []
    real = model_mod.varlen_attention

    def spy(q, k, v, **kw):
        seen.append((q.dtype, k.dtype, v.dtype))
        return real(q, k, v, **kw)

    monkeypatch.setattr(model_mod, "varlen_attention", spy)
    config = ModelConfig.from_hf_dict(tiny_hf_dict(model_type=model_type))
    assert config.qk_norm == (model_type == "qwen3")
    model = init_model(config, seed=5)  # fp32 weights
    ids, pos, cu = _packed([6, 9], seed=6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(ids, pos, cu, 9)
    assert seen and all(d == (torch.bfloat16,) * 3 for d in seen), seen
