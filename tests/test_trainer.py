"""The DPO training loop on a tiny real model: it learns, its first rewards are zero, its step
plan keeps pairs whole and is reproducible, its LR schedule has the documented shape, and the
sft loss type averages over the whole step's tokens on every path."""

from __future__ import annotations

import json
import time
from dataclasses import fields, replace
from pathlib import Path

import pytest
import torch

from sdpo.engine.checkpoint import load_pretrained
from sdpo.engine.data import read_preference_file
from sdpo.engine.precision import parameter_dtype
from sdpo.engine.scoring import score_pairs
from sdpo.engine.tokenize import PairTokenizer, tokenize_pairs
from sdpo.engine.trainer import (
    DPOTrainer,
    TrainConfig,
    build_optimizer,
    create_optimizer_states,
    lr_multiplier,
    optimizer_state_bytes,
    plan_steps,
)
from tests.conftest import WORDS, dpo_trainer, write_pairs


def _pairs(model_dir: Path, data: Path):
    tok = PairTokenizer.from_dir(model_dir)
    rows = read_preference_file(str(data), source="s")
    pairs, _ = tokenize_pairs(rows, tok, max_length=32, max_prompt_length=16)
    return pairs


def _trainer(model, tmp_path: Path, **overrides) -> DPOTrainer:
    cfg = dict(
        learning_rate=3e-3, epochs=3, pairs_per_step=8, max_tokens_per_batch=96, warmup_ratio=0.1
    )
    cfg.update(overrides)
    return dpo_trainer(model, TrainConfig(**cfg), output_dir=tmp_path)


def test_short_dpo_run_raises_reward_accuracy_on_its_training_pairs(tiny_model_dir, tmp_path):
    pairs = _pairs(tiny_model_dir, write_pairs(tmp_path / "d.jsonl", n=48, seed=3))
    model = load_pretrained(tiny_model_dir)
    ref = score_pairs(model, pairs, max_tokens_per_batch=1024, impl="torch")
    before = float((ref.gamma > 0).float().mean())
    result = _trainer(model, tmp_path, epochs=6).fit(pairs, ref)
    after = score_pairs(model, pairs, max_tokens_per_batch=1024, impl="torch")
    acc_after = float((after.gamma > 0).float().mean())
    assert acc_after >= before + 0.25, (before, acc_after)
    assert result.optimizer_steps == 6 * 6
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == result.optimizer_steps
    for name in ("loss", "rewards/chosen", "rewards/accuracies", "logps/rejected", "tokens_per_s"):
        assert name in lines[-1]


def test_score_pairs_refuses_an_unknown_precision_and_resolves_auto(tiny_model_dir, tmp_path):
    """A misspelt precision was scored as fp32 (no autocast, the head's inputs unrounded),
    silently; it is refused naming the options, and "auto" is resolved as the trainer resolves
    it (fp32 on a CPU), not scored as an unknown name."""
    pairs = _pairs(tiny_model_dir, write_pairs(tmp_path / "d.jsonl", n=3, seed=4))
    model = load_pretrained(tiny_model_dir)
    with pytest.raises(ValueError, match=r"unknown precision 'bf16_mixed': use one of auto"):
        score_pairs(model, pairs, max_tokens_per_batch=1024, impl="torch", precision="bf16_mixed")
    scored = [
        score_pairs(model, pairs, max_tokens_per_batch=1024, impl="torch", precision=precision)
        for precision in ("auto", "fp32")
    ]
    assert torch.equal(scored[0].chosen_logps, scored[1].chosen_logps)


