"""A Hugging Face causal LM behind sdpo's packed-model protocol.

``DPOTrainer``, ``score_pairs`` and the in-memory stepwise loop (``sdpo.stepwise``) call
``model(input_ids, position_ids, cu_seqlens, max_seqlen)`` on a packed batch (the sequences back
to back in one 1-D stream, ``cu_seqlens`` their boundaries) and read ``model.lm_head_weight``.
sdpo's own decoder (``engine/model.py``) attends within each ``cu_seqlens`` segment itself. A
Hugging Face model given the packed stream as one row would let every sequence attend to the
ones before it under SDPA or eager attention, which gives wrong log-probs without an error.

The loss head reads the hidden states and ``lm_head_weight`` alone, so the wrapper makes their
product the model's logits. A constant logit scale (Granite's ``logits_scaling``, Cohere's
``logit_scale``: ``logit_factor``) is applied to the hidden states it returns. A soft cap
(``c * tanh(hidden @ W.T / c)``, Gemma 2) is exposed as ``logit_softcap`` (None for every other
model, sdpo's own decoder included, which has no such attribute); the trainer and the scoring
pass then compute the log-probs of the capped logits (``sdpo.engine.scoring.logprob_head``).
Logits that are anything else (a bias on the output projection) are refused (``check_head``).

``PackedCausalLM`` keeps the sequences apart the portable way: it scatters the stream into a
right-padded ``(S, max_seqlen)`` batch with an attention mask and the stream's own position ids,
runs the model's decoder (``get_decoder()``: the embeddings, the layers and the final norm, no
lm_head), and gathers the real rows back into the stream's order. Any attention implementation
the model was loaded with works; the padding costs compute on batches of uneven lengths, which
sdpo's own decoder does not pay. Where one padded batch would hold more than twice the real
tokens (one long sequence among many short ones), the sequences run in groups of similar length,
each padded to its own longest, so the activations kept for the backward stay near the real
tokens'. A rotary that transformers sets from the longest position of the whole batch (Phi-3's
longrope, dynamic NTK) would rotate a short sequence padded beside a long one as the long one:
such sequences run in separate calls, each rotated as it is alone.

The wrapper holds the decoder as ``model`` and the output embedding as ``lm_head``, so its
parameter names are the Hugging Face ones (``model.layers.0.self_attn.q_proj.weight``,
``lm_head.weight``) and training it trains the wrapped model's parameters in place: the Hugging
Face object the caller holds sees every update and saves with ``save_pretrained`` as usual.
``train()`` and ``eval()`` on the wrapper set the whole Hugging Face object's mode. A model the
caller sharded with FSDP2 (``fully_shard`` of its layers, then of the model) has the root's
forward hooks, which gather the embeddings, final norm and lm_head, run around the decoder call
(``_decoder``), as its own ``forward`` would run them.

The runner's folders (``model.implementation``,
``sdpo.engine.checkpoint.resolve_implementation``): ``load_hf_pretrained`` loads a model sdpo's
decoder does not implement (or any model, under ``"transformers"``) with
``AutoModelForCausalLM`` and wraps it; ``hf_state_dict`` and ``hf_config_dict`` are what its
checkpoints hold (the Hugging Face object's own tensor names, a tied output embedding stored
once, the config's own ``to_dict`` with the saved dtype), so they reload with
``AutoModelForCausalLM.from_pretrained`` as any Hugging Face folder does.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "PackedCausalLM",
    "apply_router_aux_loss_coef",
    "check_gradient_checkpointing",
    "check_head",
    "check_lora_layout",
    "dropout_off",
    "fp32_kept_tensors",
    "hf_config_dict",
    "hf_state_dict",
    "load_hf_pretrained",
    "logit_factor",
    "logit_softcap",
    "no_router_loss",
    "peft_adapter_parameters",
    "router_aux_loss_coef_for",
    "router_loss",
]

# config keys of Hugging Face models whose logits are not ``hidden @ lm_head.weight.T``: the
# packed protocol hands the loss head the weight alone, so these would give wrong log-probs
_LOGIT_KEYS = {
    "lm_head_multiplier": 1.0,  # Falcon-H1: logits multiplied by it
    "output_multiplier": 1.0,
    "output_multiplier_scale": 1.0,
}
# config keys that scale the logits by a constant, which the wrapper folds into the hidden
# states it returns (exact for the powers of two real configs use): key -> the factor of value
_LOGIT_SCALES = {
    "logits_scaling": lambda value: 1.0 / value,  # Granite: logits divided by it
    "logit_scale": lambda value: value,  # Cohere: logits multiplied by it
}


def _head_configs(config: object) -> list[object]:
    """The configs a model's output head reads: its own and, for a multimodal model (Gemma 3's
    ForConditionalGeneration), its text config, where the head's settings live."""
    configs = [config]
    if callable(getattr(config, "get_text_config", None)):
        text = config.get_text_config()
        if text is not None and text is not config:
            configs.append(text)
    return configs


def _text_config(config: object) -> object:
    """The config of a model's language part: a multimodal model's text config (what TRL's
    ``config.get_text_config()`` returns), a text model's own config."""
    if callable(getattr(config, "get_text_config", None)):
        text = config.get_text_config()
        if text is not None:
            return text
    return config


def _head_setting(config: object, key: str) -> Any:
    """``key`` of the first of ``_head_configs`` that sets it (not None), else None."""
    return next(
        (v for c in _head_configs(config) if (v := getattr(c, key, None)) is not None), None
    )


