"""The DPO loss family: sigmoid (DPO), cDPO label smoothing, robust DPO, hinge (SLiC), IPO, the
per-pair variants of TRL's ``DPOTrainer`` (EXO, NCA, BCO, SPPO-hard, APO-zero/down, DiscoPOP,
length-normalised sigmoid), plus an optional NLL term on the chosen completion (RPO) and a
reference-free mode.

Everything here works on per-pair summed log-probabilities (what ``sequence_logprobs`` returns
for the chosen and rejected sequence of each pair) and on the reference model's values for the
same sequences (read from the on-disk reference cache). Conventions follow TRL's ``DPOTrainer``
so numbers are comparable with runs made there:

- logits ``z = (pi_c - pi_r) - (ref_c - ref_r)``; with ``reference_free`` the reference terms are 0;
- IPO uses log-probs *averaged* over completion tokens (policy and reference alike), so it needs
  the token counts;
- rewards are ``beta * (policy - reference)`` of the summed log-probs, detached, for every type
  (IPO's too, as TRL 1.16 reports them): they are metrics, not loss terms;
- RPO adds ``rpo_alpha * nll`` per pair, where ``nll = -pi_c / chosen_tokens`` is the chosen
  completion's mean token negative log-likelihood. (TRL averages the NLL over all chosen tokens
  of the batch instead; the per-pair form keeps the loss separable by pair, which the fused
  chunked kernel needs, and equals TRL's when all chosen completions have the same length.)

The TRL variants are written with the per-completion log-ratios ``lc = pi_c - ref_c`` and
``lr = pi_r - ref_r``, ``d = lc - lr`` (TRL's ``delta_score``) and ``s(x)`` the logistic sigmoid:

- ``exo_pair`` (EXO-pref, K = 2), with ``eps = label_smoothing`` > 0 and ``x = beta d``:
  ``s(x) (log s(x) - log(1 - eps)) + s(-x) (log s(-x) - log eps)``;
- ``nca_pair``: ``-log s(beta lc) - log s(-beta lc) / 2 - log s(-beta lr) / 2``;
- ``bco_pair``: ``-log s(beta lc) - log s(-beta lr)`` (TRL's current form, without the running
  mean of rewards older releases subtracted, which would tie pairs across batches);
- ``sppo_hard``: ``(lc - 1 / (2 beta))^2 + (lr + 1 / (2 beta))^2``;
- ``apo_zero``: ``(1 - s(beta lc)) + s(beta lr)``; ``apo_down``: ``s(beta lc) + (1 - s(beta d))``;
  ``1 - s(x)`` is evaluated as ``s(-x)``, which keeps its precision when it is small;
- ``discopop`` with ``tau = discopop_tau`` and ``x = beta d``:
  ``-log s(x) (1 - s(x / tau)) + exp(-x) s(x / tau)``; ``1 - s(x / tau)`` is ``s(-x / tau)`` and
  ``exp(-x) s(x / tau)`` is ``exp(log s(x / tau) - x)``, so a very negative ``x`` does not turn
  ``inf * 0`` into NaN;
- ``sigmoid_norm``: ``-log s(beta (lc / chosen_tokens - lr / rejected_tokens))`` (token counts
  clamped to at least 1, as TRL does); ``ipo`` divides the same way.

f-DPO (``f_divergence_type``, as TRL names it): DPO's reverse-KL regulariser replaced by another
f-divergence between policy and reference. With ``u = pi / ref`` (so ``log u`` is ``lc`` or ``lr``)
the implicit reward becomes ``beta f'(u)``, and every type built on the reward difference (sigmoid,
robust, hinge, ipo, exo_pair, discopop, sigmoid_norm) reads ``f'(u_c) - f'(u_r)`` where it read
``lc - lr`` (``ipo`` and ``sigmoid_norm``, as TRL: ``f'(u_c) / chosen_tokens - f'(u_r) /
rejected_tokens``, with TRL's constants in ``f'``, which no longer cancel there):

- ``reverse_kl`` (default, plain DPO): ``f'(u) = log u + 1``, giving ``lc - lr``;
- ``forward_kl``: ``f'(u) = -1 / u``, giving ``exp(-lr) - exp(-lc)``;
- ``js_divergence``: ``f'(u) = log(2u / (1 + u))``, giving ``(lc - lr) - (softplus(lc) -
  softplus(lr))``, evaluated as ``logsigmoid(lc) - logsigmoid(lr)``;
- ``alpha_divergence`` with ``a = f_alpha_divergence_coef``: ``f'(u) = (1 - u^-a) / a``, giving
  ``(exp(-a lr) - exp(-a lc)) / a`` (``forward_kl`` is ``a = 1``). This is the f-DPO paper's
  alpha and TRL's description of the option; TRL 1.16's code computes ``(u^(a-1) - 1) / (a-1)``,
  that is ``1 - a`` in place of ``a``, which agrees at its default 0.5.

Against TRL 1.16 itself (``tests/test_trl_parity.py``) every type gives the same losses, rewards
and updates. Besides that alpha and RPO (below), one difference is deliberate: TRL 1.16's
sigmoid loss ignores ``label_smoothing``, which is cDPO here.

The exponents are capped at half the compute dtype's exponent range (float32: e^36.4; TRL caps
at the full range, where IPO's square and the division by ``a`` can still overflow), so a very
negative log-ratio gives a finite loss with a zero gradient instead of inf or NaN.
IPO and sigmoid_norm apply it to their token-averaged log-ratios. The rewards stay
``beta * lc`` and ``beta * lr``.

``sft`` (TRL's: the NLL of the chosen completions averaged over every chosen token of the
batch, e.g. RPO as ``["sigmoid", "sft"]`` with ``loss_weights = [1, alpha]``, MPO as
``["sigmoid", "bco_pair", "sft"]``) is a sum over pairs once the step's token count is known:
each pair's term is ``-pi_c * sft_scale`` with ``sft_scale`` = (pairs of the optimizer step) /
(chosen tokens of the step), which the trainer passes, so the step's mean is TRL's batch mean.
It is refused with WPO, whose weight TRL applies to the batch mean as a whole (the batch's mean
pair weight), which would tie every pair's gradient to the other pairs' weights. ``rpo_alpha`` is
the per-pair form: each pair's mean token NLL.

Left out because they are not separable by pair (one pair's loss would depend on other pairs,
which the fused chunked kernel cannot allow): ``aot`` and ``aot_unpaired`` (older releases:
``aot_pair``) sort the log-ratios across the batch before pairing them up.

Several loss types at once (TRL's ``loss_type`` list with ``loss_weights``, e.g. MPO's
``["sigmoid", "bco_pair"]``): the per-pair loss is the weighted sum of the types' per-pair
losses (weights default to 1), so it stays separable by pair; the reported rewards are the same
for every type, and the RPO term, if any, is added once.

LD-DPO (``ld_alpha``, TRL's option of that name) changes the summed log-probs themselves,
before they reach this module: with ``public = min(chosen, rejected completion tokens)`` of a
pair, a completion's log-prob is (sum of its first ``public`` token log-probs) + ``ld_alpha`` *
(sum of the rest). The trainer and the scoring pass apply it per token in the fused head
(``engine/packing.py``: ``length_desensitized_weights``), to the policy and the reference alike,
as TRL 1.16 does (the reference cache holds LD sums, so the first rewards of a step are 0). The
token counts given here stay the raw completion lengths: IPO and sigmoid_norm average the LD sums
over them, as TRL does. The chosen NLL terms (``sft`` and RPO's) read the raw summed log-prob
of the chosen completion, as TRL's ``sft`` reads the raw token log-probs: the log-prob head
forms both sums in the same pass (``linear_pair_loss(with_raw=True)``) and passes the raw one
as ``chosen_raw`` (see :func:`dpo_loss`); ``config.needs_raw_logps`` says when.

WPO (``use_weighting``, TRL's option of that name; Zhou et al. 2024, Eq. 2): each pair's loss
is multiplied by ``w_c * w_r``, where a completion's weight ``w = exp(aligned / max(tokens, 1))``
is the exponentiated mean over its completion tokens of ``logp_t - log sum_v p_v^2``, the
policy's log-prob of the label against the log of the sum of its squared next-token
probabilities at that position. ``aligned`` is that per-completion sum, formed by the log-prob
head in the policy's training forward (``sequence_logprobs(return_aligned=True)``,
``linear_pair_loss(with_aligned=True)``) and given to :func:`dpo_loss` as ``chosen_aligned`` /
``rejected_aligned``; the weights are constants of the loss (no gradient flows through them), so
each pair's gradient is its unweighted gradient times its weight. As in TRL: the mean runs over
the raw per-token log-probs (not LD-DPO's weighted sums) and the raw completion length clamped
to at least 1; the weight multiplies every loss type's term, so the weighted sum of several
types is weighted as a whole. TRL's chosen-NLL term is its ``sft`` loss type, which is
weighted like every type; here the RPO term (``rpo_alpha``, this module's form of it) is part
of the pair's loss and weighted too. The rewards, and the reference values, are unchanged.

All arithmetic runs in float32 at least (bf16/fp16 inputs are upcast; float64 stays float64, so
gradients can be checked with ``torch.autograd.gradcheck``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

# the TRL variants, written with the per-completion log-ratios lc and lr
_LOGRATIO_TYPES = (
    "exo_pair",
    "nca_pair",
    "bco_pair",
    "sppo_hard",
    "apo_zero",
    "apo_down",
    "discopop",
    "sigmoid_norm",
)
LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust", *_LOGRATIO_TYPES, "sft")
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
# loss types built on the reward difference, the ones an f-divergence generalises
_F_DIVERGENCE_TYPES = ("sigmoid", "robust", "hinge", "ipo", "exo_pair", "discopop", "sigmoid_norm")
# loss types an f-divergence leaves as they are (TRL accepts them with one)
_F_DIVERGENCE_NEUTRAL = ("sft",)
# loss types that average over a completion's tokens, so need its token count
_TOKEN_MEAN_TYPES = ("ipo", "sigmoid_norm", "sft")
# loss types whose loss reads label_smoothing (as cDPO's / robust DPO's flip rate, as EXO's eps)
_SMOOTHED_TYPES = ("sigmoid", "robust", "exo_pair")


@dataclass(kw_only=True)
class LossConfig:
    """Which member of the DPO family to train with.

    ``loss_type``: one type, or a list of types combined with ``loss_weights`` (see the
    module docstring). A type is ``"sigmoid"`` (DPO; with ``label_smoothing`` > 0 it is conservative DPO,
    cDPO), ``"robust"`` (robust DPO: an unbiased estimate under label noise of rate
    ``label_smoothing``; with ``label_smoothing = 0`` it is exactly the sigmoid loss, which is
    allowed but makes the choice pointless), ``"hinge"`` (SLiC: ``relu(1 - beta * z)``), ``"ipo"``
    (``(z - 1 / (2 beta))^2`` on token-averaged log-probs; ``beta`` is IPO's tau), or one of TRL's
    per-pair variants ``"exo_pair"``, ``"nca_pair"``, ``"bco_pair"``, ``"sppo_hard"``,
    ``"apo_zero"``, ``"apo_down"``, ``"discopop"``, ``"sigmoid_norm"`` (formulas in the module
    docstring).
    ``beta``: inverse temperature of the implicit reward (Zephyr/sDPO: 0.1).
    ``label_smoothing``: assumed label-flip rate in [0, 0.5), sigmoid and robust only; for
    ``exo_pair`` it is EXO's epsilon and must be > 0 (the EXO paper suggests 1e-3).
    ``discopop_tau``: DiscoPOP's temperature (> 0; TRL's and the paper's default 0.05), read by
    ``discopop`` only.
    ``loss_weights``: one weight (>= 0) per loss type; None: all 1.
    ``rpo_alpha``: weight of the chosen-NLL term (RPO); None turns it off.
    ``reference_free``: drop the reference model (its log-probs count as 0).
    ``f_divergence_type``: the regulariser between policy and reference, one of
    :data:`F_DIVERGENCES` (module docstring); other than ``"reverse_kl"`` only for the loss
    types built on the reward difference.
    ``f_alpha_divergence_coef``: the ``alpha`` (> 0) of ``"alpha_divergence"`` (TRL's default
    0.5), read by that divergence only.
    ``ld_alpha``: LD-DPO's length desensitization, in [0, 1]; None (default) is off and 1 is
    plain DPO. It is applied where log-probs are summed, not here: the trainer
    (``DPOTrainer(ld_alpha=...)``) and the scoring pass (``score_pairs(ld_alpha=...)``) weigh
    each completion's tokens past its pair's shorter length by it (module docstring).
    ``use_weighting``: WPO's weighting (TRL's option of that name): each pair's loss times
    the product of its two completions' length-normalised probabilities under the policy,
    sharpened by the policy's own next-token distributions (module docstring).
    ``router_aux_loss_coef``: the weight of a mixture of experts' router load-balancing loss
    (TRL's ``DPOConfig.router_aux_loss_coef``); None (default) is the model config's own
    ``router_aux_loss_coef``, 0 turns the loss off. The trainer applies it to the model
    (``sdpo.engine.hf``), not this loss; one other than 0 on a model without a router loss is
    an error.
    """

    loss_type: str | list[str] = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    rpo_alpha: float | None = None
    reference_free: bool = False
    discopop_tau: float = 0.05
    loss_weights: list[float] | None = None
    f_divergence_type: str = "reverse_kl"
    f_alpha_divergence_coef: float = 0.5
    ld_alpha: float | None = None
    use_weighting: bool = False
    router_aux_loss_coef: float | None = None

    def __post_init__(self) -> None:
        types = self.loss_types
        if not types:
            raise ValueError("loss_type is an empty list: give at least one loss type")
        for kind in types:
            if kind not in LOSS_TYPES:
                raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {kind!r}")
        if len(set(types)) != len(types):
            raise ValueError(f"loss_type {list(types)} names a type twice")
        if self.loss_weights is not None:
            self.loss_weights = list(self.loss_weights)
            if len(self.loss_weights) != len(types):
                raise ValueError(
                    f"loss_weights has {len(self.loss_weights)} values for {len(types)} loss "
                    f"type(s) {list(types)}: give one weight per type"
                )
            if not all(_is_real(w) and w >= 0 for w in self.loss_weights) or not any(
                w > 0 for w in self.loss_weights
            ):
                raise ValueError(
                    f"loss_weights must be finite numbers >= 0, not all 0, got {self.loss_weights}"
                )
        if not _is_real(self.beta) or not self.beta > 0:
            raise ValueError(f"beta must be a finite number > 0, got {self.beta!r}")
        if not _is_real(self.label_smoothing) or not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(
                f"label_smoothing must be in [0, 0.5), got {self.label_smoothing!r} "
                "(it is the assumed rate of flipped labels; 0.5 would mean pure noise)"
            )
        if self.label_smoothing > 0 and not set(types) & set(_SMOOTHED_TYPES):
            raise ValueError(
                f"label_smoothing = {self.label_smoothing} has no effect on loss_type "
                f"{self.loss_type!r}: use loss_type 'sigmoid' (cDPO), 'robust' or 'exo_pair', "
                "or set it to 0"
            )
        if "exo_pair" in types and self.label_smoothing == 0:
            raise ValueError(
                "loss_type 'exo_pair' needs label_smoothing > 0: it is EXO's epsilon, the weight "
                "of the rejected completion in the target distribution (the EXO paper suggests 1e-3)"
            )
        if not _is_real(self.discopop_tau) or not self.discopop_tau > 0:
            raise ValueError(f"discopop_tau must be a finite number > 0, got {self.discopop_tau!r}")
        if self.discopop_tau != 0.05 and "discopop" not in types:
            raise ValueError(
                f"discopop_tau = {self.discopop_tau} has no effect on loss_type "
                f"{self.loss_type!r}: use loss_type 'discopop' or leave it at 0.05"
            )
        if self.rpo_alpha is not None and (not _is_real(self.rpo_alpha) or self.rpo_alpha < 0):
            raise ValueError(
                f"rpo_alpha must be None or a finite number >= 0, got {self.rpo_alpha!r}"
            )
        coef = self.router_aux_loss_coef
        if coef is not None and (not _is_real(coef) or coef < 0):
            raise ValueError(
                f"router_aux_loss_coef must be unset (the model config's own) or a finite "
                f"number >= 0, got {coef!r}"
            )
        if not isinstance(self.reference_free, bool):
            raise ValueError(f"reference_free must be true or false, got {self.reference_free!r}")
        if self.f_divergence_type not in F_DIVERGENCES:
            raise ValueError(
                f"f_divergence_type must be one of {', '.join(F_DIVERGENCES)}, "
                f"got {self.f_divergence_type!r}"
            )
        if self.f_divergence_type != "reverse_kl":
            other = [
                kind for kind in types if kind not in _F_DIVERGENCE_TYPES + _F_DIVERGENCE_NEUTRAL
            ]
            if other:
                raise ValueError(
                    f"f_divergence_type = {self.f_divergence_type!r} does not apply to loss_type "
                    f"{', '.join(map(repr, other))}: an f-divergence generalises the loss types "
                    f"built on the reward difference ({', '.join(_F_DIVERGENCE_TYPES)}); use one "
                    "of them or f_divergence_type = 'reverse_kl'"
                )
        coef = self.f_alpha_divergence_coef
        if not _is_real(coef) or not coef > 0:
            raise ValueError(f"f_alpha_divergence_coef must be a finite number > 0, got {coef!r}")
        if coef != 0.5 and self.f_divergence_type != "alpha_divergence":
            raise ValueError(
                f"f_alpha_divergence_coef = {coef} has no effect with f_divergence_type "
                f"{self.f_divergence_type!r}: use f_divergence_type 'alpha_divergence' or leave "
                "it at 0.5"
            )
        if self.ld_alpha is not None and not (
            _is_real(self.ld_alpha) and 0.0 <= self.ld_alpha <= 1.0
        ):
            raise ValueError(
                f"ld_alpha must be unset (off) or a number in [0, 1], got {self.ld_alpha!r}: it "
                "weighs the tokens past the shorter completion's length (LD-DPO; 1 is plain DPO)"
            )

        if not isinstance(self.use_weighting, bool):
            raise ValueError(f"use_weighting must be true or false, got {self.use_weighting!r}")
        if "sft" in types and self.use_weighting:
            raise ValueError(
                "loss_type 'sft' does not go with use_weighting: TRL weights the batch's mean "
                "NLL by the batch's mean pair weight, which ties every pair's gradient to the "
                "others' weights (the fused head forms each pair's gradient alone); use rpo_alpha "
                "(a per-pair NLL, weighted per pair) or drop one"
            )

    @property
    def loss_types(self) -> tuple[str, ...]:
        """The loss types, in order (one for a plain string)."""
        return (self.loss_type,) if isinstance(self.loss_type, str) else tuple(self.loss_type)

    @property
    def weights(self) -> tuple[float, ...]:
        """One weight per loss type (1 each when ``loss_weights`` is None)."""
        if self.loss_weights is None:
            return (1.0,) * len(self.loss_types)
        return tuple(float(w) for w in self.loss_weights)

    @property
    def needs_raw_logps(self) -> bool:
        """LD-DPO with a chosen NLL term (``sft`` or ``rpo_alpha``): that term reads the raw
        summed log-prob of the chosen completion, the other terms the LD-weighted one."""
        return self.ld_alpha not in (None, 1) and (
            "sft" in self.loss_types or self.rpo_alpha is not None
        )

    @property
    def needs_token_counts(self) -> bool:
        """IPO and sigmoid_norm average log-probs over completion tokens, RPO's NLL, sft's NLL
        and WPO's weights are per-token means."""
        return (
            bool(set(_TOKEN_MEAN_TYPES) & set(self.loss_types))
            or self.rpo_alpha is not None
            or self.use_weighting
        )


def _is_real(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass(kw_only=True)
class DPOLossOutput:
    losses: Tensor  # (P,) per-pair loss (RPO term included), differentiable
    chosen_rewards: Tensor  # (P,) beta * (policy - reference) of the chosen completion, detached
    rejected_rewards: Tensor  # (P,) same for the rejected completion, detached
    nll: Tensor | None = None  # (P,) mean token NLL of the chosen completion when rpo_alpha is set
    pair_weights: Tensor | None = None  # (P,) WPO's w_c * w_r (detached) when use_weighting is set


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def _pair_terms(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor | None,
    ref_rejected: Tensor | None,
    *,
    config: LossConfig,
    chosen_tokens: Tensor | None,
    rejected_tokens: Tensor | None,
    chosen_aligned: Tensor | None = None,
    rejected_aligned: Tensor | None = None,
    chosen_raw: Tensor | None = None,
    sft_scale: float | Tensor | None = None,
) -> DPOLossOutput:
    """Per-pair losses and rewards; inputs already checked to be (k,) tensors."""
    dtype = _compute_dtype(policy_chosen)
    pc = policy_chosen.to(dtype)
    pr = policy_rejected.to(dtype)
    # the chosen NLL terms' log-prob: the raw sum under LD-DPO, else the (only) sum
    nll_c = pc if chosen_raw is None else chosen_raw.to(dtype)
    if config.reference_free:
        rc = rr = None
    else:
        rc = ref_chosen.to(dtype)
        rr = ref_rejected.to(dtype)
    tokens = None
    if config.needs_token_counts:
        tokens = (chosen_tokens.to(dtype), rejected_tokens.to(dtype))
    if "sft" in config.loss_types and sft_scale is None:  # the mean over these pairs' tokens
        sft_scale = tokens[0].shape[0] / tokens[0].sum().clamp(min=1.0)
    # rewards: beta times the summed log-ratios, the same for every type (IPO's too, as TRL)
    lc = pc if rc is None else pc - rc
    lr = pr if rr is None else pr - rr
    rewards = (config.beta * lc.detach(), config.beta * lr.detach())
    losses = None
    for kind, weight in zip(config.loss_types, config.weights):
        if kind == "sft":  # its per-pair share of the mean token NLL of the chosen completions
            part = -nll_c * sft_scale
        else:
            part = _type_losses(kind, config, pc, pr, rc, rr, tokens)
        if weight != 1.0:
            part = part * weight
        losses = part if losses is None else losses + part
    nll = None
    if config.rpo_alpha is not None:
        nll = -nll_c / tokens[0].clamp(min=1.0)  # a completion of no tokens: 0, not NaN
        losses = losses + config.rpo_alpha * nll
    pair_weights = None
    if config.use_weighting:
        pair_weights = _wpo_weights(chosen_aligned, tokens[0]) * _wpo_weights(
            rejected_aligned, tokens[1]
        )
        losses = losses * pair_weights
    return DPOLossOutput(
        losses=losses,
        chosen_rewards=rewards[0],
        rejected_rewards=rewards[1],
        nll=nll,
        pair_weights=pair_weights,
    )


def _wpo_weights(aligned: Tensor, tokens: Tensor) -> Tensor:
    """WPO's completion weights ``exp(aligned / max(tokens, 1))`` (k,), detached."""
    aligned = aligned.detach().to(tokens.dtype)
    return torch.exp(aligned / tokens.clamp(min=1.0))


def _type_losses(
    kind: str,
    config: LossConfig,
    pc: Tensor,
    pr: Tensor,
    rc: Tensor | None,
    rr: Tensor | None,
    tokens: tuple[Tensor, Tensor] | None,
) -> Tensor:
    """One loss type's per-pair losses (k,)."""
    beta, eps = config.beta, config.label_smoothing
    lc = pc if rc is None else pc - rc
    lr = pr if rr is None else pr - rr
    if kind in ("ipo", "sigmoid_norm"):
        # as TRL: each completion's score (its log-ratio, or f' of it) divided by its token
        # count, at least 1
        ct, rt = (t.clamp(min=1.0) for t in tokens)
        z = _divergence_score(config, lc) / ct - _divergence_score(config, lr) / rt
        if kind == "sigmoid_norm":
            return -F.logsigmoid(beta * z)
        return (z - 1 / (2 * beta)) ** 2
    if kind in _LOGRATIO_TYPES:
        return _logratio_losses(kind, config, lc, lr)
    if config.f_divergence_type == "reverse_kl":
        z = pc - pr  # (k,) policy log-ratio
        if rc is not None:
            z = z - (rc - rr)
    else:
        z = _divergence_logits(config, lc, lr)
    if kind == "hinge":
        return torch.relu(1 - beta * z)
    losses = -F.logsigmoid(beta * z)
    if eps == 0:
        # the flipped-label term has weight 0 and is left out: at z = +inf (a rejected
        # completion of log-prob -inf) it would be 0 * -inf = NaN instead of the loss's 0
        return losses
    if kind == "sigmoid":
        return losses * (1 - eps) - F.logsigmoid(-beta * z) * eps
    return (losses * (1 - eps) + F.logsigmoid(-beta * z) * eps) / (1 - 2 * eps)  # robust


def _capped_exp(x: Tensor) -> Tensor:
    """exp(x) with x capped at half the exponent range of x's dtype, less 8 (float32: 36.4,
    float64: 346.9): finite, with a zero gradient past the cap, and room left for what follows
    (the difference, the division by alpha, beta, IPO's square) to stay finite too."""
    return torch.exp(x.clamp(max=0.5 * math.log(torch.finfo(x.dtype).max) - 8.0))


def _divergence_score(config: LossConfig, logratio: Tensor) -> Tensor:
    """One completion's score, ``f'(u)`` of ``config.f_divergence_type`` with the constant TRL
    gives it (it does not cancel where each side is divided by its own token count): the
    log-ratio itself for ``reverse_kl``, ``log 2 + logsigmoid(l)`` for ``js_divergence``,
    ``(1 - u^-a) / a`` for the alpha family (``forward_kl``: ``1 - 1/u``)."""
    kind = config.f_divergence_type
    if kind == "reverse_kl":
        return logratio
    if kind == "js_divergence":
        return math.log(2.0) + F.logsigmoid(logratio)
    a = 1.0 if kind == "forward_kl" else config.f_alpha_divergence_coef
    return (1.0 - _capped_exp(-a * logratio)) / a


def _divergence_logits(config: LossConfig, lc: Tensor, lr: Tensor) -> Tensor:
    """``f'(u_c) - f'(u_r)`` of ``config.f_divergence_type`` from the log-ratios (k,) (module
    docstring); ``lc - lr`` for the reverse KL of plain DPO."""
    kind = config.f_divergence_type
    if kind == "reverse_kl":
        return lc - lr
    if kind == "js_divergence":  # (lc - softplus(lc)) - (lr - softplus(lr))
        return F.logsigmoid(lc) - F.logsigmoid(lr)
    a = 1.0 if kind == "forward_kl" else config.f_alpha_divergence_coef
    return (_capped_exp(-a * lr) - _capped_exp(-a * lc)) / a


def _logratio_losses(kind: str, config: LossConfig, lc: Tensor, lr: Tensor) -> Tensor:
    """Per-pair losses of TRL's variants (all but sigmoid_norm) from the log-ratios (k,)."""
    beta = config.beta
    if kind == "exo_pair":
        x = beta * _divergence_logits(config, lc, lr)
        eps = config.label_smoothing
        return torch.sigmoid(x) * (F.logsigmoid(x) - math.log1p(-eps)) + torch.sigmoid(-x) * (
            F.logsigmoid(-x) - math.log(eps)
        )
    if kind == "nca_pair":
        c, r = beta * lc, beta * lr
        return -F.logsigmoid(c) - 0.5 * F.logsigmoid(-c) - 0.5 * F.logsigmoid(-r)
    if kind == "bco_pair":
        return -F.logsigmoid(beta * lc) - F.logsigmoid(-beta * lr)
    if kind == "sppo_hard":
        return (lc - 0.5 / beta) ** 2 + (lr + 0.5 / beta) ** 2
    if kind == "apo_zero":
        return torch.sigmoid(-beta * lc) + torch.sigmoid(beta * lr)
    if kind == "apo_down":
        return torch.sigmoid(beta * lc) + torch.sigmoid(-beta * (lc - lr))
    if kind == "discopop":
        x = beta * _divergence_logits(config, lc, lr)
        tau = config.discopop_tau
        return -F.logsigmoid(x) * torch.sigmoid(-x / tau) + torch.exp(F.logsigmoid(x / tau) - x)
    raise AssertionError(f"unhandled loss_type {kind!r}")


def _check_tensors(named: dict[str, object]) -> None:
    """Each per-pair input is a tensor or None: a list or a NumPy array (a data set's
    column) would fail deep inside the loss with no name."""
    for name, value in named.items():
        if value is not None and not isinstance(value, Tensor):
            raise TypeError(
                f"{name} must be a torch.Tensor (one value per pair), got "
                f"{type(value).__module__}.{type(value).__qualname__}: convert it with "
                "torch.as_tensor"
            )


def _check_inputs(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor | None,
    ref_rejected: Tensor | None,
    *,
    config: LossConfig,
    chosen_tokens: Tensor | None,
    rejected_tokens: Tensor | None,
    chosen_aligned: Tensor | None = None,
    rejected_aligned: Tensor | None = None,
    chosen_raw: Tensor | None = None,
) -> None:
    _check_tensors({"policy_chosen": policy_chosen, "policy_rejected": policy_rejected})
    if policy_chosen.dim() != 1 or policy_chosen.shape != policy_rejected.shape:
        raise ValueError(
            "policy_chosen and policy_rejected must be 1-D tensors of the same length (one "
            f"value per pair), got shapes {tuple(policy_chosen.shape)} and "
            f"{tuple(policy_rejected.shape)}"
        )
    if policy_rejected.device != policy_chosen.device:
        raise ValueError(
            f"policy_rejected is on {policy_rejected.device} but policy_chosen on "
            f"{policy_chosen.device}: give both log-probs of the policy on one device"
        )
    shape = tuple(policy_chosen.shape)
    named = {"ref_chosen": ref_chosen, "ref_rejected": ref_rejected}
    if config.needs_token_counts:
        named |= {"chosen_tokens": chosen_tokens, "rejected_tokens": rejected_tokens}
    if config.use_weighting:
        named |= {"chosen_aligned": chosen_aligned, "rejected_aligned": rejected_aligned}
    if config.needs_raw_logps:
        named |= {"chosen_raw": chosen_raw}
    _check_tensors(named)
    for name, t in named.items():
        if t is None:
            if name.startswith("ref_") and config.reference_free:
                continue
            if name.startswith("ref_"):
                why = (
                    "the loss compares against the reference model (set reference_free to drop it)"
                )
            elif name == "chosen_raw":
                why = (
                    "with ld_alpha the chosen NLL terms (sft, rpo_alpha) read the raw summed "
                    "log-prob of the chosen completion (linear_pair_loss(with_raw=True), or "
                    "sequence_logprobs without token_weights)"
                )
            elif name.endswith("_aligned"):
                why = (
                    "use_weighting (WPO) needs each completion's sum of token_logp - log sum "
                    "p^2 from the policy's forward (sequence_logprobs(return_aligned=True) or "
                    "linear_pair_loss(with_aligned=True))"
                )
            else:
                what = [f"loss type {t!r}" for t in config.loss_types if t in _TOKEN_MEAN_TYPES]
                what += [f"rpo_alpha {config.rpo_alpha!r}"] * (config.rpo_alpha is not None)
                what += ["use_weighting (WPO)"] * config.use_weighting
                why = (
                    f"{' and '.join(what)} {'need' if len(what) > 1 else 'needs'} each pair's "
                    "completion token counts, (P,) ints: the scored labels (!= -100) of its "
                    "chosen and rejected sequence"
                )
            raise ValueError(f"{name} is missing: {why}")
        if tuple(t.shape) != shape:
            raise ValueError(
                f"{name} has shape {tuple(t.shape)} but the policy log-probs have {shape}: "
                "every input holds one value per pair"
            )
        if t.device != policy_chosen.device:
            # refused rather than moved: a copy from host memory waits for the work queued on
            # the GPU, and one per micro-batch (or per chunk of the fused head) would stall
            # every step. Any dtype is taken: each input is cast to the compute dtype.
            hint = " (a RefLogprobCache reads its values on the CPU)" * name.startswith("ref_")
            raise ValueError(
                f"{name} is on {t.device} but the policy log-probs are on "
                f"{policy_chosen.device}: move it there once before the loss, "
                f"{name}.to(policy_chosen.device){hint}; the loss does not copy between devices"
            )


def dpo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor | None,
    ref_rejected: Tensor | None,
    *,
    config: LossConfig,
    chosen_tokens: Tensor | None = None,
    rejected_tokens: Tensor | None = None,
    chosen_aligned: Tensor | None = None,
    rejected_aligned: Tensor | None = None,
    chosen_raw: Tensor | None = None,
    sft_scale: float | Tensor | None = None,
) -> DPOLossOutput:
    """Per-pair DPO-family losses from summed completion log-probs.

    policy_chosen, policy_rejected: (P,) summed log pi_theta(y|x), differentiable.
    ref_chosen, ref_rejected: (P,) summed log pi_ref(y|x) (may be None with reference_free).
    chosen_tokens, rejected_tokens: (P,) completion token counts; needed by IPO, RPO and WPO.
    chosen_aligned, rejected_aligned: (P,) WPO's per-completion sums of ``token_logp - log
    sum_v p_v^2`` under the policy (needed with ``use_weighting``, ignored without; treated as
    constants). The training loss of a batch is usually ``out.losses.mean()``.
    chosen_raw: (P,) the chosen completion's unweighted summed log-prob when ``policy_chosen`` is
    LD-DPO's weighted sum (needed when ``config.needs_raw_logps``; differentiable): the chosen
    NLL terms (``sft``, ``rpo_alpha``) read it, as TRL's ``sft`` reads raw token log-probs.
    None: they read ``policy_chosen``.
    sft_scale (loss type ``"sft"``): the pair's sft term is ``-policy_chosen * sft_scale`` (or
    ``chosen_raw``), so that the mean over the pairs of an optimizer step is the step's mean
    token NLL of the chosen completions when ``sft_scale`` = (pairs of the step) / (chosen
    completion tokens of the step), as TRL's ``sft`` type computes it over a batch. None: these
    pairs are the step.
    """
    inputs = {
        "config": config,
        "chosen_tokens": chosen_tokens,
        "rejected_tokens": rejected_tokens,
        "chosen_aligned": chosen_aligned,
        "rejected_aligned": rejected_aligned,
        "chosen_raw": chosen_raw,
    }
    _check_inputs(policy_chosen, policy_rejected, ref_chosen, ref_rejected, **inputs)
    return _pair_terms(
        policy_chosen, policy_rejected, ref_chosen, ref_rejected, sft_scale=sft_scale, **inputs
    )


def make_pair_loss(
    config: LossConfig,
    *,
    ref_chosen: Tensor | None,
    ref_rejected: Tensor | None,
    chosen_tokens: Tensor | None = None,
    rejected_tokens: Tensor | None = None,
    normalizer: float | Tensor = 1.0,
    sft_scale: float | Tensor | None = None,
) -> Callable[[Tensor, Tensor, slice], Tensor]:
    """The batch's DPO loss as a function of one slice of pairs, for the separable fused kernel.

    Returns ``pair_loss(chosen_logps (k,), rejected_logps (k,), pairs: slice) -> scalar`` equal to
    ``dpo_loss(...).losses[pairs].sum() / normalizer``, with the reference values and token
    counts (all (P,) for the whole batch) sliced to match. With ``config.use_weighting`` it
    takes the chunk's WPO sums as the keywords ``chosen_aligned`` / ``rejected_aligned`` (k,),
    which ``linear_pair_loss(with_aligned=True)`` passes, and with ``config.needs_raw_logps``
    the raw sums ``chosen_raw`` / ``rejected_raw``, which ``linear_pair_loss(with_raw=True)``
    passes. Summed over slices that cover the
    batch it gives ``losses.sum() / normalizer``: pass the number of pairs of the optimizer step
    as ``normalizer`` to get the mean over a gradient-accumulated step. ``sft_scale``: as in
    :func:`dpo_loss`; None: (the batch's pairs) / (their chosen completion tokens).
    ``sdpo.kernels.linear_pair_loss(..., pair_loss=make_pair_loss(...))`` consumes it.
    """
    per_pair = {
        "ref_chosen": ref_chosen,
        "ref_rejected": ref_rejected,
        "chosen_tokens": chosen_tokens,
        "rejected_tokens": rejected_tokens,
    }
    _check_tensors(per_pair)
    if sft_scale is None and "sft" in config.loss_types and chosen_tokens is not None:
        sft_scale = chosen_tokens.shape[0] / chosen_tokens.to(torch.float64).sum().clamp(min=1.0)
    if not isinstance(normalizer, Tensor) and not float(normalizer) > 0:  # NumPy's numbers too
        raise ValueError(f"normalizer must be > 0, got {normalizer!r}")
    lengths = {name: t.shape[0] for name, t in per_pair.items() if t is not None}
    if len(set(lengths.values())) > 1:
        raise ValueError(
            f"the per-pair inputs must have one length, the batch's number of pairs; got {lengths}"
        )
    num_pairs = max(lengths.values(), default=None)

    def pair_loss(
        chosen_logps: Tensor,
        rejected_logps: Tensor,
        pairs: slice,
        *,
        chosen_aligned: Tensor | None = None,
        rejected_aligned: Tensor | None = None,
        chosen_raw: Tensor | None = None,
        rejected_raw: Tensor | None = None,  # no term reads it
    ) -> Tensor:
        if pairs.step not in (None, 1):
            raise ValueError(f"pair slices must be contiguous, got step {pairs.step}")
        if num_pairs is not None:
            start, stop, _ = pairs.indices(num_pairs)
            if stop - start != chosen_logps.shape[0]:
                raise ValueError(
                    f"slice {pairs.start}:{pairs.stop} covers {max(stop - start, 0)} of the "
                    f"batch's {num_pairs} pairs but {chosen_logps.shape[0]} log-probs were given"
                )

        def cut(t: Tensor | None) -> Tensor | None:
            return None if t is None else t[pairs]

        out = dpo_loss(
            chosen_logps,
            rejected_logps,
            cut(ref_chosen),
            cut(ref_rejected),
            config=config,
            chosen_tokens=cut(chosen_tokens),
            rejected_tokens=cut(rejected_tokens),
            chosen_aligned=chosen_aligned,
            rejected_aligned=rejected_aligned,
            chosen_raw=chosen_raw,
            sft_scale=sft_scale,
        )
        return out.losses.sum() / normalizer

    # read by linear_pair_loss, which refuses a batch of another size (values of other pairs)
    pair_loss.num_pairs = num_pairs
    return pair_loss


def dpo_metrics(
    out: DPOLossOutput, policy_chosen: Tensor, policy_rejected: Tensor
) -> dict[str, Tensor]:
    """Batch means under the contract metric names, as detached 0-d tensors (no host sync).

    ``logps/*`` are the summed completion log-probs as given (as TRL 1.16 logs them, for IPO
    too). The ``loss`` metric is left to the caller, which knows the step's normaliser."""
    chosen, rejected = out.chosen_rewards.detach(), out.rejected_rewards.detach()
    return {
        "rewards/chosen": chosen.mean(),
        "rewards/rejected": rejected.mean(),
        "rewards/accuracies": (chosen > rejected).to(chosen.dtype).mean(),
        "rewards/margins": (chosen - rejected).mean(),
        "logps/chosen": policy_chosen.detach().to(chosen.dtype).mean(),
        "logps/rejected": policy_rejected.detach().to(chosen.dtype).mean(),
    }