@pytest.mark.parametrize("precision", ["fp32", "bf16-mixed", "bf16"])
@pytest.mark.parametrize("loss_path", ["fused", "plain"])
def test_first_step_rewards_are_zero_because_reference_equals_policy(
    tiny_model_dir, tmp_path, precision, loss_path
):
    """The no-grad scoring pass and the training forward give the same numbers, bit for bit,
    in every precision (bf16-mixed: both round the head's inputs to bf16), in micro-batches
    of other shapes than the scoring pass's."""
    pairs = _pairs(tiny_model_dir, write_pairs(tmp_path / "d.jsonl", n=8, seed=4))
    model = load_pretrained(tiny_model_dir, dtype=parameter_dtype(precision))
    ref = score_pairs(model, pairs, max_tokens_per_batch=1024, impl="torch", precision=precision)
    trainer = _trainer(
        model,
        tmp_path,
        pairs_per_step=8,
        max_tokens_per_batch=64,
        precision=precision,
        loss_path=loss_path,
    )
    steps = plan_steps(pairs, trainer.config, epoch=0)
    assert len(steps[0]) > 1  # several micro-batches, the scoring pass one batch
    metrics = trainer.train_step(pairs, steps[0], ref)
    assert float(metrics["rewards/chosen"]) == 0.0
    assert float(metrics["rewards/rejected"]) == 0.0
    assert float(metrics["loss"]) == pytest.approx(torch.log(torch.tensor(2.0)).item(), abs=1e-6)


def test_plan_keeps_pairs_whole_within_budget_and_is_reproducible(tiny_model_dir, tmp_path):
    pairs = _pairs(tiny_model_dir, write_pairs(tmp_path / "d.jsonl", n=37, seed=5))
    cfg = TrainConfig(pairs_per_step=5, max_tokens_per_batch=64, seed=7)
    plan = plan_steps(pairs, cfg, epoch=0)
    flat = [i for step in plan for batch in step for i in batch]
    assert sorted(flat) == list(range(37))  # every pair exactly once
    assert all(sum(len(b) for b in step) == 5 for step in plan[:-1])
    for step in plan:
        for batch in step:
            assert sum(pairs[i].num_tokens for i in batch) <= 64
    assert plan == plan_steps(pairs, cfg, epoch=0)
    assert plan != plan_steps(pairs, cfg, epoch=1)


def test_lr_schedule_warms_up_then_decays_to_zero():
    lin = [lr_multiplier(s, total_steps=10, warmup_steps=2, schedule="linear") for s in range(10)]
    assert lin[:2] == [0.5, 1.0]
    assert lin[2] == 1.0 and lin[-1] == pytest.approx(1 / 8)
    assert all(a >= b for a, b in zip(lin[1:], lin[2:]))
    cos = [lr_multiplier(s, total_steps=10, warmup_steps=0, schedule="cosine") for s in range(11)]
    assert cos[0] == 1.0 and cos[10] == pytest.approx(0.0, abs=1e-12)
    assert cos[5] == pytest.approx(0.5)


def test_warmup_steps_replace_the_ratio_and_each_record_logs_its_step_s_rate(
    tiny_model_dir, tmp_path
):
    pairs = _pairs(tiny_model_dir, write_pairs(tmp_path / "d.jsonl", n=10, seed=4))
    lr = 1e-3
    for warmup_steps, want in (
        (2, [0.5, 1.0, 1.0, 2 / 3, 1 / 3]),
        (None, [1.0, 0.8, 0.6, 0.4, 0.2]),
        (8, [1 / 8, 2 / 8, 3 / 8, 4 / 8, 5 / 8]),  # longer than the run: never peaks (TRL's)
    ):
        out = tmp_path / f"w{warmup_steps}"
        trainer = _trainer(
            load_pretrained(tiny_model_dir),
            out,
            learning_rate=lr,
            epochs=1,
            pairs_per_step=2,
            max_tokens_per_batch=4096,
            warmup_ratio=0.0,
            warmup_steps=warmup_steps,
        )
        trainer.fit(pairs, score_pairs(trainer.model, pairs, max_tokens_per_batch=4096))
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        assert [r["lr"] for r in rows] == pytest.approx([lr * m for m in want]), warmup_steps
    with pytest.raises(ValueError, match="warmup_steps must be >= 0"):
        TrainConfig(warmup_steps=-1)
    with pytest.raises(ValueError, match="warmup_steps must be a whole number"):
        TrainConfig(warmup_steps=1.5)


