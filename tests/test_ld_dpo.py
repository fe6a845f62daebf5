"""LD-DPO (``loss.ld_alpha``): each completion's summed log-prob is (its first ``public``
tokens) + ld_alpha * (the rest), public = min(chosen, rejected) completion tokens of the pair.

Checked against float64 truth built directly from per-token log-probs (full float64 logits),
for the value and the gradients of the hidden states and the lm_head weight, on the fused and
plain ops, with the PyTorch and the Triton-interpreter row kernels; the scoring pass against
the training forward; ld_alpha = 1 against the plain path bit for bit; the cache key and the
config errors.
"""

import os

import torch

if not torch.cuda.is_available():  # Triton's mode is fixed at its first import (see kernels/)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import dataclasses  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
from functools import partial  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors import safe_open  # noqa: E402

from sdpo.config import RunConfig, config_from_dict, load_config  # noqa: E402
from sdpo.engine.checkpoint import load_pretrained  # noqa: E402
from sdpo.engine.data import read_preference_file  # noqa: E402
from sdpo.engine.packing import (  # noqa: E402
    TokenizedPair,
    head_rows,
    length_desensitized_weights,
    pack_pairs,
    pack_pairs_shared,
)
from sdpo.engine.scoring import score_pairs  # noqa: E402
from sdpo.engine.tokenize import PairTokenizer, tokenize_pairs  # noqa: E402
from sdpo.engine.trainer import DPOTrainer, TrainConfig, plan_steps  # noqa: E402
from sdpo.kernels import linear_pair_loss, sequence_logprobs  # noqa: E402
from sdpo.losses import LossConfig, dpo_loss, make_pair_loss  # noqa: E402
from sdpo.runner import StepwiseRunner, run_training  # noqa: E402
from tests.conftest import (  # noqa: E402
    assert_no_worse,
    two_source_config,
    write_pairs,
    write_two_source_run,
)

BETA = 0.1
ALPHA = 0.37
# completion tokens per sequence, (chosen, rejected) per pair: longer chosen, longer rejected,
# equal lengths, one-token completions on either side and on both
COUNTS = (9, 4, 3, 11, 6, 6, 1, 7, 5, 1, 1, 1, 13, 8)


def _truth_seq_logps(h, w, labels, counts, alpha):
    """(S,) LD sums from the per-token log-probs of the full logits, in h's dtype (no weight
    vector: each completion's first public tokens and the rest summed apart)."""
    logp = torch.log_softmax(h @ w.t() if h.dtype == torch.float64 else (h @ w.t()).float(), -1)
    token = logp.gather(1, labels.unsqueeze(1)).squeeze(1)  # (M,)
    out, start = [], 0
    for s, c in enumerate(counts):
        public = min(counts[s - s % 2], counts[s - s % 2 + 1])
        part = token[start : start + c]
        out.append(part[:public].sum() + alpha * part[public:].sum())
        start += c
    return torch.stack(out)


def _inputs(seed, *, vocab=211, hidden=37):
    gen = torch.Generator().manual_seed(seed)
    m = sum(COUNTS)
    h64 = torch.randn(m, hidden, generator=gen, dtype=torch.float64)
    w64 = torch.randn(vocab, hidden, generator=gen, dtype=torch.float64) * (2.0 / hidden**0.5)
    labels = torch.randint(0, vocab, (m,), generator=gen)
    seq_ids = torch.repeat_interleave(torch.arange(len(COUNTS)), torch.tensor(COUNTS))
    ref = torch.randn(len(COUNTS), generator=gen, dtype=torch.float64) * 3 - 20
    return h64, w64, labels, seq_ids, ref


def _dpo(seq, ref):
    z = (seq[0::2] - ref[0::2].to(seq.dtype)) - (seq[1::2] - ref[1::2].to(seq.dtype))
    return -F.logsigmoid(BETA * z).sum()


