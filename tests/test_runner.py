"""The stepwise runner end to end on a tiny real model: checkpoints and caches per step, step t's
reference is M_{t-1}, the initial scoring pass is shared, caches are reused and repaired, and a
separate reference model is gone before training starts."""

from __future__ import annotations

import gc
import json
import os
import shutil
import stat
import weakref
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import sdpo.runner as runner_mod
from sdpo.config import ConfigError, config_from_dict
from sdpo.engine.checkpoint import load_pretrained
from sdpo.engine.data import read_preference_file
from sdpo.engine.scoring import score_pairs
from sdpo.engine.tiny import build_tokenizer, write_tiny_model
from sdpo.engine.tokenize import PairTokenizer, tokenize_pairs
from sdpo.engine.trainer import DPOTrainer
from sdpo.runner import OutputDirError, run_training
from tests.conftest import WORDS, reference_token_metrics, two_source_config, write_pairs


def _config(tmp_path: Path, model_dir: Path, **sdpo):
    return config_from_dict(
        two_source_config(tmp_path, model_dir, train={"log_every": 1}, sdpo=sdpo)
    )


def _tokenized(cfg):
    tok = PairTokenizer.from_dir(cfg.model.path)
    rows = []
    for s in cfg.data.sources:
        rows += read_preference_file(s.path, source=s.name)
    pairs, _ = tokenize_pairs(rows, tok, max_length=32, max_prompt_length=16)
    return pairs


def _score(model_dir: Path, pairs):
    return score_pairs(load_pretrained(model_dir), pairs, max_tokens_per_batch=4096, impl="torch")


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """(config, result) of the default two-step run of the tiny model, done once for the tests
    that read its outputs (under umask 027); a test that runs again copies it (``copy_run``)."""
    tmp = tmp_path_factory.mktemp("base_run")
    model_dir = write_tiny_model(tmp / "model", words=WORDS, hidden_size=32, seed=1)
    cfg = _config(tmp, model_dir)
    before = os.umask(0o027)
    try:
        result = run_training(cfg, progress=False)
    finally:
        os.umask(before)
    return cfg, result


def copy_run(base_run, tmp_path: Path):
    """The default run's config under ``tmp_path`` (its data files written there anew, the same
    pairs) with the run's outputs copied to its output_dir, for a test that runs it again."""
    cfg, _ = base_run
    shutil.copytree(cfg.output_dir, tmp_path / "run")
    return _config(tmp_path, Path(cfg.model.path))


def test_two_step_run_writes_step_checkpoints_and_one_cache_per_step(base_run):
    """... with the permissions the umask gives (not the private ones of temporary names)."""
    cfg, result = base_run
    out = Path(cfg.output_dir)
    modes = {p.relative_to(out): stat.S_IMODE(p.stat().st_mode) for p in out.rglob("*")}
    assert len(modes) > 10
    for path, mode in modes.items():
        assert mode == (0o750 if (out / path).is_dir() else 0o640), (path, oct(mode))
    for t in (1, 2):
        for name in ("config.json", "model.safetensors", "tokenizer.json"):
            assert (out / f"step-{t}" / name).is_file()
    assert sorted(p.name for p in (out / "cache").iterdir()) == [
        "initial.safetensors",  # the initial model's pass: step 1's reference values
        "step-2.safetensors",
        "tokens-train.safetensors",  # the tokenized data, reused by a rerun or resume
    ]
    # one scoring pass of the initial model (partition + step 1) and one of M1 (step 2): no more
    assert result.scoring_calls == 2
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {m["sdpo_step"] for m in metrics} == {1, 2}
    assert (out / "sdpo_report.json").is_file() and (out / "config.toml").is_file()


def test_step_references_are_the_previous_models_scored_independently(base_run):
    cfg, _ = base_run
    tiny_model_dir = Path(cfg.model.path)
    out = Path(cfg.output_dir)
    pairs = _tokenized(cfg)
    # step 1: the cache holds the initial model's values on chunk 1 (the "far" source); the
    # given partition and no report scoring need no more of them
    initial = load_file(out / "cache" / "initial.safetensors")
    truth0 = _score(tiny_model_dir, pairs)
    chunk1 = torch.tensor([p.index for p in pairs if p.source == "far"])
    assert initial["pair_indices"].tolist() == chunk1.tolist()
    rows = truth0.rows_for(chunk1)
    torch.testing.assert_close(
        initial["chosen_logps"], truth0.chosen_logps[rows], atol=1e-5, rtol=0
    )
    torch.testing.assert_close(
        initial["rejected_logps"], truth0.rejected_logps[rows], atol=1e-5, rtol=0
    )
    # step 2: the cache holds the saved step-1 model's values on chunk 2 (the "near" source)
    step2 = load_file(out / "cache" / "step-2.safetensors")
    chunk2 = [p for p in pairs if p.source == "near"]
    truth1 = _score(out / "step-1", chunk2)
    assert step2["pair_indices"].tolist() == truth1.pair_indices.tolist()
    torch.testing.assert_close(step2["chosen_logps"], truth1.chosen_logps, atol=1e-5, rtol=0)
    torch.testing.assert_close(step2["rejected_logps"], truth1.rejected_logps, atol=1e-5, rtol=0)
    # and M1 differs from M0 on that chunk, so the check above can fail
    assert not torch.allclose(truth1.chosen_logps, truth0.chosen_logps[truth1.pair_indices])


