"""The Llama-family decoder (Llama 2/3, Mistral, Qwen2/3, SmolLM, SOLAR) over packed token streams.

One implementation covers the family: RMSNorm, rotary position embeddings (default, linear and
llama3 scaling), grouped-query attention, SwiGLU MLP, tied or untied embeddings, optional q/k/v
bias (Qwen2), per-head query/key RMSNorm (Qwen3), sliding-window attention on the layers that
slide (Mistral: all; Qwen2/3: those ``layer_types`` names, each layer's window a constant of its
``Attention``). Parameter names equal Hugging Face's (``model.layers.0.self_attn.q_proj.weight``,
...) so checkpoints map one to one (see ``engine/checkpoint.py``).

The forward takes a padding-free packed batch (``input_ids``, ``position_ids``, ``cu_seqlens``)
and returns the final hidden states after the last norm; it never applies the lm_head. With the
optional ``shared_prefix`` (a shared-prompt batch, see ``engine/packing.py``) each attention
gathers its keys/values into that key layout, so a pair's prompt rows are computed once and
attended to by both completions. The
log-prob op takes ``lm_head_weight`` and fuses the projection with the log-softmax, so a full
(tokens x vocab) logits tensor is never formed here.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from sdpo.engine.attention import ATTENTION_BACKENDS, SharedPrefix, varlen_attention

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
# transformers' defaults for keys a config.json of the type may lack, where they are not the
# Llama ones (head_dim hidden_size / heads, a key/value head per head, 2048 positions, no window)
_TYPE_DEFAULTS: dict[str, dict[str, Any]] = {
    "mistral": {
        "num_key_value_heads": 8,
        "max_position_embeddings": 131072,
        "sliding_window": 4096,
    },
    "qwen2": {
        "num_key_value_heads": 32,
        "max_position_embeddings": 32768,
        "sliding_window": 4096,
        "max_window_layers": 28,
    },
    "qwen3": {
        "num_key_value_heads": 32,
        "max_position_embeddings": 32768,
        "sliding_window": 4096,
        "max_window_layers": 28,
        "head_dim": 128,
    },
}
# What a null in config.json means to transformers 5. A null in a key the type's modeling code
# reads is refused (its configs are strict dataclasses, or the model fails to build), except in
# the keys below, where null takes the default: a key/value head per query head,
# hidden_size / heads for head_dim. sliding_window, layer_types, rope_scaling,
# rope_parameters and partial_rotary_factor may be null for every type (see _read_rope and
# _sliding_attention).
_NULL_TAKES_DEFAULT: dict[str, frozenset[str]] = {
    "llama": frozenset({"num_key_value_heads", "head_dim"}),
    "mistral": frozenset({"head_dim"}),
    "qwen2": frozenset({"num_key_value_heads"}),
    "qwen3": frozenset({"num_key_value_heads"}),
}
# Keys whose null is refused, each with what to write instead.
_NULL_FIXES = {
    "vocab_size": "the number of rows of the model's embedding",
    "hidden_size": "the model's hidden size",
    "intermediate_size": "the inner size of its MLP",
    "num_hidden_layers": "the number of decoder layers",
    "num_attention_heads": "the number of query heads",
    "num_key_value_heads": "the number of key/value heads",
    "head_dim": "the size of one attention head",
    "rms_norm_eps": "the RMSNorm epsilon the model was trained with",
    "max_position_embeddings": "the model's context length in tokens",
    "tie_word_embeddings": "true when lm_head shares the embedding's weights, else false",
    "initializer_range": "a number (transformers' default: 0.02)",
    "hidden_act": '"silu"',
    "attention_bias": "true or false: whether the attention projections have biases",
    "mlp_bias": "true or false: whether the MLP projections have biases",
    "use_sliding_window": "true or false",
    "max_window_layers": "the index of the first layer with sliding-window attention",
}
# Keys the type's modeling code does not read, whatever their value: Mistral has no biases,
# Qwen2 always q/k/v biases and no others, Qwen3 no MLP biases; only Qwen slides by layer.
_IGNORED_KEYS: dict[str, frozenset[str]] = {
    "llama": frozenset({"sliding_window", "use_sliding_window", "max_window_layers"}),
    "mistral": frozenset({"attention_bias", "mlp_bias", "use_sliding_window", "max_window_layers"}),
    "qwen2": frozenset({"attention_bias", "mlp_bias"}),
    "qwen3": frozenset({"mlp_bias"}),
}
# Keys of a rope dict that describe the scaling (everything else, like rope_theta, is not).
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor")
# The JSON type of each key the model reads, as transformers 5's config classes check them
# (its strict fields take no 64.0 for an int, no 1 for a float, no "false" for a bool), and
# the same for the keys of a rotary dict (which it does not check, and then fails on or runs
# with a string): a number there is an int or a float, never a bool.
_JSON_TYPES: dict[str, tuple[tuple[type, ...], str]] = {
    "int": ((int,), "an integer"),
    "float": ((float,), "a decimal number (1e-06, 0.02)"),
    "number": ((int, float), "a number"),
    "bool": ((bool,), "true or false"),
}
# The model's sizes and counts: positive integers (ModelConfig checks them).
_SIZE_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
)
_KEY_TYPES = {
    **dict.fromkeys(
        (
            *_SIZE_KEYS,
            "max_position_embeddings",
            "sliding_window",
            "max_window_layers",
            "original_max_position_embeddings",
        ),
        "int",
    ),
    **dict.fromkeys(("rms_norm_eps", "initializer_range"), "float"),
    **dict.fromkeys(("rope_theta", "partial_rotary_factor"), "number"),
    **dict.fromkeys(
        ("tie_word_embeddings", "attention_bias", "mlp_bias", "use_sliding_window"), "bool"
    ),
}
_ROPE_KEY_TYPES = {
    **dict.fromkeys(("rope_theta", "partial_rotary_factor", *_LLAMA3_KEYS), "number"),
    "original_max_position_embeddings": "int",
}


class ConfigError(ValueError):
    """A config.json that this engine cannot run; the message names the key and the fix."""


class UnsupportedConfig(ConfigError):
    """A valid config.json asking for what sdpo's own decoder does not implement (a model type,
    an activation, a rotary scaling, partial rotary): transformers can run it
    (``model.implementation``)."""


@dataclass(kw_only=True)
class ModelConfig:
    """Architecture of a Llama-family model, read from (and written back to) a HF config dict.

    ``rope_scaling`` is normalised: None for plain rotary embeddings, else a dict with
    ``rope_type`` ("linear" or "llama3") and its parameters. ``raw`` keeps the dict the config
    came from, so that ``to_hf_dict`` writes back every key this class does not model."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q/k/v projections
    o_proj_bias: bool = False  # bias on the output projection (Llama attention_bias=True)
    mlp_bias: bool = False
    # the window of the layers that slide (Mistral: all; Qwen: those layer_types names), None
    # when none does: a query of such a layer sees itself and the sliding_window - 1 tokens
    # before it, as transformers masks them
    sliding_window: int | None = None
    # the indices of the layers that slide, None for every layer (while sliding_window is set);
    # normalised in __post_init__ (all layers: None)
    sliding_layers: tuple[int, ...] | None = None
    initializer_range: float = 0.02
    model_type: str = "llama"
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in _SIZE_KEYS:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"config key {name!r} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2 != 0:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedConfig(
                f"model_type {self.model_type!r} is not one sdpo's own decoder implements; "
                f"supported: {', '.join(SUPPORTED_MODEL_TYPES)} (SmolLM and SOLAR use 'llama'). "
                "The runner trains other causal LMs with transformers: model.implementation = "
                '"auto" (the default) or "transformers" (sdpo score: --implementation)'
            )
        if self.rope_scaling is not None:
            self.rope_scaling = _normalise_rope_scaling(
                self.rope_scaling,
                max_position_embeddings=self.max_position_embeddings,
                key="rope_scaling",
            )
        self._normalise_sliding_window()

    def _normalise_sliding_window(self) -> None:
        """Check the window settings against what the type's transformers model can express,
        and write each set of sliding layers one way: None for all, sorted indices otherwise,
        and no window where no layer slides."""
        window, layers = self.sliding_window, self.sliding_layers
        if window is not None and (
            isinstance(window, bool) or not isinstance(window, int) or window <= 0
        ):
            raise ConfigError(
                f"config key 'sliding_window' must be a positive integer (the tokens a query "
                f"of a sliding layer sees) or null, got {window!r}"
            )
        if window is not None and self.model_type == "llama":
            raise ConfigError(
                "a llama model has no sliding-window attention (transformers' Llama ignores "
                "sliding_window); use model_type 'mistral', 'qwen2' or 'qwen3' for one"
            )
        if layers is None or window is None:
            self.sliding_layers = None
            return
        count = self.num_hidden_layers
        if any(isinstance(i, bool) or not isinstance(i, int) for i in layers) or any(
            not 0 <= i < count for i in layers
        ):
            raise ConfigError(
                f"sliding_layers must be indices of the model's {count} layers, got {layers!r}"
            )
        layers = tuple(sorted(set(layers)))
        if len(layers) == count:
            self.sliding_layers = None
        elif not layers:  # no layer slides: no window, as transformers reads such a config
            self.sliding_window, self.sliding_layers = None, None
        elif self.model_type == "mistral":
            raise ConfigError(
                "a mistral model slides every layer or none (transformers' Mistral reads no "
                f"layer_types); got sliding layers {list(layers)} of {count}: use model_type "
                "'qwen2' or 'qwen3' for a window on some layers"
            )
        else:
            self.sliding_layers = layers

    def layer_window(self, index: int) -> int | None:
        """The sliding window of decoder layer ``index``, None where it attends to every earlier
        token of its sequence."""
        if self.sliding_layers is None or index in self.sliding_layers:
            return self.sliding_window
        return None

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Read a Hugging Face ``config.json`` dict (transformers 4.x or 5.x spelling)."""
        required = (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
        )
        missing = [k for k in required if k not in d]
        if missing:
            raise ConfigError(
                f"config is missing required key(s) {missing}; a Llama-family config.json "
                f"needs {', '.join(required)}"
            )
        model_type = d.get("model_type", "llama")
        raw = d
        # a key the file lacks (not one set to null) takes transformers' default for the type
        d = {**_TYPE_DEFAULTS.get(model_type, {}), **d}
        _refuse_nulls(d, model_type)
        _refuse_wrong_types(d, _KEY_TYPES, model_type=model_type)
        act = d.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise UnsupportedConfig(
                f"config key 'hidden_act' is {act!r}; only 'silu' (SwiGLU) is supported"
            )
        heads = d["num_attention_heads"]
        head_dim = d.get("head_dim") or d["hidden_size"] // heads
        theta, scaling = _read_rope(d)

        # transformers' modeling code per type: Llama's attention_bias is on q/k/v and o_proj,
        # its mlp_bias on the MLP; Qwen3 reads attention_bias alone, Qwen2 neither (q/k/v
        # biases always, never on o_proj), Mistral neither (no biases)
        ignored = _IGNORED_KEYS.get(model_type, frozenset())
        if model_type == "qwen2":
            qkv_bias, o_bias = True, False
        else:
            qkv_bias = o_bias = "attention_bias" not in ignored and bool(
                d.get("attention_bias", False)
            )
        mlp_bias = "mlp_bias" not in ignored and bool(d.get("mlp_bias", False))
        window, sliding_layers = _sliding_attention(d, model_type)

        return cls(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=d.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=qkv_bias,
            o_proj_bias=o_bias,
            mlp_bias=mlp_bias,
            sliding_window=window,
            sliding_layers=sliding_layers,
            initializer_range=float(d.get("initializer_range", 0.02)),
            model_type=model_type,
            raw=copy.deepcopy(raw),
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """The config as a HF ``config.json`` dict: the raw dict it came from, updated.

        Rotary settings are written in the spelling the source used (``rope_parameters`` for
        transformers 5 configs, ``rope_theta``/``rope_scaling`` otherwise, which both major
        transformers versions read)."""
        d = copy.deepcopy(self.raw)
        d.update(
            model_type=self.model_type,
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            hidden_act=d.get("hidden_act", "silu"),
            rms_norm_eps=self.rms_norm_eps,
            max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_word_embeddings,
            initializer_range=self.initializer_range,
        )
        d.setdefault("architectures", [_ARCHITECTURES[self.model_type]])
        if self.model_type in ("llama", "qwen3"):
            if self.attention_bias != self.o_proj_bias:
                raise ConfigError(
                    f"a {self.model_type} config has one attention_bias for q/k/v and o_proj; "
                    f"got q/k/v bias {self.attention_bias} and o_proj bias {self.o_proj_bias}"
                )
            d["attention_bias"] = self.attention_bias
        if self.model_type == "llama":
            d["mlp_bias"] = self.mlp_bias
        if self.model_type in ("mistral", "qwen2", "qwen3"):
            # the source's window keys stay as they are where they give the model's windows
            # (a Qwen's max_window_layers, layer_types); other windows are written anew
            resolved = {**_TYPE_DEFAULTS[self.model_type], **d}
            try:
                kept = _sliding_attention(resolved, self.model_type) == (
                    self.sliding_window,
                    self.sliding_layers,
                )
            except ConfigError:  # layer_types for another number of layers
                kept = False
            if not kept:
                d["sliding_window"] = self.sliding_window
                if self.model_type in ("qwen2", "qwen3"):
                    d.pop("layer_types", None)
                    d.update(_qwen_window_keys(self))

        rope: dict[str, Any] = {"rope_type": "default"}
        if self.rope_scaling is not None:
            rope = dict(self.rope_scaling)
        if "rope_parameters" in d:
            d["rope_parameters"] = {**rope, "rope_theta": self.rope_theta}
            d.pop("rope_scaling", None)
            d.pop("rope_theta", None)
        else:
            d["rope_theta"] = self.rope_theta
            d["rope_scaling"] = None if self.rope_scaling is None else rope
        return d

    @property
    def qk_norm(self) -> bool:
        """Qwen3: an RMSNorm over each head's queries and keys, before the rotary."""
        return self.model_type == "qwen3"

    def architecture_dict(self) -> dict[str, Any]:
        """The fields that determine the model's function (no raw dict): for fingerprints.

        ``sliding_layers`` is left out while it is None (every layer slides, or none does), so
        that the fingerprints of such models, and the caches they key, are those of the
        releases before it existed."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "raw"}
        if d["sliding_layers"] is None:
            del d["sliding_layers"]
        else:
            d["sliding_layers"] = list(d["sliding_layers"])
        return d

    def earlier_architecture_dicts(self) -> list[dict[str, Any]]:
        """The architecture dicts earlier releases fingerprinted for this config where they
        differ from ``architecture_dict()``, so that their runs resume and their reference
        caches stay valid (``sdpo.engine.checkpoint.earlier_model_fingerprints``).

        Two changes of a Qwen2/Qwen3 window's reading changed the dict and not what the model
        computes on the sequences those releases ran: they kept one window for the model (no
        ``sliding_layers``), and before that took it from ``use_sliding_window`` whether or not a
        layer slides. Their decoder applied no window and refused every sequence longer than the
        one in the dict, and on sequences no longer than a window sliding and full attention
        agree; where no layer slides (the second case) attention is full now as it was then."""
        if self.model_type not in ("qwen2", "qwen3"):
            return []  # Mistral's window was read the same way before (every layer or none)
        now = self.architecture_dict()
        one_window = {k: v for k, v in now.items() if k != "sliding_layers"}
        resolved = {**_TYPE_DEFAULTS[self.model_type], **self.raw}
        candidates = [one_window]
        if resolved.get("use_sliding_window") is True:
            candidates.append({**one_window, "sliding_window": resolved.get("sliding_window")})
        earlier: list[dict[str, Any]] = []
        for d in candidates:
            if d != now and d not in earlier:
                earlier.append(d)
        return earlier


def _refuse_nulls(d: dict[str, Any], model_type: str) -> None:
    """A ConfigError for a null that transformers refuses in a key the type's model reads."""
    lenient = _NULL_TAKES_DEFAULT.get(model_type, frozenset()) | _IGNORED_KEYS.get(
        model_type, frozenset()
    )
    for key, fix in _NULL_FIXES.items():
        if key in d and d[key] is None and key not in lenient:
            raise ConfigError(
                f"config key {key!r} is null, which transformers does not accept for a "
                f"{model_type} model; write {fix}"
            )