def test_tokens_per_s_leaves_out_only_the_eval_time_of_its_window(tiny_model_dir, tmp_path):
    # records every 3 steps, an evaluation after each step but the last, and a checkpoint write
    # of at least 0.25 s after every step: a record's window holds two such writes before the
    # evaluation that precedes it, and only the evaluation's time may be left out
    pairs = _pairs(tiny_model_dir, write_pairs(tmp_path / "d.jsonl", n=12, seed=4))
    model = load_pretrained(tiny_model_dir)
    ref = score_pairs(model, pairs, max_tokens_per_batch=4096, impl="torch")
    config = TrainConfig(
        learning_rate=1e-3, pairs_per_step=2, max_tokens_per_batch=4096, log_every=3
    )
    config.eval_every = config.save_every = 1
    evals = []
    trainer = dpo_trainer(
        model,
        config,
        output_dir=tmp_path,
        evaluate=lambda t: evals.append(t.position["step_in_run"]),
        save_checkpoint=lambda t: time.sleep(0.25),
    )
    trainer.fit(pairs, ref)
    assert evals == [1, 2, 3, 4, 5]
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [3, 6]
    window_tokens = [rows[0]["tokens"], rows[1]["tokens"] - rows[0]["tokens"]]
    for row, tokens in zip(rows, window_tokens):
        # the window spans at least the writes after its first two steps
        assert row["tokens_per_s"] <= tokens / 0.5, row


def test_training_is_bitwise_reproducible_on_cpu(tiny_model_dir, tmp_path):
    pairs = _pairs(tiny_model_dir, write_pairs(tmp_path / "d.jsonl", n=16, seed=6))
    finals = []
    for run in range(2):
        model = load_pretrained(tiny_model_dir)
        ref = score_pairs(model, pairs, max_tokens_per_batch=1024, impl="torch")
        _trainer(model, tmp_path / f"r{run}", epochs=1).fit(pairs, ref)
        finals.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(finals[0], finals[1])


def _fused_and_foreach(tiny_model_dir: Path, tmp_path: Path, **overrides):
    """Two trainers on the same initial weights: fused AdamW (clip scale and non-finite flag
    handed to its kernel as tensors) and foreach AdamW (clip pass, then the step)."""
    out = []
    for fused in (True, False):
        model = load_pretrained(tiny_model_dir)
        trainer = _trainer(model, tmp_path / str(fused), **overrides)
        trainer.optimizer = build_optimizer(model, trainer.config, fused=fused)
        out.append(trainer)
    return out


def test_fused_optimizer_clips_inside_its_kernel_like_the_clip_pass(tiny_model_dir, tmp_path):
    pairs = _pairs(tiny_model_dir, write_pairs(tmp_path / "d.jsonl", n=24, seed=8))
    # max_grad_norm far below the gradient norm: every step is clipped, by a different factor
    fused, plain = _fused_and_foreach(tiny_model_dir, tmp_path, max_grad_norm=0.05)
    ref = score_pairs(fused.model, pairs, max_tokens_per_batch=1024, impl="torch")
    steps = plan_steps(pairs, fused.config, epoch=0)
    for step in steps:
        a = fused.train_step(pairs, step, ref)
        b = plain.train_step(pairs, step, ref)
        assert float(a["grad_norm"]) > 0.05
        assert float(a["grad_norm"]) == pytest.approx(float(b["grad_norm"]), rel=1e-4)
    for p, q in zip(fused.model.parameters(), plain.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)
        # the first moment holds the clipped gradients: a missed scale would be 10-100x off
        m_p = fused.optimizer.state[p]["exp_avg"]
        m_q = plain.optimizer.state[q]["exp_avg"]
        torch.testing.assert_close(m_p, m_q, rtol=1e-3, atol=1e-7)
        assert float(fused.optimizer.state[p]["step"]) == len(steps)


