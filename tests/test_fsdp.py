"""Sharded data parallelism (``train.fsdp``, FSDP2) with real ``torch.distributed`` (gloo, two
CPU processes): one optimizer step (untied and tied embeddings, uneven work per rank; bf16
parameters; gradient checkpointing; compiled decoder layers), the scoring pass and a two-step
sDPO run give what one process gives (also with a separate reference, loaded sharded), and a
sharded run resumes from its checkpoints, sharded or in one process."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import shutil
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sdpo.config import config_from_dict
from sdpo.engine import sharding
from sdpo.engine.checkpoint import load_pretrained
from sdpo.engine.compile import compile_decoder_layers
from sdpo.engine.scoring import PairLogps, score_pairs
from sdpo.engine.trainer import TrainConfig, plan_steps
from sdpo.runner import run_training
from tests.conftest import dpo_trainer
from tests.test_distributed import (
    _alongside,
    _close,
    _pairs,
    _run_config,
    _spawn,
    _strip,
    assert_same_score_rows,
)


def _one_process_reference(model_dir: Path, pairs) -> PairLogps:
    """The reference values of ``pairs`` under the unsharded model (the same on every rank)."""
    return score_pairs(
        load_pretrained(model_dir),
        pairs,
        max_tokens_per_batch=4096,
        impl="torch",
        data_parallel=False,
    )


def _one_process_and_two_ranks(tmp: Path, steps: Callable[[Path, Path, bool], dict]):
    """``steps(model_dir, data, fsdp)`` on a tiny model and 23 pairs: in this process unsharded,
    then sharded on two gloo ranks; returns (one process's result, each rank's)."""
    from sdpo.engine.tiny import write_tiny_model
    from tests.conftest import WORDS, write_pairs

    model_dir = write_tiny_model(tmp / "model", words=WORDS, hidden_size=32, seed=1)
    data = write_pairs(tmp / "d.jsonl", n=23, seed=11)
    return _alongside(lambda: steps(model_dir, data, False), tmp, steps, model_dir, data, True)


LR = 1e-2
# several micro-batches per step (3 on one rank, 2 on the other: a filler pass) and a step of
# one pair (one rank runs a filler pass only)
CASES = [
    ("micro_batches", {"pairs_per_step": 9, "max_tokens_per_batch": 60}),
    ("one_pair", {"pairs_per_step": 1, "max_tokens_per_batch": 4096}),
]


def _shifted(ref, n):
    return type(ref)(
        pair_indices=ref.pair_indices,
        chosen_logps=ref.chosen_logps - 0.3 * torch.arange(n) % 1.1,
        rejected_logps=ref.rejected_logps + 0.2,
        chosen_tokens=ref.chosen_tokens,
        rejected_tokens=ref.rejected_tokens,
    )


def _one_step(model, pairs, ref, config: TrainConfig, *, fsdp: bool) -> dict:
    """One optimizer step of the plan's first step: metrics, full weights and full gradients."""
    trainer = dpo_trainer(model, config)
    plan = plan_steps(pairs, config, epoch=0)
    ref = _shifted(ref, len(pairs))
    # the memory probe first (one pass per rank, gathers and scatters included): it must leave
    # the step exactly as it would be without it
    trainer.probe_memory(pairs, ref, plan[0])
    metrics = trainer.train_step(pairs, plan[0], ref)
    grads = {k: sharding.full_tensor(p.grad).clone() for k, p in model.named_parameters()}
    weights = sharding.full_state_dict(model) if fsdp else model.state_dict()
    return {
        "metrics": {k: float(v) for k, v in metrics.items()},
        "weights": {k: v.detach().clone() for k, v in weights.items()},
        "grads": grads,
        "plan": plan[0],
    }