@pytest.mark.parametrize("partition", ["given", "random"])
def test_without_report_scoring_the_initial_model_scores_chunk_one_alone(
    tiny_model_dir, tmp_path, partition
):
    # the same run with and without report scoring: the partition (given or random) does not
    # depend on the initial model's values, and neither do the weights
    runs = {}
    for report in (False, True):
        (tmp_path / f"report-{report}").mkdir()
        cfg = config_from_dict(
            two_source_config(
                tmp_path / f"report-{report}",
                tiny_model_dir,
                sdpo={"partition": partition, "report_scoring": report},
            )
        )
        result = run_training(cfg, progress=False)
        out = Path(cfg.output_dir)
        runs[report] = (result, out, json.loads((out / "sdpo_report.json").read_text()))
    (partial, out_p, doc_p), (_, out_f, doc_f) = runs[False], runs[True]
    assert partial.scoring_calls == 2  # M0 on chunk 1, M1 on chunk 2
    chunks = [c["sources"] for c in doc_f["partition"]["chunks"]]
    assert chunks == [c["sources"] for c in doc_p["partition"]["chunks"]]
    for name, w in load_file(out_f / "step-2" / "model.safetensors").items():
        assert torch.equal(w, load_file(out_p / "step-2" / "model.safetensors")[name]), name
    initial_p = load_file(out_p / "cache" / "initial.safetensors")["pair_indices"]
    initial_f = load_file(out_f / "cache" / "initial.safetensors")["pair_indices"]
    assert len(initial_f) == 22 and 0 < len(initial_p) < 22
    assert len(initial_p) == doc_p["partition"]["chunks"][0]["num_pairs"]
    # the report holds what was scored and says what was not
    first_p, first_f = doc_p["partition"]["chunks"][0], doc_f["partition"]["chunks"][0]
    assert first_p["reward_accuracy"] == first_f["reward_accuracy"]
    assert first_p["mean_gamma"] == pytest.approx(first_f["mean_gamma"], abs=1e-6)
    second_p = doc_p["partition"]["chunks"][1]
    assert second_p["reward_accuracy"] is None and second_p["mean_gamma"] is None
    steps_p, steps_f = doc_p["steps"], doc_f["steps"]
    assert steps_p[0]["gamma_ref_next_chunk"] is None
    assert steps_f[0]["gamma_ref_next_chunk"] is not None
    assert [s["gamma_ref_chunk"] for s in steps_p] == pytest.approx(
        [s["gamma_ref_chunk"] for s in steps_f], abs=1e-6
    )


def test_rerun_reuses_caches_and_a_damaged_cache_is_recomputed(base_run, tmp_path, capsys):
    cfg = copy_run(base_run, tmp_path)
    again = run_training(cfg, progress=False, overwrite=True)
    assert again.scoring_calls == 0  # both caches matched their keys and checksums
    assert "reused" in capsys.readouterr().out

    cache = Path(cfg.output_dir) / "cache" / "step-2.safetensors"
    data = bytearray(cache.read_bytes())
    data[-3] ^= 0xFF  # flip bits in the tensor payload
    cache.write_bytes(bytes(data))
    third = run_training(cfg, progress=False, overwrite=True)
    assert third.scoring_calls == 1
    assert "step-2.safetensors: recomputing (checksum mismatch" in capsys.readouterr().out


def test_run_training_given_a_dict_or_a_path_says_how_to_build_its_config(tmp_path):
    """A dict (a parsed TOML file) or a config file's path is refused naming the RunConfig it
    needs and the two ways to build one, not an AttributeError from its first field read."""
    for given in ({"output_dir": str(tmp_path / "run")}, tmp_path / "run.toml"):
        with pytest.raises(
            TypeError, match=r"RunConfig, got .*load_config\(path\).*config_from_dict"
        ):
            run_training(given, progress=False)
    assert not (tmp_path / "run").exists()


def test_existing_outputs_are_refused_without_overwrite(base_run, tmp_path):
    cfg = copy_run(base_run, tmp_path)
    with pytest.raises(OutputDirError, match="--overwrite"):
        run_training(cfg, progress=False)