def test_fused_optimizer_skips_a_non_finite_step_entirely(tiny_model_dir, tmp_path):
    """The skipped step leaves weights, moments and step counters as they were, and the next
    step (its gradients left behind until then) trains as if it had never run."""
    pairs = _pairs(tiny_model_dir, write_pairs(tmp_path / "d.jsonl", n=24, seed=9))
    fused, plain = _fused_and_foreach(tiny_model_dir, tmp_path)
    ref = score_pairs(fused.model, pairs, max_tokens_per_batch=1024, impl="torch")
    steps = plan_steps(pairs, fused.config, epoch=0)
    assert len(steps) >= 3
    fused.train_step(pairs, steps[0], ref)
    assert fused.last_step_finite
    params = [p.detach().clone() for p in fused.model.parameters()]
    state = {k: v.clone() for k, v in fused.optimizer.state[fused.model.lm_head_weight].items()}
    broken = steps[1][0][0]
    saved = ref.chosen_logps[pairs[broken].index].item()
    ref.chosen_logps[pairs[broken].index] = float("nan")
    metrics = fused.train_step(pairs, steps[1], ref)
    assert not fused.last_step_finite and not torch.isfinite(metrics["loss"])
    for before, p in zip(params, fused.model.parameters(), strict=True):
        assert torch.equal(before, p)
    for k, v in fused.optimizer.state[fused.model.lm_head_weight].items():
        assert torch.equal(state[k], v), k  # moments and the step counter untouched
    ref.chosen_logps[pairs[broken].index] = saved
    fused.train_step(pairs, steps[2], ref)
    for step in (steps[0], steps[2]):
        plain.train_step(pairs, step, ref)
    for p, q in zip(fused.model.parameters(), plain.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)


def test_capped_chunks_split_long_pairs_and_train_the_same(tiny_model_dir, tmp_path):
    """max_chunk_tokens below a pair's length: the fused head splits the pair (recomputing
    all but its tail) and the step's losses and weights match the unsplit run's."""
    pairs = _pairs(tiny_model_dir, write_pairs(tmp_path / "d.jsonl", n=12, seed=10))
    assert max(p.num_tokens for p in pairs) > 13
    results = []
    for cap in (None, 13):
        model = load_pretrained(tiny_model_dir)
        ref = score_pairs(model, pairs, max_tokens_per_batch=1024, impl="torch")
        trainer = _trainer(model, tmp_path / str(cap), epochs=1, pairs_per_step=4)
        trainer.max_chunk_tokens = cap
        steps = plan_steps(pairs, trainer.config, epoch=0)
        metrics = [trainer.train_step(pairs, step, ref) for step in steps]
        results.append((metrics, [p.detach().clone() for p in model.parameters()]))
    (m_full, w_full), (m_cap, w_cap) = results
    for a, b in zip(m_full, m_cap, strict=True):
        for key in ("loss", "rewards/margins", "logps/chosen", "grad_norm"):
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    for p, q in zip(w_full, w_cap, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_fused_optimizer_step_on_bf16_parameters(tiny_model_dir, tmp_path):
    """bf16 parameters (train.precision = "bf16", as on the GPU): the gradient norm comes back
    in bf16 and the clip factor handed to the fused kernel must still be fp32."""
    pairs = _pairs(tiny_model_dir, write_pairs(tmp_path / "d.jsonl", n=8, seed=12))
    model = load_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    ref = score_pairs(model, pairs, max_tokens_per_batch=1024, impl="torch", precision="bf16")
    trainer = _trainer(model, tmp_path, precision="bf16", max_grad_norm=0.05)
    trainer.optimizer = build_optimizer(model, trainer.config, fused=True)
    before = [p.detach().clone() for p in model.parameters()]
    metrics = trainer.train_step(pairs, plan_steps(pairs, trainer.config, epoch=0)[0], ref)
    assert trainer.last_step_finite and metrics["grad_norm"].dtype == torch.bfloat16
    assert float(metrics["grad_norm"]) > 0.05
    moved = [not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True)]
    assert all(moved)
    state = trainer.optimizer.state[model.lm_head_weight]
    assert state["exp_avg"].dtype == torch.bfloat16 and float(state["step"]) == 1