def _step_and_scores(model_dir: Path, data: Path, fsdp: bool) -> dict:
    """One optimizer step per case and a scoring pass, in one process or on every rank."""
    pairs = _pairs(model_dir, data)
    model = load_pretrained(model_dir)
    ref = score_pairs(model, pairs, max_tokens_per_batch=4096, impl="torch", data_parallel=False)
    if fsdp:
        model = sharding.shard_model(model, precision="fp32")
    scores = score_pairs(model, pairs, max_tokens_per_batch=80, impl="torch")
    steps = {}
    for name, settings in CASES:
        model = load_pretrained(model_dir)
        if fsdp:
            model = sharding.shard_model(model, precision="fp32")
            assert sharding.is_sharded(model)
        config = TrainConfig(learning_rate=LR, seed=3, fsdp=fsdp, **settings)
        steps[name] = _one_step(model, pairs, ref, config, fsdp=fsdp)
    return {"scores": scores, "steps": steps}


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def step_results(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp_step")
    from sdpo.engine.tiny import write_tiny_model
    from tests.conftest import WORDS, write_pairs

    model_dir = write_tiny_model(
        tmp / "model", words=WORDS, hidden_size=32, seed=1, tie_word_embeddings=request.param
    )
    data = write_pairs(tmp / "d.jsonl", n=23, seed=11)
    return _alongside(
        lambda: _step_and_scores(model_dir, data, False),
        tmp,
        _step_and_scores,
        model_dir,
        data,
        True,
    )


@pytest.mark.parametrize("case", [name for name, _ in CASES])
def test_one_sharded_step_equals_one_process(step_results, case):
    single, ranks = step_results
    want = single["steps"][case]
    if case == "micro_batches":
        assert len(want["plan"]) == 3  # 2 + 1 over the ranks: one filler pass
    for r, got in enumerate(ranks):
        got = got["steps"][case]
        assert got["plan"] == want["plan"]
        for k, v in want["metrics"].items():
            assert got["metrics"][k] == pytest.approx(v, rel=1e-6, abs=1e-6), (r, k)
        # the reduce-scattered gradient is the single-process sum (not the mean over ranks),
        # lm_head (or the tied embedding) included
        assert want["grads"].keys() == got["grads"].keys()
        for name, g in want["grads"].items():
            assert _close(g, got["grads"][name]), (r, name)
    # rank 0 gathers the whole state dict; every weight within Adam's rounding of one process
    gathered = ranks[0]["steps"][case]["weights"]
    assert gathered.keys() == want["weights"].keys()
    assert ranks[1]["steps"][case]["weights"] == {}
    for name, w in want["weights"].items():
        assert (w - gathered[name]).abs().max().item() <= 1e-3 * LR, name


def test_sharded_scoring_equals_one_process(step_results):
    single, ranks = step_results
    want = single["scores"]
    for got in ranks:
        got = got["scores"]
        assert torch.equal(got.pair_indices, want.pair_indices)
        assert torch.allclose(got.chosen_logps, want.chosen_logps, rtol=1e-6, atol=1e-5)
        assert torch.allclose(got.rejected_logps, want.rejected_logps, rtol=1e-6, atol=1e-5)


def _train(config: dict, resume: bool = False):
    try:
        result = run_training(config_from_dict(config), progress=False, resume=resume)
    except Exception as e:
        return type(e).__name__, str(e)
    return result.scoring_calls


def test_two_step_sdpo_run_sharded_writes_what_one_process_writes(tiny_model_dir, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    config = _run_config(tmp_path, tiny_model_dir, one)
    sharded = {**_run_config(tmp_path, tiny_model_dir, two)}
    sharded["train"] = {**sharded["train"], "fsdp": True}
    calls_one, calls_two = _alongside(lambda: _train(config), tmp_path, _train, sharded)
    assert calls_two == [calls_one] * 2
    for t in (1, 2):  # the gathered weights, written by rank 0 as a Hugging Face folder
        a = load_file(str(one / f"step-{t}" / "model.safetensors"))
        b = load_file(str(two / f"step-{t}" / "model.safetensors"))
        assert a.keys() == b.keys()
        for name, w in a.items():
            assert (w - b[name]).abs().max().item() <= 1e-5, (t, name)
    # mid-step checkpoints hold the gathered weights and the gathered optimizer state, in the
    # form a plain run writes (parameters numbered in the same order, the same tensor shapes)
    mid = sorted((two / "checkpoints").iterdir())[0]
    assert load_file(str(mid / "model" / "model.safetensors")).keys() == a.keys()
    got = torch.load(mid / "trainer_state.pt", weights_only=True)["optimizer"]
    plain = sorted((one / "checkpoints").iterdir())[0] / "trainer_state.pt"
    want = torch.load(plain, weights_only=True)["optimizer"]
    assert got["param_groups"] == want["param_groups"]
    assert got["state"].keys() == want["state"].keys()
    for i, s in want["state"].items():
        assert torch.equal(s["step"], got["state"][i]["step"])
        for k in ("exp_avg", "exp_avg_sq"):
            assert s[k].shape == got["state"][i][k].shape
            assert torch.allclose(s[k], got["state"][i][k], rtol=1e-4, atol=1e-7), (i, k)
    # the caches of the sharded run equal one process's (the fingerprint of the gathered model
    # is the unsharded one's, so the keys agree)
    for name in ("initial", "step-2"):
        x = load_file(str(one / "cache" / f"{name}.safetensors"))
        y = load_file(str(two / "cache" / f"{name}.safetensors"))
        for k, v in x.items():
            if v.is_floating_point():
                assert torch.allclose(v, y[k], rtol=1e-6, atol=1e-5), (name, k)
    assert (one / "metrics.jsonl").read_text().count("\n") == (
        two / "metrics.jsonl"
    ).read_text().count("\n")

    # resume from the mid-step checkpoint of step 2, sharded on two ranks: the same bits as
    # the uninterrupted sharded run; in one process (the same checkpoint, no sharding): the
    # sharded run's weights within float rounding
    final = load_file(str(two / "step-2" / "model.safetensors"))
    lines = (two / "metrics.jsonl").read_text().splitlines()
    three = tmp_path / "three"
    _interrupt_in_step_2(two)
    shutil.copytree(two, three)
    single = {**_run_config(tmp_path, tiny_model_dir, three)}
    single["train"] = {**single["train"], "fsdp": True}  # one process: fsdp changes nothing
    calls_single, calls = _alongside(lambda: _train(single, True), tmp_path, _train, sharded, True)
    assert isinstance(calls[0], int) and calls[1] == calls[0], calls  # not an error
    resumed = load_file(str(two / "step-2" / "model.safetensors"))
    for name, w in final.items():
        assert torch.equal(w, resumed[name]), name
    assert [_strip(x) for x in (two / "metrics.jsonl").read_text().splitlines()] == [
        _strip(x) for x in lines
    ]
    assert isinstance(calls_single, int), calls_single
    resumed = load_file(str(three / "step-2" / "model.safetensors"))
    for name, w in final.items():
        assert (w - resumed[name]).abs().max().item() <= 1e-5, name


def test_sharded_resume_with_the_optimizer_kept_across_steps(tiny_model_dir, tmp_path):
    """sdpo.reset_optimizer = false: the end-of-step checkpoint holds the gathered optimizer;
    resuming after step 1 on two ranks gives the uninterrupted sharded run's bits."""
    out = tmp_path / "out"
    config = _run_config(tmp_path, tiny_model_dir, out)
    config["train"] = {**config["train"], "fsdp": True, "save_every": 0}
    config["sdpo"] = {**config["sdpo"], "reset_optimizer": False, "report_scoring": False}
    calls = _spawn(tmp_path, _train, config)
    assert isinstance(calls[0], int), calls
    final = load_file(str(out / "step-2" / "model.safetensors"))
    checkpoints = sorted((out / "checkpoints").iterdir())
    assert len(checkpoints) == 2  # the ends of steps 1 and 2
    kept = torch.load(checkpoints[0] / "trainer_state.pt", weights_only=True)["optimizer"]
    assert kept["state"] and kept["param_groups"]
    shutil.rmtree(checkpoints[1])
    shutil.rmtree(out / "step-2")
    calls = _spawn(tmp_path, _train, config, True)
    assert isinstance(calls[0], int), calls
    resumed = load_file(str(out / "step-2" / "model.safetensors"))
    for name, w in final.items():
        assert torch.equal(w, resumed[name]), name


@contextlib.contextmanager
def _loads_seen(module) -> Iterator[list[tuple[str, bool]]]:
    """``module.load_pretrained`` noting each load: (folder name, sharded while loading)."""
    seen: list[tuple[str, bool]] = []
    real = module.load_pretrained

    def watched(path, **kw):
        seen.append((Path(path).name, kw.get("shard") is not None))
        return real(path, **kw)

    module.load_pretrained = watched
    try:
        yield seen
    finally:
        module.load_pretrained = real


def _train_watching_loads(config: dict) -> tuple[int, list[tuple[str, bool]]]:
    from sdpo import runner

    with _loads_seen(runner) as loads:
        return _train(config), loads


def test_a_separate_reference_is_loaded_sharded_and_scores_what_one_process_scores(
    tiny_model_dir, tmp_path
):
    """sdpo.reference under train.fsdp: the reference is built on the meta device and each rank
    reads its own shards (a reference larger than one GPU loads), and its cached values, the
    trained weights and the report equal one process's with the whole reference."""
    from sdpo.engine.tiny import write_tiny_model
    from tests.conftest import WORDS

    ref_dir = write_tiny_model(tmp_path / "ref", words=WORDS, hidden_size=32, seed=9)
    one, two = tmp_path / "one", tmp_path / "two"
    configs = {}
    for out, fsdp in ((one, False), (two, True)):
        config = _run_config(tmp_path, tiny_model_dir, out)
        config["train"] = {**config["train"], "fsdp": fsdp, "save_every": 0}
        config["sdpo"] = {**config["sdpo"], "reference": str(ref_dir), "report_scoring": False}
        configs[out] = config
    (calls_one, loads_one), ranks = _alongside(
        lambda: _train_watching_loads(configs[one]), tmp_path, _train_watching_loads, configs[two]
    )
    assert loads_one[0] == ("ref", False)
    for calls, loads in ranks:
        assert calls == calls_one
        assert loads[0] == ("ref", True)  # the reference first, sharded, then the policy
        assert all(sharded for _, sharded in loads), loads
    a = load_file(str(one / "cache" / "reference.safetensors"))
    b = load_file(str(two / "cache" / "reference.safetensors"))
    assert a.keys() == b.keys()
    for k, v in a.items():
        if v.is_floating_point():
            assert torch.allclose(v, b[k], rtol=1e-6, atol=1e-5), k
        else:
            assert torch.equal(v, b[k]), k
    for t in (1, 2):
        x = load_file(str(one / f"step-{t}" / "model.safetensors"))
        y = load_file(str(two / f"step-{t}" / "model.safetensors"))
        for name, w in x.items():
            assert (w - y[name]).abs().max().item() <= 1e-5, (t, name)
    # every step's γ_ref is the separate reference's, the same in both runs
    steps_one = json.loads((one / "sdpo_report.json").read_text())["steps"]
    steps_two = json.loads((two / "sdpo_report.json").read_text())["steps"]
    for x, y in zip(steps_one, steps_two, strict=True):
        assert y["gamma_ref_chunk"] == pytest.approx(x["gamma_ref_chunk"], rel=1e-5, abs=1e-5)
        assert y["train_metrics"]["loss"] == pytest.approx(x["train_metrics"]["loss"], rel=1e-4)


def _score_watching_loads(args: list[str]) -> tuple[int, list[tuple[str, bool]]]:
    from sdpo.cli import main
    from sdpo.engine import checkpoint

    with _loads_seen(checkpoint) as loads:
        return main(args), loads


def test_sdpo_score_with_fsdp_loads_sharded_and_writes_what_one_process_writes(
    tiny_model_dir, tmp_path
):
    from tests.conftest import write_pairs

    data = write_pairs(tmp_path / "pairs.jsonl", n=11, seed=8)
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    base = ["score", "--model", str(tiny_model_dir), "--data", str(data), "--impl", "torch"]
    base += ["--fsdp", "--precision", "fp32"]
    (code_one, loads_one), ranks = _alongside(
        lambda: _score_watching_loads([*base, "--out", str(one)]),
        tmp_path,
        _score_watching_loads,
        [*base, "--out", str(two)],
    )
    assert (code_one, loads_one) == (0, [("model", False)])  # one process: no sharding
    assert ranks == [(0, [("model", True)])] * 2
    assert_same_score_rows(one, two)


def _interrupt_in_step_2(out: Path) -> None:
    """Leave ``out`` as a run killed inside sDPO step 2, after a mid-step checkpoint."""
    shutil.rmtree(sorted((out / "checkpoints").iterdir())[-1])  # the end-of-step checkpoint
    shutil.rmtree(out / "step-2")
    left = sorted((out / "checkpoints").iterdir())[-1]
    progress = json.loads((left / "progress.json").read_text())
    assert not progress["step_finished"] and progress["sdpo_step"] == 2


def _bf16_mixed_scores_and_keys(config: dict, data: Path) -> tuple[torch.Tensor, dict]:
    """The pairs' bf16-mixed chosen log-probs under ``config``'s model (sharded where the run
    would shard it), and the digest of the reference cache key the runner gives them under
    each precision."""
    from sdpo.runner import StepwiseRunner

    model_dir = Path(config["model"]["path"])
    pairs = _pairs(model_dir, data)
    keys = {}
    for precision in ("bf16-mixed", "fp32"):
        cfg = config_from_dict({**config, "train": {**config["train"], "precision": precision}})
        keys[precision] = StepwiseRunner(cfg, progress=False).cache_key("0" * 64, pairs).digest()
    model = load_pretrained(model_dir)
    if sharding.wanted(config["train"]["fsdp"]):
        model = sharding.shard_model(model, precision="bf16-mixed")
    scores = score_pairs(model, pairs, max_tokens_per_batch=4096, precision="bf16-mixed")
    return scores.chosen_logps, keys


def test_bf16_mixed_values_scored_sharded_round_otherwise_and_are_cached_apart(
    tiny_model_dir, tmp_path
):
    """bf16-mixed under FSDP runs the forward on bf16 copies of the parameters, one process
    autocasts over fp32 ones: other values, so a reference cache of one must not serve the
    other (the policy would start a step away from its reference). fp32 computes alike sharded
    or whole: one key."""
    config = _run_config(tmp_path, tiny_model_dir, tmp_path / "out")
    data = Path(config["data"]["sources"][0]["path"])
    whole = {**config, "train": {**config["train"], "fsdp": False}}
    sharded = {**config, "train": {**config["train"], "fsdp": True}}
    (values, keys), ranks = _alongside(
        lambda: _bf16_mixed_scores_and_keys(whole, data),
        tmp_path,
        _bf16_mixed_scores_and_keys,
        sharded,
        data,
    )
    for rank_values, rank_keys in ranks:
        assert (rank_values - values).abs().max().item() > 1e-4
        assert rank_keys["bf16-mixed"] != keys["bf16-mixed"]
        assert rank_keys["fp32"] == keys["fp32"]


def test_fsdp_in_one_process_is_the_plain_run(tiny_model_dir, tmp_path):
    """No process group: train.fsdp changes nothing (a world of one has nothing to shard)."""
    assert not sharding.wanted(True)
    with pytest.raises(RuntimeError, match="more than one rank"):
        sharding.shard_model(load_pretrained(tiny_model_dir), precision="fp32")
    with pytest.raises(ValueError, match="fsdp must be true or false"):
        TrainConfig(fsdp="yes")


# one sharded step against one process: bf16 parameters (and optimizer states), and fp32 with
# gradient checkpointing (each decoder layer's forward recomputed inside FSDP's backward)
VARIANTS = {"bf16": ("bf16", False), "checkpointing": ("fp32", True)}


def _variant_steps(model_dir: Path, data: Path, fsdp: bool) -> dict:
    pairs = _pairs(model_dir, data)
    ref = _one_process_reference(model_dir, pairs)
    out = {}
    for name, (precision, checkpointing) in VARIANTS.items():
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        model = load_pretrained(model_dir, dtype=dtype)
        model.gradient_checkpointing = checkpointing
        if fsdp:
            model = sharding.shard_model(model, precision=precision)
        config = TrainConfig(
            learning_rate=LR,
            seed=3,
            fsdp=fsdp,
            precision=precision,
            adam_eps=1e-3,
            pairs_per_step=9,
            max_tokens_per_batch=60,
        )
        step = _one_step(model, pairs, ref, config, fsdp=fsdp)
        out[name] = {**step, "dtype": next(iter(step["grads"].values())).dtype}
    return out


@pytest.fixture(scope="module")
def variant_results(tmp_path_factory):
    return _one_process_and_two_ranks(tmp_path_factory.mktemp("fsdp_variants"), _variant_steps)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_sharded_step_variant_equals_one_process(variant_results, variant):
    single, ranks = variant_results
    want = single[variant]
    dtype = torch.bfloat16 if variant == "bf16" else torch.float32
    eps = torch.finfo(dtype).eps  # tolerances scale with the parameters' precision
    for r, got in enumerate(ranks):
        got = got[variant]
        assert want["dtype"] == got["dtype"] == dtype
        for k, v in want["metrics"].items():  # the loss head computes in fp32
            assert got["metrics"][k] == pytest.approx(v, rel=1e-5, abs=1e-6), (r, k)
        assert want["grads"].keys() == got["grads"].keys()
        for name, g in want["grads"].items():
            scale = g.double().abs().max().item()
            diff = (g.double() - got["grads"][name].double()).abs().max().item()
            assert diff <= 4 * eps * scale + 1e-12, (r, name, diff, scale)
    gathered = ranks[0][variant]["weights"]
    assert gathered.keys() == want["weights"].keys()
    for name, w in want["weights"].items():
        assert gathered[name].dtype == dtype
        diff = (w.double() - gathered[name].double()).abs().max().item()
        assert diff <= 2 * eps * w.double().abs().max().item() + 1e-3 * LR, (name, diff)


# model.compile under FSDP, built as the runner builds it: each decoder layer compiled, then
# sharded. Traced by Dynamo and AOTAutograd and split by the min-cut partitioner under an
# activation budget, run without code generation (the CPU tests' backend); the truth is one
# process's plain eager model.
COMPILE_BACKEND = "aot_eager_decomp_partition"


def _compiled_steps(model_dir: Path, data: Path, fsdp: bool) -> dict:
    """The scoring pass and one optimizer step without and with gradient checkpointing."""
    from torch._dynamo.utils import counters

    pairs = _pairs(model_dir, data)
    ref = _one_process_reference(model_dir, pairs)

    def policy():
        model = load_pretrained(model_dir)
        if fsdp:
            compile_decoder_layers(model, backend=COMPILE_BACKEND, activation_memory_budget=0.5)
            model = sharding.shard_model(model, precision="fp32")
        return model

    out = {"scores": score_pairs(policy(), pairs, max_tokens_per_batch=80, impl="torch")}
    graphs = []
    for checkpointing in (False, True):
        model = policy()
        model.gradient_checkpointing = checkpointing
        config = TrainConfig(
            learning_rate=LR, seed=3, fsdp=fsdp, pairs_per_step=9, max_tokens_per_batch=60
        )
        out[checkpointing] = _one_step(model, pairs, ref, config, fsdp=fsdp)
        graphs.append(counters["stats"]["unique_graphs"])
    # the trained model scored in batches of new shapes: no new graph
    out["trained_scores"] = score_pairs(model, pairs, max_tokens_per_batch=50, impl="torch")
    out["graphs"] = (*graphs, counters["stats"]["unique_graphs"])
    out["graph_breaks"] = dict(counters["graph_break"])
    return out


@pytest.fixture(scope="module")
def compiled_results(tmp_path_factory):
    return _one_process_and_two_ranks(tmp_path_factory.mktemp("fsdp_compile"), _compiled_steps)


def test_compiled_layers_under_fsdp_score_and_train_as_one_eager_process(compiled_results):
    single, ranks = compiled_results
    eps = torch.finfo(torch.float32).eps
    for r, got in enumerate(ranks):
        for scores in ("scores", "trained_scores"):
            for field in ("chosen_logps", "rejected_logps"):
                want = getattr(single[scores], field)
                assert torch.allclose(getattr(got[scores], field), want, rtol=1e-5, atol=1e-5)
        for checkpointing in (False, True):
            want, step = single[checkpointing], got[checkpointing]
            assert step["plan"] == want["plan"] and len(want["plan"]) == 3
            for k, v in want["metrics"].items():
                assert step["metrics"][k] == pytest.approx(v, rel=1e-5, abs=1e-6), (r, k)
            for name, g in want["grads"].items():
                scale = g.double().abs().max().item()
                diff = (g.double() - step["grads"][name].double()).abs().max().item()
                assert diff <= 4 * eps * scale + 1e-12, (r, checkpointing, name, diff, scale)
    for checkpointing in (False, True):
        # rank 0's gathered state dict has the plain names (no compile wrapper in them)
        want, gathered = single[checkpointing]["weights"], ranks[0][checkpointing]["weights"]
        assert list(gathered) == list(want)
        for name, w in want.items():
            diff = (w.double() - gathered[name].double()).abs().max().item()
            assert diff <= 2 * eps * w.double().abs().max().item() + 1e-3 * LR, (name, diff)


def test_compiled_layers_under_fsdp_break_only_at_the_attention_loop_and_reuse_their_graphs(
    compiled_results,
):
    """FSDP's gathers and reshards run around the compiled forward, not inside it: the only
    graph break is the CPU path's eager attention loop. The checkpointed step's recomputation
    (which FSDP's forward hook leaves alone) reuses the training graphs, and new batch shapes
    add no graph."""
    _, ranks = compiled_results
    for got in ranks:
        trained, checkpointed, scored = got["graphs"]
        assert 0 < trained == checkpointed == scored, got["graphs"]
        assert got["graph_breaks"], "nothing was compiled"
        for reason in got["graph_breaks"]:
            assert "FSDP" not in reason and "disable" in reason, reason


def test_a_sharded_model_s_config_names_the_precision_s_dtype_not_its_gathered_one():
    """Under bf16-mixed a sharded model's forward gathers its fp32 parameters in bf16, and a
    no-grad pass (scoring) leaves the root's gathered: its embedding then reads bf16. The config
    a run writes names the precision's parameter dtype, the weights' (fp32), whatever the module
    holds at that moment. One process: a group of one rank, sharded as ``shard_model`` shards
    (which asks for several)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from sdpo.engine.checkpoint import pretrained_config
    from sdpo.engine.model import ModelConfig, init_model
    from tests.conftest import TINY_SHAPE

    model = init_model(ModelConfig(vocab_size=64, **TINY_SHAPE), seed=0)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        policy = sharding.mixed_precision_policy("bf16-mixed")
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=False)
        ids = torch.arange(8)
        with torch.no_grad():
            model(ids, ids, torch.tensor([0, 8], dtype=torch.int32), 8)
        assert model.model.embed_tokens.weight.dtype == torch.bfloat16  # gathered, in bf16
        config = pretrained_config(model, precision="bf16-mixed")
        assert (config["dtype"], config["torch_dtype"]) == ("float32", "float32")
        assert pretrained_config(model, precision="bf16")["dtype"] == "bfloat16"
    finally:
        dist.destroy_process_group()


def test_a_model_wrapped_in_fsdp1_is_refused_before_any_work():
    """FSDP1's FullyShardedDataParallel (flat parameters, its own hooks and state dicts) is not
    FSDP2's ``fully_shard`` that sdpo gathers, sums and saves: run_sdpo, DPOTrainer and
    score_pairs refuse it, whole or on a submodule, naming what to use, and leave the weights
    as they were. One process: a gloo group of one rank, where FSDP1 builds on the CPU."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel

    from sdpo.engine.model import ModelConfig, init_model
    from sdpo.losses import LossConfig
    from sdpo.stepwise import run_sdpo
    from tests.conftest import TINY_SHAPE

    pairs = _random_pairs(64)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        cpu = torch.device("cpu")
        whole = FullyShardedDataParallel(
            init_model(ModelConfig(vocab_size=64, **TINY_SHAPE), seed=0), device_id=cpu
        )
        before = {k: v.clone() for k, v in whole.state_dict().items()}
        with pytest.raises(
            TypeError, match=r"run_sdpo: the model is wrapped in Fully.*fully_shard"
        ):
            run_sdpo(
                whole,
                pairs,
                steps=1,
                partition="random",
                train=TrainConfig(learning_rate=LR, pairs_per_step=2),
                loss=LossConfig(beta=0.1),
                kernels_impl="torch",
            )
        assert all(torch.equal(v, before[k]) for k, v in whole.state_dict().items())
        part = init_model(ModelConfig(vocab_size=64, **TINY_SHAPE), seed=0)
        part.model.layers[0] = FullyShardedDataParallel(part.model.layers[0], device_id=cpu)
        with pytest.raises(TypeError, match=r"DPOTrainer: its module 'model.layers.0' is wrapped"):
            dpo_trainer(part, TrainConfig(learning_rate=LR, pairs_per_step=2))
        with pytest.raises(TypeError, match=r"score_pairs: .*DistributedDataParallel"):
            score_pairs(part, pairs, max_tokens_per_batch=256, impl="torch")
    finally:
        dist.destroy_process_group()


# -- models the caller sharded or wrapped itself (the embedding API) -------------------------
def _random_pairs(vocab: int, n: int = 8) -> list:
    """``n`` pairs of random ids below ``vocab``, over two sources."""
    from sdpo.engine.packing import TokenizedPair

    g = torch.Generator().manual_seed(5)

    def ids() -> list[int]:
        length = int(torch.randint(2, 7, (1,), generator=g))
        return torch.randint(1, vocab, (length,), generator=g).tolist()

    return [
        TokenizedPair(
            index=i, prompt_ids=ids(), chosen_ids=ids(), rejected_ids=ids(), source="ab"[i % 2]
        )
        for i in range(n)
    ]


def _callers_models() -> dict:
    """On every rank: the same two-step ``run_sdpo`` on a plain replica, on a model the caller
    sharded with ``fully_shard`` (FSDP's defaults: gradients averaged) and on one wrapped in
    DDP; a bf16 ``fit`` on a plain bf16 replica and on one sharded in bf16; and what is
    refused before any work (a cast of sharded fp32 parameters to bf16, a root left unsharded,
    a DDP over a sub-group or with find_unused_parameters / static_graph, a MixedPrecisionPolicy
    the precision contradicts) or at the first forward (a root that reshards after it); runs
    under the caller's own policy; a sharded Llama resumed from a kept trainer state."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.nn.parallel import DistributedDataParallel

    from sdpo.engine.model import ModelConfig, init_model
    from sdpo.losses import LossConfig
    from sdpo.stepwise import run_sdpo
    from tests.conftest import TINY_SHAPE

    vocab = 64  # below the tiny Hugging Face model's too
    pairs = _random_pairs(vocab)

    def fresh(dtype=torch.float32):
        return init_model(ModelConfig(vocab_size=vocab, **TINY_SHAPE), seed=0, dtype=dtype)

    def shard(model, *, root=True, policy=None, **root_options):
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        mp = {} if policy is None else {"mp_policy": policy}
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh, **mp)
        if root:
            fully_shard(model, mesh=mesh, **mp, **root_options)
        return model

    def weights(model) -> dict:
        return {k: sharding.full_tensor(v.detach()).clone() for k, v in model.state_dict().items()}

    train = TrainConfig(learning_rate=LR, pairs_per_step=2, seed=1, precision="fp32")

    def sdpo_run(model):
        records: list[dict] = []
        run_sdpo(
            model,
            pairs,
            steps=2,
            partition="random",
            train=train,
            loss=LossConfig(beta=0.1),
            kernels_impl="torch",
            log_hook=records.append,
        )
        inner = model.module if isinstance(model, DistributedDataParallel) else model
        return {"weights": weights(inner), "grad_norms": [r["grad_norm"] for r in records]}

    out: dict = {"plain": {**sdpo_run(fresh()), "initial": weights(fresh())}}
    sharded = shard(fresh())
    (group,) = sharding.param_groups(sharded)  # the root's, in either torch's state layout
    out["sharded"] = sdpo_run(sharded)
    # the caller's model averages its gradients again after the run, as FSDP does by default
    out["sharded_reduction_after"] = (
        group.gradient_divide_factor,
        group.force_sum_reduction_for_comms,
    )
    out["ddp"] = sdpo_run(DistributedDataParallel(fresh()))
    if importlib.util.find_spec("transformers") is not None:
        # a Hugging Face model the caller sharded (run_sdpo wraps it in PackedCausalLM, which
        # runs its decoder: the root's gathers must run around it)
        import transformers

        from sdpo.engine.hf import PackedCausalLM
        from tests.conftest import tiny_hf_dict

        for name in ("hf_plain", "hf_sharded", "hf_packed_sharded"):
            torch.manual_seed(0)
            hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**tiny_hf_dict()))
            initial = weights(hf)
            if name == "hf_packed_sharded":  # the caller's own wrapper sharded as the root
                out[name] = sdpo_run(shard(PackedCausalLM(hf)))
            else:
                out[name] = sdpo_run(shard(hf) if name == "hf_sharded" else hf)
            out[name]["initial"] = initial
        out["hf_resumed"] = _resumed_hf_run(shard, weights, pairs)

    ref = score_pairs(fresh(), pairs, max_tokens_per_batch=4096, impl="torch", data_parallel=False)
    ref = _shifted(ref, len(pairs))
    bf16 = replace(train, precision="bf16")
    for name, model in (
        ("plain_bf16", fresh(torch.bfloat16)),
        ("sharded_bf16", shard(fresh(torch.bfloat16))),
    ):
        result = dpo_trainer(model, bf16).fit(pairs, ref)
        out[name] = {"weights": weights(model), "grad_norm": result.last_metrics["grad_norm"]}

    # the caller's MixedPrecisionPolicy: "auto" trains as its sharding says, as sdpo's own
    # bf16-mixed sharding does; bf16-mixed over shards gathered in fp32 computes in bf16 under
    # its autocast, as a plain bf16-mixed replica does
    bf16_fp32 = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    mixed = replace(train, precision="bf16-mixed")
    for name, model, config in (
        ("policy_auto", shard(fresh(), policy=bf16_fp32), replace(train, precision="auto")),
        ("sdpo_mixed", sharding.shard_model(fresh(), precision="bf16-mixed"), mixed),
        ("plain_mixed", fresh(), mixed),
        ("mixed_fp32_gather", shard(fresh()), mixed),
    ):
        trainer = dpo_trainer(model, config)
        result = trainer.fit(pairs, ref)
        out[name] = {
            "weights": weights(model),
            "grad_norm": result.last_metrics["grad_norm"],
            "precision": trainer.precision,
        }

    def refused(make, call) -> tuple[str, str, bool]:
        model = make()
        before = weights(model)
        try:
            call(model)
        except (TypeError, ValueError, RuntimeError) as e:
            after = weights(model)
            unchanged = all(torch.equal(before[k], after[k]) for k in before)
            return type(e).__name__, str(e), unchanged
        return "", "not refused", False

    out["cast"] = refused(lambda: shard(fresh()), lambda m: dpo_trainer(m, bf16))
    out["cast_run"] = refused(lambda: shard(fresh()), lambda m: run_sdpo(m, pairs, train=bf16))
    out["no_root"] = refused(
        lambda: shard(fresh(), root=False), lambda m: run_sdpo(m, pairs, train=train)
    )
    out["root_reshards"] = refused(
        lambda: shard(fresh(), reshard_after_forward=True),
        lambda m: run_sdpo(m, pairs, train=train, kernels_impl="torch"),
    )

    def shard_within_rank(model):  # each rank its own one-rank mesh: no gradient crosses ranks
        mesh = init_device_mesh("cpu", (dist.get_world_size(), 1), mesh_dim_names=("dp", "fs"))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh["fs"])
        return fully_shard(model, mesh=mesh["fs"])

    out["sub_mesh"] = refused(lambda: shard_within_rank(fresh()), lambda m: dpo_trainer(m, train))
    out["sub_mesh_run"] = refused(
        lambda: shard_within_rank(fresh()), lambda m: run_sdpo(m, pairs, train=train)
    )
    # a policy that computes or reduces in a lower dtype than the precision says
    bf16_only = MixedPrecisionPolicy(param_dtype=torch.bfloat16)  # reduces in bf16
    bf16_reduce = MixedPrecisionPolicy(reduce_dtype=torch.bfloat16)
    for name, policy, config in (
        ("policy_fp32", bf16_fp32, train),
        ("policy_mixed_reduce", bf16_only, mixed),
        ("policy_fp32_reduce", bf16_reduce, train),
    ):
        out[name] = refused(
            lambda policy=policy: shard(fresh(), policy=policy),
            lambda m, config=config: dpo_trainer(m, config),
        )
    # outputs cast to bf16 under fp32: the next layer and the head would read them rounded
    out["policy_fp32_output"] = refused(
        lambda: shard(fresh(), policy=MixedPrecisionPolicy(output_dtype=torch.bfloat16)),
        lambda m: dpo_trainer(m, train),
    )
    # the common MixedPrecisionPolicy(param_dtype=torch.bfloat16) reduces in bf16: "auto" takes
    # bf16-mixed from it and is refused, saying so; "bf16" over its fp32 shards is refused,
    # naming the precisions that train them under that policy
    out["policy_auto_reduce"] = refused(
        lambda: shard(fresh(), policy=bf16_only),
        lambda m: dpo_trainer(m, replace(train, precision="auto")),
    )
    out["policy_auto_output"] = refused(
        lambda: shard(fresh(), policy=MixedPrecisionPolicy(output_dtype=torch.bfloat16)),
        lambda m: dpo_trainer(m, replace(train, precision="auto")),
    )
    out["policy_bf16_cast"] = refused(
        lambda: shard(fresh(), policy=bf16_fp32), lambda m: dpo_trainer(m, bf16)
    )
    out["policy_fp32_score"] = refused(
        lambda: shard(fresh(), policy=bf16_fp32),
        lambda m: score_pairs(m, pairs, max_tokens_per_batch=4096, impl="torch", precision="fp32"),
    )
    # score_pairs' default ("auto", the trainer's) scores as the policy computes: bf16-mixed
    scored = shard(fresh(), policy=bf16_only)
    out["policy_score"] = {
        precision: score_pairs(
            scored, pairs, max_tokens_per_batch=4096, impl="torch", **precision_arg
        ).chosen_logps
        for precision, precision_arg in (
            ("default", {}),
            ("bf16-mixed", {"precision": "bf16-mixed"}),
        )
    }
    out["policy_fp32_run"] = refused(
        lambda: shard(fresh(), policy=bf16_fp32), lambda m: run_sdpo(m, pairs, train=train)
    )
    subgroups = [dist.new_group([r]) for r in range(dist.get_world_size())]
    # DDP's record of used parameters: sdpo's passes through the module would mark them used
    # in the wrapper's next iteration, which then fails where one goes unused
    out["ddp_unused"] = refused(
        lambda: DistributedDataParallel(fresh(), find_unused_parameters=True),
        lambda m: run_sdpo(m, pairs, train=train, kernels_impl="torch"),
    )
    out["ddp_static"] = refused(
        lambda: DistributedDataParallel(fresh(), static_graph=True),
        lambda m: dpo_trainer(m, train),
    )
    out["ddp_subgroup"] = refused(
        lambda: DistributedDataParallel(fresh(), process_group=subgroups[dist.get_rank()]),
        lambda m: dpo_trainer(m, train),
    )
    return out


def _resumed_hf_run(shard: Callable, weights: Callable, pairs: list) -> dict:
    """A Hugging Face Llama the caller sharded, trained four optimizer steps in one ``fit``
    whose checkpoint callback keeps, in memory, ``DPOTrainer.state_dict()`` and the model's
    full state dict after step 2 (as a caller's checkpointer does, written later); then a
    fresh sharded model loads those weights (the caller's ``set_model_state_dict``), a new
    trainer loads this rank's state through ``torch.save`` / ``torch.load`` (rank 1's holds
    no optimizer state: rank 0's is broadcast) and the ``fit`` resumed at step 3."""
    import io

    import transformers
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        set_model_state_dict,
    )

    from sdpo.engine.hf import PackedCausalLM
    from tests.conftest import tiny_hf_dict

    def fresh_hf(seed: int) -> PackedCausalLM:
        torch.manual_seed(seed)
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**tiny_hf_dict()))
        return PackedCausalLM(shard(hf))

    config = TrainConfig(learning_rate=LR, pairs_per_step=2, seed=1, precision="fp32", save_every=1)
    model = fresh_hf(0)
    ref = _shifted(score_pairs(model, pairs, max_tokens_per_batch=4096, impl="torch"), len(pairs))
    kept: dict = {}

    def keep(trainer) -> None:
        if trainer.position["step_in_run"] == 2:
            kept["state"] = trainer.state_dict()
            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            kept["weights"] = get_model_state_dict(trainer.model.hf_model, options=options)

    dpo_trainer(model, config, save_checkpoint=keep).fit(pairs, ref)
    buffer = io.BytesIO()
    torch.save(kept["state"], buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    resumed = fresh_hf(7)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(resumed.hf_model, kept["weights"], options=options)
    records: list[dict] = []
    trainer = dpo_trainer(resumed, config, log_hook=records.append)
    trainer.fit(pairs, ref, resume_state=state)
    return {
        "straight": weights(model.hf_model),
        "resumed": weights(resumed.hf_model),
        "steps": [r["step"] for r in records],
        "state_has_optimizer": bool(kept["state"]["optimizer"]),
    }


def _updates_agree(got: dict, want: dict, initial: dict) -> bool:
    """Whether weights ``got`` are ``want`` to 1e-3 of the update from ``initial`` to ``want``
    (both norms over every tensor together)."""
    update = sum(float((v - initial[k]).square().sum()) for k, v in want.items())
    apart = sum(float((got[k] - v).square().sum()) for k, v in want.items())
    return math.sqrt(apart) < 1e-3 * math.sqrt(update)


def test_a_model_the_caller_sharded_or_wrapped_in_ddp_trains_as_plain_data_parallel(tmp_path):
    """The embedding API on two gloo ranks. A model sharded by the caller with fully_shard
    (FSDP averages gradients by default; the loss is divided by the global pair count, so
    they must be summed) and a DDP-wrapped one (trained through its module, so each gradient
    is summed once) end a two-step run_sdpo where the plain replicas end, with the same
    gradient norms; the sharded model averages again afterwards. A model sharded in bf16
    trains in bf16 as a plain bf16 one; fp32 shards are not cast to bf16 (FSDP keeps its
    shards apart from the Parameters) but refused, as are a root left unsharded, a DDP over a
    sub-group and a model sharded over a mesh of fewer ranks (whose gradients no rank outside
    it would add), before any work, and a root that reshards after its forward."""
    ranks = _spawn(tmp_path, _callers_models)
    if "hf_resumed" in ranks[0]:  # only rank 0's state holds the optimizer's, and it logs
        assert [got["hf_resumed"]["state_has_optimizer"] for got in ranks] == [True, False]
        assert ranks[0]["hf_resumed"]["steps"] == [3, 4]
    for got in ranks:
        # DDP: sdpo trains the module it wraps as a plain replica, bitwise. Sharded: the
        # gathered weights are views into FSDP's flat buffers, laid out otherwise than the
        # plain ones, so a matmul may round its last bit otherwise on some builds, which
        # AdamW's first steps (about lr x sign of each gradient) amplify on the few near-zero
        # gradients: the updates are compared as a whole, and the gradient norms to 1e-5 (a
        # gradient scaled by 1/N, FSDP's default mean, fails both)
        plain = got["plain"]
        assert got["ddp"]["grad_norms"] == plain["grad_norms"]
        for k, v in plain["weights"].items():
            assert torch.equal(got["ddp"]["weights"][k], v), k
        sharded = got["sharded"]
        assert sharded["grad_norms"] == pytest.approx(plain["grad_norms"], rel=1e-5)
        assert _updates_agree(sharded["weights"], plain["weights"], plain["initial"])
        if "hf_plain" in got:  # transformers is installed
            hf = got["hf_plain"]
            for sharded in (got["hf_sharded"], got["hf_packed_sharded"]):
                assert sharded["grad_norms"] == pytest.approx(hf["grad_norms"], rel=1e-5)
                assert _updates_agree(sharded["weights"], hf["weights"], hf["initial"])
            # the run resumed from the state kept after step 2 ends bitwise where the
            # uninterrupted one ends
            resumed = got["hf_resumed"]
            for k, v in resumed["straight"].items():
                assert torch.equal(resumed["resumed"][k], v), k
        # the caller's MixedPrecisionPolicy: "auto" is its bf16-mixed, trained bitwise as sdpo's
        # own bf16-mixed sharding; fp32 gathers under bf16-mixed train as a plain replica
        assert got["policy_auto"]["precision"] == "bf16-mixed"
        for k, v in got["sdpo_mixed"]["weights"].items():
            assert torch.equal(got["policy_auto"]["weights"][k], v), k
        assert got["mixed_fp32_gather"]["precision"] == "bf16-mixed"
        assert got["mixed_fp32_gather"]["grad_norm"] == pytest.approx(
            got["plain_mixed"]["grad_norm"], rel=1e-3
        )
        for k, v in got["plain_mixed"]["weights"].items():
            torch.testing.assert_close(got["mixed_fp32_gather"]["weights"][k], v)
        assert got["sharded_reduction_after"] == (None, False)
        assert got["sharded_bf16"]["grad_norm"] == pytest.approx(
            got["plain_bf16"]["grad_norm"], rel=1e-2
        )
        for k, v in got["plain_bf16"]["weights"].items():
            assert got["sharded_bf16"]["weights"][k].dtype == torch.bfloat16
            torch.testing.assert_close(got["sharded_bf16"]["weights"][k], v)
        scores = got["policy_score"]
        assert torch.equal(scores["default"], scores["bf16-mixed"])
        for case, kind, words in (
            ("cast", "ValueError", "Cast the model to torch.bfloat16 before fully_shard"),
            ("cast_run", "ValueError", "precision 'fp32' or 'bf16-mixed'"),
            ("no_root", "ValueError", "shard the root too, fully_shard(model) after its layers"),
            ("root_reshards", "RuntimeError", "reshard_after_forward=False"),
            ("ddp_subgroup", "ValueError", "pass the wrapped module (model.module)"),
            ("ddp_unused", "ValueError", "built without find_unused_parameters=True"),
            ("ddp_static", "ValueError", "DPOTrainer: the DistributedDataParallel model was built"),
            ("sub_mesh", "ValueError", "over a device mesh of 1 rank(s)"),
            ("sub_mesh_run", "ValueError", "shard it over a mesh of all 2 ranks"),
            ("policy_fp32", "ValueError", "train it with precision 'bf16-mixed'"),
            ("policy_fp32_run", "ValueError", "run_sdpo: precision 'fp32' computes in"),
            ("policy_auto_reduce", "ValueError", "precision 'auto' (here 'bf16-mixed', as the"),
            ("policy_auto_output", "ValueError", "precision 'auto' (here 'fp32', as on this"),
            ("policy_bf16_cast", "ValueError", "train it with precision 'bf16-mixed' or 'auto'"),
            ("policy_fp32_output", "ValueError", "casts its forward's outputs to torch.bfloat16"),
            ("policy_fp32_score", "ValueError", "score it with precision 'bf16-mixed'"),
            ("policy_mixed_reduce", "ValueError", "set reduce_dtype=torch.float32"),
            ("policy_fp32_reduce", "ValueError", "reduces them in torch.bfloat16"),
        ):
            error, message, unchanged = got[case]
            assert (error, unchanged) == (kind, True), (case, message)
            assert words in message, (case, message)


def test_param_groups_reads_both_layouts_of_fsdp_state():
    """FSDP2's parameter groups as ``summed_gradients`` reads them, in the state layout of
    torch 2.12 and newer (a list) and in that of earlier releases, 2.11 among them (one
    group or None); reading only the list failed there with an AttributeError."""
    from types import SimpleNamespace

    def module(**state):
        return SimpleNamespace(_get_fsdp_state=lambda: SimpleNamespace(**state))

    a, b = object(), object()
    assert sharding.param_groups(module(_fsdp_param_groups=[a, b])) == [a, b]
    assert sharding.param_groups(module(_fsdp_param_group=a)) == [a]
    assert sharding.param_groups(module(_fsdp_param_group=None)) == []
