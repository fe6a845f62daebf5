"""DPO loss family: hand-computed values, float64 truth on random inputs, gradients, RPO, IPO
token averaging, reference-free mode, TRL's per-pair variants against a 60-digit evaluation of
their literal formulas (extreme logits included) and the slice-wise form used by the fused
kernel."""

from __future__ import annotations

import dataclasses
import math
import zlib

import mpmath
import numpy as np
import pytest
import torch

from sdpo.losses import (
    F_DIVERGENCES,
    LOSS_TYPES,
    LossConfig,
    dpo_loss,
    dpo_metrics,
    make_pair_loss,
)


def t64(*xs: float) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float64)


def log_sigmoid(x: float) -> float:
    # log(1 / (1 + e^-x)), written directly from the definition
    return -math.log(1.0 + math.exp(-x))


# Two fixed pairs: the formulas are evaluated by hand below with math.* in float64.
PC, PR, RC, RR = (-10.0, -31.5), (-12.5, -29.0), (-11.0, -30.0), (-12.0, -30.5)
CT, RT = (4, 9), (5, 7)


def z_of(i: int, *, average: bool = False, reference_free: bool = False) -> float:
    pc, pr, rc, rr = PC[i], PR[i], RC[i], RR[i]
    if average:
        pc, rc, pr, rr = pc / CT[i], rc / CT[i], pr / RT[i], rr / RT[i]
    if reference_free:
        rc = rr = 0.0
    return (pc - pr) - (rc - rr)


def run(cfg: LossConfig, **kw):
    return dpo_loss(
        t64(*PC), t64(*PR), t64(*RC), t64(*RR), config=cfg,
        chosen_tokens=torch.tensor(CT), rejected_tokens=torch.tensor(RT), **kw,
    )  # fmt: skip


def test_sigmoid_matches_hand_computed_values():
    # pair 0: z = 2.5 - 1.0 = 1.5; pair 1: z = -2.5 - 0.5 = -3.0
    assert z_of(0) == 1.5 and z_of(1) == -3.0
    out = run(LossConfig(beta=0.1))
    expected = [-log_sigmoid(0.1 * 1.5), -log_sigmoid(0.1 * -3.0)]
    assert out.losses.tolist() == pytest.approx(expected, rel=1e-12)
    # -log(sigmoid(-0.3)) = log(1 + e^0.3), evaluated separately
    assert out.losses[1].item() == pytest.approx(0.8543552444685272, rel=1e-12)
    assert out.chosen_rewards.tolist() == pytest.approx([0.1 * 1.0, 0.1 * -1.5], rel=1e-12)
    assert out.rejected_rewards.tolist() == pytest.approx([0.1 * -0.5, 0.1 * 1.5], rel=1e-12)
    assert out.nll is None


def test_cdpo_label_smoothing_matches_hand_computed_values():
    eps, beta = 0.2, 0.5
    out = run(LossConfig(beta=beta, label_smoothing=eps))
    expected = [
        -(1 - eps) * log_sigmoid(beta * z_of(i)) - eps * log_sigmoid(-beta * z_of(i))
        for i in range(2)
    ]
    assert out.losses.tolist() == pytest.approx(expected, rel=1e-12)


def test_robust_matches_hand_computed_values():
    eps, beta = 0.1, 0.3
    out = run(LossConfig(loss_type="robust", beta=beta, label_smoothing=eps))
    expected = [
        (-(1 - eps) * log_sigmoid(beta * z_of(i)) + eps * log_sigmoid(-beta * z_of(i)))
        / (1 - 2 * eps)
        for i in range(2)
    ]
    assert out.losses.tolist() == pytest.approx(expected, rel=1e-12)


def test_robust_without_smoothing_equals_sigmoid():
    a = run(LossConfig(loss_type="robust", beta=0.2)).losses
    b = run(LossConfig(loss_type="sigmoid", beta=0.2)).losses
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_hinge_matches_hand_computed_values():
    out = run(LossConfig(loss_type="hinge", beta=0.5))
    # beta*z = 0.75 -> 0.25; beta*z = -1.5 -> 2.5
    assert out.losses.tolist() == pytest.approx([0.25, 2.5], rel=1e-12)
    out = run(LossConfig(loss_type="hinge", beta=1.0))
    assert out.losses.tolist() == pytest.approx([0.0, 4.0], abs=1e-12)


def test_ipo_averages_logprobs_over_completion_tokens():
    beta = 0.25
    out = run(LossConfig(loss_type="ipo", beta=beta))
    # pair 0 by hand: (-10/4 - -12.5/5) - (-11/4 - -12/5) = 0 - (-0.35) = 0.35
    assert z_of(0, average=True) == pytest.approx(0.35, abs=1e-15)
    expected = [(z_of(i, average=True) - 1 / (2 * beta)) ** 2 for i in range(2)]
    assert out.losses.tolist() == pytest.approx(expected, rel=1e-12)
    assert out.losses[0].item() == pytest.approx((0.35 - 2.0) ** 2, rel=1e-12)
    # rewards are beta times the summed log-ratios, as for every type (TRL 1.16 reports them so)
    assert out.chosen_rewards[0].item() == pytest.approx(beta * (-10 + 11), rel=1e-12)
    assert out.rejected_rewards[1].item() == pytest.approx(beta * (-29 + 30.5), rel=1e-12)


def test_rpo_adds_mean_token_nll_of_chosen():
    alpha = 0.7
    out = run(LossConfig(beta=0.1, rpo_alpha=alpha))
    nll = [-PC[i] / CT[i] for i in range(2)]  # 2.5, 3.5
    assert out.nll.tolist() == pytest.approx([2.5, 3.5], rel=1e-12)
    expected = [-log_sigmoid(0.1 * z_of(i)) + alpha * nll[i] for i in range(2)]
    assert out.losses.tolist() == pytest.approx(expected, rel=1e-12)


def test_reference_free_ignores_reference_values():
    cfg = LossConfig(beta=0.1, reference_free=True)
    out = run(cfg)
    expected = [-log_sigmoid(0.1 * z_of(i, reference_free=True)) for i in range(2)]
    assert out.losses.tolist() == pytest.approx(expected, rel=1e-12)
    assert out.chosen_rewards.tolist() == pytest.approx([0.1 * p for p in PC], rel=1e-12)
    # reference values may be left out entirely
    out2 = dpo_loss(t64(*PC), t64(*PR), None, None, config=cfg)
    torch.testing.assert_close(out2.losses, out.losses, rtol=0, atol=0)


# ---- random float64 checks against an independent numpy implementation ----


TRL_TYPES = (
    "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "apo_zero", "apo_down", "discopop",
    "sigmoid_norm",
)  # fmt: skip


