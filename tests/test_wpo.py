"""WPO (``loss.use_weighting``): each pair's loss times ``w_c * w_r``, a completion's weight the
exponentiated mean over its completion tokens of ``logp_t - log sum_v p_v^2`` under the policy.

Checked: the row kernels' ``lsq`` against float64 truth (PyTorch and Triton-interpreter, odd
sizes, a block tail, masked rows) without changing ``logp`` / ``lse``; the weighted loss and
its gradients through ``linear_pair_loss`` (several chunks, split pairs, LD-DPO weights) and
through the plain op against float64 truth built from the logits, the gradient being the
pair's weight times the unweighted one; a training step's loss on the fused and the plain
path (and with a shared prompt); the option off, bit for bit; TRL's own log-sum-square kernel
and formula, when trl is importable.
"""

import copy
import os

import torch

if not torch.cuda.is_available():  # Triton's mode is fixed at its first import (see kernels/)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from functools import partial  # noqa: E402

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from sdpo.config import load_config  # noqa: E402
from sdpo.engine.checkpoint import load_pretrained  # noqa: E402
from sdpo.engine.data import read_preference_file  # noqa: E402
from sdpo.engine.packing import length_desensitized_weights, pack_pairs  # noqa: E402
from sdpo.engine.scoring import score_pairs  # noqa: E402
from sdpo.engine.tokenize import PairTokenizer, tokenize_pairs  # noqa: E402
from sdpo.engine.trainer import DPOTrainer, TrainConfig, plan_steps  # noqa: E402
from sdpo.kernels import linear_pair_loss, sequence_logprobs  # noqa: E402
from sdpo.kernels.dispatch import triton_available  # noqa: E402
from sdpo.kernels.logprobs import rows_forward  # noqa: E402
from sdpo.losses import LossConfig, dpo_loss, make_pair_loss  # noqa: E402
from tests.conftest import write_pairs, write_two_source_run  # noqa: E402

IMPLS = [
    "torch",
    pytest.param("triton", marks=pytest.mark.skipif(not triton_available(), reason="no triton")),
]
BETA = 0.1
RPO = 0.3
# (completion tokens, prompt tokens) per sequence; chosen, rejected of each pair in turn
SEQS = (
    (9, 3),
    (4, 3),
    (3, 2),
    (11, 2),
    (6, 0),
    (6, 0),
    (1, 4),
    (7, 4),
    (5, 1),
    (1, 1),
    (13, 2),
    (8, 2),
)


def _inputs(seed, *, vocab=211, hidden=37):
    """Packed fp64 hidden rows and head weight, labels (-100 on prompt rows), seq ids."""
    gen = torch.Generator().manual_seed(seed)
    labels, seq_ids = [], []
    for s, (comp, prompt) in enumerate(SEQS):
        lab = torch.randint(0, vocab, (prompt + comp,), generator=gen)
        lab[:prompt] = -100
        labels.append(lab)
        seq_ids.append(torch.full((prompt + comp,), s))
    labels, seq_ids = torch.cat(labels), torch.cat(seq_ids)
    h64 = torch.randn(labels.shape[0], hidden, generator=gen, dtype=torch.float64)
    w64 = torch.randn(vocab, hidden, generator=gen, dtype=torch.float64) * (4.0 / hidden**0.5)
    ref = torch.randn(len(SEQS), generator=gen, dtype=torch.float64) * 3 - 20
    return h64, w64, labels, seq_ids, ref


def _tokens():
    return torch.tensor([c for c, _ in SEQS])


def _truth(h, w, labels, seq_ids, ref, *, weighting=True, token_weights=None):
    """float64 summed loss (sigmoid + RPO) from the full logits, WPO weights detached."""
    logits = h @ w.t()
    logp = torch.log_softmax(logits, -1)
    valid = labels != -100
    token = torch.where(valid, logp.gather(1, labels.clamp(min=0)[:, None])[:, 0], 0.0)
    s = len(SEQS)
    tw = token if token_weights is None else token * token_weights.double()
    seq = torch.zeros(s, dtype=h.dtype).index_add(0, seq_ids, tw)
    z = (seq[0::2] - ref[0::2]) - (seq[1::2] - ref[1::2])
    tokens = _tokens().double()
    losses = -F.logsigmoid(BETA * z) + RPO * (-seq[0::2] / tokens[0::2])
    with torch.no_grad():
        p = torch.softmax(logits.detach(), -1)
        lsq = torch.log((p**2).sum(-1))
        aligned = torch.zeros(s, dtype=h.dtype).index_add(
            0, seq_ids, torch.where(valid, token.detach() - lsq, 0.0)
        )
        weights = torch.exp(aligned / tokens.clamp(min=1))
        pair_w = weights[0::2] * weights[1::2]
    if weighting:
        losses = losses * pair_w
    return losses.sum(), pair_w, aligned