def _refuse_wrong_types(
    d: dict[str, Any], types: dict[str, str], *, model_type: str, where: str = ""
) -> None:
    """A ConfigError for a value of another JSON type than ``types`` gives its key (nulls are
    _refuse_nulls's), in a key the type's model reads; ``where`` prefixes a rotary dict's keys."""
    ignored = _IGNORED_KEYS.get(model_type, frozenset()) if not where else frozenset()
    for key, kind in types.items():
        value = d.get(key)
        if value is None or key in ignored:
            continue
        accepted, words = _JSON_TYPES[kind]
        if isinstance(value, accepted) and (kind == "bool" or not isinstance(value, bool)):
            continue
        fix = _NULL_FIXES.get(key, "the value the model was trained with")
        name = _JSON_NAMES.get(type(value), type(value).__name__)
        raise ConfigError(
            f"config key {where + key!r} is {value!r} (a JSON {name}), which a {model_type} "
            f"model does not take: write {words}, without quotes ({fix})"
        )


_JSON_NAMES = {
    bool: "boolean",
    int: "integer",
    float: "decimal number",
    str: "string",
    list: "array",
    dict: "object",
}


def _sliding_attention(
    d: dict[str, Any], model_type: str
) -> tuple[int | None, tuple[int, ...] | None]:
    """(window, sliding layers) as transformers 5 reads the config, in ModelConfig's form: the
    window of the layers that attend through a sliding window (None where no layer does) and
    their indices (None: every layer). Mistral slides every layer when sliding_window is set;
    Qwen2/Qwen3 only with use_sliding_window, and then only the layers layer_types names
    sliding_attention (by default those from max_window_layers on, so none in a model of
    max_window_layers layers or fewer)."""
    if model_type == "mistral":
        return d.get("sliding_window"), None
    if model_type not in ("qwen2", "qwen3"):
        return None, None
    window = d.get("sliding_window") if d.get("use_sliding_window", False) else None
    layers = d["num_hidden_layers"]
    layer_types = d.get("layer_types")
    if layer_types is None:
        first = max(d["max_window_layers"], 0)
        if window is None or first >= layers:
            return None, None
        return window, None if first == 0 else tuple(range(first, layers))
    # transformers reads the legacy "attention" as full_attention
    kinds = ["full_attention" if t == "attention" else t for t in layer_types]
    allowed = ("full_attention", "sliding_attention")
    if not isinstance(layer_types, list) or any(t not in allowed for t in kinds):
        raise ConfigError(
            f"config key 'layer_types' must be a list of {' or '.join(map(repr, allowed))}, "
            f"one per layer, for a {model_type} model; got {layer_types!r}"
        )
    if len(kinds) != layers:
        raise ConfigError(
            f"config key 'layer_types' names {len(kinds)} layers, and num_hidden_layers is "
            f"{layers}: write one entry per layer"
        )
    if "sliding_attention" not in kinds:
        return None, None
    if window is None:
        raise ConfigError(
            "config key 'layer_types' names sliding_attention layers, and the model has no "
            "window (use_sliding_window false or sliding_window null), which transformers "
            "cannot build: set use_sliding_window to true and sliding_window to the window, or "
            "those layers to full_attention"
        )
    sliding = tuple(i for i, kind in enumerate(kinds) if kind == "sliding_attention")
    return window, None if len(sliding) == layers else sliding