def f_prime(cfg: LossConfig, log_u):
    """f'(u) of the f-divergence of ``cfg`` at u = exp(log_u), from its definition (f-DPO)."""
    u = mpmath.exp(log_u)
    kind = cfg.f_divergence_type
    if kind == "reverse_kl":  # f(u) = u log u
        return mpmath.log(u) + 1
    if kind == "forward_kl":  # f(u) = -log u
        return -1 / u
    if kind == "js_divergence":  # f(u) = u log u - (u + 1) log((u + 1) / 2)
        return mpmath.log(2 * u / (1 + u))
    a = mpmath.mpf(cfg.f_alpha_divergence_coef)  # f(u) = (u^(1-a) - (1-a) u - a) / (a (a-1))
    return (1 - u ** (-a)) / a


def trl_score(cfg: LossConfig, log_u):
    """One completion's score as TRL computes it before dividing by its token count (ipo,
    sigmoid_norm): f'(u) with TRL's constant (the log-ratio itself for reverse_kl, 1 - 1/u for
    forward_kl)."""
    kind = cfg.f_divergence_type
    if kind == "reverse_kl":
        return log_u
    if kind == "forward_kl":
        return 1 - 1 / mpmath.exp(log_u)
    return f_prime(cfg, log_u)  # js: log(2u / (1 + u)); alpha: (1 - u^-a) / a


def trl_truth(cfg: LossConfig, pc, pr, rc, rr, ct, rt) -> mpmath.mpf:
    """One pair's loss from the literal formulas of TRL's DPOTrainer, in 60-digit arithmetic
    (no rewriting for stability: the precision and exponent range make that unnecessary). The
    reward difference ``d`` is ``f'(u_c) - f'(u_r)`` of the config's f-divergence."""
    with mpmath.workdps(max(60, mpmath.mp.dps)):  # mpmath.diff evaluates at higher precision
        pc, pr, rc, rr = (mpmath.mpf(v) for v in (pc, pr, rc, rr))
        if cfg.reference_free:
            rc = rr = mpmath.mpf(0)
        b = mpmath.mpf(cfg.beta)
        e = mpmath.mpf(cfg.label_smoothing)

        def sig(x):
            return 1 / (1 + mpmath.exp(-x))

        def logsig(x):
            return mpmath.log(sig(x))

        kind = cfg.loss_type
        lc, lr = pc - rc, pr - rr
        d = f_prime(cfg, lc) - f_prime(cfg, lr)
        if kind in ("ipo", "sigmoid_norm"):  # each score over its token count, at least 1
            d = trl_score(cfg, lc) / max(int(ct), 1) - trl_score(cfg, lr) / max(int(rt), 1)
        if kind == "sigmoid":
            out = -(1 - e) * logsig(b * d) - e * logsig(-b * d)
        elif kind == "robust":
            out = (-(1 - e) * logsig(b * d) + e * logsig(-b * d)) / (1 - 2 * e)
        elif kind == "hinge":
            out = max(mpmath.mpf(0), 1 - b * d)
        elif kind == "ipo":
            out = (d - 1 / (2 * b)) ** 2
        elif kind == "exo_pair":
            x = b * d
            out = sig(x) * (logsig(x) - mpmath.log(1 - e)) + sig(-x) * (logsig(-x) - mpmath.log(e))
        elif kind == "nca_pair":
            out = -logsig(b * lc) - logsig(-b * lc) / 2 - logsig(-b * lr) / 2
        elif kind == "bco_pair":
            out = -logsig(b * lc) - logsig(-b * lr)
        elif kind == "sppo_hard":
            out = (lc - 1 / (2 * b)) ** 2 + (lr + 1 / (2 * b)) ** 2
        elif kind == "apo_zero":
            out = 1 - sig(b * lc) + sig(b * lr)
        elif kind == "apo_down":
            out = sig(b * lc) + 1 - sig(b * d)
        elif kind == "discopop":
            x = b * d
            m = sig(x / mpmath.mpf(cfg.discopop_tau))
            out = -logsig(x) * (1 - m) + mpmath.exp(-x) * m
        elif kind == "sigmoid_norm":
            out = -logsig(b * d)
        else:
            raise AssertionError(kind)
        if cfg.rpo_alpha is not None:
            out = out + mpmath.mpf(cfg.rpo_alpha) * (-pc / max(int(ct), 1))
        return out


def numpy_reference(pc, pr, rc, rr, ct, rt, *, cfg: LossConfig) -> np.ndarray:
    if cfg.loss_type in TRL_TYPES or cfg.f_divergence_type != "reverse_kl":
        rows = zip(*(np.asarray(x).tolist() for x in (pc, pr, rc, rr, ct, rt)), strict=True)
        return np.array([float(trl_truth(cfg, *row)) for row in rows])
    pc, pr, rc, rr = (np.asarray(x, dtype=np.float64) for x in (pc, pr, rc, rr))
    ct, rt = np.asarray(ct, dtype=np.float64), np.asarray(rt, dtype=np.float64)
    nll = -pc / ct
    if cfg.reference_free:
        rc, rr = np.zeros_like(rc), np.zeros_like(rr)
    if cfg.loss_type == "ipo":
        pc, rc, pr, rr = pc / ct, rc / ct, pr / rt, rr / rt
    x = cfg.beta * ((pc - rc) - (pr - rr))
    nls_pos = np.logaddexp(0.0, -x)  # -log sigmoid(x)
    nls_neg = np.logaddexp(0.0, x)  # -log sigmoid(-x)
    e = cfg.label_smoothing
    if cfg.loss_type == "sigmoid":
        out = (1 - e) * nls_pos + e * nls_neg
    elif cfg.loss_type == "robust":
        out = ((1 - e) * nls_pos - e * nls_neg) / (1 - 2 * e)
    elif cfg.loss_type == "hinge":
        out = np.maximum(0.0, 1.0 - x)
    else:
        out = (x / cfg.beta - 0.5 / cfg.beta) ** 2
    if cfg.rpo_alpha is not None:
        out = out + cfg.rpo_alpha * nll
    return out


