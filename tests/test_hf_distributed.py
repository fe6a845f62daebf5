"""Data parallelism on the transformers path (two gloo processes on CPU): random-init
transformers models in ``PackedCausalLM`` trained two optimizer steps on two ranks end with the
same weights on both and with the losses, gradients and weights of one process running the same
global batches (Gemma's scaled and tied embedding, Gemma 2's soft-capped head and a mixture of
experts' router loss included, also where an expert gets tokens on one rank only), and the
mixture's held-out metrics are one process's; a two-step sDPO run on two ranks writes what one
process writes; ``train.fsdp``, which needs sdpo's decoder, is refused on every rank before any
work."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import torch

from sdpo.cli import EXIT_INPUT
from sdpo.config import config_from_dict, write_resolved_config
from sdpo.engine import distributed
from sdpo.engine.checkpoint import load_model
from sdpo.engine.scoring import score_pairs
from sdpo.engine.trainer import TrainConfig, plan_steps
from sdpo.losses import LossConfig
from sdpo.runner import StepwiseRunner
from tests.conftest import dpo_trainer, two_source_config, write_hf_model, write_pairs
from tests.test_distributed import (
    _alongside,
    _metrics,
    _pairs,
    _run_config,
    _train_cli,
    _train_watched,
    _weights,
    preload_in_ranks,
)

pytest.importorskip("transformers")
# this module and transformers' modeling code are imported once, by the forkserver the ranks
# are forked from, not in each rank
preload_in_ranks(
    "tests.test_hf_distributed",
    "transformers.models.auto.modeling_auto",
    "transformers.models.llama.modeling_llama",
    "transformers.models.qwen2.modeling_qwen2",
    "transformers.models.gemma.modeling_gemma",
    "transformers.models.gemma2.modeling_gemma2",
    "transformers.models.qwen2_moe.modeling_qwen2_moe",
    "sdpo.engine.hf",
)

LR = 1e-2
STEPS = 2
# (overlapped all-reduce, max_tokens_per_batch) of each case: several uneven micro-batches per
# step (nine pairs), the all-reduce overlapped with the last backward or after it; a mixture of
# experts also runs steps of one micro-batch each, fewer than the ranks
CASES = {"overlapped": (True, 60), "after": (False, 60)}
ROUTER_CASES = {"one_micro_batch": (True, 4096)}
# loss.router_aux_loss_coef of a model folder (by name): the mixture of experts' coefficient
# instead of its config's 0.001, one that moves the gradients
ROUTER_COEF = {"moe": 0.05}


def _hf_steps(model_dir: Path, data: Path) -> dict:
    """Two optimizer steps of the transformers-run model in each of ``CASES`` (the overlapped
    all-reduce in buckets of 4 KiB, many for this model); runs the same way in one process and
    in every rank. A mixture of experts also records which experts each training forward
    routed tokens to, and its router loss with the micro-batch it was computed over."""
    pairs = _pairs(model_dir, data)
    model = load_model(model_dir, implementation="transformers")
    ref = score_pairs(model, pairs, max_tokens_per_batch=4096, impl="torch", data_parallel=False)
    # rewards off zero from the first step: the pairs' loss gradients differ
    ref = type(ref)(
        pair_indices=ref.pair_indices,
        chosen_logps=ref.chosen_logps - 0.3 * (torch.arange(len(pairs)) % 3),
        rejected_logps=ref.rejected_logps + 0.2,
        chosen_tokens=ref.chosen_tokens,
        rejected_tokens=ref.rejected_tokens,
    )
    out = {"world": distributed.world(), "softcap": model.logit_softcap}
    coef = ROUTER_COEF.get(model_dir.name)
    router = bool(model.router_aux_loss_coef if coef is None else coef)
    for case, (overlap, max_tokens) in {**CASES, **(ROUTER_CASES if router else {})}.items():
        model = load_model(model_dir, implementation="transformers")
        config = TrainConfig(
            learning_rate=LR,
            seed=3,
            pairs_per_step=9,
            max_tokens_per_batch=max_tokens,
            overlap_grad_reduce=overlap,
        )
        trainer = dpo_trainer(model, config, LossConfig(beta=0.1, router_aux_loss_coef=coef))
        if trainer.grad_reducer is not None:
            trainer.grad_reducer = distributed.GradReducer(model.parameters(), bucket_bytes=4096)
        plan = plan_steps(pairs, config, epoch=0)[:STEPS]
        hf = model.hf_model
        experts: list[list[set]] = []  # per step, per training forward: (layer, expert) hit
        auxes: list[list[tuple]] = []  # per step: (input ids, cu_seqlens, router loss)
        if router:
            _record_routing(model, experts, auxes)
        losses, grads, weights, shares, logged = [], [], [], [], []
        for step in plan:
            experts.append([])
            auxes.append([])
            shares.append(trainer._local_share(pairs, step))
            metrics = trainer.train_step(pairs, step, ref)
            losses.append(float(metrics["loss"]))
            logged.append(float(metrics["aux_loss"]) if router else None)
            grads.append({n: p.grad.clone() for n, p in hf.named_parameters()})
            weights.append({n: w.detach().clone() for n, w in hf.state_dict().items()})
        reducer = trainer.grad_reducer
        out[case] = {
            "plan": plan,
            "shares": shares,
            "losses": losses,
            "aux_loss": logged,  # the step's logged router loss
            "grads": grads,
            "weights": weights,
            "experts": experts,
            "aux": auxes,
            "coef": model.router_aux_loss_coef,  # the one the trainer's loss config set
            "buckets": 0 if reducer is None else len(reducer.buckets),
            "in_backward": 0 if reducer is None else reducer.started_in_backward,
        }
    if router:  # the held-out metrics of the last trained model, against the initial's values
        out["eval"] = _held_out_metrics(model, model_dir, pairs, ref)
    return out


def _held_out_metrics(model, model_dir: Path, pairs: list, initial) -> dict[str, float]:
    """The run's held-out metrics (``StepwiseRunner._evaluate``) of ``pairs`` under ``model``,
    scored in batches of up to 150 tokens (several pairs each, a batch across the middle of
    the pairs' tokens); each process logs into its own folder."""
    folder = model_dir.parent / f"eval-{distributed.world()}-{distributed.rank()}"
    folder.mkdir()
    raw = two_source_config(folder, model_dir, sdpo={"score_tokens_per_batch": 150})
    runner = StepwiseRunner(config_from_dict(raw), progress=False)
    runner.out.mkdir()
    runner.eval_pairs, runner.eval_initial = pairs, initial
    return runner._evaluate(model, t=1, beta=0.1, run_step=STEPS, num_tokens=0)


def _record_routing(model, experts: list[list[set]], auxes: list[list[tuple]]) -> None:
    """Hooks on a Qwen2-MoE in ``PackedCausalLM``: each training forward appends to
    ``experts[-1]`` the (layer, expert) pairs its routers sent tokens to, and to ``auxes[-1]``
    its packed input ids, ``cu_seqlens`` and the router loss the trainer adds."""

    def started(module, args) -> None:
        if torch.is_grad_enabled():
            experts[-1].append(set())

    def routed(layer: int, module, args, output) -> None:
        if torch.is_grad_enabled():  # output: (router logits, top-k weights, top-k experts)
            experts[-1][-1].update((layer, e) for e in output[2].unique().tolist())

    def finished(module, args, output) -> None:
        if module._aux_loss is not None:
            auxes[-1].append((args[0].clone(), args[2].clone(), float(module._aux_loss.detach())))

    model.register_forward_pre_hook(started)
    model.register_forward_hook(finished)
    for layer, block in enumerate(model.hf_model.model.layers):
        block.mlp.gate.register_forward_hook(partial(routed, layer))


def _all_steps(model_dirs: list[Path], data: Path) -> list[dict]:
    return [_hf_steps(model_dir, data) for model_dir in model_dirs]


def _one_process(model_dirs: list[Path], data: Path, run: dict) -> list[dict]:
    steps = _all_steps(model_dirs, data)
    _train_watched(run)
    return steps


def _in_ranks(config_file: Path, model_dirs: list[Path], data: Path, run: dict) -> dict:
    """In every rank: ``_hf_steps`` of each model, a two-step sDPO run, then ``sdpo train``
    of ``config_file`` (refused; the command leaves the process group as it ends)."""
    out = {"models": _all_steps(model_dirs, data), "run": _train_watched(run)[1]["tokenize_calls"]}
    code, err, seen = _train_cli(config_file)
    return {"refused": (code, err, seen["tokenize_calls"]), **out}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item() / (a.abs().max().item() + 1e-30)


def test_transformers_models_on_two_ranks_train_as_one_process(tmp_path):
    """An untied Llama, a Qwen2 (q/k/v biases) whose lm_head is its embedding, a Gemma 2
    (soft-capped logits, eager attention), a Qwen2-MoE and a Gemma (scaled embeddings, tied
    head): two optimizer steps each, and a whole two-step sDPO run of the Qwen2."""
    model_dirs = [
        write_hf_model(tmp_path / "llama", "LlamaConfig", seed=2),
        # byte-level BPE: a qwen2 folder gets Qwen2's tokenizer class, which keeps only the
        # file's vocabulary and merges
        write_hf_model(
            tmp_path / "qwen2", "Qwen2Config", seed=3, byte_level=True, tie_word_embeddings=True
        ),
        # logits soft-capped at 2 (30 hardly caps a random init's)
        write_hf_model(tmp_path / "gemma2", "Gemma2Config", seed=4, final_logit_softcapping=2.0),
        # eight experts, one per token, few tokens a micro-batch: some expert gets tokens on
        # one rank and none on the other; trained with loss.router_aux_loss_coef (ROUTER_COEF)
        write_hf_model(
            tmp_path / "moe",
            "Qwen2MoeConfig",
            seed=5,
            num_experts=8,
            num_experts_per_tok=1,
            moe_intermediate_size=8,
            shared_expert_intermediate_size=8,
        ),
        # embeddings scaled by sqrt(hidden), lm_head tied to them, and an attention dropout
        # that training turns off (a rank's own dropout draws would part the ranks)
        write_hf_model(tmp_path / "gemma", "GemmaConfig", seed=6, attention_dropout=0.5),
    ]
    data = write_pairs(tmp_path / "d.jsonl", n=23, seed=11)
    (tmp_path / "fsdp").mkdir()
    sharded = two_source_config(
        tmp_path / "fsdp",
        model_dirs[0],
        model={"implementation": "transformers"},
        train={"fsdp": True},
    )
    config_file = tmp_path / "fsdp.toml"
    write_resolved_config(config_from_dict(sharded), config_file)
    one, two = tmp_path / "one", tmp_path / "two"
    runs = [_run_config(tmp_path, model_dirs[1], out) for out in (one, two)]
    for run in runs:
        run["model"]["implementation"] = "transformers"
    singles, ranks = _alongside(
        lambda: _one_process(model_dirs, data, runs[0]),
        tmp_path,
        _in_ranks,
        config_file,
        model_dirs,
        data,
        runs[1],
    )
    assert [r["run"] for r in ranks] == [1, 0]  # rank 0 alone read and tokenized the data
    _check_run(one, two)
    # train.fsdp: every rank exits with the input error before reading any data; rank 0 says
    # why and what to do
    assert [r["refused"][0] for r in ranks] == [EXIT_INPUT] * 2
    assert [r["refused"][2] for r in ranks] == [0, 0]
    said = ranks[0]["refused"][1]
    assert 'implementation = "transformers"' in said and "sdpo's own decoder" in said
    assert "train.fsdp = true; remove" in said and ranks[1]["refused"][1] == ""
    assert not Path(sharded["output_dir"]).exists()

    for m, (model_dir, single) in enumerate(zip(model_dirs, singles, strict=True)):
        _check_model(single, [r["models"][m] for r in ranks], model_dir)
    # Gemma 2's soft-capped logits ran on the capped head; the mixture of experts' router
    # loss was on
    assert [single["softcap"] for single in singles] == [None, None, 2.0, None, None]
    assert [("one_micro_batch" in single) for single in singles] == [False] * 3 + [True, False]
    # Gemma's head stayed its embedding on both ranks
    for got in (singles[4], *(r["models"][4] for r in ranks)):
        for case in CASES:
            for weights in got[case]["weights"]:
                assert torch.equal(weights["lm_head.weight"], weights["model.embed_tokens.weight"])
    _check_router(singles[3], [r["models"][3] for r in ranks], model_dirs[3])
    # the loss config's coefficient replaced the config's 0.001 in one process and each rank
    assert load_model(model_dirs[3]).router_aux_loss_coef == 0.001
    for got in (singles[3], *(r["models"][3] for r in ranks)):
        assert [got[case]["coef"] for case in (*CASES, *ROUTER_CASES)] == [0.05] * 3


def _check_run(one: Path, two: Path) -> None:
    """A two-step sDPO run (``adam_eps`` 1e-3) on two ranks wrote the files one process wrote,
    step folders of weights equal to 5e-8 (under 2e-5 of the learning rate 3e-3: the ranks'
    gradient sums round in another order) plus the weight's own fp32 rounding (one ulp: a
    norm weight near 1 whose update differs in its last bits may round to the next float),
    and metrics to fp32 rounding."""

    def listing(out: Path) -> list[str]:
        return sorted(str(p.relative_to(out)) for p in out.rglob("*"))

    assert listing(two) == listing(one)
    for t in (1, 2):
        a, b = _weights(one / f"step-{t}"), _weights(two / f"step-{t}")
        assert a.keys() == b.keys() and "lm_head.weight" not in a  # the tie kept
        ulp = torch.finfo(torch.float32).eps
        for name, w in a.items():
            excess = (w - b[name]).abs() - (5e-8 + ulp * w.abs())
            assert excess.max().item() <= 0, (t, name)
    metrics_one, metrics_two = _metrics(one), _metrics(two)
    assert len(metrics_two) == len(metrics_one)
    for m1, m2 in zip(metrics_one, metrics_two, strict=True):
        assert m1.keys() == m2.keys()
        for k, v in m1.items():
            assert m2[k] == pytest.approx(v, rel=1e-4, abs=1e-6), k


def _check_model(single: dict, ranks: list[dict], model_dir: Path) -> None:
    assert single["world"] == 1 and [r["world"] for r in ranks] == [2, 2]
    initial = load_model(model_dir, implementation="transformers").hf_model.state_dict()
    cases = [c for c in (*CASES, *ROUTER_CASES) if c in single]
    assert all(list(r.keys()) == list(single.keys()) for r in ranks)
    for case in cases:
        want = single[case]
        for r, got in enumerate(ranks):
            got = got[case]
            assert got["plan"] == want["plan"], r
            if case in CASES:  # several micro-batches per step, dealt out whole
                assert len(want["plan"][0]) >= 3
            if case == "overlapped":  # the reduction started inside the last backward
                assert got["buckets"] > 4 and got["in_backward"] > 0, r
            for t in range(STEPS):
                where = (model_dir.name, case, r, t)
                # the ranks sum the micro-batches' terms in another order than one process:
                # the losses agree to fp32 rounding (equal, or one unit in the last place) ...
                assert got["losses"][t] == pytest.approx(want["losses"][t], rel=1e-6), where
                # ... and so do the summed gradients: the first step's to 1.1e-7 of each
                # tensor's largest entry, the second's (at weights already apart) to 1.3e-6
                for name, g in want["grads"][t].items():
                    assert _rel(g, got["grads"][t][name]) <= (1e-6, 1e-5)[t], (*where, name)
                # the weights to 1.5e-4 of the learning rate (Qwen2's second step; 1.4e-5
                # for the Llama): Adam's update lr * g / (|g| + eps) turns the rounding of an
                # entry with |g| near eps into a share of lr
                for name, w in want["weights"][t].items():
                    diff = (w - got["weights"][t][name]).abs().max().item()
                    assert diff <= 5e-4 * LR, (*where, name, diff)
        # the ranks hold bitwise the same weights after every step
        for t in range(STEPS):
            for name, w in ranks[0][case]["weights"][t].items():
                assert torch.equal(w, ranks[1][case]["weights"][t][name]), (case, t, name)
        # the steps moved the weights, so the comparisons are not vacuous
        last = want["weights"][-1]
        assert sum(not torch.equal(w, initial[n]) for n, w in last.items()) == len(initial)


def _check_router(single: dict, ranks: list[dict], model_dir: Path) -> None:
    """The mixture of experts: a step in which an expert got tokens on one rank and none on
    the other, among equal results; its router loss computed over every micro-batch of one
    process's plan exactly once, on one rank, as transformers computes it for the micro-batch
    as one padded batch (what TRL's DPOTrainer adds, times router_aux_loss_coef)."""
    overlapped = [r["overlapped"] for r in ranks]
    one_sided = [
        (t, set.union(*overlapped[0]["experts"][t]) ^ set.union(*overlapped[1]["experts"][t]))
        for t in range(STEPS)
    ]
    assert all(hit for _, hit in one_sided), one_sided
    # ... and in the backward that overlaps the all-reduce (each rank's last micro-batch)
    assert overlapped[0]["experts"][0][-1] != overlapped[1]["experts"][0][-1]
    # a step of one micro-batch, fewer than the ranks: dealt out whole, not pair by pair
    for t, step in enumerate(single["one_micro_batch"]["plan"]):
        assert len(step) == 1
        assert [r["one_micro_batch"]["shares"][t] for r in ranks] in ([step, []], [[], step])
    # the held-out metrics are the one process's: each scoring batch is scored whole on one
    # rank, so eval/aux_loss (and the coefficient's share of eval/loss) is the mean over the
    # same batches' router losses
    want = single["eval"]
    assert want["eval/aux_loss"] > 1.0 and want["eval/rewards/margins"] != 0
    for got in ranks:
        assert got["eval"].keys() == want.keys()
        for key, value in want.items():
            assert got["eval"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    hf = load_model(model_dir, implementation="transformers").hf_model
    for case in (*CASES, *ROUTER_CASES):
        # the logged router loss: each micro-batch's, weighted by its pairs, summed over ranks
        for got in ranks:
            assert got[case]["aux_loss"] == pytest.approx(single[case]["aux_loss"], rel=1e-6)
        plan, auxes = single[case]["plan"][0], single[case]["aux"][0]
        assert single[case]["aux_loss"][0] == pytest.approx(
            sum(len(m) * aux for m, (*_, aux) in zip(plan, auxes, strict=True)) / 9, rel=1e-6
        )
        want = single[case]["aux"][0]  # the first step, at the initial weights
        got = [a for r in ranks for a in r[case]["aux"][0]]
        assert len(got) == len(want) == len(single[case]["plan"][0]), case
        for ids, cu, aux in want:
            same = [g for g in got if torch.equal(g[0], ids) and torch.equal(g[1], cu)]
            assert len(same) == 1 and same[0][2] == pytest.approx(aux, rel=1e-6), case
            lengths = (cu[1:] - cu[:-1]).tolist()
            padded = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
            mask = torch.zeros_like(padded)
            for i, n in enumerate(lengths):
                padded[i, :n], mask[i, :n] = ids[cu[i] : cu[i + 1]], 1
            with torch.no_grad():
                trl = hf(input_ids=padded, attention_mask=mask, output_router_logits=True)
            assert aux == pytest.approx(float(trl.aux_loss), rel=1e-5), case