def _grads(fn, h, w):
    h = h.detach().clone().requires_grad_(True)
    w = w.detach().clone().requires_grad_(True)
    value = fn(h, w)
    value.backward()
    return value.detach(), h.grad, w.grad


def test_weights_mark_each_completions_tokens_past_its_pairs_shorter_length():
    weights = length_desensitized_weights(torch.tensor([3, 5, 2, 2, 1, 4, 4, 2]), 0.25)
    a = 0.25
    expected = [1, 1, 1] + [1, 1, 1, a, a] + [1, 1] + [1, 1] + [1] + [1, a, a, a]
    expected += [1, 1, a, a] + [1, 1]
    assert weights.dtype == torch.float32
    assert weights.tolist() == expected


def test_shared_and_unshared_head_rows_get_the_same_weights():
    gen = torch.Generator().manual_seed(11)
    pairs = [
        TokenizedPair(
            index=i,
            prompt_ids=torch.randint(0, 50, (p,), generator=gen).tolist(),
            chosen_ids=torch.randint(0, 50, (c,), generator=gen).tolist(),
            rejected_ids=torch.randint(0, 50, (r,), generator=gen).tolist(),
        )
        for i, (p, c, r) in enumerate([(3, 5, 2), (1, 1, 4), (6, 3, 3), (2, 7, 1)])
    ]
    plain = head_rows(pack_pairs(pairs), ld_alpha=ALPHA)
    shared = head_rows(pack_pairs_shared(pairs), ld_alpha=ALPHA)
    assert torch.equal(plain.labels, shared.labels)
    assert torch.equal(plain.token_weights, shared.token_weights)
    assert int((plain.token_weights != 1).sum()) == (5 - 2) + (4 - 1) + (7 - 1)
    for alpha in (None, 1, 1.0):
        assert head_rows(pack_pairs(pairs), ld_alpha=alpha).token_weights is None


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_sequence_logprobs_with_ld_weights_match_float64_truth(impl):
    h64, w64, labels, seq_ids, _ = _inputs(1)
    weights = length_desensitized_weights(torch.tensor(COUNTS), ALPHA)
    coeff = torch.linspace(-1.0, 2.0, len(COUNTS), dtype=torch.float64)
    h, w = h64.float(), w64.float()

    def ours(h, w):
        seq = sequence_logprobs(
            h, w, labels, seq_ids, len(COUNTS), impl=impl, chunk_tokens=17, token_weights=weights
        )
        return (seq * coeff.float()).sum()

    def direct(h, w):
        return (_truth_seq_logps(h, w, labels, COUNTS, ALPHA) * coeff.to(h.dtype)).sum()

    truth, base = _grads(direct, h64, w64), _grads(direct, h, w)
    for name, o, t, b in zip(
        ("value", "grad_hidden", "grad_weight"), _grads(ours, h, w), truth, base
    ):
        assert_no_worse(name, o, b, t, rel_margin=2e-6)
    with torch.no_grad():  # the scoring pass: the same sums
        seq = sequence_logprobs(
            h, w, labels, seq_ids, len(COUNTS), impl=impl, token_weights=weights
        )
    assert_no_worse(
        "seq_logps",
        seq,
        _truth_seq_logps(h, w, labels, COUNTS, ALPHA),
        _truth_seq_logps(h64, w64, labels, COUNTS, ALPHA),
        rel_margin=2e-6,
    )
    plain = sequence_logprobs(h, w, labels, seq_ids, len(COUNTS), impl=impl)
    assert (seq - plain).abs().max() > 1.0  # the weights change the numbers