CONFIGS = [
    LossConfig(loss_type="sigmoid", beta=0.1),
    LossConfig(loss_type="sigmoid", beta=0.37, label_smoothing=0.15),
    LossConfig(loss_type="robust", beta=0.2, label_smoothing=0.3),
    LossConfig(loss_type="hinge", beta=0.05),
    LossConfig(loss_type="ipo", beta=0.4),
    LossConfig(loss_type="sigmoid", beta=0.1, rpo_alpha=1.3),
    LossConfig(loss_type="ipo", beta=0.1, rpo_alpha=0.5, reference_free=True),
    LossConfig(loss_type="exo_pair", beta=0.1, label_smoothing=1e-3),
    LossConfig(loss_type="exo_pair", beta=0.3, label_smoothing=0.2),
    LossConfig(loss_type="nca_pair", beta=0.1),
    LossConfig(loss_type="bco_pair", beta=0.2),
    LossConfig(loss_type="sppo_hard", beta=0.1),
    LossConfig(loss_type="apo_zero", beta=0.1),
    LossConfig(loss_type="apo_down", beta=0.25),
    LossConfig(loss_type="discopop", beta=0.1),
    LossConfig(loss_type="discopop", beta=0.5, discopop_tau=0.3),
    LossConfig(loss_type="sigmoid_norm", beta=0.1),
    LossConfig(loss_type="nca_pair", beta=0.15, rpo_alpha=0.5, reference_free=True),
    LossConfig(loss_type="discopop", beta=0.1, rpo_alpha=1.1),
]
# f-DPO: every loss type built on the reward difference, under each other f-divergence
F_CONFIGS = [
    LossConfig(loss_type="sigmoid", beta=0.1, f_divergence_type="js_divergence"),
    LossConfig(loss_type="sigmoid", beta=0.2, f_divergence_type="alpha_divergence"),
    LossConfig(
        loss_type="robust", beta=0.1, label_smoothing=0.1, f_divergence_type="forward_kl"
    ),
    LossConfig(
        loss_type="hinge", beta=0.05, f_divergence_type="alpha_divergence",
        f_alpha_divergence_coef=1.7,
    ),
    LossConfig(loss_type="ipo", beta=0.3, f_divergence_type="js_divergence"),
    LossConfig(
        loss_type="exo_pair", beta=0.1, label_smoothing=1e-3, f_divergence_type="forward_kl"
    ),
    LossConfig(
        loss_type="discopop", beta=0.2, f_divergence_type="alpha_divergence",
        f_alpha_divergence_coef=0.3,
    ),
    LossConfig(loss_type="sigmoid_norm", beta=0.1, f_divergence_type="js_divergence"),
    LossConfig(loss_type="sigmoid_norm", beta=0.1, f_divergence_type="forward_kl"),
    LossConfig(loss_type="ipo", beta=0.2, f_divergence_type="forward_kl"),
    LossConfig(loss_type="sigmoid", beta=0.1, rpo_alpha=0.7, f_divergence_type="forward_kl"),
]  # fmt: skip
CONFIGS += F_CONFIGS
TRL_CONFIGS = [
    c for c in CONFIGS if c.loss_type in TRL_TYPES and c.f_divergence_type == "reverse_kl"
]


def random_batch(p: int, *, seed: int):
    g = torch.Generator().manual_seed(seed)
    ct = torch.randint(1, 60, (p,), generator=g)
    rt = torch.randint(1, 60, (p,), generator=g)
    pc = -ct * (0.5 + 2 * torch.rand(p, generator=g, dtype=torch.float64))
    pr = -rt * (0.5 + 2 * torch.rand(p, generator=g, dtype=torch.float64))
    rc = pc + torch.randn(p, generator=g, dtype=torch.float64) * 3
    rr = pr + torch.randn(p, generator=g, dtype=torch.float64) * 3
    return pc, pr, rc, rr, ct, rt


@pytest.mark.parametrize(
    "cfg",
    CONFIGS,
    ids=lambda c: f"{c.loss_type}-{c.f_divergence_type}-{c.rpo_alpha}-{c.reference_free}",
)
def test_losses_match_float64_numpy_truth_on_random_pairs(cfg):
    pc, pr, rc, rr, ct, rt = random_batch(37, seed=zlib.crc32(repr(cfg).encode()))
    out = dpo_loss(pc, pr, rc, rr, config=cfg, chosen_tokens=ct, rejected_tokens=rt)
    truth = numpy_reference(pc, pr, rc, rr, ct, rt, cfg=cfg)
    np.testing.assert_allclose(out.losses.numpy(), truth, rtol=1e-12, atol=1e-12)
    # float32 and bf16 inputs are computed in float32 and stay close to the float64 truth
    for dtype, tol in ((torch.float32, 2e-4), (torch.bfloat16, 5e-2)):
        out32 = dpo_loss(
            pc.to(dtype), pr.to(dtype), rc.to(dtype), rr.to(dtype), config=cfg,
            chosen_tokens=ct, rejected_tokens=rt,
        )  # fmt: skip
        assert out32.losses.dtype == torch.float32
        rounded = numpy_reference(
            *(x.to(dtype).double() for x in (pc, pr, rc, rr)), ct, rt, cfg=cfg
        )
        np.testing.assert_allclose(out32.losses.double().numpy(), rounded, rtol=tol, atol=tol)


@pytest.mark.parametrize(
    "cfg",
    CONFIGS,
    ids=lambda c: f"{c.loss_type}-{c.f_divergence_type}-{c.rpo_alpha}-{c.reference_free}",
)
def test_gradients_pass_gradcheck_in_float64(cfg):
    pc, pr, rc, rr, ct, rt = random_batch(7, seed=11)
    pc.requires_grad_(True)
    pr.requires_grad_(True)

    def f(a, b):
        return dpo_loss(a, b, rc, rr, config=cfg, chosen_tokens=ct, rejected_tokens=rt).losses

    assert torch.autograd.gradcheck(f, (pc, pr), eps=1e-6, atol=1e-8)
    out = dpo_loss(pc, pr, rc, rr, config=cfg, chosen_tokens=ct, rejected_tokens=rt)
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad


def test_sigmoid_gradient_has_the_dpo_closed_form():
    # dL/dpi_c = -beta * sigmoid(-beta z), dL/dpi_r = +beta * sigmoid(-beta z)
    pc, pr, rc, rr, ct, rt = random_batch(13, seed=5)
    pc.requires_grad_(True)
    pr.requires_grad_(True)
    beta = 0.3
    dpo_loss(pc, pr, rc, rr, config=LossConfig(beta=beta)).losses.sum().backward()
    z = (pc - pr - rc + rr).detach()
    torch.testing.assert_close(pc.grad, -beta * torch.sigmoid(-beta * z), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(pr.grad, beta * torch.sigmoid(-beta * z), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(
    "cfg",
    CONFIGS,
    ids=lambda c: f"{c.loss_type}-{c.f_divergence_type}-{c.rpo_alpha}-{c.reference_free}",
)
def test_pair_loss_slices_sum_to_the_full_batch_loss(cfg):
    p = 19
    pc, pr, rc, rr, ct, rt = random_batch(p, seed=3)
    norm = 23.0  # e.g. pairs in a gradient-accumulated optimizer step
    full_c = pc.clone().requires_grad_(True)
    full_r = pr.clone().requires_grad_(True)
    full = dpo_loss(full_c, full_r, rc, rr, config=cfg, chosen_tokens=ct, rejected_tokens=rt)
    (full.losses.sum() / norm).backward()

    pair_loss = make_pair_loss(
        cfg, ref_chosen=rc, ref_rejected=rr, chosen_tokens=ct, rejected_tokens=rt, normalizer=norm
    )
    total = torch.zeros((), dtype=torch.float64)
    grads_c, grads_r = [], []
    for s in (slice(0, 6), slice(6, 7), slice(7, p)):
        c = pc[s].clone().requires_grad_(True)
        r = pr[s].clone().requires_grad_(True)
        part = pair_loss(c, r, s)
        part.backward()
        total = total + part.detach()
        grads_c.append(c.grad)
        grads_r.append(r.grad)
    torch.testing.assert_close(total, full.losses.sum().detach() / norm, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(torch.cat(grads_c), full_c.grad, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(torch.cat(grads_r), full_r.grad, rtol=1e-13, atol=1e-15)


def test_pair_loss_rejects_a_slice_that_does_not_match_its_inputs():
    pc, pr, rc, rr, _, _ = random_batch(5, seed=1)
    pair_loss = make_pair_loss(LossConfig(), ref_chosen=rc, ref_rejected=rr, normalizer=5)
    with pytest.raises(ValueError, match="covers 2 of the batch's 5 pairs but 3"):
        pair_loss(pc[:3], pr[:3], slice(1, 3))
    with pytest.raises(ValueError, match="normalizer must be > 0"):
        make_pair_loss(LossConfig(), ref_chosen=rc, ref_rejected=rr, normalizer=0)
    for bad in (np.int64(0), np.float32(-1.0), float("nan")):  # a NumPy count: inf losses
        with pytest.raises(ValueError, match="normalizer must be > 0"):
            make_pair_loss(LossConfig(), ref_chosen=rc, ref_rejected=rr, normalizer=bad)
    # a reference or count tensor of another length than the others: refused when built (a
    # longer one was sliced silently, its values for the batch's pairs misaligned or not)
    with pytest.raises(ValueError, match=r"one length.*'ref_chosen': 5, 'ref_rejected': 4"):
        make_pair_loss(LossConfig(), ref_chosen=rc, ref_rejected=rr[:4])
    tokens = torch.ones(6)
    with pytest.raises(ValueError, match="'chosen_tokens': 6"):
        make_pair_loss(
            LossConfig(loss_type="ipo"),
            ref_chosen=rc,
            ref_rejected=rr,
            chosen_tokens=tokens,
            rejected_tokens=tokens,
        )


def test_per_pair_inputs_that_are_not_tensors_are_named_when_the_loss_is_built():
    """A data set's reference column as a list or NumPy array: refused naming the input (it
    passed make_pair_loss and failed at the first chunk with "'numpy.ndarray' object has no
    attribute 'to'"), and likewise by dpo_loss."""
    pc, pr, rc, rr, _, _ = random_batch(3, seed=4)
    for bad in (rr.tolist(), rr.numpy()):
        with pytest.raises(TypeError, match=r"ref_rejected must be a torch\.Tensor.*as_tensor"):
            make_pair_loss(LossConfig(), ref_chosen=rc, ref_rejected=bad)
        with pytest.raises(TypeError, match=r"ref_rejected must be a torch\.Tensor"):
            dpo_loss(pc, pr, rc, bad, config=LossConfig())
    with pytest.raises(TypeError, match=r"policy_chosen must be a torch\.Tensor"):
        dpo_loss(pc.numpy(), pr, rc, rr, config=LossConfig())


def test_linear_pair_loss_refuses_a_pair_loss_built_for_another_number_of_pairs():
    """make_pair_loss over a whole data set's reference values, used on a batch of fewer pairs:
    its values were sliced by position, read against the wrong pairs, silently."""
    from sdpo.kernels import linear_pair_loss

    g = torch.Generator().manual_seed(5)
    h, w = torch.randn(12, 5, generator=g), torch.randn(7, 5, generator=g)
    labels = torch.randint(0, 7, (12,), generator=g)
    seq_ids = torch.arange(4).repeat_interleave(3)  # 4 sequences: 2 pairs
    ref = -torch.rand(3, generator=g) * 10
    whole = make_pair_loss(LossConfig(), ref_chosen=ref, ref_rejected=ref - 1)
    with pytest.raises(ValueError, match=r"values .* of 3 pairs but this batch has 2"):
        linear_pair_loss(h, w, labels, seq_ids, 4, pair_loss=whole, impl="torch")
    batch = make_pair_loss(LossConfig(), ref_chosen=ref[:2], ref_rejected=ref[:2] - 1)
    loss, logps = linear_pair_loss(h, w, labels, seq_ids, 4, pair_loss=batch, impl="torch")
    want = dpo_loss(logps[0::2], logps[1::2], ref[:2], ref[:2] - 1, config=LossConfig())
    torch.testing.assert_close(loss, want.losses.sum(), rtol=1e-6, atol=1e-6)


def test_metrics_are_batch_means_under_contract_names():
    pc, pr, rc, rr, _, _ = random_batch(11, seed=9)
    beta = 0.1
    out = dpo_loss(pc, pr, rc, rr, config=LossConfig(beta=beta))
    m = dpo_metrics(out, pc, pr)
    assert set(m) == {
        "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
        "logps/chosen", "logps/rejected",
    }  # fmt: skip
    ch, rj = beta * (pc - rc), beta * (pr - rr)
    torch.testing.assert_close(m["rewards/chosen"], ch.mean())
    torch.testing.assert_close(m["rewards/rejected"], rj.mean())
    torch.testing.assert_close(m["rewards/margins"], (ch - rj).mean())
    acc = sum(float(a > b) for a, b in zip(ch.tolist(), rj.tolist())) / 11
    assert m["rewards/accuracies"].item() == pytest.approx(acc)
    torch.testing.assert_close(m["logps/chosen"], pc.mean())
    torch.testing.assert_close(m["logps/rejected"], pr.mean())
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in m.values())


def test_missing_inputs_are_explained():
    pc, pr, rc, rr, ct, rt = random_batch(4, seed=2)
    # only what needs the token counts is named
    with pytest.raises(ValueError, match="chosen_tokens is missing: loss type 'ipo' needs"):
        dpo_loss(pc, pr, rc, rr, config=LossConfig(loss_type="ipo"))
    with pytest.raises(ValueError, match="chosen_tokens is missing: rpo_alpha 1.0 needs"):
        dpo_loss(pc, pr, rc, rr, config=LossConfig(rpo_alpha=1.0))
    with pytest.raises(ValueError, match="ref_chosen is missing.*reference_free"):
        dpo_loss(pc, pr, None, rr, config=LossConfig())
    with pytest.raises(ValueError, match="ref_rejected has shape"):
        dpo_loss(pc, pr, rc, rr[:3], config=LossConfig())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"loss_type": "kto"}, "loss_type must be one of sigmoid, ipo, hinge, robust"),
        ({"beta": 0.0}, "beta must be"),
        ({"beta": float("nan")}, "beta must be"),
        ({"label_smoothing": 0.5}, r"label_smoothing must be in \[0, 0.5\)"),
        ({"label_smoothing": -0.1}, "label_smoothing must be"),
        ({"loss_type": "hinge", "label_smoothing": 0.1}, "has no effect"),
        ({"rpo_alpha": -1.0}, "rpo_alpha must be"),
        ({"loss_type": "nca_pair", "label_smoothing": 0.1}, "has no effect"),
        ({"loss_type": "exo_pair"}, "exo_pair' needs label_smoothing > 0"),
        ({"loss_type": "exo_pair", "label_smoothing": 0.5}, "label_smoothing must be in"),
        ({"loss_type": "discopop", "discopop_tau": 0.0}, "discopop_tau must be"),
        ({"loss_type": "discopop", "discopop_tau": -1.0}, "discopop_tau must be"),
        ({"loss_type": "discopop", "discopop_tau": float("inf")}, "discopop_tau must be"),
        ({"loss_type": "discopop", "discopop_tau": True}, "discopop_tau must be"),
        ({"loss_type": "sigmoid", "discopop_tau": 0.1}, "discopop_tau = 0.1 has no effect"),
        ({"loss_type": "aot"}, "loss_type must be one of"),
        ({"loss_type": ["sigmoid", "sft"], "use_weighting": True}, "'sft' does not go with use"),
        ({"f_divergence_type": "kl"}, "f_divergence_type must be one of reverse_kl"),
        (
            {"loss_type": "bco_pair", "f_divergence_type": "js_divergence"},
            "does not apply to loss_type 'bco_pair'",
        ),
        (
            {"loss_type": ["sigmoid", "apo_zero"], "f_divergence_type": "forward_kl"},
            "does not apply to loss_type 'apo_zero'",
        ),
        ({"f_alpha_divergence_coef": 0.7}, "f_alpha_divergence_coef = 0.7 has no effect"),
        (
            {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.0},
            "f_alpha_divergence_coef must be",
        ),
        (
            {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": float("nan")},
            "f_alpha_divergence_coef must be",
        ),
    ],
)
def test_loss_config_rejects_invalid_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LossConfig(**kwargs)