def test_an_output_dir_that_cannot_be_written_is_refused_before_reading_inputs(
    tiny_model_dir, tmp_path
):
    afile = tmp_path / "afile"
    afile.write_text("not a folder\n")
    cases = [
        (afile, "is a file, not a folder"),
        (afile / "run", "cannot be made: .*afile is a file"),
        (Path("/proc/sdpo-run"), "is not writable"),
    ]
    for out, message in cases:
        cfg = _config(tmp_path, tiny_model_dir)
        cfg.output_dir = str(out)
        cfg.data.sources[0].path = str(tmp_path / "missing.jsonl")  # never read
        with pytest.raises(OutputDirError, match=message):
            run_training(cfg, progress=False)
    # sdpo.cache_dir, first written after the initial scoring pass, is checked as early
    for cache, message in ((afile, "sdpo.cache_dir .*afile is a file"), (afile / "c", "made")):
        cfg = _config(tmp_path, tiny_model_dir)
        cfg.output_dir = str(tmp_path / "run")
        cfg.sdpo.cache_dir = str(cache)
        cfg.data.sources[0].path = str(tmp_path / "missing.jsonl")  # never read
        with pytest.raises(OutputDirError, match=message):
            run_training(cfg, progress=False)
    assert afile.read_text() == "not a folder\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["afile", "model", "far.jsonl", "near.jsonl"]
    )


def test_a_partition_that_cannot_be_cut_is_refused_before_outputs_are_replaced(base_run, tmp_path):
    """More steps than pairs, or a source the held-out split emptied: refused with exit 2's
    error before --overwrite clears the previous run's outputs."""
    from sdpo.runner import RunInputError

    cfg = copy_run(base_run, tmp_path)
    tiny_model_dir = Path(cfg.model.path)
    out = Path(cfg.output_dir)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    too_many = _config(tmp_path, tiny_model_dir, partition="random", steps=40)
    with pytest.raises(RunInputError, match="cannot cut 22 pairs into 40 steps"):
        run_training(too_many, progress=False, overwrite=True)
    tiny = write_pairs(tmp_path / "one.jsonl", n=1, seed=5)
    emptied = _config(tmp_path, tiny_model_dir, partition="given")
    emptied.data.sources.append(type(emptied.data.sources[0])(name="one", path=str(tiny)))
    emptied.sdpo.steps, emptied.data.eval_fraction = 3, 0.5
    with pytest.raises(RunInputError, match=r"held out every pair of source\(s\) \['one'\]"):
        run_training(emptied, progress=False, overwrite=True)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_a_reference_with_another_tokenizer_of_the_same_size_is_refused(tiny_model_dir, tmp_path):
    from sdpo.runner import RunInputError

    ref_dir = write_tiny_model(tmp_path / "ref", words=WORDS[::-1], hidden_size=32, seed=9)
    assert (
        load_pretrained(ref_dir).config.vocab_size
        == load_pretrained(tiny_model_dir).config.vocab_size
    )
    cfg = _config(tmp_path, tiny_model_dir, reference=str(ref_dir))
    with pytest.raises(RunInputError, match="has another tokenizer than model.path"):
        run_training(cfg, progress=False)
    assert not Path(cfg.output_dir).exists()