@pytest.mark.parametrize(
    "impl, chunk_tokens, max_chunk_tokens",
    [("torch", 23, None), ("torch", 64, 10), ("triton", 40, 12)],
)
def test_fused_pair_loss_with_ld_weights_matches_float64_truth(
    impl, chunk_tokens, max_chunk_tokens
):
    """Chunks of whole pairs, and long pairs split keep-the-tail (max_chunk_tokens)."""
    h64, w64, labels, seq_ids, ref = _inputs(2)
    weights = length_desensitized_weights(torch.tensor(COUNTS), ALPHA)
    h, w = h64.float(), w64.float()
    seen = {}

    def ours(h, w):
        def pair_loss(chosen, rejected, pairs):
            z = (chosen - ref[0::2][pairs].float()) - (rejected - ref[1::2][pairs].float())
            return -F.logsigmoid(BETA * z).sum()

        loss, seen["seq"] = linear_pair_loss(
            h,
            w,
            labels,
            seq_ids,
            len(COUNTS),
            pair_loss=pair_loss,
            impl=impl,
            chunk_tokens=chunk_tokens,
            max_chunk_tokens=max_chunk_tokens,
            token_weights=weights,
        )
        return loss

    def direct(h, w):
        return _dpo(_truth_seq_logps(h, w, labels, COUNTS, ALPHA), ref)

    truth, base = _grads(direct, h64, w64), _grads(direct, h, w)
    for name, o, t, b in zip(
        ("value", "grad_hidden", "grad_weight"), _grads(ours, h, w), truth, base
    ):
        assert_no_worse(name, o, b, t, rel_margin=2e-6)
    assert_no_worse(
        "seq_logps",
        seen["seq"],
        _truth_seq_logps(h, w, labels, COUNTS, ALPHA),
        _truth_seq_logps(h64, w64, labels, COUNTS, ALPHA),
        rel_margin=2e-6,
    )


def _raw_seq_logps(h, w, labels, counts):
    """(S,) unweighted sums (ld_alpha 1) in h's dtype."""
    return _truth_seq_logps(h, w, labels, counts, 1.0)


RAW_LOSSES = {
    # TRL 1.16's RPO: DPO on the LD sums plus alpha times sft on the raw token log-probs
    "sft": LossConfig(beta=BETA, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5]),
    # the per-pair RPO term reads the raw sum too
    "rpo_alpha": LossConfig(beta=BETA, rpo_alpha=0.7),
}


@pytest.mark.parametrize("loss_name", list(RAW_LOSSES))
@pytest.mark.parametrize(
    "impl, chunk_tokens, max_chunk_tokens",
    [("torch", 23, None), ("torch", 64, 10), ("triton", 40, 12)],
)
def test_chosen_nll_terms_read_the_raw_sums_beside_the_ld_sums(
    impl, chunk_tokens, max_chunk_tokens, loss_name
):
    """With LD-DPO, sft and rpo_alpha read each chosen completion's raw sum and the DPO term the
    LD sum, both from one pass: loss and gradients against float64 autograd through both sums,
    in chunks of whole pairs and in pairs split keep-the-tail."""
    config = dataclasses.replace(RAW_LOSSES[loss_name], ld_alpha=ALPHA)
    assert config.needs_raw_logps
    h64, w64, labels, seq_ids, ref = _inputs(6)
    weights = length_desensitized_weights(torch.tensor(COUNTS), ALPHA)
    tokens = torch.tensor(COUNTS, dtype=torch.float64)
    h, w = h64.float(), w64.float()
    seen = {}

    def ours(h, w):
        pair_loss = make_pair_loss(
            config,
            ref_chosen=ref[0::2].float(),
            ref_rejected=ref[1::2].float(),
            chosen_tokens=tokens[0::2].float(),
            rejected_tokens=tokens[1::2].float(),
        )
        loss, seen["seq"], seen["raw"] = linear_pair_loss(
            h,
            w,
            labels,
            seq_ids,
            len(COUNTS),
            pair_loss=pair_loss,
            impl=impl,
            chunk_tokens=chunk_tokens,
            max_chunk_tokens=max_chunk_tokens,
            token_weights=weights,
            with_raw=True,
        )
        return loss

    def direct(h, w):
        seq = _truth_seq_logps(h, w, labels, COUNTS, ALPHA)
        raw = _raw_seq_logps(h, w, labels, COUNTS)
        out = dpo_loss(
            seq[0::2],
            seq[1::2],
            ref[0::2].to(seq.dtype),
            ref[1::2].to(seq.dtype),
            config=config,
            chosen_tokens=tokens[0::2].to(seq.dtype),
            rejected_tokens=tokens[1::2].to(seq.dtype),
            chosen_raw=raw[0::2],
        )
        return out.losses.sum()

    truth, base = _grads(direct, h64, w64), _grads(direct, h, w)
    for name, o, t, b in zip(
        ("value", "grad_hidden", "grad_weight"), _grads(ours, h, w), truth, base
    ):
        assert_no_worse(name, o, b, t, rel_margin=2e-6)
    for name, got, fn in (
        ("seq_logps", seen["seq"], lambda h, w: _truth_seq_logps(h, w, labels, COUNTS, ALPHA)),
        ("raw", seen["raw"], lambda h, w: _raw_seq_logps(h, w, labels, COUNTS)),
    ):
        assert_no_worse(name, got, fn(h, w), fn(h64, w64), rel_margin=2e-6)
    # reading the LD sums instead would give other numbers: the test can fail
    ld_only = _grads(
        lambda h, w: dpo_loss(
            *(_truth_seq_logps(h, w, labels, COUNTS, ALPHA)[k::2] for k in (0, 1)),
            ref[0::2],
            ref[1::2],
            config=dataclasses.replace(config, ld_alpha=None),
            chosen_tokens=tokens[0::2],
            rejected_tokens=tokens[1::2],
        ).losses.sum(),
        h64,
        w64,
    )
    assert abs(float(ld_only[0] - truth[0])) > 1e-3