def _qwen_window_keys(config: ModelConfig) -> dict[str, Any]:
    """The Qwen2/Qwen3 config.json keys that give ``config``'s windows in transformers: the
    layers from max_window_layers on where they are the sliding ones (which transformers 4
    reads too), else layer_types, one entry per layer."""
    window, sliding = config.sliding_window, config.sliding_layers
    count = config.num_hidden_layers
    if window is None:
        return {"use_sliding_window": False, "max_window_layers": 0}
    keys: dict[str, Any] = {"use_sliding_window": True, "sliding_window": window}
    if sliding is None:
        return {**keys, "max_window_layers": 0}
    if sliding == tuple(range(sliding[0], count)):
        return {**keys, "max_window_layers": sliding[0]}
    kinds = ["sliding_attention" if i in sliding else "full_attention" for i in range(count)]
    return {**keys, "max_window_layers": sliding[0], "layer_types": kinds}


def _read_rope(d: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, normalised scaling dict or None) from either config spelling."""
    max_pos = int(d.get("max_position_embeddings", 2048))
    # transformers reads a non-empty rope_scaling over rope_parameters (5.x keeps
    # rope_parameters only when rope_scaling is absent or empty; 4.x knows no rope_parameters)
    if d.get("rope_scaling"):
        key, params = "rope_scaling", d["rope_scaling"]
    elif d.get("rope_parameters") is not None:
        key, params = "rope_parameters", d["rope_parameters"]
    else:
        key, params = "rope_theta", {}
    if not isinstance(params, dict):
        raise ConfigError(f"config key {key!r} must be a dict, got {type(params).__name__}")
    _refuse_wrong_types(
        params, _ROPE_KEY_TYPES, model_type=d.get("model_type", "llama"), where=f"{key}."
    )
    theta = params.get("rope_theta", d.get("rope_theta", 10000.0))
    if theta is None:
        # transformers builds no rotary from a null base
        where = f"{key}.rope_theta" if "rope_theta" in params else "rope_theta"
        raise ConfigError(
            f"config key {where!r} is null, which transformers does not accept; write the "
            "rotary base the model was trained with (transformers' default: 10000.0)"
        )
    # a null partial_rotary_factor is no factor (a full rotary), as in transformers
    partial = params.get("partial_rotary_factor", d.get("partial_rotary_factor"))
    if partial is not None and float(partial) != 1.0:
        raise UnsupportedConfig(
            f"config key {key!r}: partial_rotary_factor != 1 is not supported by this engine"
        )
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return float(theta), None
    if "original_max_position_embeddings" in d:
        # a top-level original_max_position_embeddings (Phi-3's spelling) is the one
        # transformers 5 gives the scaled rotary, over the rope dict's own (a null one too)
        if d["original_max_position_embeddings"] is None and rope_type == "llama3":
            raise ConfigError(
                "config key 'original_max_position_embeddings' is null, which transformers "
                "does not accept beside a llama3 rotary; write the context length the model "
                "was pretrained with, or remove the key to use the rotary dict's own"
            )
        params = {
            **params,
            "original_max_position_embeddings": d["original_max_position_embeddings"],
        }
    return float(theta), _normalise_rope_scaling(params, max_position_embeddings=max_pos, key=key)


def _normalise_rope_scaling(
    params: dict[str, Any], *, max_position_embeddings: int, key: str
) -> dict[str, Any] | None:
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type is None:
        raise ConfigError(
            f"config key {key!r} has a null rope_type, which transformers does not accept; "
            'write the rotary\'s type ("default", "linear", "llama3", ...)'
        )
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedConfig(
            f"config key {key!r} has rope_type {rope_type!r}, which this engine does not "
            f"support; supported rope types: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    # transformers fails on these nulls; name each, rather than run a default it does not
    read = ("factor",)
    if rope_type == "llama3":
        read = (*_LLAMA3_KEYS, "original_max_position_embeddings")
    nulls = [k for k in read if k in params and params[k] is None]
    if nulls:
        raise ConfigError(
            f"config key {key!r} has null {', '.join(nulls)}, which transformers does not "
            f"accept for rope_type {rope_type!r}; write the value the model was trained with"
        )
    if rope_type == "default":
        return None
    if "factor" not in params:
        raise ConfigError(f"config key {key!r} (rope_type {rope_type!r}) needs a 'factor'")
    if rope_type == "linear":
        return {"rope_type": "linear", "factor": float(params["factor"])}
    missing = [k for k in _LLAMA3_KEYS if k not in params]
    if missing:
        raise ConfigError(f"config key {key!r} (rope_type 'llama3') is missing {missing}")
    out = {"rope_type": "llama3", **{k: float(params[k]) for k in _LLAMA3_KEYS}}
    out["original_max_position_embeddings"] = int(
        params.get("original_max_position_embeddings", max_position_embeddings)
    )
    if out["high_freq_factor"] <= out["low_freq_factor"]:
        raise ConfigError(
            f"config key {key!r}: high_freq_factor ({out['high_freq_factor']}) must exceed "
            f"low_freq_factor ({out['low_freq_factor']})"
        )
    return out


def rope_inverse_frequencies(config: ModelConfig, *, device: torch.device | str = "cpu") -> Tensor:
    """Rotary inverse frequencies (head_dim / 2,) in float32, with the config's scaling applied.

    Computed in float64 then rounded once, so the result does not depend on the device."""
    dim = config.head_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.float64, device=device) / dim
    inv_freq = 1.0 / (config.rope_theta**exponents)  # (D/2,)
    scaling = config.rope_scaling
    if scaling is not None and scaling["rope_type"] == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif scaling is not None and scaling["rope_type"] == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_context = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        # Short wavelengths (< old_context / high) keep their frequency, long ones
        # (> old_context / low) are divided by `factor`, and the band between is interpolated.
        smooth = (old_context / wavelen - low) / (high - low)
        interpolated = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        inv_freq = torch.where(
            wavelen > old_context / low,
            inv_freq / factor,
            torch.where(wavelen < old_context / high, inv_freq, interpolated),
        )
    return inv_freq.to(torch.float32)


def rotary_cos_sin(
    position_ids: Tensor, inv_freq: Tensor, *, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """cos and sin tables (N, D) for the given positions, computed in fp32, cast to ``dtype``."""
    freqs = position_ids.to(torch.float32)[:, None] * inv_freq[None, :]  # (N, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (N, D)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x (N, heads, D) by the per-token angles in cos/sin (N, D); the result keeps x's
    dtype. (Under bf16 autocast the residual stream, and so cos/sin, are fp32 while q/k are
    bf16: without the cast back, fp32 q/k would push attention off the flash/varlen kernels
    onto the per-sequence SDPA fallback.)"""
    cos = cos[:, None, :]  # (N, 1, D)
    sin = sin[:, None, :]  # (N, 1, D)
    return (x * cos + _rotate_half(x) * sin).to(x.dtype)


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in fp32 and cast back before the weight (as HF does)."""

    def __init__(self, hidden_size: int, *, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x32 = x.to(torch.float32)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class Attention(nn.Module):
    """Grouped-query attention of one layer; ``window`` is the layer's sliding window (None:
    every earlier token of the sequence), a constant of the layer that compiled graphs
    specialise on."""

    def __init__(self, config: ModelConfig, *, window: int | None = None) -> None:
        super().__init__()
        self.window = window
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        h, d = config.hidden_size, config.head_dim
        self.q_proj = nn.Linear(h, self.num_heads * d, bias=config.attention_bias)
        self.k_proj = nn.Linear(h, self.num_kv_heads * d, bias=config.attention_bias)
        self.v_proj = nn.Linear(h, self.num_kv_heads * d, bias=config.attention_bias)
        self.o_proj = nn.Linear(self.num_heads * d, h, bias=config.o_proj_bias)
        if config.qk_norm:  # Qwen3
            self.q_norm = RMSNorm(d, eps=config.rms_norm_eps)
            self.k_norm = RMSNorm(d, eps=config.rms_norm_eps)
        self.qk_norm = config.qk_norm

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        *,
        cu_seqlens: Tensor,
        max_seqlen: int,
        backend: str,
        cu_seqlens_k: Tensor | None = None,
        max_seqlen_k: int | None = None,
        kv_index: Tensor | None = None,
    ) -> Tensor:
        n = x.shape[0]
        q = self.q_proj(x).view(n, self.num_heads, self.head_dim)  # (N, Hq, D)
        k = self.k_proj(x).view(n, self.num_kv_heads, self.head_dim)  # (N, Hkv, D)
        v = self.v_proj(x).view(n, self.num_kv_heads, self.head_dim)  # (N, Hkv, D)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        # Rotated in the dtype they arrive in, then back to v's (the projections'): under bf16
        # autocast the fp32 weights of Qwen3's q/k norms promote q/k to fp32, which would send
        # attention to the per-sequence fallback (or fail a named flash/varlen backend). One
        # rounding after the rotation, as autocast's SDPA and transformers' flash path apply.
        q = apply_rotary(q, cos, sin).to(v.dtype)
        k = apply_rotary(k, cos, sin).to(v.dtype)
        if kv_index is not None:
            # shared-prompt layout: keys/values in key order, each prompt's rows twice; the
            # backward of index_select sums a prompt row's gradient over both of its uses
            k = k.index_select(0, kv_index)  # (K, Hkv, D)
            v = v.index_select(0, kv_index)  # (K, Hkv, D)
        out = varlen_attention(
            q,
            k,
            v,
            cu_seqlens=cu_seqlens,
            max_seqlen=max_seqlen,
            backend=backend,
            cu_seqlens_k=cu_seqlens_k,
            max_seqlen_k=max_seqlen_k,
            window=self.window,
        )  # (N, Hq, D)
        return self.o_proj(out.reshape(n, self.num_heads * self.head_dim))  # (N, H)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        h, i = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(h, i, bias=config.mlp_bias)
        self.up_proj = nn.Linear(h, i, bias=config.mlp_bias)
        self.down_proj = nn.Linear(i, h, bias=config.mlp_bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """One pre-norm transformer block; the unit of activation checkpointing and of regional
    ``torch.compile``."""

    def __init__(self, config: ModelConfig, *, window: int | None = None) -> None:
        super().__init__()
        self.self_attn = Attention(config, window=window)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        cu_seqlens: Tensor,
        max_seqlen: int,
        backend: str,
        cu_seqlens_k: Tensor | None = None,
        max_seqlen_k: int | None = None,
        kv_index: Tensor | None = None,
    ) -> Tensor:
        x = x + self.self_attn(
            self.input_layernorm(x),
            cos,
            sin,
            cu_seqlens=cu_seqlens,
            max_seqlen=max_seqlen,
            backend=backend,
            cu_seqlens_k=cu_seqlens_k,
            max_seqlen_k=max_seqlen_k,
            kv_index=kv_index,
        )
        return x + self.mlp(self.post_attention_layernorm(x))  # (N, H)


class DecoderStack(nn.Module):
    """Embeddings, decoder layers and the final norm (HF's ``model.`` prefix)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(config, window=config.layer_window(i))
            for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)


