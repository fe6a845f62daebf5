"""The token metrics (entropy, mean logit, top-1 accuracy) of the log-prob ops and the trainer,
against float64 recomputations from the full logits.

The ops form them in the pass that streams each row for its logsumexp
(``rows_forward(with_stats=True)``: the Triton kernel under the interpreter, and the PyTorch
reference), and every head returns their per-sequence sums; the trainer logs them per step and
the eval pass per evaluation. The same numbers are also compared with TRL 1.16's own in
tests/test_trl_parity.py.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import json  # noqa: E402

import pytest  # noqa: E402

from sdpo.engine.checkpoint import load_pretrained  # noqa: E402
from sdpo.engine.data import read_preference_file  # noqa: E402
from sdpo.engine.tokenize import PairTokenizer, tokenize_pairs  # noqa: E402
from sdpo.engine.trainer import TrainConfig, plan_steps  # noqa: E402
from sdpo.kernels import (  # noqa: E402
    linear_pair_loss,
    sequence_logprobs,
    softcap_sequence_logprobs,
)
from sdpo.kernels import logprobs as logprobs_mod  # noqa: E402
from sdpo.kernels.logprobs import IGNORE_INDEX, STAT_NAMES, rows_forward  # noqa: E402
from tests.conftest import (  # noqa: E402
    assert_no_worse,
    dpo_trainer,
    packed_labels,
    reference_token_metrics,
    write_pairs,
)

IMPLS = ["torch", "triton"]
VOCAB = 1237  # three 512-wide blocks, the last a ragged tail of 213


def _rows(seed: int, *, dtype=torch.float32, device="cpu"):
    """131 tokens over 3 sequences. In the first five scored rows the label (near column 920,
    in the second 512-wide block) gets a planted logit: tied with the top one at column 0 (in
    an earlier block: not the top-1), at the last column (a later block: the top-1), above
    every other (the top-1), tied at column 600 (the same block, before it: not) and at column
    1000 (the same block, after it: the top-1)."""
    gen = torch.Generator().manual_seed(seed)
    labels, seq_ids = packed_labels(lengths=[61, 22, 48], prompts=[17, 20, 5], vocab=VOCAB, gen=gen)
    logits64 = torch.randn(len(labels), VOCAB, generator=gen, dtype=torch.float64) * 4.0
    scored = (labels != IGNORE_INDEX).nonzero()[:, 0].tolist()
    for row, other in zip(scored[:5], (0, VOCAB - 1, None, 600, 1000), strict=True):
        labels[row] = 900 + row % 50  # away from the planted columns
        top = logits64[row].max() + 1.0
        if other is not None:
            logits64[row, other] = top
        logits64[row, labels[row]] = top
    return logits64.to(device), logits64.to(dtype).to(device), labels.to(device), seq_ids.to(device)


def _truth(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(N, 3) entropy, mean logit and top-1 flag (torch.argmax, the first maximum) in the logits'
    dtype, zero on unscored rows."""
    logp = torch.log_softmax(logits, dim=-1)
    entropy = -(logp.exp() * logp).sum(-1)
    top1 = (logits.argmax(-1) == labels).to(logits.dtype)
    stats = torch.stack([entropy, logits.mean(-1), top1], dim=1)
    return torch.where((labels != IGNORE_INDEX).unsqueeze(1), stats, 0.0)


@pytest.fixture
def small_blocks(monkeypatch):
    """The interpreted kernel streams 512-wide blocks, so a row spans several and a tail."""
    monkeypatch.setattr(logprobs_mod, "INTERPRETER_BLOCK_V", 512)


@pytest.mark.parametrize("impl", IMPLS)
def test_row_statistics_match_float64_and_argmax_ties_go_to_the_first_maximum(impl, small_blocks):
    logits64, logits, labels, _ = _rows(seed=3)
    logp, lse, stats = rows_forward(logits, labels, impl=impl, with_stats=True)
    assert stats.shape == (len(labels), len(STAT_NAMES)) and stats.dtype == torch.float32
    truth, same_dtype = _truth(logits64, labels), _truth(logits, labels)
    assert_no_worse("entropy", stats[:, 0], same_dtype[:, 0], truth[:, 0], rel_margin=1e-6)
    assert_no_worse("mean logit", stats[:, 1], same_dtype[:, 1], truth[:, 1], rel_margin=1e-6)
    assert torch.equal(stats[:, 2], same_dtype[:, 2])  # the fp32 logits' own argmax, exactly
    scored = (labels != IGNORE_INDEX).nonzero()[:, 0].tolist()
    # a tie goes to the first maximum, as torch.argmax (and TRL) pick it
    assert stats[scored[:5], 2].tolist() == [0.0, 1.0, 1.0, 0.0, 1.0]
    # the statistics change nothing else: the pass without them gives the same bits
    logp_off, lse_off = rows_forward(logits, labels, impl=impl)
    assert torch.equal(logp, logp_off) and torch.equal(lse, lse_off)