def test_dpo_loss_asks_for_the_raw_sums_when_a_chosen_nll_term_meets_ld_alpha():
    config = dataclasses.replace(RAW_LOSSES["rpo_alpha"], ld_alpha=ALPHA)
    one = torch.zeros(3)
    kwargs = {"config": config, "chosen_tokens": one + 2, "rejected_tokens": one + 3}
    with pytest.raises(ValueError, match="chosen_raw is missing"):
        dpo_loss(one, one, one, one, **kwargs)
    out = dpo_loss(one, one, one, one, chosen_raw=torch.tensor([-2.0, -4.0, -6.0]), **kwargs)
    # log 2 of the DPO term, plus 0.7 x the mean token NLL of the raw sums over 2 tokens
    expected = math.log(2.0) + 0.7 * torch.tensor([1.0, 2.0, 3.0])
    torch.testing.assert_close(out.losses, expected)
    assert not dataclasses.replace(config, ld_alpha=1.0).needs_raw_logps  # plain DPO sums


def test_all_ones_weights_give_the_unweighted_ops_bit_for_bit():
    h64, w64, labels, seq_ids, ref = _inputs(3)
    h, w = h64.float(), w64.float()
    ones = torch.ones(h.shape[0])
    args = (labels, seq_ids, len(COUNTS))

    def fused(weights):
        def run(h, w):
            def pair_loss(chosen, rejected, pairs):
                z = (chosen - ref[0::2][pairs].float()) - (rejected - ref[1::2][pairs].float())
                return -F.logsigmoid(BETA * z).sum()

            loss, _ = linear_pair_loss(
                h, w, *args, pair_loss=pair_loss, chunk_tokens=30, token_weights=weights
            )
            return loss

        return run

    def plain(weights):
        return lambda h, w: _dpo(sequence_logprobs(h, w, *args, token_weights=weights), ref)

    for make in (fused, plain):
        for a, b in zip(_grads(make(None), h, w), _grads(make(ones), h, w)):
            assert torch.equal(a, b)


