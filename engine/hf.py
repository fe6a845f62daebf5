"""A Hugging Face causal LM behind sdpo's packed-model protocol.

``DPOTrainer``, ``score_pairs`` and the in-memory stepwise loop (``sdpo.stepwise``) call
``model(input_ids, position_ids, cu_seqlens, max_seqlen)`` on a packed batch (the sequences back
to back in one 1-D stream, ``cu_seqlens`` their boundaries) and read ``model.lm_head_weight``.
sdpo's own decoder (``engine/model.py``) attends within each ``cu_seqlens`` segment itself. A
Hugging Face model given the packed stream as one row would let every sequence attend to the
ones before it under SDPA or eager attention, which gives wrong log-probs without an error.

``PackedCausalLM`` keeps the sequences apart the portable way: it scatters the stream into a
right-padded ``(S, max_seqlen)`` batch with an attention mask and the stream's own position ids,
runs the model's decoder (``get_decoder()``: the embeddings, the layers and the final norm, no
lm_head), and gathers the real rows back into the stream's order. Any attention implementation
the model was loaded with works; the padding costs compute on batches of uneven lengths, which
sdpo's own decoder does not pay.

The wrapper holds the decoder as ``model`` and the output embedding as ``lm_head``, so its
parameter names are the Hugging Face ones (``model.layers.0.self_attn.q_proj.weight``,
``lm_head.weight``) and training it trains the wrapped model's parameters in place: the Hugging
Face object the caller holds sees every update and saves with ``save_pretrained`` as usual.
``train()`` and ``eval()`` on the wrapper set the whole Hugging Face object's mode.
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor, nn

__all__ = ["PackedCausalLM", "peft_adapter_parameters"]


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

    def __init__(self, hf_model: nn.Module) -> None:
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
        self.model = decoder
        self.lm_head = head
        # the Hugging Face object itself, kept out of the module tree (a tuple is not registered)
        # so the parameter names stay the ones above; train()/eval() set its mode too, or the
        # object the caller holds would report eval mode while its layers train (dropout on)
        self._hf_model = (hf_model,)

    def train(self, mode: bool = True) -> PackedCausalLM:
        self._hf_model[0].train(mode)
        return super().train(mode)

    @property
    def lm_head_weight(self) -> Tensor:
        return self.lm_head.weight

    def forward(
        self,
        input_ids: Tensor,
        position_ids: Tensor,
        cu_seqlens: Tensor,
        max_seqlen: int,
        shared_prefix: object | None = None,
    ) -> Tensor:
        """Final hidden states ``(N, H)`` of the packed stream, each sequence attending only to
        itself."""
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
        device = input_ids.device
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
        num_seqs = lengths.shape[0]
        # row and column of every stream token in the padded batch, without a host read
        row = torch.repeat_interleave(torch.arange(num_seqs, device=device), lengths, output_size=n)
        col = torch.arange(n, device=device) - cu_seqlens.long()[row]
        width = int(max_seqlen)
        ids = input_ids.new_zeros(num_seqs, width)
        ids[row, col] = input_ids
        positions = position_ids.new_zeros(num_seqs, width)
        positions[row, col] = position_ids
        mask = torch.zeros(num_seqs, width, dtype=torch.long, device=device)
        mask[row, col] = 1
        out = self.model(
            input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False
        )
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        return hidden[row, col]
