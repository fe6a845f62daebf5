"""sdpo.kernels: fused log-prob ops (lm_head -> log-softmax -> label gather -> per-sequence sum).

The lowest layer of sdpo: torch and triton only, no model and no I/O. It exists because
the naive head of every DPO forward materialises N×V fp32 logits (26 GB at 16k tokens and
a 128k vocabulary) and reads them several times; these ops stream the vocabulary instead.

- ``logprobs_from_logits``: over a logits tensor you already have.
- ``sequence_logprobs``: from hidden states and the lm_head weight, chunked over tokens
  (general backward; under ``torch.no_grad`` it is the reference/scoring pass).
- ``linear_pair_loss``: a pair-separable loss whose gradients are formed while each
  chunk's logits are in hand (≈ 6·N·H·V FLOP for forward + backward).
- ``vocab_parallel_sequence_logprobs`` (module ``vocab_parallel``): ``sequence_logprobs`` with
  the lm_head weight split by vocabulary rows over a process group (tensor parallelism's "loss
  parallel"): each rank streams its own shard's logits, and per-token collectives combine the
  shards' logsumexp parts and label logits.
- ``fused_sequence_logprobs`` / ``fused_token_logprobs`` (module ``fused_head``, loaded on
  first use because it needs Triton): a no-grad reference pass that fuses the lm_head tiles
  with the online logsumexp, so no logits reach memory. Opt-in until its GPU timing is taken.
- ``softcap_sequence_logprobs``: ``sequence_logprobs`` for soft-capped logits
  (``c * tanh((hidden @ W.T) / c)``, Gemma 2), in plain PyTorch, chunked over tokens, with a
  backward that recomputes each chunk (module ``softcap_head``).
- ``resolve_impl``: the one place "auto" | "triton" | "torch" is decided
  (``triton_available``: whether Triton is installed at all).
- ``default_chunk_tokens``: the tokens per chunk the ops use unless told (about 256 MiB of
  logits).
- ``shift_labels``: labels aligned with the inputs (Hugging Face's) to the next-token labels
  the ops take; ``IGNORE_INDEX`` (-100) marks a label that is not scored.

Conventions shared by every op:

- A flat token stream: hidden (N, H), logits (N, V), labels and seq_ids (N,). A padded
  (B, T) batch is flattened with ``.reshape(-1, H)`` / ``.reshape(-1)`` and
  ``seq_ids = torch.arange(B).repeat_interleave(T)``; a packed stream is already flat.
- ``labels[i]`` is the token that row ``i`` predicts (already shifted: the token after
  position ``i``); ``-100`` marks a row that is not scored (log-prob 0, zero gradient), and
  no other ignore index is read. Hugging Face labels, aligned with ``input_ids``, become these
  with ``shift_labels``. labels and seq_ids are int64 or int32.
- The head is exactly ``hidden @ weight.T`` with the lm_head weight (V, H) as stored by
  ``nn.Linear``: no bias, no logit soft-capping (Gemma 2's ``final_logit_softcapping`` has
  its own op, ``softcap_sequence_logprobs``), no temperature. A temperature ``tau`` is
  ``hidden / tau``; a bias ``b`` (V,) folds in exactly as ``torch.cat([hidden, ones(N, 1)], 1)``
  with ``torch.cat([weight, b[:, None]], 1)``.
- Any strides: a slice of a bigger buffer, a transposed weight, ``hidden_states[-1]``
  flattened. Mixed dtypes run in the promoted dtype; the log-softmax and all outputs are
  fp32. ``torch.autocast`` does not reach inside the ops: under it an fp32 weight still
  gives an fp32 head, so pass ``weight.to(torch.bfloat16)`` (differentiable) for a bf16 one
  (``softcap_sequence_logprobs``, plain PyTorch, turns autocast off around itself to match).
  A weight shared with the input embedding gets its gradient accumulated like any other use; a
  frozen weight or hidden state (``requires_grad=False``) skips its matmul.
- First-order gradients only: a second backward through an op (``create_graph=True``)
  raises. ``torch.func.vmap`` over ``sequence_logprobs`` / ``logprobs_from_logits`` gives
  each entry's result (and ``.backward()`` of it the summed gradient); ``torch.func.grad``,
  ``jacrev`` and ``jvp`` are not supported and raise PyTorch's error for custom autograd
  ops (use ``torch.autograd``).

Token metrics (opt-in, off by default: ``rows_forward(with_stats=True)``, ``linear_pair_loss(
with_stats=True)``, ``sequence_logprobs`` / ``softcap_sequence_logprobs(return_stats=True)``;
the trainer and the eval pass turn them on). The forward already streams every row of logits
for its logsumexp, so three more reductions ride on that pass instead of a second read of the
logits: the running ``t = sum_v e^(x_v - m) (x_v - m)``, rescaled with the running max ``m``
as the sum ``s`` is, gives the entropy ``log s - t / s`` (= lse - E_p[x], without the
cancellation of two logit-sized terms; a token of logit -inf, probability 0, adds nothing to
``t``, not ``0 · -inf``); the plain ``sum_v x_v`` gives the mean logit; and the
maximum over the columns before the label tells whether the label is the top-1 as
``torch.argmax`` picks it (``x_label >= m`` and above every earlier column: a tie goes to the
first maximum, as TRL counts it). In the Triton kernel they sit behind the ``WITH_STATS``
constexpr, compiled out when off (as WPO's ``WITH_LSQ``), so the kernels, their benchmarks and
embedders that do not ask run exactly as before; the PyTorch reference computes the same from
its fp32 block, from the same ``x - m``. The ops return per-sequence sums over the scored
tokens, ``(S, 3)`` fp32, columns ``STAT_NAMES`` = (entropy, mean_logit, top1), detached and
never weighted by LD-DPO's token weights; a caller divides by its token counts. The statistics
change no other output.

The first two and ``softcap_sequence_logprobs`` are ``torch.library`` custom ops (namespace
``sdpo``, with fake implementations and autograd formulas), so ``torch.compile`` traces them
without a graph break; ``linear_pair_loss`` takes a Python callable and stays outside compiled
graphs.

On a PyTorch build without CUDA, Triton can only run under its interpreter, and Triton
fixes that mode when ``triton.language`` is first imported (which ``torch._dynamo`` does).
So on such a build this package sets ``TRITON_INTERPRET=1`` (unless already set) before
anything it imports can load Triton; ``impl="triton"`` then works on CPU tensors (slowly,
for tests). CUDA builds are left untouched.
"""