def _pair_stream(seed: int):
    """131 tokens over 4 sequences (2 pairs), from hidden states and a (V, H) head."""
    gen = torch.Generator().manual_seed(seed)
    lengths = [40, 31, 27, 33]
    labels, seq_ids = packed_labels(lengths=lengths, prompts=[9, 9, 4, 4], vocab=VOCAB, gen=gen)
    hidden = torch.randn(sum(lengths), 16, generator=gen, dtype=torch.float64)
    weight = torch.randn(VOCAB, 16, generator=gen, dtype=torch.float64) * 0.7
    return hidden, weight, labels, seq_ids, len(lengths)


def _per_sequence(token_stats: torch.Tensor, seq_ids: torch.Tensor, num_seqs: int):
    out = torch.zeros(num_seqs, 3, dtype=token_stats.dtype, device=token_stats.device)
    return out.index_add_(0, seq_ids, token_stats)


@pytest.mark.parametrize("impl", IMPLS)
def test_every_head_returns_the_per_sequence_sums_of_the_float64_statistics(impl, small_blocks):
    """linear_pair_loss (a pair longer than the cap split keep-the-tail; WPO's sums beside, so
    the kernel runs both options at once, as the trainer's forward under WPO does), then with
    the PyTorch rows (the wiring is the same for both implementations) sequence_logprobs and
    the soft-capped head: the same sums as float64."""
    hidden64, weight64, labels, seq_ids, s = _pair_stream(seed=5)
    hidden, weight = hidden64.float(), weight64.float()
    logits64 = hidden64 @ weight64.T
    truth = _per_sequence(_truth(logits64, labels), seq_ids, s)
    baseline = _per_sequence(_truth(hidden @ weight.T, labels), seq_ids, s)

    def check(stats):
        assert stats.shape == (s, 3) and not stats.requires_grad
        for k, name in enumerate(STAT_NAMES):
            assert_no_worse(name, stats[:, k], baseline[:, k], truth[:, k], rel_margin=1e-6)

    def pair_loss(chosen, rejected, pairs, chosen_aligned, rejected_aligned):
        return (chosen - 0.5 * rejected).sum()

    out = linear_pair_loss(
        hidden,
        weight,
        labels,
        seq_ids,
        s,
        pair_loss=pair_loss,
        impl=impl,
        chunk_tokens=64,
        max_chunk_tokens=48,  # the first pair (71 tokens) is split
        with_aligned=True,
        with_stats=True,
    )
    check(out[-1])
    if impl == "torch":
        seq, aligned, stats = sequence_logprobs(
            hidden, weight, labels, seq_ids, s, impl=impl, chunk_tokens=50, return_aligned=True,
            return_stats=True,
        )  # fmt: skip
        check(stats)
        assert torch.equal(seq, out[1]) and torch.equal(aligned, out[2])

        # the soft-capped head (one implementation): the statistics of the capped logits
        cap = 3.0
        capped64 = torch.tanh(logits64 / cap) * cap
        truth = _per_sequence(_truth(capped64, labels), seq_ids, s)
        baseline = _per_sequence(
            _truth(torch.tanh((hidden @ weight.T) / cap) * cap, labels), seq_ids, s
        )
        seq, stats = softcap_sequence_logprobs(
            hidden, weight, labels, seq_ids, s, softcap=cap, chunk_tokens=50, return_stats=True
        )
        check(stats)
        seq_off = softcap_sequence_logprobs(
            hidden, weight, labels, seq_ids, s, softcap=cap, chunk_tokens=50
        )
        assert torch.equal(seq, seq_off)


def _pairs(model_dir, data):
    tok = PairTokenizer.from_dir(model_dir)
    rows = read_preference_file(str(data), source="s")
    return tokenize_pairs(rows, tok, max_length=32, max_prompt_length=16)[0]