def test_weighted_custom_ops_pass_opcheck_and_compile_without_a_graph_break():
    """torch.compile sees the weights as an ordinary (optional) tensor input of the ops."""
    h64, w64, labels, seq_ids, ref = _inputs(5)
    h = h64.float().requires_grad_(True)
    w = w64.float().requires_grad_(True)
    weights = length_desensitized_weights(torch.tensor(COUNTS), ALPHA)
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    args = (h, w, labels, seq_ids, len(COUNTS), "torch", 29, torch.float32, weights)
    torch.library.opcheck(torch.ops.sdpo.sequence_logprobs_fwd, args, test_utils=utils)
    with torch.no_grad():
        _, lse = torch.ops.sdpo.sequence_logprobs_fwd(*args)
    grad_seq = torch.linspace(-1.0, 1.0, len(COUNTS))
    bwd = (grad_seq, h.detach(), w.detach(), labels, seq_ids, lse, "torch", 29, torch.float32)
    torch.library.opcheck(
        torch.ops.sdpo.sequence_logprobs_bwd, (*bwd, True, True, weights), test_utils=utils
    )

    def objective(h, w):
        seq = sequence_logprobs(
            h, w, labels, seq_ids, len(COUNTS), impl="torch", token_weights=weights
        )
        return _dpo(seq, ref)

    compiled = torch.compile(objective, fullgraph=True, backend="aot_eager")
    for a, b in zip(_grads(objective, h, w), _grads(compiled, h, w)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_token_weights_of_the_wrong_shape_dtype_or_device_are_refused():
    h64, w64, labels, seq_ids, _ = _inputs(4)
    h, w = h64.float(), w64.float()
    for bad, kind, match in [
        (torch.ones(h.shape[0] - 1), ValueError, r"token_weights must be \(76,\)"),
        (torch.ones(h.shape[0], dtype=torch.float64), TypeError, "must be float32"),
        (torch.ones(h.shape[0], device="meta"), ValueError, "same device"),
    ]:
        with pytest.raises(kind, match=match):
            sequence_logprobs(h, w, labels, seq_ids, len(COUNTS), token_weights=bad)
        with pytest.raises(kind, match=match):
            linear_pair_loss(
                h,
                w,
                labels,
                seq_ids,
                len(COUNTS),
                pair_loss=lambda c, r, p: c.sum(),
                token_weights=bad,
            )


# -- the engine: scoring pass, trainer, runner ------------------------------------------------


@pytest.fixture
def tiny_pairs(tiny_model_dir, tmp_path):
    tok = PairTokenizer.from_dir(tiny_model_dir)
    rows = read_preference_file(str(write_pairs(tmp_path / "d.jsonl", n=10, seed=4)), source="s")
    pairs, _ = tokenize_pairs(rows, tok, max_length=32, max_prompt_length=16)
    unequal = sum(len(p.chosen_ids) != len(p.rejected_ids) for p in pairs)
    assert unequal >= 3 and unequal < len(pairs)  # both kinds of pairs present
    return pairs


def _first_step(model, pairs, ref, *, ld_alpha, **train):
    config = TrainConfig(
        learning_rate=1e-2, pairs_per_step=10, max_tokens_per_batch=160, warmup_ratio=0.0, **train
    )
    trainer = DPOTrainer(
        model,
        config=config,
        loss_fn=lambda *a, **k: dpo_loss(*a, config=LossConfig(beta=BETA), **k),
        kernels_impl="torch",
        progress=False,
        ld_alpha=ld_alpha,
    )
    step = plan_steps(pairs, config, epoch=0)[0]
    assert len(step) > 1  # several micro-batches
    return trainer.train_step(pairs, step, ref)


@pytest.mark.parametrize(
    "loss_path, share_prompt", [("fused", False), ("plain", False), ("fused", True)]
)
def test_scoring_with_ld_alpha_equals_the_training_forward_so_first_rewards_are_zero(
    tiny_model_dir, tiny_pairs, loss_path, share_prompt, one_thread
):
    model = load_pretrained(tiny_model_dir)
    score = dict(max_tokens_per_batch=1024, impl="torch", share_prompt=share_prompt)
    ref = score_pairs(model, tiny_pairs, ld_alpha=ALPHA, **score)
    plain = score_pairs(model, tiny_pairs, **score)
    m = _first_step(model, tiny_pairs, ref, ld_alpha=ALPHA, loss_path=loss_path)
    m = {k: float(v) for k, v in m.items()}
    assert abs(m["rewards/chosen"]) < 1e-6 and abs(m["rewards/margins"]) < 1e-6
    assert m["loss"] == pytest.approx(torch.log(torch.tensor(2.0)).item(), abs=1e-6)
    assert m["logps/chosen"] == pytest.approx(float(ref.chosen_logps.mean()), rel=1e-6)
    # LD sums: the longer completion of each unequal pair counts less; never lower than plain
    assert bool((ref.chosen_logps >= plain.chosen_logps - 1e-5).all())
    assert (ref.gamma - plain.gamma).abs().max() > 0.5
    # training against the plain reference would not start at zero: the test can fail
    m_plain = _first_step(load_pretrained(tiny_model_dir), tiny_pairs, plain, ld_alpha=ALPHA)
    assert abs(float(m_plain["rewards/margins"])) > 1e-3


@pytest.mark.parametrize("loss_name", list(RAW_LOSSES))
def test_a_step_with_ld_alpha_and_a_chosen_nll_term_is_the_same_on_every_path(
    tiny_model_dir, tiny_pairs, loss_name, one_thread
):
    """sft / rpo_alpha with LD-DPO: the fused head (one pass, both sums), the plain path (the
    head twice) and shared prompts give the same step (loss, metrics, gradients); the loss is
    the one of the raw sums."""
    config = dataclasses.replace(RAW_LOSSES[loss_name], ld_alpha=ALPHA)
    score = dict(max_tokens_per_batch=1024, impl="torch")
    scored = score_pairs(load_pretrained(tiny_model_dir), tiny_pairs, ld_alpha=ALPHA, **score)
    # a reference other than the policy, so that the rewards are not all 0
    ref = dataclasses.replace(
        scored,
        chosen_logps=scored.chosen_logps - 0.5 * torch.arange(len(tiny_pairs)) % 1.3,
        rejected_logps=scored.rejected_logps + 0.4,
    )
    train = TrainConfig(
        learning_rate=1e-2, pairs_per_step=10, max_tokens_per_batch=160, warmup_ratio=0.0
    )
    runs = {}
    for name, settings in (
        ("fused", {}),
        ("plain", {"loss_path": "plain"}),
        ("shared", {"share_prompt": True}),
    ):
        model = load_pretrained(tiny_model_dir)
        trainer = DPOTrainer(
            model,
            config=dataclasses.replace(train, **settings),
            loss_fn=partial(dpo_loss, config=config),
            kernels_impl="torch",
            progress=False,
            ld_alpha=ALPHA,
        )
        step = plan_steps(tiny_pairs, train, epoch=0)[0]
        metrics = trainer.train_step(tiny_pairs, step, ref)
        grads = {k: p.grad.clone() for k, p in model.named_parameters()}
        runs[name] = ({k: float(v) for k, v in metrics.items()}, grads)
    want, want_grads = runs["fused"]
    for name in ("plain", "shared"):
        got, got_grads = runs[name]
        for key, value in want.items():
            assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-6), (name, key)
        for key, value in want_grads.items():
            scale = float(value.abs().max())
            torch.testing.assert_close(got_grads[key], value, rtol=1e-4, atol=1e-5 * scale)
    # the loss of the whole step, with the raw sums in the NLL term (the policy's raw sums are
    # the plain scoring pass's: the step's forward runs on the initial weights)
    raw = score_pairs(load_pretrained(tiny_model_dir), tiny_pairs, **score)
    kwargs = {
        "config": config,
        "chosen_tokens": scored.chosen_tokens.float(),
        "rejected_tokens": scored.rejected_tokens.float(),
        "sft_scale": len(tiny_pairs) / float(scored.chosen_tokens.sum()),
    }
    policy = (scored.chosen_logps, scored.rejected_logps, ref.chosen_logps, ref.rejected_logps)
    with_raw = dpo_loss(*policy, chosen_raw=raw.chosen_logps, **kwargs)
    assert want["loss"] == pytest.approx(float(with_raw.losses.mean()), rel=1e-5)
    with_ld = dpo_loss(*policy, chosen_raw=scored.chosen_logps, **kwargs)
    assert abs(float(with_ld.losses.mean()) - want["loss"]) > 1e-3  # the test can fail