def test_bf16_mixed_keeps_updates_below_bf16_resolution_that_bf16_drops(tiny_model_dir, tmp_path):
    """One AdamW step at lr 1e-6 moves each weight by about 1e-6, far below half a bf16 step of
    the tiny model's weights (~1e-2 in size): bf16-mixed's fp32 master weights hold it (as a
    float64 step from the same fp32 weights does), bf16 weights round nearly all of it away."""
    pairs = _pairs(tiny_model_dir, write_pairs(tmp_path / "d.jsonl", n=8, seed=12))
    moved = {}
    for precision in ("bf16-mixed", "bf16"):
        model = load_pretrained(tiny_model_dir)
        trainer = _trainer(
            model, tmp_path, precision=precision, learning_rate=1e-6, warmup_ratio=0.0
        )
        ref = score_pairs(
            model, pairs, max_tokens_per_batch=1024, impl="torch", precision=precision
        )
        weight = model.model.layers[0].mlp.down_proj.weight
        before = weight.detach().double().clone()
        trainer.train_step(pairs, plan_steps(pairs, trainer.config, epoch=0)[0], ref)
        step = weight.detach().double() - before
        has_grad = trainer.optimizer.state[weight]["exp_avg"].double() != 0
        moved[precision] = float((step != 0)[has_grad].double().mean())
        if precision == "bf16-mixed":  # AdamW's first step in float64, to fp32 rounding
            state, group = trainer.optimizer.state[weight], trainer.optimizer.param_groups[0]
            (b1, b2), eps = group["betas"], group["eps"]
            m, v = state["exp_avg"].double() / (1 - b1), state["exp_avg_sq"].double() / (1 - b2)
            want = -1e-6 * m / (v.sqrt() + eps)
            ulp = float(before.abs().max()) * 2**-23  # the new fp32 weight's rounding
            torch.testing.assert_close(step, want, rtol=0, atol=ulp)
    assert moved["bf16-mixed"] == 1.0 and moved["bf16"] < 0.2, moved


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_memory_probe_runs_the_largest_micro_batch_and_changes_nothing(
    tiny_model_dir, tmp_path, capsys, dropout
):
    """The probe's pass leaves no gradient and no RNG draw behind: with LoRA dropout (which
    draws from the RNG) the run is still bitwise the run without a probe."""
    from sdpo.engine.lora import attach_lora

    pairs = _pairs(tiny_model_dir, write_pairs(tmp_path / "d.jsonl", n=21, seed=9))
    ref = score_pairs(
        load_pretrained(tiny_model_dir), pairs, max_tokens_per_batch=1024, impl="torch"
    )
    runs = {}
    for probe in (False, True):
        model = load_pretrained(tiny_model_dir)
        if dropout:
            attach_lora(
                model, rank=2, alpha=4.0, dropout=dropout, targets=["q_proj", "up_proj"], seed=1
            )
        out = tmp_path / f"probe-{probe}"
        out.mkdir()
        # weight decay: the probe's step at learning rate 0 that makes AdamW's states
        # multiplies the matrices by 1 - 0 * wd
        trainer = _trainer(model, out, epochs=2, pairs_per_step=5, max_tokens_per_batch=70,
                           memory_probe=probe, weight_decay=0.1)  # fmt: skip
        capsys.readouterr()
        trainer.fit(pairs, ref)
        printed = capsys.readouterr().out
        runs[probe] = (model.state_dict(), (out / "metrics.jsonl").read_text(), printed, trainer)
    (w0, m0, p0, _), (w1, m1, p1, trainer) = runs[False], runs[True]
    for name, w in w0.items():
        assert torch.equal(w, w1[name]), name
    strip = lambda text: [line.split('"tokens_per_s"')[0] for line in text.splitlines()]  # noqa: E731
    assert strip(m0) == strip(m1)
    assert "memory probe" not in p0
    # the probe took the largest micro-batch of the whole run, by tokens
    batches = [
        b for e in range(2) for step in plan_steps(pairs, trainer.config, epoch=e) for b in step
    ]
    largest = max(sum(pairs[i].num_tokens for i in b) for b in batches)
    assert trainer.memory_probe_result["tokens"] == largest
    assert "tokens) fits" in p1 and f"{largest} tokens" in p1
    assert len({sum(pairs[i].num_tokens for i in b) for b in batches}) > 1  # a real choice