def logit_factor(config: object) -> float:
    """The constant the model multiplies its logits by (1.0 for most models): Granite's
    ``1 / logits_scaling``, Cohere's ``logit_scale``."""
    factor = 1.0
    for key, of in _LOGIT_SCALES.items():
        value = _head_setting(config, key)
        if value is not None:
            factor *= float(of(value))
    return factor


def logit_softcap(config: object) -> float | None:
    """The cap ``c`` of a model whose logits are ``c * tanh(hidden @ W.T / c)`` (Gemma 2's
    ``final_logit_softcapping``), or None: logits not capped."""
    value = _head_setting(config, "final_logit_softcapping")
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not (math.isfinite(value) and value > 0)
    ):
        raise ValueError(f"final_logit_softcapping must be a number > 0 or null, got {value!r}")
    return float(value)


def _caps_attention_scores(config: object) -> bool:
    """Whether the model soft-caps its attention scores (Gemma 2's ``attn_logit_softcapping``),
    which its eager attention applies and SDPA cannot."""
    return getattr(_text_config(config), "attn_logit_softcapping", None) is not None


# config.json keys that say nothing about the function a model computes: left out of its
# fingerprint
_VOLATILE_KEYS = ("dtype", "torch_dtype", "transformers_version", "_name_or_path", "architectures")


# the keys of a rotary dict (transformers 5's rope_parameters, 4's rope_scaling) whose value
# at the top of a config means the same: transformers moves them between the two across versions
_ROPE_DICTS = ("rope_parameters", "rope_scaling")
# values that state a model's default in so many words, which one version writes and another
# leaves out (a rotary over the whole head, the plain rotary)
_NEUTRAL_VALUES = {"partial_rotary_factor": 1.0, "rope_type": "default"}
# switches of what a forward returns, not of what it computes (sdpo asks for the router's
# logits itself, router_loss): a newer transformers adds them to a config type
_OUTPUT_SWITCHES = ("use_cache", "output_router_logits")


def _function_config(d: dict[str, Any]) -> dict[str, Any]:
    """A config's ``to_dict()`` as the settings that decide what the model computes, spelled
    alike by every transformers version: without the keys every config has (labels, output
    switches, its version) or that switch an output (``_OUTPUT_SWITCHES``), without keys set
    to None (a newer transformers adds them to every config of a type, a feature off); the
    keys of a one-level rotary dict at the top, where a version that keeps them there (or in
    ``rope_scaling``, its ``type`` as ``rope_type``) writes them, unless the top holds the key
    with another value (then it stays ``rope_parameters.<key>``); and without a value that
    names the default in so many words (``_NEUTRAL_VALUES``). A config inside it (a multimodal
    model's ``text_config``) is read the same way."""
    from transformers import PretrainedConfig

    d = dict(d)
    generic = set(PretrainedConfig().to_dict()) - {"model_type"}
    for key in (*_VOLATILE_KEYS, *generic, *_OUTPUT_SWITCHES):
        d.pop(key, None)
    for name in _ROPE_DICTS:
        rope = d.get(name)
        if not isinstance(rope, dict) or any(isinstance(v, dict) for v in rope.values()):
            continue  # absent, or one rotary per layer type (Gemma 3): kept as it is
        del d[name]
        for key, value in rope.items():
            key = "rope_type" if key == "type" else key
            if key in d and d[key] != value:
                d[f"{name}.{key}"] = value
            else:
                d[key] = value
    return {
        key: _function_config(value) if _is_sub_config(value) else value
        for key, value in d.items()
        if value is not None and not (key in _NEUTRAL_VALUES and value == _NEUTRAL_VALUES[key])
    }


def _is_sub_config(value: object) -> bool:
    """Whether a config's value is the dict of a config inside it (a multimodal model's
    ``text_config``), which ``_function_config`` reads as it reads the whole."""
    return isinstance(value, dict) and isinstance(value.get("model_type"), str)


def fp32_kept_tensors(model: nn.Module, dtype: torch.dtype) -> list[Tensor]:
    """The parameters and buffers of a Hugging Face model (or of one inside ``model``: a
    ``PackedCausalLM``, a PEFT model) that transformers keeps in fp32 when it loads the model in
    ``dtype``: the model class's ``_keep_in_fp32_modules_strict`` for bf16 (a DeepSeek-V3 or
    GLM-4 MoE router's ``gate.weight`` and ``e_score_correction_bias``), matched by name as
    ``from_pretrained`` matches them. None for an fp32 ``dtype`` or a model without such
    modules (sdpo's own decoder)."""
    if dtype == torch.float32:
        return []
    hf = getattr(model, "hf_model", model)
    plan = getattr(hf, "_get_dtype_plan", None)
    if callable(plan):  # transformers >= 5: the patterns from_pretrained keeps in fp32
        patterns = [p for p, kept in plan(dtype).items() if kept == torch.float32]
    else:  # older: the class attribute alone
        patterns = list(getattr(hf, "_keep_in_fp32_modules_strict", None) or [])
    if not patterns:
        return []
    # transformers' own matching: each pattern a regular expression ("*" any run), searched
    # anywhere in the tensor's name
    kept = re.compile("|".join(f"(?:{p.replace('*', '.*')})" for p in patterns))
    named = [*hf.named_parameters(), *hf.named_buffers()]
    return [t for name, t in named if kept.search(name)]