def test_sft_is_the_mean_token_nll_of_the_chosen_completions_over_the_step():
    """TRL's sft type: -sum(pi_c) / sum(chosen tokens) over a batch; per pair, -pi_c * scale with
    scale = pairs / chosen tokens of the step, so the pairs' mean is the step's token mean."""
    rng = np.random.default_rng(3)
    n = 7
    pc, pr, rc, rr = (t64(*(-rng.uniform(1, 60, n))) for _ in range(4))
    ct = torch.tensor(rng.integers(1, 40, n))
    rt = torch.tensor(rng.integers(1, 40, n))
    cfg = LossConfig(loss_type="sft", beta=0.1)
    pc.requires_grad_(True)
    out = dpo_loss(pc, pr, rc, rr, config=cfg, chosen_tokens=ct, rejected_tokens=rt)
    truth = -pc.detach().numpy() * n / ct.numpy().sum()
    np.testing.assert_allclose(out.losses.detach().numpy(), truth, rtol=1e-13)
    assert out.losses.mean().item() == pytest.approx(-pc.sum().item() / ct.sum().item(), rel=1e-13)
    # its gradient: -1 / (chosen tokens of the batch) for every pair's summed log-prob
    out.losses.mean().backward()
    np.testing.assert_allclose(pc.grad.numpy(), -1.0 / ct.sum().item(), rtol=1e-13)
    # a step of several micro-batches: the step's scale given to each, the same total
    scale = n / ct.sum().item()
    parts = [
        dpo_loss(
            pc[sl].detach(),
            pr[sl],
            rc[sl],
            rr[sl],
            config=cfg,
            chosen_tokens=ct[sl],
            rejected_tokens=rt[sl],
            sft_scale=scale,
        ).losses
        for sl in (slice(0, 3), slice(3, n))
    ]
    np.testing.assert_allclose(torch.cat(parts).numpy(), truth, rtol=1e-13)
    # with others, weighted (RPO as TRL 1.16 writes it: ["sigmoid", "sft"], weights [1, alpha]);
    # the rewards are every type's: beta times the summed log-ratios
    rpo = LossConfig(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.4], beta=0.1)
    both = dpo_loss(pc.detach(), pr, rc, rr, config=rpo, chosen_tokens=ct, rejected_tokens=rt)
    sigmoid = dpo_loss(pc.detach(), pr, rc, rr, config=LossConfig(beta=0.1))
    np.testing.assert_allclose(
        both.losses.numpy(), sigmoid.losses.numpy() + 0.4 * truth, rtol=1e-13
    )
    torch.testing.assert_close(both.chosen_rewards, sigmoid.chosen_rewards, rtol=0, atol=0)
    # make_pair_loss over slices: the batch's own scale by default
    pair_loss = make_pair_loss(
        cfg, ref_chosen=rc, ref_rejected=rr, chosen_tokens=ct, rejected_tokens=rt, normalizer=n
    )
    total = pair_loss(pc[:4].detach(), pr[:4], slice(0, 4)) + pair_loss(
        pc[4:].detach(), pr[4:], slice(4, n)
    )
    assert total.item() == pytest.approx(-pc.sum().item() / ct.sum().item(), rel=1e-13)


def test_every_loss_type_is_covered():
    # sft, a batch-mean NLL, has its own test above
    assert {c.loss_type for c in CONFIGS} | {"sft"} == set(LOSS_TYPES)
    assert {c.f_divergence_type for c in CONFIGS} == set(F_DIVERGENCES)


def test_f_divergences_match_hand_computed_values():
    # pair 0 of the fixed pairs: lc = 1, lr = -0.5
    beta, lc, lr = 0.5, 1.0, -0.5
    diffs = {
        "js_divergence": log_sigmoid(lc) - log_sigmoid(lr),  # log(2u/(1+u)) difference
        "forward_kl": math.exp(-lr) - math.exp(-lc),
        "alpha_divergence": (math.exp(-0.5 * lr) - math.exp(-0.5 * lc)) / 0.5,
    }
    for kind, d in diffs.items():
        cfg = LossConfig(beta=beta, f_divergence_type=kind)
        assert run(cfg).losses[0].item() == pytest.approx(-log_sigmoid(beta * d), rel=1e-12)
        hinge = LossConfig(loss_type="hinge", beta=beta, f_divergence_type=kind)
        assert run(hinge).losses[0].item() == pytest.approx(max(0.0, 1 - beta * d), rel=1e-12)
    # alpha = 1 is the forward KL; the rewards stay beta times the summed log-ratios
    one = LossConfig(beta=beta, f_divergence_type="alpha_divergence", f_alpha_divergence_coef=1)
    fwd = run(LossConfig(beta=beta, f_divergence_type="forward_kl"))
    torch.testing.assert_close(run(one).losses, fwd.losses, rtol=1e-15, atol=0)
    assert fwd.chosen_rewards.tolist() == pytest.approx([beta * 1.0, beta * -1.5], rel=1e-12)
    # the reverse KL is plain DPO, bit for bit
    plain = run(LossConfig(beta=beta))
    torch.testing.assert_close(
        run(LossConfig(beta=beta, f_divergence_type="reverse_kl")).losses, plain.losses,
        rtol=0, atol=0,
    )  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind", ["forward_kl", "alpha_divergence"])