def test_ld_alpha_one_trains_bit_for_bit_like_plain_dpo(tiny_model_dir, tiny_pairs, one_thread):
    ref = score_pairs(load_pretrained(tiny_model_dir), tiny_pairs, max_tokens_per_batch=1024)
    assert torch.equal(
        ref.chosen_logps,
        score_pairs(
            load_pretrained(tiny_model_dir), tiny_pairs, max_tokens_per_batch=1024, ld_alpha=1.0
        ).chosen_logps,
    )
    runs = []
    for alpha in (None, 1.0, ALPHA):
        model = load_pretrained(tiny_model_dir)
        metrics = _first_step(model, tiny_pairs, ref, ld_alpha=alpha)
        runs.append(({k: v.clone() for k, v in metrics.items()}, model.state_dict()))
    (m0, s0), (m1, s1), (m2, s2) = runs
    assert all(torch.equal(m0[k], m1[k]) for k in m0)
    assert all(torch.equal(s0[k], s1[k]) for k in s0)
    assert not all(torch.equal(s0[k], s2[k]) for k in s0)  # and ld_alpha < 1 is not plain


def test_reference_cache_key_changes_with_ld_alpha_and_one_is_plain(tmp_path):
    base = write_two_source_run(tmp_path)
    keys = {}
    for alpha in (None, 1.0, 0.5, 0.25):
        cfg = load_config(base, overrides=[] if alpha is None else [f"loss.ld_alpha={alpha}"])
        runner = StepwiseRunner(cfg, progress=False)
        keys[alpha] = runner.cache_key("m" * 64, [])
    assert "ld_alpha" not in keys[None].fields()  # keys written before the option stay valid
    assert keys[None] == keys[1.0]
    assert keys[0.5].fields()["ld_alpha"] == 0.5
    assert len({keys[a].digest() for a in (None, 0.5, 0.25)}) == 3