def peft_adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of the PEFT adapters in ``model`` (``peft.get_peft_model``): each tuner
    layer's own, not its base layer's. PEFT keeps them in fp32 over a bf16 base (so that small
    updates are not rounded away), and ``DPOTrainer`` leaves them out of its cast to the
    precision's dtype, as it does sdpo's own adapters (engine/lora.py). None without peft."""
    if "peft" not in sys.modules:  # never imported: no model holds a PEFT layer
        return []
    from peft.tuners.tuners_utils import BaseTunerLayer

    params: list[nn.Parameter] = []
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            base = {id(p) for p in module.get_base_layer().parameters()}
            params += [p for p in module.parameters() if id(p) not in base]
    return params


class PackedCausalLM(nn.Module):
    """``hf_model`` (a ``transformers`` ``*ForCausalLM``, or anything with ``get_decoder()`` and
    ``get_output_embeddings()``) behind the packed protocol; see the module docstring."""

    def __init__(self, hf_model: nn.Module, *, router_aux_loss_coef: float | None = None) -> None:
        super().__init__()
        missing = [
            name
            for name in ("get_decoder", "get_output_embeddings")
            if not callable(getattr(hf_model, name, None))
        ]
        if missing:
            raise TypeError(
                f"PackedCausalLM wraps a Hugging Face causal LM; {type(hf_model).__name__} has no "
                f"{' or '.join(missing)}()"
            )
        decoder = hf_model.get_decoder()
        head = hf_model.get_output_embeddings()
        if decoder is None or head is None or not isinstance(getattr(head, "weight", None), Tensor):
            raise TypeError(
                f"{type(hf_model).__name__} has no decoder or no output embedding with a weight: "
                "wrap a *ForCausalLM model (with its lm_head), not a bare base model"
            )
        check_head(hf_model)
        self.model = decoder
        self.lm_head = head
        # Granite's and Cohere's constant logit scale, applied to the hidden states returned,
        # so that they times lm_head.weight are the model's logits
        self.logit_factor = logit_factor(getattr(hf_model, "config", None))
        # Gemma 2's final_logit_softcapping: the logits are cap * tanh(hidden @ W.T / cap), which
        # the trainer and the scoring pass compute with their soft-capped head when this is set
        self.logit_softcap = logit_softcap(getattr(hf_model, "config", None))
        # the Hugging Face object itself, kept out of the module tree (a tuple is not registered)
        # so the parameter names stay the ones above; train()/eval() set its mode too, or the
        # object the caller holds would report eval mode while its layers train (dropout on)
        self._hf_model = (hf_model,)
        # config.json keys to write back over the model's own config when saving (the dropout
        # rates load_hf_pretrained turned off)
        self.saved_config: dict[str, Any] = {}
        # a mixture of experts' load-balancing loss, added to the training loss with the
        # config's router_aux_loss_coef (or ``router_aux_loss_coef`` given here, TRL's
        # DPOConfig option) as TRL's DPOTrainer adds it; the trainer takes each training
        # forward's value with pop_aux_loss()
        self._aux_loss: Tensor | None = None
        # inside recording_router_loss(): forwards without gradients keep it too (the eval
        # pass, which reports it as TRL's evaluate() does)
        self._record_router_loss = False
        self.set_router_aux_loss_coef(router_aux_loss_coef)
        # (kind, threshold) of a rotary that changes with the batch's longest position
        self._rotary_split = _rotary_split(getattr(hf_model, "config", None))

    def set_router_aux_loss_coef(
        self, coef: float | None, *, key: str = "router_aux_loss_coef"
    ) -> None:
        """Weight the router load-balancing loss by ``coef`` (``loss.router_aux_loss_coef``):
        None is the model config's own coefficient, 0 turns the loss off (no router logits are
        computed). A ``ValueError`` naming ``key`` for a coefficient other than 0 on a model
        with no router loss sdpo computes (``router_loss``)."""
        self.router_aux_loss_coef, self._balance, self._balance_options = router_loss(
            self.hf_model, coef, key=key
        )

    def train(self, mode: bool = True) -> PackedCausalLM:
        self._hf_model[0].train(mode)
        return super().train(mode)

    def pop_aux_loss(self) -> Tensor | None:
        """The router load-balancing loss of the last training forward, or of the last forward
        inside ``recording_router_loss()`` (None: not a mixture of experts, no coefficient, or
        no such forward since the last call)."""
        aux, self._aux_loss = self._aux_loss, None
        return aux

    @contextlib.contextmanager
    def recording_router_loss(self) -> Iterator[None]:
        """Every forward inside the block keeps its router load-balancing loss for
        ``pop_aux_loss``, in eval mode and without gradients too (where the coefficient is not
        0): the eval pass adds it to its loss as TRL's ``evaluate()`` does."""
        before, self._record_router_loss = self._record_router_loss, True
        try:
            yield
        finally:
            self._record_router_loss = before
            self._aux_loss = None

    @property
    def lm_head_weight(self) -> Tensor:
        return self.lm_head.weight

    def _decoder(self, **inputs: Any) -> Any:
        """The decoder's forward, as the Hugging Face model's own forward runs it. A model the
        caller sharded with FSDP2 (``fully_shard`` of its layers, then of the model) gathers
        the root's parameters (embeddings, final norm, lm_head) in the root's forward hooks,
        which its own ``forward`` runs and the decoder alone would not (the embedding would
        meet its shard): they run around the decoder here, as torch's
        ``register_fsdp_forward_method`` runs them around a method, and the root keeps
        lm_head gathered for the head after it (a root's default)."""
        from torch.distributed.fsdp import FSDPModule

        root = self.hf_model
        if not isinstance(root, FSDPModule):
            return self.model(**inputs)
        state = root._get_fsdp_state()
        args, inputs = state._pre_forward(root, (), inputs)
        return state._post_forward(root, args, self.model(*args, **inputs))

    @property
    def hf_model(self) -> nn.Module:
        """The wrapped Hugging Face object (its parameters are the wrapper's)."""
        return self._hf_model[0]

    def enable_gradient_checkpointing(self) -> None:
        """Recompute each decoder layer's activations in backward (transformers'
        ``gradient_checkpointing_enable``, non-reentrant, as TRL's ``gradient_checkpointing``
        sets it): the same numbers, less activation memory, one more forward of the layers.
        A ``ValueError`` when the model class does not support it."""
        hf = self.hf_model
        _check_checkpointing(type(hf))
        kwargs = {"use_reentrant": False}
        if hasattr(hf, "activation_checkpointing_enable"):  # the name from transformers 5.2x
            hf.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    @property
    def is_gradient_checkpointing(self) -> bool:
        """Whether the wrapped model recomputes its layers in backward."""
        hf = self.hf_model
        if hasattr(hf, "is_activation_checkpointing"):
            return bool(hf.is_activation_checkpointing)
        return bool(hf.is_gradient_checkpointing)

    def fingerprint_config(self) -> str:
        """The wrapped model's architecture as text, for ``model_fingerprint``: its class and
        its config's settings (``_function_config``), not the way a version of transformers
        serialises them, so that upgrading it keeps the reference caches and ``--resume``."""
        d = _function_config(self.hf_model.config.to_dict())
        return json.dumps(
            {"transformers": type(self.hf_model).__name__, "config": d}, sort_keys=True, default=str
        )

    def earlier_fingerprint_configs(self) -> list[str]:
        """The texts earlier releases fingerprinted for this model where they differ from
        ``fingerprint_config()`` (the rotary settings where transformers put them, an output
        switch), so that their runs resume and their reference caches stay valid under the
        transformers they ran with (``sdpo.engine.checkpoint.earlier_model_fingerprints``)."""
        from transformers import PretrainedConfig

        d = self.hf_model.config.to_dict()
        generic = set(PretrainedConfig().to_dict()) - {"model_type"}
        for key in (*_VOLATILE_KEYS, *generic, "use_cache"):
            d.pop(key, None)
        d = {key: value for key, value in d.items() if value is not None}
        text = json.dumps(
            {"transformers": type(self.hf_model).__name__, "config": d}, sort_keys=True, default=str
        )
        return [] if text == self.fingerprint_config() else [text]

    def forward(
        self,
        input_ids: Tensor,
        position_ids: Tensor,
        cu_seqlens: Tensor,
        max_seqlen: int,
        shared_prefix: object | None = None,
    ) -> Tensor:
        """Final hidden states ``(N, H)`` of the packed stream, each sequence attending only to
        itself, times the model's constant logit scale (``logit_factor``; 1 for most models),
        so that ``hidden @ lm_head_weight.T`` are the model's logits. input_ids and
        position_ids (N,) int64 (positions restart at 0 in each sequence), cu_seqlens (S+1,)
        int32 the sequences' boundaries, max_seqlen the longest one's length: the fields of
        ``sdpo.engine.packing.pack_pairs``' ``PackedBatch``."""
        if shared_prefix is not None:
            raise ValueError(
                "a wrapped Hugging Face model cannot compute a pair's prompt once for both "
                "completions (train.share_prompt / share_prompt=True): leave it off"
            )
        if input_ids.dim() != 1 or position_ids.shape != input_ids.shape:
            raise ValueError(
                "the packed protocol takes 1-D input_ids and position_ids of the same length, "
                f"got {tuple(input_ids.shape)} and {tuple(position_ids.shape)}"
            )
        n = input_ids.shape[0]
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
        starts = cu_seqlens[:-1].long()
        width = int(max_seqlen)
        router: list[list[Tensor]] | None = None
        if self.router_aux_loss_coef and (
            self._record_router_loss or (self.training and torch.is_grad_enabled())
        ):
            router = []  # each call's router logits of its real tokens, layer by layer
        # a rotary scaled by the longest position of the batch (longrope, dynamic): sequences
        # the model would rotate differently each alone never share a decoder call
        rotary = _rotary_groups(self._rotary_split, position_ids, cu_seqlens)
        if rotary is None and lengths.shape[0] * width <= _PADDING_FACTOR * n:
            # one padded batch is cheap enough
            hidden = self._padded(input_ids, position_ids, starts, lengths, width, n, router)
        else:
            # a few long sequences among many short ones: padding all to the longest would
            # cost (and hold for the backward) far more than the real tokens, so the sequences
            # run in groups of similar length, each padded to its own longest
            sizes = [int(x) for x in lengths.tolist()]
            groups = [
                [part[i] for i in group]
                for part in (rotary or [list(range(len(sizes)))])
                for group in _length_groups([sizes[i] for i in part])
            ]
            parts, where = [], []
            for group in groups:
                index = torch.tensor(group, device=input_ids.device)
                size = int(lengths[index].sum())
                part, tokens = self._padded(
                    input_ids,
                    position_ids,
                    starts[index],
                    lengths[index],
                    None,
                    size,
                    router,
                    stream=True,
                )
                parts.append(part)
                where.append(tokens)
            hidden = torch.cat(parts)[torch.argsort(torch.cat(where))]
        if router:
            # over the real tokens alone, as transformers' masked loss of one padded batch
            layers = tuple(torch.cat(per_layer) for per_layer in zip(*router, strict=True))
            self._aux_loss = self._balance(layers, **self._balance_options)
        if self.logit_factor != 1.0:
            hidden = hidden * self.logit_factor
        return hidden

    def _padded(
        self,
        input_ids: Tensor,
        position_ids: Tensor,
        starts: Tensor,
        lengths: Tensor,
        width: int | None,
        n: int,
        router: list[list[Tensor]] | None = None,
        *,
        stream: bool = False,
    ) -> Any:
        """The decoder on the sequences at ``starts`` (of ``lengths``, ``n`` tokens in all)
        right-padded to ``width`` (None: their longest): their final hidden states ``(n, H)``,
        sequence after sequence; with ``stream`` also the stream index of each row. ``router``:
        a list that gets the router logits of the real tokens, one tensor per layer."""
        device = input_ids.device
        num_seqs = lengths.shape[0]
        if width is None:
            width = int(lengths.max())
        # row and column of every token in the padded batch, without a host read
        row = torch.repeat_interleave(torch.arange(num_seqs, device=device), lengths, output_size=n)
        offsets = torch.cumsum(lengths, 0) - lengths
        col = torch.arange(n, device=device) - offsets[row]
        tokens = starts[row] + col  # where each token sits in the packed stream
        ids = input_ids.new_zeros(num_seqs, width)
        ids[row, col] = input_ids[tokens]
        positions = position_ids.new_zeros(num_seqs, width)
        positions[row, col] = position_ids[tokens]
        mask = torch.zeros(num_seqs, width, dtype=torch.long, device=device)
        mask[row, col] = 1
        extra = {"output_router_logits": True} if router is not None else {}
        out = self._decoder(
            input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False, **extra
        )
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        if router is not None:
            router.append([t.reshape(num_seqs, width, -1)[row, col] for t in out.router_logits])
        return (hidden[row, col], tokens) if stream else hidden[row, col]