@pytest.mark.parametrize("precision", ["fp32", "bf16", "bf16-mixed"])
def test_memory_probe_runs_with_adamw_states_and_leaves_a_fresh_optimizer(
    tiny_model_dir, tmp_path, precision
):
    """On a fresh optimizer the probe's pass runs with AdamW's states present, of the size the
    training steps hold (2 x each parameter's bytes and a 4-byte step count: 8 bytes a
    parameter under fp32 weights, 4 under bf16's), and leaves the optimizer as fresh (no state,
    the same state_dict) and the weights bit for bit as they were; with states already there
    (a resumed or shared optimizer) it keeps them as they are."""
    pairs = _pairs(tiny_model_dir, write_pairs(tmp_path / "d.jsonl", n=6, seed=4))
    model = load_pretrained(tiny_model_dir)
    ref = score_pairs(model, pairs, max_tokens_per_batch=1024, impl="torch", precision=precision)
    trainer = _trainer(model, tmp_path, precision=precision, weight_decay=0.1)
    opt = trainer.optimizer
    fresh = build_optimizer(model, trainer.config).state_dict()
    params = [p for p in model.parameters() if p.requires_grad]
    per_param = 8 if precision != "bf16" else 4
    want = sum(per_param * p.numel() + 4 for p in params)
    seen = []
    model.register_forward_pre_hook(lambda *_: seen.append(optimizer_state_bytes(opt)))
    before = [p.detach().clone() for p in params]
    result = trainer.probe_memory(pairs, ref, [[0, 1], [2, 3, 4]])
    assert seen == [want] and result["optimizer_state_bytes"] == want
    assert not opt.state and opt.state_dict() == fresh
    assert all(p.grad is None and torch.equal(p, b) for p, b in zip(params, before))
    trainer.train_step(pairs, [[0, 1, 2]], ref)
    assert optimizer_state_bytes(opt) == want
    steps = [float(opt.state[p]["step"]) for p in params]
    trainer.probe_memory(pairs, ref, [[0, 1]])
    assert seen[-1] == want and [float(opt.state[p]["step"]) for p in params] == steps


def test_train_step_and_memory_probe_refuse_a_bad_token_id_before_any_backward(
    tiny_model_dir, tmp_path
):
    """Called directly (not through fit, which checks every pair first), a step whose second
    micro-batch holds an id outside the vocabulary or a float is refused before the first
    micro-batch's backward: the error names the pair, field and position (not the embedding's
    index error), no gradient is left on the parameters and no optimizer state is made; the
    memory probe names it too. A good list then trains."""
    pairs = _pairs(tiny_model_dir, write_pairs(tmp_path / "d.jsonl", n=4, seed=4))
    model = load_pretrained(tiny_model_dir)
    ref = score_pairs(model, pairs, max_tokens_per_batch=1024, impl="torch")
    trainer = _trainer(model, tmp_path)
    before = [p.detach().clone() for p in model.parameters()]
    vocab = model.lm_head_weight.shape[0]
    for bad, error, said in (
        (vocab, ValueError, f"holds token id {vocab}, outside the model's vocabulary"),
        (2.0, TypeError, "is 2.0, a float"),
    ):
        broken = [*pairs[:3], replace(pairs[3], chosen_ids=[bad, *pairs[3].chosen_ids[1:]])]
        where = rf"pair {pairs[3].index}: chosen_ids\[0\] {said}"
        with pytest.raises(error, match=where):
            trainer.train_step(broken, [[0, 1], [2, 3]], ref)
        assert all(p.grad is None for p in model.parameters())
        assert not trainer.optimizer.state
        with pytest.raises(error, match=where):
            trainer.probe_memory(broken, ref, [[3]])
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    trainer.train_step(pairs, [[0, 1], [2, 3]], ref)
    assert trainer.optimizer.state