@pytest.mark.parametrize(
    ("loss_path", "share_prompt"),
    [("fused", False), ("plain", True)],
    ids=["fused", "plain-shared"],
)
def test_training_records_the_step_s_token_metrics_of_its_full_logits(
    tiny_model_dir, tmp_path, loss_path, share_prompt, one_thread
):
    """A step in several micro-batches logs, per token of the whole step, the metrics of the
    float64 logits of the weights it starts from; num_tokens counts every pair's prompt twice
    (in both layouts) and runs on over the steps."""
    from sdpo.engine.scoring import score_pairs

    pairs = _pairs(tiny_model_dir, write_pairs(tmp_path / "d.jsonl", n=12, seed=8))
    model = load_pretrained(tiny_model_dir)
    start = load_pretrained(tiny_model_dir)
    ref = score_pairs(model, pairs, max_tokens_per_batch=1024, impl="torch")
    config = TrainConfig(
        learning_rate=1e-2,
        pairs_per_step=6,
        max_tokens_per_batch=80,
        loss_path=loss_path,
        share_prompt=share_prompt,
        shuffle=False,
    )
    steps = plan_steps(pairs, config, epoch=0)
    assert len(steps) == 2 and len(steps[0]) > 1
    out = tmp_path / "out"
    dpo_trainer(model, config, output_dir=out).fit(pairs, ref)
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    first = [pairs[i] for batch in steps[0] for i in batch]
    expected = reference_token_metrics(start, first)
    for key, value in expected.items():
        assert records[0][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    step_tokens = [sum(pairs[i].num_tokens for batch in step for i in batch) for step in steps]
    assert [r["num_tokens"] for r in records] == [step_tokens[0], sum(step_tokens)]


def test_trackers_get_the_token_metrics_with_the_other_keys(tiny_model_dir, tmp_path):
    """The trainer's log hook (what feeds TensorBoard and W&B) gets every key it writes."""
    from sdpo.engine.scoring import score_pairs

    pairs = _pairs(tiny_model_dir, write_pairs(tmp_path / "d.jsonl", n=4, seed=2))
    model = load_pretrained(tiny_model_dir)
    ref = score_pairs(model, pairs, max_tokens_per_batch=1024, impl="torch")
    seen = []
    trainer = dpo_trainer(model, TrainConfig(pairs_per_step=4), log_hook=seen.append)
    trainer.fit(pairs, ref)
    for key in ("entropy", "logits/chosen", "logits/rejected", "mean_token_accuracy"):
        assert key in seen[0]
    assert seen[0]["num_tokens"] == sum(p.num_tokens for p in pairs)


# Kept apart from the CPU tests above: on CUDA the kernel is compiled, in bf16 and fp32.
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("dtype", "rel_margin"), [(torch.float32, 1e-6), (torch.bfloat16, 1e-3)])
def test_row_statistics_on_cuda_match_float64(dtype, rel_margin):
    logits64, logits, labels, seq_ids = _rows(seed=13, dtype=dtype, device="cuda")
    _, _, stats = rows_forward(logits, labels, impl="triton", with_stats=True)
    truth, same_dtype = _truth(logits64, labels), _truth(logits.float(), labels)
    for k in (0, 1):
        assert_no_worse(
            STAT_NAMES[k], stats[:, k], same_dtype[:, k], truth[:, k], rel_margin=rel_margin
        )
    assert torch.equal(stats[:, 2], same_dtype[:, 2])  # argmax of the bf16/fp32 logits themselves


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("dtype", "rel_margin"), [(torch.float32, 1e-6), (torch.bfloat16, 1e-3)])
def test_linear_pair_loss_statistics_on_cuda_match_float64(dtype, rel_margin):
    hidden64, weight64, labels, seq_ids, s = _pair_stream(seed=17)
    hidden, weight = hidden64.to("cuda", dtype), weight64.to("cuda", dtype)
    labels, seq_ids = labels.cuda(), seq_ids.cuda()
    out = linear_pair_loss(
        hidden.requires_grad_(True),
        weight,
        labels,
        seq_ids,
        s,
        pair_loss=lambda c, r, sl: (c - r).sum(),
        impl="triton",
        max_chunk_tokens=48,
        pair_tokens=[71, 60],
        with_stats=True,
    )
    truth = _per_sequence(_truth(hidden64.cuda() @ weight64.cuda().T, labels), seq_ids, s)
    logits = (hidden.detach() @ weight.T).float()  # PyTorch on the same rounded logits
    baseline = _per_sequence(_truth(logits, labels), seq_ids, s)
    for k, name in enumerate(STAT_NAMES[:2]):
        assert_no_worse(name, out[-1][:, k], baseline[:, k], truth[:, k], rel_margin=rel_margin)
    # the chunks' matmuls may round a near-tie of the top two logits the other way: one flip
    assert (out[-1][:, 2] - baseline[:, 2]).abs().max() <= 1.0