def test_f_divergence_exponentials_are_capped_to_finite_values(kind, dtype):
    # log-ratios far below 0 overflow exp(-a * l): capped, the loss stays finite, gradients too
    cfg = LossConfig(beta=0.1, f_divergence_type=kind)
    lc = torch.tensor([-5000.0, -1.0, 3.0, -800.0], dtype=dtype, requires_grad=True)
    lr = torch.tensor([1.0, -5000.0, -900.0, -2.0], dtype=dtype, requires_grad=True)
    zero = torch.zeros(4, dtype=dtype)
    out = dpo_loss(lc, lr, zero, zero, config=cfg)
    out.losses.sum().backward()
    for t in (out.losses, lc.grad, lr.grad):
        assert torch.isfinite(t).all(), t
    # a capped rejected side still wins: the loss of pair 1 is 0, as the truth's
    assert float(trl_truth(cfg, -1.0, -5000.0, 0.0, 0.0, 1, 1)) == pytest.approx(0.0, abs=1e-300)
    assert out.losses[1].item() == 0.0
    # a capped chosen side loses: -log sigmoid(beta d) = -beta d with the exponent at its cap
    # (half the dtype's exponent range, less 8), and no gradient flows past the cap
    a = 1.0 if kind == "forward_kl" else cfg.f_alpha_divergence_coef
    cap = 0.5 * math.log(torch.finfo(dtype).max) - 8.0
    want = cfg.beta * (math.exp(cap) - math.exp(-a * 1.0)) / a
    assert out.losses[0].item() == pytest.approx(want, rel=1e-5)
    assert lc.grad[0].item() == 0.0


def test_trl_variants_accept_their_parameters():
    assert LossConfig(loss_type="exo_pair", label_smoothing=1e-3).label_smoothing == 1e-3
    assert LossConfig(loss_type="discopop").discopop_tau == 0.05  # TRL's default
    assert LossConfig(loss_type="discopop", discopop_tau=2).discopop_tau == 2
    assert LossConfig(loss_type="sigmoid_norm").needs_token_counts
    assert not LossConfig(loss_type="apo_zero").needs_token_counts
    with pytest.raises(ValueError, match="chosen_tokens is missing"):
        pc, pr, rc, rr, _, _ = random_batch(3, seed=4)
        dpo_loss(pc, pr, rc, rr, config=LossConfig(loss_type="sigmoid_norm"))


# (beta * chosen log-ratio, beta * rejected log-ratio) of pairs with extreme logits
EXTREMES = [
    (2000.0, -2000.0), (-2000.0, 2000.0), (-2000.0, -1990.0), (1500.0, 1700.0),
    (300.0, 290.0), (-300.0, -310.0), (95.0, -95.0), (-95.0, 95.0), (45.0, -45.0),
    (-45.0, 45.0), (-0.5, 0.25), (0.0, 0.0), (3e-9, -1e-9),
]  # fmt: skip


def extreme_batch(cfg: LossConfig, *, seed: int):
    """13 pairs: ordinary policy log-probs and references placed so the log-ratios hit EXTREMES."""
    p = len(EXTREMES)
    g = torch.Generator().manual_seed(seed)
    ct = torch.randint(1, 60, (p,), generator=g)
    rt = torch.randint(1, 60, (p,), generator=g)
    pc = -ct * (0.5 + 2 * torch.rand(p, generator=g, dtype=torch.float64))
    pr = -rt * (0.5 + 2 * torch.rand(p, generator=g, dtype=torch.float64))
    if cfg.loss_type == "sigmoid_norm":  # its logits are per token: scale by the counts
        lc = torch.tensor([a for a, _ in EXTREMES], dtype=torch.float64) * ct / cfg.beta
        lr = torch.tensor([b for _, b in EXTREMES], dtype=torch.float64) * rt / cfg.beta
    else:
        lc = torch.tensor([a for a, _ in EXTREMES], dtype=torch.float64) / cfg.beta
        lr = torch.tensor([b for _, b in EXTREMES], dtype=torch.float64) / cfg.beta
    if cfg.reference_free:  # the log-ratios are the policy log-probs themselves
        return (
            lc,
            lr,
            torch.zeros(p, dtype=torch.float64),
            torch.zeros(p, dtype=torch.float64),
            ct,
            rt,
        )
    return pc, pr, pc - lc, pr - lr, ct, rt


def truth_grads(cfg, pc, pr, rc, rr, ct, rt) -> tuple[np.ndarray, np.ndarray]:
    """d loss / d policy_chosen and d loss / d policy_rejected by 60-digit numeric differentiation."""
    gc, gr = [], []
    for row in zip(*(x.tolist() for x in (pc, pr, rc, rr, ct, rt)), strict=True):
        a, b = row[0], row[1]
        with mpmath.workdps(60):
            gc.append(float(mpmath.diff(lambda x, r=row: trl_truth(cfg, x, *r[1:]), a)))
            gr.append(float(mpmath.diff(lambda x, r=row: trl_truth(cfg, r[0], x, *r[2:]), b)))
    return np.array(gc), np.array(gr)


# the TRL variants, and the base types with label smoothing at the ends of its range
EXTREME_CONFIGS = TRL_CONFIGS + [
    LossConfig(loss_type="sigmoid", beta=0.1),
    LossConfig(loss_type="sigmoid", beta=0.1, label_smoothing=0.4999),
    LossConfig(loss_type="robust", beta=0.1, label_smoothing=0.4999),
    LossConfig(loss_type="hinge", beta=0.1),
    LossConfig(loss_type="ipo", beta=0.1),
    LossConfig(loss_type="exo_pair", beta=0.1, label_smoothing=0.4999),
]