def apply_router_aux_loss_coef(
    model: nn.Module, coef: float | None, *, key: str = "loss.router_aux_loss_coef"
) -> None:
    """Weight the router loss of ``model`` (a ``PackedCausalLM``, or sdpo's own decoder) by
    ``coef`` (``PackedCausalLM.set_router_aux_loss_coef``); None keeps its config's. A
    ``ValueError`` naming ``key`` for a coefficient other than 0 on a model without a router
    loss (sdpo's own decoder runs dense models only)."""
    if coef is None:
        return
    if isinstance(model, PackedCausalLM):
        model.set_router_aux_loss_coef(coef, key=key)
    elif coef:
        raise no_router_loss(
            key, coef, type(model).__name__, "sdpo's own decoder runs dense models only"
        )


@contextlib.contextmanager
def router_aux_loss_coef_for(
    model: nn.Module, coef: float | None, *, key: str = "loss.router_aux_loss_coef"
) -> Iterator[None]:
    """``apply_router_aux_loss_coef`` for the block alone: the model's own coefficient (and
    its load-balancing function) is back after it, however the block ends, and no router loss
    of the block's forwards is left in it. A model a caller lends to ``run_sdpo`` keeps its
    own setting; the refusals are raised before the block, with nothing changed."""
    if not isinstance(model, PackedCausalLM):
        apply_router_aux_loss_coef(model, coef, key=key)
        yield
        return
    saved = (model.router_aux_loss_coef, model._balance, model._balance_options)
    apply_router_aux_loss_coef(model, coef, key=key)
    try:
        yield
    finally:
        model.router_aux_loss_coef, model._balance, model._balance_options = saved
        model._aux_loss = None