def test_train_step_refuses_a_pair_without_reference_values_or_unpackable_before_any_backward(
    tiny_model_dir, tmp_path
):
    """Called directly, a step whose second micro-batch holds a pair the reference table lacks,
    or a pair with an empty prompt, is refused before the first micro-batch's backward (it
    failed in that micro-batch, the first one's gradients left on the parameters), as fit
    refuses them; the same list with a table that holds it, and the good pairs, then train."""
    pairs = _pairs(tiny_model_dir, write_pairs(tmp_path / "d.jsonl", n=4, seed=4))
    model = load_pretrained(tiny_model_dir)
    ref = score_pairs(model, pairs, max_tokens_per_batch=1024, impl="torch")
    short = replace(  # the table without the last pair's row
        ref,
        **{
            f.name: getattr(ref, f.name)[:3]
            for f in fields(ref)
            if getattr(ref, f.name) is not None
        },
    )
    trainer = _trainer(model, tmp_path)
    empty = [*pairs[:3], replace(pairs[3], prompt_ids=[])]
    for step_pairs, table, error, said in (
        (pairs, short, KeyError, rf"no reference values for pairs \[{pairs[3].index}\]"),
        (empty, ref, ValueError, rf"pair {pairs[3].index} has an empty prompt"),
    ):
        with pytest.raises(error, match=said):
            trainer.train_step(step_pairs, [[0, 1], [2, 3]], table)
        assert all(p.grad is None for p in model.parameters())
        assert not trainer.optimizer.state
    trainer.train_step(pairs, [[0, 1], [2, 3]], ref)
    assert trainer.optimizer.state


def test_optimizer_states_are_made_only_for_adam_and_none_are_left_by_a_failed_step():
    """Another optimizer's step at lr 0 need not leave the weights alone (Adafactor's relative
    step size, SGD's momentum buffers, LBFGS's closure), so none is taken for it; a step that
    fails part way (out of memory while making the states) leaves no state behind."""
    w = torch.nn.Parameter(torch.randn(5, 3, dtype=torch.float64))
    before = w.detach().clone()
    sgd = torch.optim.SGD([w], lr=0.1, momentum=0.9, weight_decay=0.1)
    assert create_optimizer_states(sgd) == [] and not sgd.state and torch.equal(w, before)

    adam = torch.optim.AdamW([w], lr=0.1, weight_decay=0.1)

    def fail_after_the_states(*args, **kwargs):
        adam.state[w]["step"] = torch.tensor(1.0)  # made, then the step fails
        raise torch.OutOfMemoryError("out of memory")

    adam.step = fail_after_the_states
    with pytest.raises(torch.OutOfMemoryError):
        create_optimizer_states(adam)
    assert not adam.state and adam.param_groups[0]["lr"] == 0.1 and w.grad is None
    del adam.step
    assert create_optimizer_states(adam) == [w] and torch.equal(w, before)