def _config(weighting=True):
    return LossConfig(beta=BETA, rpo_alpha=RPO, use_weighting=weighting)


def _loss_kwargs(ref):
    tok = _tokens()
    return dict(
        ref_chosen=ref[0::2].float(),
        ref_rejected=ref[1::2].float(),
        chosen_tokens=tok[0::2],
        rejected_tokens=tok[1::2],
    )


def _weighted_loss(seq, aligned, ref):
    """dpo_loss (``_config()``, WPO on) of packed sums ``seq`` (chosen, rejected, ...) with
    WPO's sums ``aligned`` against the reference values ``ref``."""
    kw = _loss_kwargs(ref)
    return dpo_loss(
        seq[0::2],
        seq[1::2],
        kw.pop("ref_chosen"),
        kw.pop("ref_rejected"),
        config=_config(),
        **kw,
        chosen_aligned=aligned[0::2],
        rejected_aligned=aligned[1::2],
    )


def _grads(fn, h, w):
    h = h.detach().clone().requires_grad_(True)
    w = w.detach().clone().requires_grad_(True)
    value, *extra = fn(h, w)
    value.backward()
    return value.detach(), h.grad, w.grad, extra


# -- the row kernels ------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
def test_row_lsq_matches_float64_truth_and_leaves_logp_and_lse_alone(impl):
    gen = torch.Generator().manual_seed(7)
    n, vocab = 131, 50_257  # not a multiple of any block: a tail block in every row
    logits = torch.randn(n, vocab, generator=gen) * 4.0
    logits[5, 1000] = 40.0  # one row nearly one-hot: lsq close to 0
    logits[0] *= 1e-3  # one nearly uniform: lsq close to -log V
    labels = torch.randint(0, vocab, (n,), generator=gen)
    labels[::7] = -100
    logp, lse, lsq = rows_forward(logits, labels, impl=impl, with_lsq=True)
    p = torch.softmax(logits.double(), -1)
    want = torch.log((p**2).sum(-1))
    torch.testing.assert_close(lsq.double(), want, rtol=0, atol=2e-5)
    assert abs(float(lsq[5])) < 1e-3 and float(lsq[0]) < -10.8  # both ends of the range
    # the extra accumulator leaves the pass's other outputs bit for bit
    logp0, lse0 = rows_forward(logits, labels, impl=impl)
    assert torch.equal(logp, logp0) and torch.equal(lse, lse0)