class CausalLM(nn.Module):
    """A Llama-family causal LM whose forward returns final hidden states (N, H).

    Logits are ``hidden @ lm_head_weight.T``; the caller (the log-prob op) applies them."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = DecoderStack(config)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.gradient_checkpointing = False
        # With gradient checkpointing on, recompute every k-th decoder layer in backward (1: all
        # layers; 2: half of them, trading half the saved activations for half the recompute).
        self.checkpoint_every = 1
        self.attn_backend = "auto"

    @property
    def lm_head_weight(self) -> Tensor:
        """(V, H): the output projection; the embedding matrix when embeddings are tied."""
        if self.config.tie_word_embeddings:
            return self.model.embed_tokens.weight
        return self.lm_head.weight

    def forward(
        self,
        input_ids: Tensor,
        position_ids: Tensor,
        cu_seqlens: Tensor,
        max_seqlen: int,
        *,
        shared_prefix: SharedPrefix | None = None,
    ) -> Tensor:
        """input_ids, position_ids (N,); cu_seqlens (S+1,) int32 -> hidden states (N, H).

        ``shared_prefix``: the key layout of a shared-prompt batch (``cu_seqlens`` then
        delimits its query sequences)."""
        if input_ids.dim() != 1 or position_ids.shape != input_ids.shape:
            raise ValueError(
                "CausalLM.forward takes a packed batch: input_ids and position_ids of shape "
                f"(N,), got {tuple(input_ids.shape)} and {tuple(position_ids.shape)}"
            )
        if self.attn_backend not in ATTENTION_BACKENDS:
            raise ValueError(
                f"unknown attn_backend {self.attn_backend!r}; choose one of {ATTENTION_BACKENDS}"
            )
        x = self.model.embed_tokens(input_ids)  # (N, H)
        inv_freq = rope_inverse_frequencies(self.config, device=input_ids.device)
        cos, sin = rotary_cos_sin(position_ids, inv_freq, dtype=x.dtype)  # (N, D) each
        checkpointing = self.gradient_checkpointing and torch.is_grad_enabled()
        every = max(1, int(self.checkpoint_every))
        # the shared-prompt key layout travels as plain tensors and an int (as cu_seqlens does)
        # so that compiled layers and checkpointing see nothing new
        shared = ()
        if shared_prefix is not None:
            p = shared_prefix
            shared = (p.cu_seqlens_k, p.max_seqlen_k, p.kv_index)
        for i, layer in enumerate(self.model.layers):
            # Each layer takes its input as a view (free: no copy). FSDP's pre-forward hook hands
            # a layer a view of every input that requires grad, but not to the recomputation of
            # a checkpointed layer nor to a layer whose input needs no grad (frozen embeddings
            # under LoRA); a compiled layer guards on whether its input is a view, so without
            # this it would compile each of those calls again.
            args = (x.view_as(x), cos, sin, cu_seqlens, max_seqlen, self.attn_backend, *shared)
            if checkpointing and i % every == 0:
                x = torch.utils.checkpoint.checkpoint(layer, *args, use_reentrant=False)
            else:
                x = layer(*args)
        return self.model.norm(x)  # (N, H)


def init_model(config: ModelConfig, *, seed: int, dtype: torch.dtype = torch.float32) -> CausalLM:
    """A randomly initialised model: weights ~ N(0, initializer_range), biases 0, norms 1.

    Deterministic for a given seed (drawn on the CPU in parameter order)."""
    model = CausalLM(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            elif name.endswith(".bias"):
                param.zero_()
            else:
                param.normal_(mean=0.0, std=config.initializer_range, generator=generator)
    return model.to(dtype)