def no_router_loss(key: str, coef: float, model: str, why: str) -> ValueError:
    """The error for ``key = coef`` (other than 0) on ``model``, which has no router loss
    (``why``): there is nothing to weight."""
    return ValueError(
        f"{key} = {coef:g}, but {model} is not a mixture of experts with a router "
        f"load-balancing loss ({why}), so there is no router loss to weight: leave {key} unset "
        "or set it to 0"
    )


def router_loss(
    hf_model: nn.Module, coef: float | None = None, *, key: str = "router_aux_loss_coef"
) -> tuple[float, Any, dict[str, Any]]:
    """A mixture of experts' router load-balancing loss as ``hf_model`` computes it: the
    coefficient (0.0: none), its module's ``load_balancing_loss_func`` and the arguments after
    the router logits with which its forward calls it: the experts, the experts per token
    (``top_k``) and no attention mask (the logits given are the real tokens' alone).

    On, as in TRL's DPOTrainer, for a config with an ``output_router_logits`` key and a
    ``router_aux_loss_coef`` other than 0 (and its experts on: Doge's ``is_moe``, false by
    default, turns them off). A ``ValueError``, naming the way out, for a function that takes
    other arguments (Doge's product-key router: ``num_keys``, and logits that are not one row
    per token).

    ``coef``: the coefficient instead of the config's (TRL's ``DPOConfig.router_aux_loss_coef``;
    None: the config's); 0 turns the loss off. One other than 0 on a model with no router loss
    (no ``output_router_logits`` key, experts off, or no load-balancing function sdpo finds) is
    a ``ValueError`` naming ``key``: there is nothing to weight."""
    # read from the text config, as TRL reads them: a multimodal model (Qwen3-VL-MoE's
    # ForConditionalGeneration) keeps its router settings there; a text model's is its config
    config = _text_config(getattr(hf_model, "config", None))
    given = coef is not None
    if given and (
        isinstance(coef, bool) or not isinstance(coef, (int, float)) or not math.isfinite(coef)
    ):
        raise ValueError(f"{key} must be a finite number or unset, got {coef!r}")
    coef = float(getattr(config, "router_aux_loss_coef", 0.0) or 0.0) if coef is None else coef
    # the transformers model's own module, also under a PEFT wrapper (whose attributes and
    # forward are the wrapped model's)
    base = hf_model.get_base_model() if hasattr(hf_model, "get_base_model") else hf_model
    balance = getattr(sys.modules.get(type(base).__module__), "load_balancing_loss_func", None)
    # the experts and experts per token its forward gives that function: the model's own
    # attributes, or (a multimodal model without them) its text config's
    experts, top_k = (
        getattr(hf_model, name, None) or getattr(config, name, None)
        for name in ("num_experts", "num_experts_per_tok")
    )
    moe = experts is not None and top_k is not None
    on = hasattr(config, "output_router_logits") and getattr(config, "is_moe", True) is not False
    if given and coef and not (moe and on and balance is not None):
        why = (
            "its config has no output_router_logits"
            if not hasattr(config, "output_router_logits")
            else "its experts are off (is_moe false)"
            if getattr(config, "is_moe", True) is False
            else "sdpo finds no load-balancing loss of its router"
        )
        raise no_router_loss(key, coef, type(hf_model).__name__, why)
    if not (coef and moe and on and balance is not None):
        return 0.0, None, {}
    known = {"num_experts": int(experts), "top_k": int(top_k), "attention_mask": None}
    names = list(inspect.signature(balance).parameters)[1:]
    unknown = [name for name in names if name not in known]
    if unknown or "top_k" not in names:
        fix = (
            f"set {key} to 0"
            if given
            else "set router_aux_loss_coef to 0 in the model's config.json"
            + ("" if key == "router_aux_loss_coef" else f" or {key} = 0")
        )
        raise ValueError(
            f"{type(hf_model).__name__}'s router load-balancing loss "
            f"({balance.__module__}.load_balancing_loss_func) takes arguments sdpo does not know "
            f"({', '.join(unknown or ['no top_k'])}): {fix} to train it without that loss"
        )
    return coef, balance, {name: known[name] for name in names}