@pytest.mark.parametrize("bad", [1.5, -0.1, float("nan"), True, "0.5"])
def test_ld_alpha_outside_zero_to_one_is_a_config_error(bad):
    with pytest.raises(ValueError, match="ld_alpha must be unset"):
        LossConfig(ld_alpha=bad)
    with pytest.raises(ValueError, match="ld_alpha must be None"):
        length_desensitized_weights(torch.tensor([2, 3]), bad)


def test_ld_alpha_in_a_toml_config_and_on_the_command_line(tmp_path):
    base = write_two_source_run(tmp_path)
    cfg = load_config(base, overrides=["loss.ld_alpha=0.5"])
    assert isinstance(cfg, RunConfig) and cfg.loss.ld_alpha == 0.5
    assert dataclasses.replace(cfg.loss, beta=0.2).ld_alpha == 0.5  # per-step beta keeps it
    with pytest.raises(ValueError, match="loss.ld_alpha"):
        load_config(base, overrides=["loss.ld_alpha=2"])


def test_trainer_and_scoring_refuse_an_ld_alpha_outside_zero_to_one(tiny_model_dir, tiny_pairs):
    model = load_pretrained(tiny_model_dir)
    with pytest.raises(ValueError, match="ld_alpha must be None"):
        score_pairs(model, tiny_pairs, max_tokens_per_batch=1024, ld_alpha=1.2)
    with pytest.raises(ValueError, match="ld_alpha must be None"):
        DPOTrainer(
            model,
            config=TrainConfig(),
            loss_fn=dpo_loss,
            kernels_impl="torch",
            progress=False,
            ld_alpha=-1.0,
        )
    with pytest.raises(ValueError, match=r"pass DPOTrainer\(\.\.\., ld_alpha=0.5\)"):
        DPOTrainer(
            model,
            config=TrainConfig(),
            loss_fn=partial(dpo_loss, config=LossConfig(ld_alpha=0.5)),
            kernels_impl="torch",
            progress=False,
        )