@pytest.mark.parametrize(
    "cfg", EXTREME_CONFIGS, ids=lambda c: f"{c.loss_type}-{c.beta}-{c.label_smoothing}"
)
def test_losses_are_exact_and_finite_at_extreme_logits(cfg):
    pc, pr, rc, rr, ct, rt = extreme_batch(cfg, seed=zlib.crc32(repr(cfg).encode()))
    c, r = pc.clone().requires_grad_(True), pr.clone().requires_grad_(True)
    out = dpo_loss(c, r, rc, rr, config=cfg, chosen_tokens=ct, rejected_tokens=rt)
    truth = numpy_reference(pc, pr, rc, rr, ct, rt, cfg=cfg)
    assert np.isfinite(truth).all()
    np.testing.assert_allclose(out.losses.detach().numpy(), truth, rtol=1e-12, atol=1e-12)
    out.losses.sum().backward()
    gc, gr = truth_grads(cfg, pc, pr, rc, rr, ct, rt)
    np.testing.assert_allclose(c.grad.numpy(), gc, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(r.grad.numpy(), gr, rtol=1e-9, atol=1e-12)
    # float32: finite losses and gradients, close to the truth on the rounded inputs
    c32, r32 = (x.float().requires_grad_(True) for x in (pc, pr))
    rc32, rr32 = rc.float(), rr.float()
    out32 = dpo_loss(c32, r32, rc32, rr32, config=cfg, chosen_tokens=ct, rejected_tokens=rt)
    out32.losses.sum().backward()
    for t in (out32.losses, c32.grad, r32.grad):
        assert torch.isfinite(t).all(), t
    rounded = numpy_reference(
        *(x.double() for x in (c32.detach(), r32.detach(), rc32, rr32)), ct, rt, cfg=cfg
    )
    np.testing.assert_allclose(
        out32.losses.detach().double().numpy(), rounded, rtol=1e-4, atol=1e-4
    )
    # and so are the gradients (float64's, checked above, on the rounded inputs)
    c64, r64 = (x.detach().double().requires_grad_(True) for x in (c32, r32))
    dpo_loss(
        c64, r64, rc32.double(), rr32.double(), config=cfg, chosen_tokens=ct, rejected_tokens=rt
    ).losses.sum().backward()
    for ours, want in ((c32.grad, c64.grad), (r32.grad, r64.grad)):
        torch.testing.assert_close(ours.double(), want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", ["sigmoid", "robust"])
def test_a_rejected_log_prob_of_minus_inf_costs_nothing_without_label_smoothing(kind):
    """A rejected completion of log-prob -inf (its label's logit -inf): z = +inf, where the
    loss is 0 and so is its gradient; the flipped-label term of weight 0 is left out, not
    0 * -inf = NaN. A chosen one of -inf costs +inf with the finite gradient -beta, +beta."""
    cfg = LossConfig(loss_type=kind, beta=0.1)
    inf = float("inf")
    pc = torch.tensor([-4.0, -inf], requires_grad=True)
    pr = torch.tensor([-inf, -5.0], requires_grad=True)
    ref = torch.tensor([-6.0, -6.0])
    out = dpo_loss(pc, pr, ref, ref, config=cfg)
    out.losses.sum().backward()
    assert out.losses.tolist() == [0.0, inf]
    assert pc.grad.tolist() == [0.0, pytest.approx(-0.1)]
    assert pr.grad.tolist() == [0.0, pytest.approx(0.1)]


@pytest.mark.parametrize("cfg", TRL_CONFIGS, ids=lambda c: f"{c.loss_type}-{c.beta}")
def test_trl_variants_report_beta_times_summed_log_ratios_as_rewards(cfg):
    # TRL reports beta * (policy - reference) of the summed log-probs for every loss type
    pc, pr, rc, rr, ct, rt = random_batch(13, seed=21)
    out = dpo_loss(pc, pr, rc, rr, config=cfg, chosen_tokens=ct, rejected_tokens=rt)
    if cfg.reference_free:
        rc, rr = torch.zeros_like(rc), torch.zeros_like(rr)
    want_c = [cfg.beta * (a - b) for a, b in zip(pc.tolist(), rc.tolist())]
    want_r = [cfg.beta * (a - b) for a, b in zip(pr.tolist(), rr.tolist())]
    assert out.chosen_rewards.tolist() == pytest.approx(want_c, rel=1e-13, abs=1e-13)
    assert out.rejected_rewards.tolist() == pytest.approx(want_r, rel=1e-13, abs=1e-13)
    assert not out.chosen_rewards.requires_grad


def test_trl_variants_match_hand_computed_values():
    # pair 0 of the fixed pairs: lc = -10 - -11 = 1, lr = -12.5 - -12 = -0.5, d = 1.5
    beta = 0.5
    lc, lr, d = 1.0, -0.5, 1.5

    def sig(x):
        return 1.0 / (1.0 + math.exp(-x))

    def first(cfg):
        return run(cfg).losses[0].item()

    # sppo_hard: 1 / (2 beta) = 1, so (1 - 1)^2 + (-0.5 + 1)^2
    assert (lc - 1.0) ** 2 + (lr + 1.0) ** 2 == 0.25
    assert first(LossConfig(loss_type="sppo_hard", beta=beta)) == pytest.approx(0.25, rel=1e-12)
    assert first(LossConfig(loss_type="apo_zero", beta=beta)) == pytest.approx(
        1 - sig(0.5) + sig(-0.25), rel=1e-12
    )
    assert first(LossConfig(loss_type="apo_down", beta=beta)) == pytest.approx(
        sig(0.5) + 1 - sig(0.75), rel=1e-12
    )
    assert first(LossConfig(loss_type="bco_pair", beta=beta)) == pytest.approx(
        -log_sigmoid(0.5) - log_sigmoid(0.25), rel=1e-12
    )
    assert first(LossConfig(loss_type="nca_pair", beta=beta)) == pytest.approx(
        -log_sigmoid(0.5) - 0.5 * log_sigmoid(-0.5) - 0.5 * log_sigmoid(0.25), rel=1e-12
    )
    e, x = 0.01, beta * d
    assert first(LossConfig(loss_type="exo_pair", beta=beta, label_smoothing=e)) == pytest.approx(
        sig(x) * (log_sigmoid(x) - math.log(1 - e)) + sig(-x) * (log_sigmoid(-x) - math.log(e)),
        rel=1e-12,
    )
    m = sig(x / 0.05)
    assert first(LossConfig(loss_type="discopop", beta=beta)) == pytest.approx(
        -log_sigmoid(x) * (1 - m) + math.exp(-x) * m, rel=1e-12
    )
    # sigmoid_norm: per-token log-ratios 1 / 4 and -0.5 / 5
    assert first(LossConfig(loss_type="sigmoid_norm", beta=beta)) == pytest.approx(
        -log_sigmoid(beta * (1.0 / 4 + 0.5 / 5)), rel=1e-12
    )


# -- several loss types at once (TRL's loss_type list with loss_weights) ------------------------
COMBINED = [
    # MPO-style: DPO plus BCO's pair loss
    LossConfig(loss_type=["sigmoid", "bco_pair"], loss_weights=[0.8, 0.2], beta=0.1),
    LossConfig(loss_type=["ipo", "sigmoid_norm", "hinge"], beta=0.3, rpo_alpha=0.5),
    LossConfig(
        loss_type=["exo_pair", "robust"], loss_weights=[1.5, 0.0], beta=0.2, label_smoothing=0.1
    ),
    LossConfig(
        loss_type=["discopop", "apo_zero"], beta=0.25, discopop_tau=0.3, reference_free=True
    ),
]


def _single(cfg: LossConfig, kind: str) -> LossConfig:
    """The one-type config of ``kind`` within ``cfg`` (the settings it reads, no RPO term)."""
    return dataclasses.replace(
        cfg,
        loss_type=kind,
        loss_weights=None,
        rpo_alpha=None,
        label_smoothing=cfg.label_smoothing if kind in ("sigmoid", "robust", "exo_pair") else 0.0,
        discopop_tau=cfg.discopop_tau if kind == "discopop" else 0.05,
    )


@pytest.mark.parametrize("cfg", COMBINED, ids=lambda c: "+".join(c.loss_types))
def test_combined_loss_types_are_the_weighted_sum_of_their_float64_truths(cfg):
    pc, pr, rc, rr, ct, rt = random_batch(29, seed=zlib.crc32(repr(cfg).encode()))
    out = dpo_loss(pc, pr, rc, rr, config=cfg, chosen_tokens=ct, rejected_tokens=rt)
    truth = sum(
        w * numpy_reference(pc, pr, rc, rr, ct, rt, cfg=_single(cfg, kind))
        for kind, w in zip(cfg.loss_types, cfg.weights)
    )
    if cfg.rpo_alpha is not None:  # the NLL term once, not once per type
        truth = truth + cfg.rpo_alpha * (-pc / ct).numpy()
    np.testing.assert_allclose(out.losses.numpy(), truth, rtol=1e-12, atol=1e-12)
    # the rewards are the first type's
    first = dpo_loss(
        pc, pr, rc, rr, config=_single(cfg, cfg.loss_types[0]), chosen_tokens=ct, rejected_tokens=rt
    )
    assert torch.equal(out.chosen_rewards, first.chosen_rewards)
    assert torch.equal(out.rejected_rewards, first.rejected_rewards)

    # gradients, and the fused kernel's per-slice form
    a, b = pc[:7].clone().requires_grad_(True), pr[:7].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x, y: (
            dpo_loss(
                x, y, rc[:7], rr[:7], config=cfg, chosen_tokens=ct[:7], rejected_tokens=rt[:7]
            ).losses
        ),
        (a, b),
        eps=1e-6,
        atol=1e-8,
    )
    pair_loss = make_pair_loss(
        cfg, ref_chosen=rc, ref_rejected=rr, chosen_tokens=ct, rejected_tokens=rt, normalizer=29
    )
    parts = [pair_loss(pc[s], pr[s], s) for s in (slice(0, 10), slice(10, 29))]
    torch.testing.assert_close(sum(parts), out.losses.sum() / 29, rtol=1e-13, atol=1e-13)


def test_a_one_element_list_is_the_plain_loss_type():
    pc, pr, rc, rr, ct, rt = random_batch(11, seed=4)
    for kind in LOSS_TYPES:
        kw = {"label_smoothing": 0.1} if kind == "exo_pair" else {}
        one = dpo_loss(pc, pr, rc, rr, config=LossConfig(loss_type=kind, **kw), chosen_tokens=ct,
                       rejected_tokens=rt)  # fmt: skip
        listed = dpo_loss(pc, pr, rc, rr, config=LossConfig(loss_type=[kind], **kw),
                          chosen_tokens=ct, rejected_tokens=rt)  # fmt: skip
        assert torch.equal(one.losses, listed.losses), kind


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"loss_type": []}, "empty list"),
        ({"loss_type": ["sigmoid", "kto"]}, "loss_type must be one of"),
        ({"loss_type": ["sigmoid", "sigmoid"]}, "names a type twice"),
        ({"loss_type": ["sigmoid", "hinge"], "loss_weights": [1.0]}, "one weight per type"),
        ({"loss_type": ["sigmoid", "hinge"], "loss_weights": [1.0, -0.1]}, "finite numbers >= 0"),
        ({"loss_type": ["sigmoid", "hinge"], "loss_weights": [0.0, 0.0]}, "not all 0"),
        ({"loss_type": "sigmoid", "loss_weights": [1.0, 2.0]}, "one weight per type"),
        ({"loss_type": ["hinge", "ipo"], "label_smoothing": 0.1}, "has no effect"),
        ({"loss_type": ["sigmoid", "exo_pair"]}, "exo_pair' needs label_smoothing > 0"),
        ({"loss_type": ["sigmoid", "hinge"], "discopop_tau": 0.2}, "has no effect"),
    ],
)
def test_combined_loss_config_rejects_invalid_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LossConfig(**kwargs)