def _padded_model(folder: Path, *, seed: int, rows: int) -> Path:
    """A tiny model whose embeddings have ``rows`` more rows than its tokenizer has tokens (as
    models padded to a round vocab_size have), its tokenizer_config.json without
    added_tokens_decoder (an older folder, whose added_tokens.json adds tokens)."""
    write_tiny_model(folder, words=WORDS, hidden_size=32, seed=seed)
    weights = load_file(folder / "model.safetensors")
    gen = torch.Generator().manual_seed(seed)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        extra = torch.randn(rows, weights[name].shape[1], generator=gen) * 0.02
        weights[name] = torch.cat([weights[name], extra.to(weights[name].dtype)])
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["vocab_size"] += rows
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_a_reference_whose_added_tokens_json_gives_other_ids_is_refused(tmp_path):
    """The same tokenizer.json, but each folder's added_tokens.json gives the first free id,
    inside both models' (padded) embeddings, another token: the reference would score the
    policy's id of '<tool>' as '<call>'. Refused before the run starts, naming both folders,
    the id, both tokens and the file that gives each; one folder without added_tokens.json
    (a step folder of an earlier sdpo) is refused naming the copy that ends it. The same added
    tokens pass, and so do different ones past the embeddings, which reach neither model."""
    from sdpo.runner import RunInputError, _check_same_vocabulary

    policy = _padded_model(tmp_path / "model", seed=1, rows=2)
    ref = _padded_model(tmp_path / "ref", seed=9, rows=2)
    size = PairTokenizer.from_dir(policy).vocab_size  # tokenizer.json's tokens: ids 0..size-1
    (policy / "added_tokens.json").write_text(json.dumps({"<tool>": size}))
    (ref / "added_tokens.json").write_text(json.dumps({"<call>": size}))
    cfg = _config(tmp_path, policy, reference=str(ref))
    with pytest.raises(RunInputError) as info:
        run_training(cfg, progress=False)
    assert str(info.value) == (
        f"sdpo.reference {ref} has another tokenizer than model.path {policy}: id {size} is "
        f"'<tool>' in {policy} (its added_tokens.json) but '<call>' in {ref} (its "
        "added_tokens.json), so the reference would score token ids that mean other text to it; "
        "use a reference of the same tokenizer"
    )
    assert not Path(cfg.output_dir).exists()
    tokenizer = PairTokenizer.from_dir(policy)
    vocab_size = size + 2
    _check_same_vocabulary(policy, ref, tokenizer=tokenizer, vocab_size=size)  # past both
    # the reference a step folder of an earlier sdpo, which did not copy added_tokens.json (or
    # the policy one): the file that makes the difference is named, and the copy that ends it
    (ref / "added_tokens.json").unlink()
    for ours, theirs, lacking, having in ((policy, ref, ref, policy), (ref, policy, ref, policy)):
        with pytest.raises(RunInputError) as info:
            _check_same_vocabulary(
                ours, theirs, tokenizer=PairTokenizer.from_dir(ours), vocab_size=vocab_size
            )
        tool, nothing = f"'<tool>' in {having} (its added_tokens.json)", f"no token in {lacking}"
        assert f"id {size} is {tool} but {nothing}," in str(info.value) or (
            f"id {size} is {nothing} but {tool}," in str(info.value)
        )
        assert str(info.value).endswith(
            f"; {lacking} has no added_tokens.json (a step folder written by sdpo before step "
            f"folders carried that file lacks it): if its model was trained from {having}'s, "
            f"copy {having / 'added_tokens.json'} into {lacking}; otherwise use a reference of "
            "the same tokenizer"
        )
    shutil.copy(policy / "added_tokens.json", ref / "added_tokens.json")
    _check_same_vocabulary(policy, ref, tokenizer=tokenizer, vocab_size=vocab_size)
    # an added_tokens.json naming tokenizer.json's own added tokens at their ids changes no id:
    # a folder without it passes
    (policy / "added_tokens.json").write_text(json.dumps({"<pad>": 0, "<eos>": 2}))
    (ref / "added_tokens.json").unlink()
    for ours, theirs in ((policy, ref), (ref, policy)):
        _check_same_vocabulary(
            ours, theirs, tokenizer=PairTokenizer.from_dir(ours), vocab_size=vocab_size
        )
    (ref / "tokenizer.json").write_text("{")
    with pytest.raises(RunInputError, match=r"its tokenizer cannot be read \(.*not a valid tok"):
        _check_same_vocabulary(policy, ref, tokenizer=tokenizer, vocab_size=vocab_size)


def test_separate_reference_is_freed_before_training(tiny_model_dir, tmp_path, monkeypatch):
    ref_dir = write_tiny_model(tmp_path / "ref", words=WORDS, hidden_size=32, seed=9)
    cfg = _config(tmp_path, tiny_model_dir, reference=str(ref_dir))
    ref_params: list[weakref.ref] = []
    real_load = runner_mod.load_pretrained

    def load_and_watch(path, **kw):
        model = real_load(path, **kw)
        if Path(path) == ref_dir:
            ref_params.extend(weakref.ref(p) for p in model.parameters())
        return model

    alive_at_fit: list[int] = []
    real_fit = DPOTrainer.fit

    def fit_and_check(self, *args, **kw):
        gc.collect()
        alive_at_fit.append(sum(r() is not None for r in ref_params))
        return real_fit(self, *args, **kw)

    hashed: list[tuple[int, ...]] = []  # the pairs each data fingerprint hashed
    real_fingerprint = runner_mod.data_fingerprint

    def fingerprint_and_count(pairs):
        hashed.append(tuple(p.index for p in pairs))
        return real_fingerprint(pairs)

    monkeypatch.setattr(runner_mod, "load_pretrained", load_and_watch)
    monkeypatch.setattr(DPOTrainer, "fit", fit_and_check)
    monkeypatch.setattr(runner_mod, "data_fingerprint", fingerprint_and_count)
    result = run_training(cfg, progress=False)
    # the training pairs are hashed once (checkpoints and the reference cache's key share it)
    assert len(hashed) == len(set(hashed)) == 1
    assert ref_params, "the reference model was never loaded"
    assert alive_at_fit == [0, 0]  # no reference tensor alive when either step trains
    # a given partition without report scoring: the separate reference's pass is the only one
    # (no initial-model pass: chunk 1's reference values are the reference's too)
    assert not cfg.sdpo.report_scoring and cfg.sdpo.partition == "given"
    assert result.scoring_calls == 1
    assert sorted(p.name for p in (Path(cfg.output_dir) / "cache").iterdir()) == [
        "reference.safetensors",
        "tokens-train.safetensors",
    ]
    assert result.reports[0].reward_accuracy_before is not None
    # every step used the separate reference's values
    ref_scores = _score(ref_dir, _tokenized(cfg))
    report = result.reports[1]
    near = [i for i, p in enumerate(_tokenized(cfg)) if p.source == "near"]
    assert report.gamma_ref_chunk == pytest.approx(float(ref_scores.gamma[near].mean()), abs=1e-5)