def _rotary_split(config: object) -> tuple[str, int] | None:
    """``("longrope", n)`` or ``("dynamic", n)`` for a model whose rotary frequencies
    transformers picks from the longest position of the whole batch (``max(position_ids) + 1``):
    Phi-3's longrope switches to its long factors past ``original_max_position_embeddings``,
    dynamic NTK rescales past ``max_position_embeddings`` (``n``); None for any other rotary."""
    config = _text_config(config)
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    if not isinstance(params, dict):
        return None
    # one dict, or one per layer type (Gemma 3: {"full_attention": {...}, ...})
    dicts = [v for v in params.values() if isinstance(v, dict)] or [params]
    found: tuple[str, int] | None = None
    for d in dicts:
        rope_type = str(d.get("rope_type", d.get("type", "default")))
        if rope_type == "longrope":
            limit = d.get("original_max_position_embeddings") or getattr(
                config, "original_max_position_embeddings", None
            )
            kind = "longrope"
        elif "dynamic" in rope_type:
            limit, kind = getattr(config, "max_position_embeddings", None), "dynamic"
        else:
            continue
        if limit is not None and (found is None or int(limit) < found[1]):
            found = (kind, int(limit))
    return found


def _rotary_groups(
    split: tuple[str, int] | None, position_ids: Tensor, cu_seqlens: Tensor
) -> list[list[int]] | None:
    """The packed sequences in groups that transformers rotates alike (``_rotary_split``):
    those within the limit, and past it (longrope) all together or (dynamic) those of the same
    span; None when one group holds them all."""
    if split is None:
        return None
    kind, limit = split
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    row = torch.repeat_interleave(
        torch.arange(lengths.shape[0], device=lengths.device),
        lengths,
        output_size=len(position_ids),
    )
    spans = torch.zeros(lengths.shape[0], dtype=torch.long, device=lengths.device)
    spans = spans.scatter_reduce(0, row, position_ids.long() + 1, "amax").tolist()
    keys = [0 if span <= limit else (1 if kind == "longrope" else span) for span in spans]
    if len(set(keys)) <= 1:
        return None
    groups: dict[int, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    return [groups[key] for key in sorted(groups)]


# padded tokens a micro-batch may cost in one decoder call, as a multiple of its real tokens;
# past that its sequences run in groups of similar length
_PADDING_FACTOR = 2


def _length_groups(lengths: list[int]) -> list[list[int]]:
    """Indices of ``lengths`` in groups, longest first, each group padded to its own longest
    costing at most ``_PADDING_FACTOR`` times its real tokens (a lone sequence costs nothing)."""
    groups: list[list[int]] = []
    real = 0
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if groups and (len(groups[-1]) + 1) * lengths[groups[-1][0]] <= _PADDING_FACTOR * (
            real + lengths[i]
        ):
            groups[-1].append(i)
            real += lengths[i]
        else:
            groups.append([i])
            real = lengths[i]
    return groups


# names of a module's dropout rates: nn.Dropout's ``p``, and the float attributes attention
# modules keep from their config (``self.attention_dropout``, ``resid_pdrop``...)
_DROPOUT_SUFFIXES = ("dropout", "pdrop", "dropout_prob", "dropout_rate")


@contextlib.contextmanager
def dropout_off(model: nn.Module) -> Iterator[None]:
    """Every dropout of ``model`` at 0 inside the block, its rates restored after it: each
    ``nn.Dropout``'s ``p`` and each module's float rate attribute (an attention module reads
    ``self.attention_dropout`` in forward, which setting the config afterwards does not reach).
    What ``load_hf_pretrained`` does for a folder, for a model the caller built (``run_sdpo``):
    a policy with dropout leaves its reference values at once (a step's first rewards not 0)."""
    saved: list[tuple[nn.Module, str, float]] = []
    for module in model.modules():
        rates = {
            key: value for key, value in vars(module).items() if key.endswith(_DROPOUT_SUFFIXES)
        }
        if isinstance(module, nn.modules.dropout._DropoutNd):
            rates["p"] = module.p
        for key, value in rates.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
                saved.append((module, key, value))
                setattr(module, key, 0.0)
    try:
        yield
    finally:
        for module, key, value in saved:
            setattr(module, key, value)


def _check_checkpointing(model_class: type) -> None:
    if not getattr(model_class, "supports_gradient_checkpointing", False):
        raise ValueError(
            f"{model_class.__name__} does not support gradient checkpointing in transformers; "
            "set model.gradient_checkpointing = false"
        )


def check_gradient_checkpointing(path: str | os.PathLike) -> None:
    """A ``ValueError`` unless the ``AutoModelForCausalLM`` class of the folder's config supports
    gradient checkpointing (read from the config alone, before any weight is loaded)."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    config = transformers.AutoConfig.from_pretrained(str(path))
    _check_checkpointing(MODEL_FOR_CAUSAL_LM_MAPPING[type(config)])


def check_head(hf_model: nn.Module) -> None:
    """Refuse a model whose logits are more than ``hidden @ lm_head.weight.T`` times a constant
    (a bias on the output projection): the packed protocol's loss head reads the weight alone
    and would compute other log-probs than the model does, without an error. A constant scale
    (``logit_factor``) is folded into the hidden states instead, and soft-capped logits
    (``logit_softcap``) have a head of their own."""
    head = hf_model.get_output_embeddings()
    name = type(hf_model).__name__
    if getattr(head, "bias", None) is not None:
        raise ValueError(
            f"{name}'s output projection has a bias, which sdpo's loss head (hidden states times "
            "lm_head.weight) leaves out: this model cannot be trained here"
        )
    config = getattr(hf_model, "config", None)
    configs = _head_configs(config)
    logit_softcap(config)  # a cap that is not a positive number
    for key, neutral in _LOGIT_KEYS.items():
        value = next(
            (v for c in configs if (v := getattr(c, key, neutral)) not in (None, neutral)), None
        )
        if value is not None:
            raise ValueError(
                f"{name} has config key {key} = {value!r}: its logits are not hidden states "
                "times lm_head.weight, which is what sdpo's loss head computes; this model "
                "cannot be trained here"
            )


def load_hf_pretrained(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> PackedCausalLM:
    """The checkpoint folder ``path`` loaded with ``AutoModelForCausalLM`` in ``dtype`` on
    ``device`` (SDPA attention where the model supports it, else eager), in eval mode, wrapped
    in ``PackedCausalLM``. A weight the folder lacks is an error, not a random init (a tied
    output embedding is not stored and is not missing).

    Dropout is off (every ``*dropout`` / ``*pdrop`` rate of the config 0, as TRL's
    ``disable_dropout`` does): sdpo's decoder has none, and with it the policy's log-probs would
    differ from the reference values its own eval-mode pass cached, so a step's first rewards
    would not be 0. ``hf_config_dict`` writes the folder's own rates back."""
    import transformers

    folder = str(Path(path))
    config = transformers.AutoConfig.from_pretrained(folder)
    dropout = {
        key: value
        for key, value in config.to_dict().items()
        if key.endswith(("dropout", "pdrop", "dropout_prob", "dropout_rate"))
        and isinstance(value, (int, float))
        and not isinstance(value, bool)
        and value > 0
    }
    for key in dropout:
        setattr(config, key, 0.0)
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    dtype_key = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    common: dict[str, Any] = {dtype_key: dtype, "output_loading_info": True, "config": config}
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()  # a run loads a model per step
    # SDPA cannot cap attention scores: a model that caps them (Gemma 2's
    # attn_logit_softcapping) runs eager attention, which does. Recent transformers refuse SDPA
    # for Gemma 2 (the ValueError below); earlier releases (5.17) offer it and leave the cap out.
    attention = "eager" if _caps_attention_scores(config) else "sdpa"
    try:
        try:
            hf, info = transformers.AutoModelForCausalLM.from_pretrained(
                folder, attn_implementation=attention, **common
            )
        except ValueError as e:  # the architecture has no SDPA path
            message = str(e).lower()
            if attention != "sdpa" or (
                "sdpa" not in message and "scaled_dot_product_attention" not in message
            ):
                raise
            hf, info = transformers.AutoModelForCausalLM.from_pretrained(
                folder, attn_implementation="eager", **common
            )
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        shown = ", ".join(repr(n) for n in missing[:5])
        raise ValueError(
            f"weights in {folder} lack tensor(s) {shown}{' ...' if len(missing) > 5 else ''} "
            "that its config.json implies; check that config.json belongs to these weights"
        )
    for module in hf.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    hf.to(device)
    hf.eval()
    wrapped = PackedCausalLM(hf)
    wrapped.saved_config = dropout
    _check_logits(wrapped, folder)
    return wrapped


def _check_logits(model: PackedCausalLM, folder: str) -> None:
    """Refuse a model whose own logits on a few tokens are not what sdpo's heads compute of its
    final hidden states: times ``lm_head.weight``, soft-capped where ``logit_softcap`` says so
    (a transform of the logits no config key named, which ``check_head`` would miss): sdpo would
    train other log-probs than the model computes."""
    hf = model.hf_model
    vocab = model.lm_head_weight.shape[0]
    n = min(8, vocab)
    device = model.lm_head_weight.device
    # ordinary ids from the middle of the vocabulary (special and multimodal placeholder ids
    # sit at its ends)
    ids = torch.arange(n, device=device) + (vocab - n) // 2
    with torch.no_grad():
        hidden = model(ids, torch.arange(n, device=device), torch.tensor([0, n], device=device), n)
        ours = (hidden @ model.lm_head_weight.T).float()
        if model.logit_softcap is not None:
            ours = torch.tanh(ours / model.logit_softcap) * model.logit_softcap
        try:
            theirs = hf(input_ids=ids[None], use_cache=False).logits[0].float()
        except (ValueError, RuntimeError, TypeError):  # a forward that needs more than ids
            return
    scale = float(theirs.abs().max()) + 1e-6
    tol = 1e-3 if model.lm_head_weight.dtype == torch.float32 else 3e-2
    if float((ours - theirs).abs().max()) > tol * scale:
        raise ValueError(
            f"{type(hf).__name__} in {folder} computes logits other than its final hidden states "
            "times lm_head.weight (a scaled, capped or biased output), which is what sdpo's loss "
            "head computes; this model cannot be trained here"
        )


def hf_state_dict(model: PackedCausalLM) -> dict[str, Tensor]:
    """The wrapped model's weights under its own Hugging Face names, each tensor once: of tied
    parameters (an ``lm_head`` tied to the input embeddings) only the first name is kept, as
    ``save_pretrained`` stores them (safetensors refuses two names of one tensor). Where
    transformers converts a checkpoint's tensors on loading (MoE experts stored one by one and
    fused in memory), they are converted back, as ``save_pretrained`` does."""
    hf = model.hf_model
    seen: set[int] = set()
    state: dict[str, Tensor] = {}
    for name, tensor in hf.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        state[name] = tensor.detach()
    try:  # transformers >= 5: the names a checkpoint of this model has (fused MoE experts...)
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:
        return state
    return revert_weight_conversion(hf, state)


def hf_config_dict(model: PackedCausalLM, *, dtype: torch.dtype | None = None) -> dict[str, Any]:
    """The ``config.json`` of the wrapped model (its config's ``to_dict``) with the dtype its
    weights are saved in: ``dtype``, by default its input embedding's
    (``checkpoint.pretrained_config``)."""
    hf = model.hf_model
    d = hf.config.to_dict()
    d.update(model.saved_config)
    dtype = str(dtype or hf.get_input_embeddings().weight.dtype).removeprefix("torch.")
    d["dtype"] = dtype  # transformers >= 5
    d["torch_dtype"] = dtype  # transformers 4.x
    if not d.get("architectures"):
        d["architectures"] = [type(hf).__name__]
    return d


def check_lora_layout(path: str | os.PathLike, *, targets: Any) -> None:
    """Check, on the meta device (no weight read), that sdpo's LoRA (``engine/lora.py``) can
    attach to the model in folder ``path`` when transformers runs it: its decoder layers at
    ``model.layers`` and each of ``targets`` an ``nn.Linear`` under ``self_attn`` / ``mlp`` of
    every layer, as in the Llama family (so the adapter's names are PEFT's for this model).
    A ``ValueError`` names what is missing."""
    import transformers

    from sdpo.engine.lora import _PARENT, check_targets

    names = check_targets(targets)
    config = transformers.AutoConfig.from_pretrained(str(path))
    with torch.device("meta"):
        hf = transformers.AutoModelForCausalLM.from_config(config)
    kind = type(hf).__name__
    decoder = hf.get_decoder()
    layers = getattr(decoder, "layers", None)
    if getattr(hf, "model", None) is not decoder or not isinstance(layers, nn.ModuleList):
        raise ValueError(
            f"{kind} keeps its decoder layers elsewhere than model.layers, where sdpo attaches "
            "LoRA adapters; train it in full (lora.rank = 0)"
        )
    for i, layer in enumerate(layers):
        for name in names:
            module = getattr(getattr(layer, _PARENT[name], None), name, None)
            if not isinstance(module, nn.Linear):
                raise ValueError(
                    f"{kind} has no nn.Linear {_PARENT[name]}.{name} in decoder layer {i} (LoRA "
                    f"target {name!r}); choose lora.targets among the projections it has, or "
                    "train it in full (lora.rank = 0)"
                )