@pytest.mark.parametrize(
    "config",
    [
        LossConfig(loss_type="ipo", beta=0.3),
        LossConfig(loss_type="sigmoid_norm", beta=0.1),
        LossConfig(loss_type="sigmoid", beta=0.1, rpo_alpha=0.5),
    ],
    ids=["ipo", "sigmoid_norm", "rpo"],
)
def test_a_completion_of_no_tokens_counts_as_one_as_in_trl(config):
    """A pair whose completion lost every token (truncation, called outside the engine): the
    count is clamped to 1, as TRL does, not a division by zero."""
    pc, pr = torch.tensor([-0.0, -7.5], dtype=torch.float64), torch.tensor([-3.0, -9.0]).double()
    rc, rr = torch.tensor([-0.0, -7.0], dtype=torch.float64), torch.tensor([-2.5, -8.0]).double()
    zero = dpo_loss(pc, pr, rc, rr, config=config, chosen_tokens=torch.tensor([0, 5]),
                    rejected_tokens=torch.tensor([4, 6]))  # fmt: skip
    one = dpo_loss(pc, pr, rc, rr, config=config, chosen_tokens=torch.tensor([1, 5]),
                   rejected_tokens=torch.tensor([4, 6]))  # fmt: skip
    assert torch.isfinite(zero.losses).all()
    torch.testing.assert_close(zero.losses, one.losses, rtol=0, atol=0)


def test_inputs_on_another_device_than_the_policy_are_refused_naming_the_move():
    """Reference values read from a RefLogprobCache come on the CPU; with the policy's log-probs
    on a GPU, torch failed deep inside the loss with its generic device error. Refused naming
    the input and the move (the loss copies nothing itself: a host copy per micro-batch or per
    fused chunk would wait for the GPU's queued work). "meta" stands in for the GPU here."""
    pc, pr, rc, rr, ct, rt = random_batch(3, seed=6)
    meta_pc, meta_pr = pc.to("meta"), pr.to("meta")
    move = r"ref_chosen is on cpu but the policy log-probs are on meta: .*ref_chosen\.to\("
    with pytest.raises(ValueError, match=move + r"policy_chosen\.device\).*RefLogprobCache"):
        dpo_loss(meta_pc, meta_pr, rc, rr.to("meta"), config=LossConfig())
    with pytest.raises(ValueError, match="chosen_tokens is on cpu but the policy log-probs"):
        dpo_loss(meta_pc, meta_pr, rc.to("meta"), rr.to("meta"), config=LossConfig(loss_type="ipo"),
                 chosen_tokens=ct, rejected_tokens=rt.to("meta"))  # fmt: skip
    with pytest.raises(ValueError, match="policy_rejected is on cpu but policy_chosen on meta"):
        dpo_loss(meta_pc, pr, rc, rr, config=LossConfig())
    pair_loss = make_pair_loss(LossConfig(), ref_chosen=rc, ref_rejected=rr)  # the fused path
    with pytest.raises(ValueError, match=move):
        pair_loss(meta_pc[:2], meta_pr[:2], slice(0, 2))


def test_reference_values_in_another_dtype_are_cast_to_the_compute_dtype():
    """The cache's float32 values with bf16 policy log-probs: taken as they are (no copy between
    devices), the loss computed in float32 as with float32 log-probs."""
    pc, pr, rc, rr, _, _ = random_batch(5, seed=7)
    pc16, pr16 = pc.to(torch.bfloat16), pr.to(torch.bfloat16)
    got = dpo_loss(pc16, pr16, rc.float(), rr.float(), config=LossConfig())
    want = dpo_loss(pc16.float(), pr16.float(), rc.float(), rr.float(), config=LossConfig())
    assert got.losses.dtype == torch.float32
    torch.testing.assert_close(got.losses, want.losses, rtol=0, atol=0)