import os as _os

import torch as _torch

if __name__ != "sdpo.kernels":
    # This folder was found as a top-level package named ``kernels``: its parent (the
    # repository root) is on sys.path, in a test session or a shell started there, and a
    # library probed for an unrelated distribution of that name (transformers does, for
    # Hugging Face's ``kernels``). Importing the ops under a second name would register the
    # ``sdpo::`` custom ops again, which replaces the live registrations and leaves the
    # handles ``sdpo.kernels`` holds dangling (crashes in later op calls). So under any other
    # name this package is empty.
    __all__: list[str] = []
else:
    if _torch.version.cuda is None and _torch.version.hip is None:
        _os.environ.setdefault("TRITON_INTERPRET", "1")

    from .dispatch import resolve_impl, triton_available
    from .linear_logprobs import (
        default_chunk_tokens,
        linear_pair_loss,
        sequence_logprobs,
    )
    from .logprobs import IGNORE_INDEX, logprobs_from_logits, shift_labels
    from .softcap_head import softcap_sequence_logprobs
    from .vocab_parallel import vocab_parallel_sequence_logprobs

    _LAZY = {"fused_sequence_logprobs", "fused_token_logprobs"}

    def __getattr__(name: str):
        if name in _LAZY:
            from . import fused_head

            return getattr(fused_head, name)
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

    __all__ = [
        "IGNORE_INDEX",
        "default_chunk_tokens",
        "fused_sequence_logprobs",
        "fused_token_logprobs",
        "linear_pair_loss",
        "logprobs_from_logits",
        "resolve_impl",
        "sequence_logprobs",
        "shift_labels",
        "softcap_sequence_logprobs",
        "triton_available",
        "vocab_parallel_sequence_logprobs",
    ]