def test_kept_optimizer_runs_one_schedule_across_steps(tiny_model_dir, tmp_path):
    cfg = _config(tmp_path, tiny_model_dir, reset_optimizer=False)
    run_training(cfg, progress=False)
    metrics = [
        json.loads(line)
        for line in (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()
    ]
    steps = [m["step"] for m in metrics]
    assert steps == list(range(1, len(steps) + 1))  # one step counter across sDPO steps
    lrs = [m["lr"] for m in metrics]
    peak = lrs.index(max(lrs))
    assert peak < 2 and all(a >= b for a, b in zip(lrs[peak:], lrs[peak + 1 :]))  # one decay


@pytest.mark.gpu
def test_on_cuda_a_separate_reference_returns_gpu_memory_and_steps_train(
    tmp_path, monkeypatch, cuda_blas_warm
):
    """The whole runner on CUDA (Triton kernels, varlen attention, bf16 autocast): a separate
    reference model's GPU memory is back to the pre-load level once its values are cached
    (cuBLAS's workspaces made before the run, so that its first matmul's do not count)."""
    model_dir = write_tiny_model(tmp_path / "m", words=WORDS, hidden_size=256, seed=1)
    ref_dir = write_tiny_model(tmp_path / "ref", words=WORDS, hidden_size=256, seed=9)
    cfg = _config(tmp_path, model_dir, reference=str(ref_dir))
    cfg.kernels.impl = "auto"
    seen: list[tuple[int, int]] = []
    real = runner_mod.StepwiseRunner._score_with_separate_reference

    def watched(self, *args, **kw):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        values = real(self, *args, **kw)
        torch.cuda.synchronize()
        seen.append((before, torch.cuda.memory_allocated()))
        return values

    monkeypatch.setattr(runner_mod.StepwiseRunner, "_score_with_separate_reference", watched)
    result = run_training(cfg, progress=False)
    assert len(seen) == 1 and seen[0][0] == seen[0][1], seen
    assert all(r.train_metrics["loss"] == r.train_metrics["loss"] for r in result.reports)
    assert (Path(cfg.output_dir) / "step-2" / "model.safetensors").is_file()


def test_held_out_eval_sources_are_scored_after_every_step_and_never_trained_on(
    tiny_model_dir, tmp_path, capsys
):
    held = write_pairs(tmp_path / "held.jsonl", n=7, seed=11)
    cfg = _config(tmp_path, tiny_model_dir)
    cfg.data.eval_sources = [type(cfg.data.sources[0])(name="held", path=str(held))]
    result = run_training(cfg, progress=False)
    out = Path(cfg.output_dir)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [m for m in lines if "eval/loss" in m]
    assert [m["sdpo_step"] for m in evals] == [1, 2]
    # eval pairs are not in any training chunk and have their own initial-model cache
    assert all(r.num_pairs in (12, 10) for r in result.reports)
    assert (out / "cache" / "eval-initial.safetensors").is_file()
    # the logged numbers are the step model's scores against the initial model's
    tok = PairTokenizer.from_dir(tiny_model_dir)
    pairs, _ = tokenize_pairs(
        read_preference_file(str(held), source="held"), tok, max_length=32, max_prompt_length=16
    )
    m0, m2 = _score(tiny_model_dir, pairs), _score(out / "step-2", pairs)
    last = evals[-1]
    assert last["eval/preference_accuracy"] == pytest.approx(float((m2.gamma > 0).float().mean()))
    margin = 0.1 * ((m2.chosen_logps - m0.chosen_logps) - (m2.rejected_logps - m0.rejected_logps))
    assert last["eval/rewards/margins"] == pytest.approx(float(margin.mean()), abs=1e-5)
    assert result.reports[-1].eval_metrics["eval/loss"] == pytest.approx(last["eval/loss"])
    # the token metrics of the held-out completions, each token weighing the same, and the
    # input tokens trained on so far (over both sDPO steps)
    expected = reference_token_metrics(load_pretrained(out / "step-2"), pairs)
    for key, value in expected.items():
        assert last[f"eval/{key}"] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    trained = [m for m in lines if "loss" in m and "eval/loss" not in m]
    assert trained[-1]["num_tokens"] > trained[0]["num_tokens"]
    assert last["eval/num_tokens"] == trained[-1]["num_tokens"]
    # the report says where the held-out pairs came from and the initial model's baseline
    report = json.loads((out / "sdpo_report.json").read_text())["held_out"]
    g0 = m0.gamma
    assert report == {
        "pairs": 7,
        "sources": {"held": 7},
        "from": "data.eval_sources",
        "also_training_pairs": 0,
        "initial_preference_accuracy": pytest.approx(float((g0 > 0).float().mean())),
        "initial_gamma": pytest.approx(float(g0.double().mean()), abs=1e-5),
    }
    accuracies = [report["initial_preference_accuracy"]] + [
        m["eval/preference_accuracy"] for m in evals
    ]
    assert (
        "held-out preference accuracy (7 pairs, data.eval_sources): initial model "
        "{:.3f}, after step 1 {:.3f}, after step 2 {:.3f}".format(*accuracies)
    ) in capsys.readouterr().out


def test_held_out_pairs_that_are_also_training_pairs_are_counted(tiny_model_dir, tmp_path, capsys):
    cfg = _config(tmp_path, tiny_model_dir)
    far = Path(cfg.data.sources[0].path)
    held = tmp_path / "held.jsonl"  # two training rows and one new one
    rows = far.read_text().splitlines()[:2]
    new = write_pairs(tmp_path / "new.jsonl", n=1, seed=99).read_text().splitlines()
    held.write_text("\n".join(rows + new) + "\n")
    cfg.data.eval_sources = [type(cfg.data.sources[0])(name="held", path=str(held))]
    runner_mod.StepwiseRunner(cfg, progress=False).load_inputs()
    assert "2 of 3 held-out pair(s) (source(s) ['held']) are also training pairs" in (
        capsys.readouterr().out
    )
    cfg.data.eval_sources[0].path = str(tmp_path / "new.jsonl")
    runner_mod.StepwiseRunner(cfg, progress=False).load_inputs()
    assert "also training pairs" not in capsys.readouterr().out


def test_eval_fraction_holds_out_a_seeded_share_scored_after_every_step(tiny_model_dir, tmp_path):
    cfg = _config(tmp_path, tiny_model_dir)
    n = len(_tokenized(cfg))
    cfg.data.eval_fraction = 0.25
    result = run_training(cfg, progress=False)
    out = Path(cfg.output_dir)
    held = round(0.25 * n)
    assert sum(r.num_pairs for r in result.reports) == n - held
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [m for m in lines if "eval/loss" in m]
    assert [m["sdpo_step"] for m in evals] == [1, 2]
    held_out = _cached_indices(out / "cache" / "eval-initial.safetensors")
    # the trained pairs: chunk 1 (the initial model's cache) and chunk 2 (M1's)
    trained = [
        *_cached_indices(out / "cache" / "initial.safetensors"),
        *_cached_indices(out / "cache" / "step-2.safetensors"),
    ]
    assert len(held_out) == held and not set(held_out) & set(trained)
    assert sorted(held_out + trained) == list(range(n))
    # the report names the rows drawn, file and line
    report = json.loads((out / "sdpo_report.json").read_text())["held_out"]
    assert report["from"] == "data.eval_fraction" and report["pairs"] == held
    assert (report["eval_fraction"], report["seed"]) == (0.25, cfg.train.seed)
    n_far = len(Path(cfg.data.sources[0].path).read_text().splitlines())
    expected_rows = [
        f"{cfg.data.sources[0].path} line {i + 1}"
        if i < n_far
        else f"{cfg.data.sources[1].path} line {i - n_far + 1}"
        for i in held_out
    ]
    assert report["rows"] == expected_rows
    assert sum(report["sources"].values()) == held
    assert 0.0 <= report["initial_preference_accuracy"] <= 1.0
    # the same seed holds out the same pairs, another seed others
    for seed, same in ((cfg.train.seed, True), (cfg.train.seed + 1, False)):
        again = _config(tmp_path, tiny_model_dir)
        again.output_dir = str(tmp_path / f"seed-{seed}")
        again.data.eval_fraction = 0.25
        again.train.seed = seed
        run_training(again, progress=False)
        indices = _cached_indices(Path(again.output_dir) / "cache" / "eval-initial.safetensors")
        assert (indices == held_out) is same


def _cached_indices(path: Path) -> list[int]:
    return sorted(load_file(str(path))["pair_indices"].tolist())


def test_eval_every_scores_the_held_out_pairs_inside_each_step_with_that_steps_weights(
    tiny_model_dir, tmp_path, monkeypatch
):
    held = write_pairs(tmp_path / "held.jsonl", n=7, seed=11)
    cfg = _config(tmp_path, tiny_model_dir)
    cfg.data.eval_sources = [type(cfg.data.sources[0])(name="held", path=str(held))]
    cfg.train.eval_every = 2
    cfg.train.save_every = 1  # a checkpoint of every step's weights to check against
    cfg.train.keep_checkpoints = 100
    evaluate_in_step = runner_mod.StepwiseRunner._evaluate_in_step
    after_eval: list[str] = []  # the out-of-memory message once an in-step eval returned

    def evaluated(self, trainer, **kwargs) -> None:
        evaluate_in_step(self, trainer, **kwargs)
        after_eval.append(self._out_of_memory_message())

    monkeypatch.setattr(runner_mod.StepwiseRunner, "_evaluate_in_step", evaluated)
    run_training(cfg, progress=False)
    # training goes on after the eval pass: running out of memory then names training and its
    # settings, not the eval's scoring pass
    assert len(after_eval) == 2
    for t, message in enumerate(after_eval, start=1):
        assert f"ran out of memory while training sDPO step {t}" in message
        assert "lower train.max_tokens_per_batch" in message
    out = Path(cfg.output_dir)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train_steps = {1: 0, 2: 0}
    for m in lines:
        if "loss" in m:
            train_steps[m["sdpo_step"]] += 1
    assert train_steps == {1: 3, 2: 3}  # 12 and 10 pairs, 4 per step
    evals = [(m["sdpo_step"], m["step"]) for m in lines if "eval/loss" in m]
    # run steps 2 and 5 inside the steps, 3 and 6 at their ends (no eval twice at an end)
    assert evals == [(1, 2), (1, 3), (2, 5), (2, 6)]
    tok = PairTokenizer.from_dir(tiny_model_dir)
    pairs, _ = tokenize_pairs(
        read_preference_file(str(held), source="held"), tok, max_length=32, max_prompt_length=16
    )
    m0 = _score(tiny_model_dir, pairs)
    for m in (m for m in lines if "eval/loss" in m):
        weights = out / "checkpoints" / f"ckpt-{m['step']:08d}" / "model"
        if m["step"] in (3, 6):  # the end of an sDPO step: its step folder
            weights = out / f"step-{m['sdpo_step']}"
        mt = _score(weights, pairs)
        assert m["eval/gamma"] == pytest.approx(float(mt.gamma.mean()), abs=1e-6)
        margin = 0.1 * (
            (mt.chosen_logps - m0.chosen_logps) - (mt.rejected_logps - m0.rejected_logps)
        )
        assert m["eval/rewards/margins"] == pytest.approx(float(margin.mean()), abs=1e-5)
    # the weights moved between the two evaluations of a step, so the check above can fail
    assert lines[[i for i, m in enumerate(lines) if "eval/loss" in m][0]]["eval/gamma"] != next(
        m["eval/gamma"] for m in lines if "eval/loss" in m and m["step"] == 3
    )
    # a mid-step checkpoint's model folder carries the tokenizer, as step-<t>/ does, so sdpo
    # score and AutoTokenizer read it as a model folder
    mid = out / "checkpoints" / f"ckpt-{2:08d}" / "model"
    assert PairTokenizer.from_dir(mid).fingerprint == tok.fingerprint


def test_eval_every_without_held_out_pairs_is_refused(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="train.eval_every = 2 but there are no held-out pairs"):
        config_from_dict(
            {
                "output_dir": str(tmp_path / "run"),
                "model": {"path": str(tiny_model_dir)},
                "data": {"path": str(tmp_path / "d.jsonl")},
                "train": {"eval_every": 2},
            }
        )


def test_the_run_log_counts_pairs_cut_to_identical_token_ids(tiny_model_dir, tmp_path, capsys):
    """Pairs cut by max_length to the same ids are counted before training (as ``sdpo score``
    counts them); uncut, the line is absent."""
    for max_length, count in ((5, 7), (32, 0)):
        data = write_pairs(tmp_path / "near.jsonl", n=8, seed=3, kind="near")
        cfg = config_from_dict(
            {
                "output_dir": str(tmp_path / "unused"),
                "model": {"path": str(tiny_model_dir)},
                "data": {
                    "sources": [{"name": "near", "path": str(data)}],
                    "max_length": max_length,
                    "max_prompt_length": 3,
                },
            }
        )
        tok = PairTokenizer.from_dir(tiny_model_dir)
        runner_mod.load_pairs(cfg, tok, vocab_size=tok.vocab_size)
        out = capsys.readouterr().out
        if count:
            assert f"data: {count} pair(s) have identical chosen and rejected token ids" in out
        else:
            assert "identical chosen and rejected" not in out


def test_step_checkpoints_carry_the_model_s_template_and_processor_files(tmp_path):
    model = write_tiny_model(tmp_path / "model", words=WORDS, hidden_size=32, seed=1)
    # the layout transformers 5 saves: the template in chat_template.jinja, named ones in
    # additional_chat_templates/; and a processor's chat_template.json
    config = json.loads((model / "tokenizer_config.json").read_text())
    (model / "chat_template.jinja").write_text(config.pop("chat_template"))
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    (model / "additional_chat_templates").mkdir()
    (model / "additional_chat_templates" / "tool_use.jinja").write_text(
        "{% for t in tools %}{{ t | tojson }} {% endfor %}{{ messages[0]['content'] }}"
    )
    (model / "chat_template.json").write_text(json.dumps({"chat_template": "{{ bos_token }}"}))
    # an older folder's added_tokens.json (its tokenizer_config.json has no added_tokens_decoder),
    # whose tokens AutoTokenizer adds
    added = PairTokenizer.from_dir(model).vocab_size
    (model / "added_tokens.json").write_text(json.dumps({"<tool>": added}))
    # a multimodal model's processor: AutoProcessor reads it beside the tokenizer, and its
    # other tokenizer from the subfolder named after it (the model's own where that is missing)
    image = {"image_processor_type": "BlipImageProcessor", "size": {"height": 8, "width": 8}}
    (model / "preprocessor_config.json").write_text(json.dumps(image))
    processor = {"processor_class": "InstructBlipProcessor", "num_query_tokens": 2}
    (model / "processor_config.json").write_text(json.dumps(processor))
    build_tokenizer(model / "qformer_tokenizer", words=["zebra", "yak", *WORDS[:2]])
    cfg = config_from_dict(two_source_config(tmp_path, model, far=4, near=4, sdpo={"steps": 1}))
    run_training(cfg, progress=False)
    step = Path(cfg.output_dir) / "step-1"
    for name in (
        "chat_template.jinja",
        "chat_template.json",
        "additional_chat_templates/tool_use.jinja",
        "added_tokens.json",
        "preprocessor_config.json",
        "processor_config.json",
        "qformer_tokenizer/tokenizer.json",
        "qformer_tokenizer/tokenizer_config.json",
    ):
        assert (step / name).read_bytes() == (model / name).read_bytes(), name
    ours = PairTokenizer.from_dir(step)
    assert ours.fingerprint == PairTokenizer.from_dir(model).fingerprint
    assert ours.tool_use_template is not None
    transformers = pytest.importorskip("transformers")
    theirs = [transformers.AutoTokenizer.from_pretrained(str(d)) for d in (model, step)]
    assert theirs[0].chat_template == theirs[1].chat_template
    assert set(theirs[1].chat_template) == {"default", "tool_use"}
    assert [t(f"user <tool> {WORDS[0]}").input_ids for t in theirs] == [[1, 5, added, 8]] * 2
    for folder in (model, step):  # AutoProcessor refuses it beside chat_template.jinja
        (folder / "chat_template.json").unlink()
    processors = [transformers.AutoProcessor.from_pretrained(str(d)) for d in (model, step)]
    assert type(processors[1]).__name__ == "InstructBlipProcessor"
    assert processors[1].to_dict() == processors[0].to_dict()
    text = f"zebra yak {WORDS[0]}"
    assert [p.qformer_tokenizer(text).input_ids for p in processors] == [[1, 8, 9, 10]] * 2
    assert [p.tokenizer(text).input_ids for p in processors] == [theirs[0](text).input_ids] * 2


def test_a_stop_in_a_later_sdpo_step_names_the_run_step_of_its_checkpoint(
    tiny_model_dir, tmp_path, monkeypatch
):
    """Optimizer steps are counted as the checkpoints are named, across sDPO steps: a stop at
    the first step of sDPO step 2 (two steps in step 1) is after step 3, not step 1 again."""
    from sdpo.engine import resume
    from sdpo.engine.trainer import TrainingStopped

    cfg = config_from_dict(two_source_config(tmp_path, tiny_model_dir, far=4, near=4))
    cfg.train.pairs_per_step = 2
    monkeypatch.setattr(resume, "_fault_counts", {})
    monkeypatch.setenv(resume.FAULT_ENV, "train_step:3:TERM")  # SIGTERM: a graceful stop
    with pytest.raises(TrainingStopped) as stopped:
        run_training(cfg, progress=False)
    assert stopped.value.global_step == 3 and stopped.value.checkpoint.name == "ckpt-00000003"