def test_two_step_run_scores_and_trains_with_ld_alpha_and_keys_its_caches(
    tiny_model_dir, tmp_path, one_thread
):
    cfg = config_from_dict(
        two_source_config(tmp_path, tiny_model_dir, loss={"ld_alpha": ALPHA}, sdpo={"steps": 2})
    )
    run_training(cfg, progress=False)
    out = Path(cfg.output_dir)
    cache = safe_open(out / "cache" / "initial.safetensors", "pt")
    assert json.loads(cache.metadata()["key.ld_alpha"]) == ALPHA
    # the cached reference is the LD scoring pass of the initial model, not the plain one
    tok = PairTokenizer.from_dir(tiny_model_dir)
    rows = [r for s in cfg.data.sources for r in read_preference_file(s.path, source=s.name)]
    pairs, _ = tokenize_pairs(rows, tok, max_length=32, max_prompt_length=16)
    score = dict(max_tokens_per_batch=4096, impl="torch")
    model = load_pretrained(tiny_model_dir)
    truth = score_pairs(model, pairs, ld_alpha=ALPHA, **score)
    plain = score_pairs(model, pairs, **score)
    cached = cache.get_tensor("chosen_logps")
    rows = truth.rows_for(cache.get_tensor("pair_indices"))  # chunk 1's pairs
    torch.testing.assert_close(cached, truth.chosen_logps[rows], atol=1e-5, rtol=0)
    assert (cached - plain.chosen_logps[rows]).abs().max() > 0.5
    # and the training forward is LD too: the first step starts at zero rewards
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert abs(first["rewards/margins"]) < 1e-6


def test_score_command_writes_ld_sums_and_refuses_an_alpha_outside_zero_to_one(
    tiny_model_dir, tmp_path, capsys
):
    from sdpo.cli import EXIT_INPUT, main

    data = write_pairs(tmp_path / "pairs.jsonl", n=7, seed=11)
    base = ["score", "--model", str(tiny_model_dir), "--data", str(data)]
    outs = {}
    for alpha in (None, ALPHA):
        out = tmp_path / f"scores-{alpha}.jsonl"
        extra = [] if alpha is None else ["--ld-alpha", str(alpha)]
        assert main([*base, "--out", str(out), *extra]) == 0
        outs[alpha] = [json.loads(line) for line in out.read_text().splitlines()]
    # the same numbers as the scoring pass of training with loss.ld_alpha
    tok = PairTokenizer.from_dir(tiny_model_dir)
    rows = read_preference_file(str(data))
    pairs, _ = tokenize_pairs(rows, tok, max_length=1024, max_prompt_length=512)
    truth = score_pairs(
        load_pretrained(tiny_model_dir), pairs, max_tokens_per_batch=4096, ld_alpha=ALPHA
    )
    got = torch.tensor([[r["logp_chosen"], r["logp_rejected"]] for r in outs[ALPHA]])
    want = torch.stack([truth.chosen_logps, truth.rejected_logps], dim=1).float()
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
    plain = torch.tensor([[r["logp_chosen"], r["logp_rejected"]] for r in outs[None]])
    assert (plain - got).abs().max() > 0.5  # unequal lengths: the LD sums differ
    capsys.readouterr()
    assert main([*base, "--ld-alpha", "1.5"]) == EXIT_INPUT
    assert "--ld-alpha: ld_alpha must be None (off) or a number in [0, 1]" in (
        capsys.readouterr().err
    )