@pytest.mark.parametrize(
    ("loss_path", "impl", "use_weighting"),
    [("fused", "triton", False), ("plain", "torch", True)],
    ids=["fused-triton", "plain-wpo"],
)
def test_training_without_token_metrics_logs_none_and_trains_the_same_bits(
    tiny_model_dir, tmp_path, loss_path, impl, use_weighting, one_thread
):
    """``token_metrics=False`` (``log.token_metrics``): the records and the log hook lack the
    four keys (and only them), and the losses, the other metrics and the weights are those of
    the run with them, bit for bit (the head's reductions do not touch the training)."""
    from functools import partial

    from sdpo.engine.scoring import score_pairs
    from sdpo.engine.trainer import TOKEN_METRICS, DPOTrainer
    from sdpo.losses import LossConfig, dpo_loss

    pairs = _pairs(tiny_model_dir, write_pairs(tmp_path / "d.jsonl", n=6, seed=5))
    ref = score_pairs(load_pretrained(tiny_model_dir), pairs, max_tokens_per_batch=1024)
    config = TrainConfig(
        learning_rate=1e-2, pairs_per_step=3, max_tokens_per_batch=60, loss_path=loss_path
    )
    runs = {}
    for on in (True, False):
        model, seen = load_pretrained(tiny_model_dir), []
        out = tmp_path / f"out-{on}"
        DPOTrainer(
            model,
            config=config,
            loss_fn=partial(dpo_loss, config=LossConfig(beta=0.1, use_weighting=use_weighting)),
            kernels_impl=impl,
            progress=False,
            output_dir=out,
            log_hook=seen.append,
            token_metrics=on,
        ).fit(pairs, ref)
        records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        assert [set(r) for r in seen] == [set(r) for r in records]
        runs[on] = records, model.state_dict()
    (with_records, with_weights), (records, weights) = runs[True], runs[False]
    assert len(records) == len(with_records) == 2
    for mine, theirs in zip(records, with_records, strict=True):
        assert set(mine) == set(theirs) - set(TOKEN_METRICS)
        assert "num_tokens" in mine
        for key in set(mine) - {"tokens_per_s"}:
            assert mine[key] == theirs[key], key
    for name, value in weights.items():
        assert torch.equal(value, with_weights[name]), name


def test_eval_without_token_metrics_logs_none(tiny_model_dir, tmp_path):
    """``log.token_metrics = false``: the held-out records (and so the trackers) lack the four
    ``eval/`` keys, ``eval/num_tokens`` stays and the rest is the same as with them."""
    from sdpo.config import config_from_dict
    from sdpo.engine.scoring import score_pairs
    from sdpo.runner import StepwiseRunner
    from tests.conftest import two_source_config

    pairs = _pairs(tiny_model_dir, write_pairs(tmp_path / "d.jsonl", n=3, seed=4))
    model = load_pretrained(tiny_model_dir)
    initial = score_pairs(model, pairs, max_tokens_per_batch=1024, impl="torch")
    metrics = {}
    for on in (True, False):
        (tmp_path / str(on)).mkdir()
        raw = two_source_config(tmp_path / str(on), tiny_model_dir, log={"token_metrics": on})
        runner = StepwiseRunner(config_from_dict(raw), progress=False)
        runner.out.mkdir(parents=True)
        runner.eval_pairs, runner.eval_initial = pairs, initial
        metrics[on] = runner._evaluate(model, t=1, beta=0.1, run_step=1, num_tokens=7)
        logged = json.loads((runner.out / "metrics.jsonl").read_text())
        assert set(logged) - {"step", "run_step", "sdpo_step"} == set(metrics[on])
    assert set(metrics[True]) - set(metrics[False]) == {
        "eval/entropy",
        "eval/logits/chosen",
        "eval/logits/rejected",
        "eval/mean_token_accuracy",
    }
    assert metrics[False] == {k: v for k, v in metrics[True].items() if k in metrics[False]}
    assert metrics[False]["eval/num_tokens"] == 7