# -- the ops: fused pair loss and plain sums -------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("layout", ["chunks", "split_ld"])
def test_fused_weighted_loss_and_gradients_match_float64_truth(impl, layout):
    h64, w64, labels, seq_ids, ref = _inputs(1)
    tw = None
    chunking = dict(chunk_tokens=40)
    if layout == "split_ld":  # pairs over the cap run keep-the-tail; LD weights on the sums
        tw = length_desensitized_weights(_tokens(), 0.4)
        # head rows of the LD weights: prompt rows get weight 1 (their log-probs are 0)
        full = torch.ones(labels.shape[0])
        full[labels != -100] = tw
        tw = full
        chunking = dict(chunk_tokens=40, max_chunk_tokens=9)

    def fused(weighting):
        def fn(h, w):
            return linear_pair_loss(
                h,
                w,
                labels,
                seq_ids,
                len(SEQS),
                pair_loss=make_pair_loss(_config(weighting), **_loss_kwargs(ref)),
                impl=impl,
                token_weights=tw,
                with_aligned=weighting,
                **chunking,
            )

        return fn

    loss, gh, gw, (_, aligned) = _grads(fused(True), h64.float(), w64.float())
    t_loss, t_gh, t_gw, (pair_w, t_aligned) = _grads(
        lambda h, w: _truth(h, w, labels, seq_ids, ref, token_weights=tw), h64, w64
    )
    assert (pair_w.max() / pair_w.min()) > 3  # the weights differ between pairs
    torch.testing.assert_close(aligned.double(), t_aligned, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(loss.double(), t_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gh.double(), t_gh, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gw.double(), t_gw, rtol=1e-4, atol=1e-6)
    # weights are constants: each token's gradient is its pair's weight times the unweighted one
    _, gh0, _, _ = _grads(fused(False), h64.float(), w64.float())
    row_w = pair_w.float()[seq_ids // 2]
    torch.testing.assert_close(gh, gh0 * row_w[:, None], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("impl", IMPLS)
def test_plain_op_weighted_loss_and_gradients_match_float64_truth(impl):
    h64, w64, labels, seq_ids, ref = _inputs(2)

    def plain(h, w):
        seq, aligned = sequence_logprobs(
            h, w, labels, seq_ids, len(SEQS), impl=impl, chunk_tokens=17, return_aligned=True
        )
        assert not aligned.requires_grad
        return _weighted_loss(seq, aligned, ref).losses.sum(), seq

    loss, gh, gw, (seq,) = _grads(plain, h64.float(), w64.float())
    t_loss, t_gh, t_gw, _ = _grads(lambda h, w: _truth(h, w, labels, seq_ids, ref)[:1], h64, w64)
    torch.testing.assert_close(loss.double(), t_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gh.double(), t_gh, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gw.double(), t_gw, rtol=1e-4, atol=1e-6)
    # the sums are the op's usual ones, bit for bit
    assert torch.equal(
        seq,
        sequence_logprobs(
            h64.float(), w64.float(), labels, seq_ids, len(SEQS), impl=impl, chunk_tokens=17
        ),
    )


def test_option_off_is_bit_for_bit_the_unweighted_computation():
    h64, w64, labels, seq_ids, ref = _inputs(3)
    h, w = h64.float(), w64.float()
    pair_loss = make_pair_loss(_config(False), **_loss_kwargs(ref))

    def run(with_aligned):
        return _grads(
            lambda h, w: linear_pair_loss(
                h,
                w,
                labels,
                seq_ids,
                len(SEQS),
                pair_loss=pair_loss,
                impl="torch",
                chunk_tokens=40,
                max_chunk_tokens=9,
                with_aligned=with_aligned,
            ),
            h,
            w,
        )

    (l0, gh0, gw0, (s0,)), (l1, gh1, gw1, (s1, aligned)) = run(False), run(True)
    assert torch.equal(l0, l1) and torch.equal(gh0, gh1) and torch.equal(gw0, gw1)
    assert torch.equal(s0, s1) and aligned.abs().min() > 0
    # off, dpo_loss ignores the sums; on, it needs them
    kw = _loss_kwargs(ref)
    args = (s0[0::2], s0[1::2], kw.pop("ref_chosen"), kw.pop("ref_rejected"))
    off = dpo_loss(*args, config=_config(False), **kw)
    also = dpo_loss(
        *args,
        config=_config(False),
        **kw,
        chosen_aligned=aligned[0::2],
        rejected_aligned=aligned[1::2],
    )
    assert torch.equal(off.losses, also.losses) and off.pair_weights is None
    with pytest.raises(ValueError, match="chosen_aligned is missing: use_weighting"):
        dpo_loss(*args, config=_config(True), **kw)


def test_use_weighting_must_be_a_bool_and_reads_from_a_run_config(tmp_path):
    with pytest.raises(ValueError, match="use_weighting must be true or false"):
        LossConfig(use_weighting="yes")
    base = write_two_source_run(tmp_path)
    assert not load_config(base).loss.use_weighting
    assert load_config(base, overrides=["loss.use_weighting=true"]).loss.use_weighting


# -- a training step -----------------------------------------------------------------------


@pytest.fixture
def tiny_pairs(tiny_model_dir, tmp_path):
    tok = PairTokenizer.from_dir(tiny_model_dir)
    rows = read_preference_file(str(write_pairs(tmp_path / "d.jsonl", n=8, seed=5)), source="s")
    pairs, _ = tokenize_pairs(rows, tok, max_length=32, max_prompt_length=16)
    return pairs


def _step(model_dir, pairs, ref, *, weighting, **train):
    config = TrainConfig(
        learning_rate=1e-2, pairs_per_step=8, max_tokens_per_batch=160, warmup_ratio=0.0, **train
    )
    model = load_pretrained(model_dir)
    trainer = DPOTrainer(
        model,
        config=config,
        loss_fn=partial(dpo_loss, config=LossConfig(beta=BETA, use_weighting=weighting)),
        kernels_impl="torch",
        progress=False,
    )
    step = plan_steps(pairs, config, epoch=0)[0]
    metrics = trainer.train_step(pairs, step, ref)
    return {k: float(v) for k, v in metrics.items()}, model.state_dict()


def test_a_weighted_step_has_the_same_loss_on_the_fused_and_plain_paths(
    tiny_model_dir, tiny_pairs, one_thread
):
    ref = score_pairs(load_pretrained(tiny_model_dir), tiny_pairs, max_tokens_per_batch=1024)
    fused, _ = _step(tiny_model_dir, tiny_pairs, ref, weighting=True)
    plain, _ = _step(tiny_model_dir, tiny_pairs, ref, weighting=True, loss_path="plain")
    shared, _ = _step(tiny_model_dir, tiny_pairs, ref, weighting=True, share_prompt=True)
    unweighted, _ = _step(tiny_model_dir, tiny_pairs, ref, weighting=False)
    assert fused["loss"] == pytest.approx(plain["loss"], rel=1e-5)
    assert fused["loss"] == pytest.approx(shared["loss"], rel=1e-4)
    # the first step's logits are 0: each pair's loss is log 2, times its weight with WPO (the
    # tiny model's distributions are nearly uniform: weights near 1, p_label ~ sum p^2)
    assert unweighted["loss"] == pytest.approx(0.6931472, rel=1e-6)
    assert abs(fused["loss"] - unweighted["loss"]) > 1e-3
    assert fused["rewards/margins"] == unweighted["rewards/margins"]  # rewards unweighted


def test_option_off_trains_bit_for_bit_like_a_loss_without_the_option(
    tiny_model_dir, tiny_pairs, one_thread
):
    ref = score_pairs(load_pretrained(tiny_model_dir), tiny_pairs, max_tokens_per_batch=1024)
    config = TrainConfig(
        learning_rate=1e-2, pairs_per_step=8, max_tokens_per_batch=160, warmup_ratio=0.0
    )
    runs = []
    for loss_fn in (
        partial(dpo_loss, config=LossConfig(beta=BETA, use_weighting=False)),
        lambda *a, **k: dpo_loss(*a, config=LossConfig(beta=BETA), **k),  # no config to read
    ):
        model = load_pretrained(tiny_model_dir)
        trainer = DPOTrainer(
            model, config=config, loss_fn=loss_fn, kernels_impl="torch", progress=False
        )
        metrics = trainer.train_step(tiny_pairs, plan_steps(tiny_pairs, config, epoch=0)[0], ref)
        runs.append((metrics, model.state_dict()))
    (m0, s0), (m1, s1) = runs
    assert all(torch.equal(m0[k], m1[k]) for k in m0)
    assert all(torch.equal(s0[k], s1[k]) for k in s0)


# -- TRL -----------------------------------------------------------------------------------


def test_trl_formula_on_the_same_tokens_gives_the_same_weights():
    chunked = pytest.importorskip("trl.kernels.chunked_logprob")
    h64, w64, labels, seq_ids, ref = _inputs(4)
    h, w = h64.float(), w64.float()
    _, _, aligned = linear_pair_loss(
        h,
        w,
        labels,
        seq_ids,
        len(SEQS),
        pair_loss=make_pair_loss(_config(), **_loss_kwargs(ref)),
        impl="torch",
        chunk_tokens=40,
        with_aligned=True,
    )
    ours = _weighted_loss(torch.zeros(len(SEQS)), aligned, ref).pair_weights
    # TRL: its kernel's per-token log-probs and log_sum_sq_probs, padded [chosen..., rejected...]
    logps, _, lsq, _, _ = chunked.ChunkedLogProbFunction.apply(
        h, w, None, labels.clamp(min=0), 1.0, 64, None, 1.0, ("log_sum_sq_probs",)
    )
    width = max(c + p for c, p in SEQS)
    per_token = torch.zeros(len(SEQS), width)
    lsq_pad = torch.zeros(len(SEQS), width)
    mask = torch.zeros(len(SEQS), width)
    for s in range(len(SEQS)):
        rows = (seq_ids == s).nonzero()[:, 0]
        per_token[s, : len(rows)] = logps[rows]
        lsq_pad[s, : len(rows)] = lsq[rows]
        mask[s, : len(rows)] = (labels[rows] != -100).float()
    order = torch.cat([torch.arange(0, len(SEQS), 2), torch.arange(1, len(SEQS), 2)])
    per_token, lsq_pad, mask = per_token[order], lsq_pad[order], mask[order]
    # dpo_trainer.py, use_weighting
    lengths = mask.sum(dim=1).clamp_min(1)
    weights = torch.exp(((per_token - lsq_pad) * mask).sum(dim=1) / lengths)
    chosen_w, rejected_w = weights.chunk(2, dim=0)
    torch.testing.assert_close(ours, chosen_w * rejected_w, rtol=1e-5, atol=0)


def test_weights_of_very_unlikely_completions_underflow_to_zero_not_nan():
    """WPO's weight exp(aligned / tokens) of a completion far less likely than the policy's
    own next-token distributions (a mean of -200 per token and below) underflows in fp32: its
    pair weighs 0 (one side's underflow is enough) and adds nothing to the loss or the
    gradients, finite, where float64's weight is ~1e-87 or less; the pair of ordinary weights
    beside it keeps float64's loss and gradients."""
    cfg = LossConfig(beta=BETA, use_weighting=True)
    tokens = torch.tensor([10, 3, 9])
    values = {
        "pc": [-3000.0, -12.0, -8.0],
        "pr": [-12.0, -3000.0, -9.5],
        "ref_c": [-20.0, -20.0, -9.0],
        "ref_r": [-20.0, -20.0, -9.0],
        "aligned_c": [-2400.0, -6.0, -2.0],
        "aligned_r": [-9.0, -2600.0, -4.0],
    }
    results = {}
    for dtype in (torch.float64, torch.float32):
        t = {k: torch.tensor(v, dtype=dtype) for k, v in values.items()}
        pc, pr = t["pc"].requires_grad_(True), t["pr"].requires_grad_(True)
        out = dpo_loss(
            pc, pr, t["ref_c"], t["ref_r"], config=cfg, chosen_tokens=tokens,
            rejected_tokens=tokens, chosen_aligned=t["aligned_c"], rejected_aligned=t["aligned_r"],
        )  # fmt: skip
        out.losses.sum().backward()
        results[dtype] = (out.losses, out.pair_weights, pc.grad, pr.grad)
        for x in results[dtype]:
            assert torch.isfinite(x).all(), x
    assert results[torch.float32][1][:2].tolist() == [0.0, 0.0]
    assert 0 < results[torch.float64][1][:2].max().item() < 1e-80
    for ours, want in zip(results[torch.float32], results[torch.float64], strict=True):
        torch.testing.assert_close(ours.detach().double(), want.detach(), rtol=1e-6, atol=1e-30)


# -- a run -------------------------------------------------------------------------------


def _float64_sums(model, pairs):
    """Each completion's summed log-prob and WPO sum of ``token_logp - log sum_v p_v^2``, from
    the model run pair by pair in float64 with full logits (no kernel, no packing of pairs)."""
    model = copy.deepcopy(model).double()
    sums = torch.zeros(4, len(pairs), dtype=torch.float64)  # chosen, rejected, aligned c / r
    with torch.no_grad():
        for i, pair in enumerate(pairs):
            batch = pack_pairs([pair])
            hidden = model(batch.input_ids, batch.position_ids, batch.cu_seqlens, batch.max_seqlen)
            logp = torch.log_softmax(hidden @ model.lm_head_weight.T, dim=-1)
            scored = batch.labels != -100
            token = logp[scored].gather(1, batch.labels[scored, None])[:, 0]
            lsq = torch.logsumexp(2 * logp[scored], dim=-1)
            for s in range(2):
                mine = batch.seq_ids[scored] == s
                sums[s, i] = token[mine].sum()
                sums[2 + s, i] = (token[mine] - lsq[mine]).sum()
    return sums


@pytest.mark.parametrize("share_prompt", [False, True])
def test_the_scoring_pass_forms_wpo_sums_as_float64_truth(
    tiny_model_dir, tiny_pairs, one_thread, share_prompt
):
    model = load_pretrained(tiny_model_dir)
    scores = score_pairs(
        model, tiny_pairs, max_tokens_per_batch=90, share_prompt=share_prompt, return_aligned=True
    )
    truth = _float64_sums(model, tiny_pairs)
    got = (
        scores.chosen_logps,
        scores.rejected_logps,
        scores.chosen_aligned,
        scores.rejected_aligned,
    )
    for k, column in enumerate(got):
        torch.testing.assert_close(column.double(), truth[k], rtol=1e-5, atol=1e-5)
    plain = score_pairs(model, tiny_pairs, max_tokens_per_batch=90, share_prompt=share_prompt)
    assert plain.chosen_aligned is None and torch.equal(plain.chosen_logps, scores.chosen_logps)


def test_a_weighted_run_evaluates_with_the_weighted_loss(tiny_model_dir, tmp_path, one_thread):
    """eval/loss is TRL's evaluate() loss under WPO: each held-out pair's loss against the
    initial model times the weights of the step's model, formed in the same scoring pass;
    checked against float64 sums of the saved step-1 model."""
    import json
    from pathlib import Path

    from safetensors.torch import load_file

    from sdpo.config import config_from_dict
    from sdpo.runner import run_training
    from tests.conftest import two_source_config

    held = write_pairs(tmp_path / "held.jsonl", n=6, seed=13)
    d = two_source_config(tmp_path, tiny_model_dir, loss={"use_weighting": True, "beta": BETA})
    d["data"]["eval_sources"] = [{"name": "held", "path": str(held)}]
    cfg = config_from_dict(d)
    run_training(cfg, progress=False)
    out = Path(cfg.output_dir)
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    logged = next(m for m in metrics if "eval/loss" in m and m["sdpo_step"] == 1)
    assert any(m.get("loss") for m in metrics)  # the weighted training ran

    tok = PairTokenizer.from_dir(tiny_model_dir)
    rows = read_preference_file(str(held), source="held")
    pairs, _ = tokenize_pairs(rows, tok, max_length=32, max_prompt_length=16)
    sums = _float64_sums(load_pretrained(out / "step-1"), pairs)
    initial = load_file(str(out / "cache" / "eval-initial.safetensors"))
    order = initial["pair_indices"].argsort()
    kwargs = {
        "chosen_tokens": torch.tensor([len(p.chosen_ids) for p in pairs], dtype=torch.float64),
        "rejected_tokens": torch.tensor([len(p.rejected_ids) for p in pairs], dtype=torch.float64),
    }
    ref = initial["chosen_logps"][order].double(), initial["rejected_logps"][order].double()
    weighted, unweighted = (
        dpo_loss(
            sums[0],
            sums[1],
            *ref,
            config=LossConfig(beta=BETA, use_weighting=weighting),
            chosen_aligned=sums[2],
            rejected_aligned=sums[3],
            **kwargs,
        )
        for weighting in (True, False)
    )
    assert logged["eval/loss"] == pytest.approx(float(weighted.losses.mean()), abs=1e-5)
    assert abs(float(weighted.losses.mean()) - float(unweighted.losses.mean())) > 1e-3
    margins = weighted.chosen_rewards - weighted.rejected_rewards
    assert logged["eval/rewards/margins"] == pytest.approx(float(margins.mean()), abs=1e-5)


def test_step_benchmark_times_a_weighted_step(one_thread, tmp_path):
    """``throughput.py step --use-weighting`` (its GPU cost is measured beside the plain step):
    the same pairs, a different loss (WPO's weights), both finite."""
    import json
    import math

    from tests.test_speed_paths import load_throughput

    throughput = load_throughput()
    losses = {}
    for weighting in (False, True):
        out = tmp_path / f"step-{weighting}.json"
        flags = ["--use-weighting"] if weighting else []
        common = ["--warmup-steps", "0", "--steps", "1", "--profile-steps", "0"]
        throughput.main(["step", "--smoke", *common, *flags, "--json", str(out)])
        payload = json.loads(out.read_text())
        assert payload["use_weighting"] is weighting
        train = next(r for r in payload["results"] if r["variant"] == "sdpo train step")
        losses[weighting] = train["losses"]
    assert all(math.isfinite(v) for v in losses[True] + losses[False])
    assert losses[True] != losses[False]