@pytest.mark.gpu
def test_memory_probe_peak_on_cuda_is_the_peak_of_the_training_steps(tmp_path, cuda_blas_warm):
    """On CUDA (fused AdamW, bf16-mixed: fp32 weights, 8 bytes of states a parameter) the
    probe's peak on a fresh optimizer is the peak of training steps on its micro-batch, whose
    backward holds AdamW's states from the second step on: within a quarter of the states'
    size (about 200 MB here; a probe without them was short by all of it), and the weights
    are bit for bit as before the probe."""
    from sdpo.engine.tiny import write_tiny_model

    model_dir = write_tiny_model(
        tmp_path / "m", words=WORDS, hidden_size=1024, num_heads=16, num_kv_heads=4, seed=2
    )  # 24 M parameters, heads of 64
    pairs = _pairs(model_dir, write_pairs(tmp_path / "d.jsonl", n=8, seed=5))
    model = load_pretrained(model_dir, device="cuda")
    trainer = _trainer(model, tmp_path, learning_rate=1e-5)
    assert trainer.precision == "bf16-mixed" and trainer.optimizer.param_groups[0]["fused"]
    ref = score_pairs(model, pairs, max_tokens_per_batch=1024, impl="torch", precision="bf16-mixed")
    batch = list(range(len(pairs)))
    before = [p.detach().cpu() for p in model.parameters()]  # not on the measured device
    result = trainer.probe_memory(pairs, ref, [batch])
    assert all(torch.equal(p.cpu(), b) for p, b in zip(model.parameters(), before))
    assert not trainer.optimizer.state
    states = result["optimizer_state_bytes"]  # the step counts on the device too (fused)
    assert states == sum(8 * p.numel() + 4 for p in model.parameters())
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(3):
        trainer.train_step(pairs, [batch], ref)
    torch.cuda.synchronize()
    trained = torch.cuda.max_memory_allocated()
    assert optimizer_state_bytes(trainer.optimizer) == states
    probed = result["peak_gib"] * 2**30
    assert abs(probed - trained) <= states / 4, (probed / 2**20, trained / 2**20, states / 2**20)


def test_a_step_with_the_sft_type_is_the_step_s_token_mean_on_every_path(tiny_model_dir, tmp_path):
    """loss_type ["sigmoid", "sft"]: the first step's loss is log 2 plus w times the step's mean
    token NLL of the chosen completions (float64 truth from a separate scoring pass), whether
    the step runs as one micro-batch or several, on the fused or the plain path, with shared
    prompts; and the updates agree."""
    from functools import partial

    from sdpo.losses import LossConfig, dpo_loss

    pairs = _pairs(tiny_model_dir, write_pairs(tmp_path / "d.jsonl", n=9, seed=13))
    truth = score_pairs(
        load_pretrained(tiny_model_dir, dtype=torch.float64), pairs, max_tokens_per_batch=4096
    )
    weight = 0.7
    want = torch.log(torch.tensor(2.0, dtype=torch.float64)) - weight * (
        truth.chosen_logps.double().sum() / sum(len(p.chosen_ids) for p in pairs)
    )
    ref = score_pairs(load_pretrained(tiny_model_dir), pairs, max_tokens_per_batch=4096)
    loss = LossConfig(beta=0.1, loss_type=["sigmoid", "sft"], loss_weights=[1.0, weight])
    results = {}
    for name, overrides in {
        "one": {"max_tokens_per_batch": 4096},
        "several": {"max_tokens_per_batch": 64},
        "plain": {"max_tokens_per_batch": 64, "loss_path": "plain"},
        "shared": {"max_tokens_per_batch": 64, "share_prompt": True},
    }.items():
        config = TrainConfig(learning_rate=1e-2, pairs_per_step=9, warmup_ratio=0.0, **overrides)
        model = load_pretrained(tiny_model_dir)
        trainer = DPOTrainer(
            model, config=config, loss_fn=partial(dpo_loss, config=loss), progress=False
        )
        step = plan_steps(pairs, config, epoch=0)[0]
        assert (len(step) > 1) == (name != "one"), name
        metrics = trainer.train_step(pairs, step, ref)
        results[name] = (float(metrics["loss"]), model.state_dict())
        assert results[name][0] == pytest.approx(float(want), rel=1e-5), name
    for name in ("several", "plain", "shared"):
        for key, w in results["one"][1].items():
            assert torch.allclose(w, results[name][1][key], rtol=1e-4, atol=1e-6), (name, key)
