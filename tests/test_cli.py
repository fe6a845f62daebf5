"""The `sdpo` command as a user runs it: train from a TOML file with --set, score, demo."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from sdpo.cli import EXIT_INPUT, EXIT_OUT_OF_MEMORY, EXIT_WRITE, main
from tests.conftest import write_pairs


def _toml(tmp_path: Path, model_dir: Path) -> Path:
    data = write_pairs(tmp_path / "pairs.jsonl", n=12, seed=3)
    cfg = tmp_path / "run.toml"
    cfg.write_text(
        f"""output_dir = "out"
[model]
path = "{model_dir}"
[data]
path = "{data.name}"
max_length = 32
max_prompt_length = 16
[train]
pairs_per_step = 4
max_tokens_per_batch = 128
[kernels]
impl = "torch"
"""
    )
    return cfg


def test_train_from_toml_with_set_override_writes_outputs(tiny_model_dir, tmp_path, capsys):
    cfg = _toml(tmp_path, tiny_model_dir)
    overrides = ["--set", "train.learning_rate=1e-3", "--set", "model.checkpoint_every=2"]
    code = main(["train", "--config", str(cfg), *overrides, "--no-progress"])
    assert code == 0
    # accepted (a saved config may hold it), but said to do nothing without checkpointing
    assert (
        "warning: model.checkpoint_every = 2 does nothing while model.gradient_checkpointing is "
        "false"
    ) in capsys.readouterr().out
    out = tmp_path / "out"  # relative output_dir resolves against the TOML file's folder
    assert (out / "step-1" / "model.safetensors").is_file()
    assert "learning_rate = 0.001" in (out / "config.toml").read_text()
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert first["sdpo_step"] == 1 and first["lr"] > 0
    # a second start in the same folder is refused with a message and exit code 2
    assert main(["train", "--config", str(cfg), "--no-progress"]) == 2


def test_unknown_config_key_names_the_closest_valid_one(tiny_model_dir, tmp_path, capsys):
    cfg = _toml(tmp_path, tiny_model_dir)
    assert main(["train", "--config", str(cfg), "--set", "train.learnig_rate=1e-3"]) == 2
    err = capsys.readouterr().err
    assert "learnig_rate" in err and "learning_rate" in err


def test_score_writes_per_pair_jsonl_and_prints_summary(tiny_model_dir, tmp_path, capsys):
    data = write_pairs(tmp_path / "pairs.jsonl", n=9, seed=4)
    out = tmp_path / "scores.jsonl"
    assert (
        main(["score", "--model", str(tiny_model_dir), "--data", str(data), "--out", str(out)]) == 0
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 9
    for r in rows:
        assert abs(r["gamma"] - (r["logp_chosen"] - r["logp_rejected"])) < 1e-5
        assert r["logp_chosen"] < 0 and r["chosen_tokens"] >= 2  # at least one word + EOS
    acc = sum(r["gamma"] > 0 for r in rows) / 9
    printed = capsys.readouterr()
    assert f"reward accuracy: {acc:.4f}" in printed.out and "scoring" in printed.err  # its bar
    assert printed.out.rstrip().endswith(f"wrote {out}")
    quiet = tmp_path / "quiet.jsonl"
    argv = ["score", "--model", str(tiny_model_dir), "--data", str(data), "--out", str(quiet)]
    assert main([*argv, "--no-progress"]) == 0
    assert quiet.read_text() == out.read_text()
    assert "scoring" not in capsys.readouterr().err  # no bar
    # the shared-prompt layout scores the same pairs to float rounding
    shared = tmp_path / "shared.jsonl"
    args = ["score", "--model", str(tiny_model_dir), "--data", str(data), "--out", str(shared)]
    assert main([*args, "--share-prompt"]) == 0
    for r, s in zip(rows, (json.loads(x) for x in shared.read_text().splitlines()), strict=True):
        assert r["index"] == s["index"]
        assert abs(r["logp_chosen"] - s["logp_chosen"]) < 1e-4 * abs(r["logp_chosen"])
        assert abs(r["logp_rejected"] - s["logp_rejected"]) < 1e-4 * abs(r["logp_rejected"])


def test_score_precision_follows_train_precision(tiny_model_dir, tmp_path):
    """--precision: fp32 matches a float64 scoring to fp32 rounding; bf16-mixed (fp32 weights,
    bf16 autocast) and bf16 (bf16 weights) to their rounding, and they do change the values."""
    import torch

    from sdpo.engine.checkpoint import load_pretrained
    from sdpo.engine.scoring import score_pairs
    from sdpo.engine.tokenize import PairTokenizer, tokenize_pairs

    data = write_pairs(tmp_path / "pairs.jsonl", n=7, seed=12)
    rows = [json.loads(x) for x in data.read_text().splitlines()]
    pairs, _ = tokenize_pairs(
        rows, PairTokenizer.from_dir(tiny_model_dir), max_length=1024, max_prompt_length=512
    )
    model = load_pretrained(tiny_model_dir, dtype=torch.float64)
    truth = score_pairs(model, pairs, max_tokens_per_batch=4096, impl="torch")
    got = {}
    for precision in ("fp32", "bf16-mixed", "bf16"):
        out = tmp_path / f"{precision}.jsonl"
        args = ["score", "--model", str(tiny_model_dir), "--data", str(data), "--out", str(out)]
        assert main([*args, "--impl", "torch", "--precision", precision]) == 0
        got[precision] = [json.loads(x) for x in out.read_text().splitlines()]
    for precision, tol in (("fp32", 1e-5), ("bf16-mixed", 3e-2), ("bf16", 6e-2)):
        for r in got[precision]:
            i = int((truth.pair_indices == r["index"]).nonzero())
            want = float(truth.chosen_logps[i])
            assert abs(r["logp_chosen"] - want) <= tol * abs(want), (precision, r, want)
    for precision in ("bf16-mixed", "bf16"):
        assert [r["logp_chosen"] for r in got[precision]] != [r["logp_chosen"] for r in got["fp32"]]
    assert got["bf16-mixed"] != got["bf16"]


def test_score_precision_defaults_to_what_train_resolves(monkeypatch):
    """score's default precision is train.precision's: "auto", so on CUDA it scores the
    bf16-mixed values a default run caches (not bf16's), and fp32 on a CPU. "auto" is fp32 on
    a GPU that only emulates bf16 (before compute capability 8.0: slower than fp32)."""
    from sdpo.cli import build_parser
    from sdpo.engine.precision import resolve_precision
    from sdpo.engine.trainer import TrainConfig

    args = build_parser().parse_args(["score", "--model", "m", "--data", "d.jsonl"])
    assert args.precision == TrainConfig.precision == "auto"
    # the answers for a GPU that computes in bf16, and for one that emulates it
    monkeypatch.setattr("sdpo.engine.precision.bf16_support", lambda device: "native")
    assert resolve_precision(args.precision, "cuda") == "bf16-mixed"
    monkeypatch.setattr("sdpo.engine.precision.bf16_support", lambda device: "emulated")
    assert resolve_precision(args.precision, "cuda") == "fp32"
    assert resolve_precision("bf16-mixed", "cuda") == "bf16-mixed"  # asked for: as given
    assert resolve_precision(args.precision, "cpu") == "fp32"
    given = build_parser().parse_args(
        ["score", "--model", "m", "--data", "d", "--precision", "bf16"]
    )
    assert resolve_precision(given.precision, "cuda") == "bf16"


def test_precision_is_resolved_for_the_model_s_gpu_not_the_current_one(monkeypatch):
    """Two GPUs as torch.cuda describes them: cuda:0 (current) an H100, cuda:1 a V100. A model
    on cuda:1 resolves "auto" to fp32 and is warned that bf16 is emulated there; one on cuda:0
    (or on "cuda", the current device) resolves it to bf16-mixed. torch.cuda's
    is_bf16_supported() answers for the current device only."""
    from sdpo.engine.precision import emulated_bf16_warning, precision_problem, resolve_precision

    capabilities = {0: (9, 0), 1: (7, 0)}

    def capability(device=None):
        index = torch.device(device).index if device is not None else None
        return capabilities[0 if index is None else index]  # the current device: cuda:0

    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", capability)
    monkeypatch.setattr(
        torch.cuda, "get_device_properties", lambda device=None: SimpleNamespace(major=9)
    )
    assert resolve_precision("auto", "cuda:0") == "bf16-mixed"
    assert resolve_precision("auto", "cuda") == "bf16-mixed"
    assert resolve_precision("auto", torch.device("cuda", 1)) == "fp32"
    assert emulated_bf16_warning("bf16", "cuda:0") is None
    assert "compute capability 7.0" in emulated_bf16_warning("bf16", "cuda:1")
    assert precision_problem("bf16", "cuda:0") is None


def test_bf16_asked_for_on_a_gpu_that_only_emulates_it_is_warned_of(monkeypatch):
    """An explicit bf16 or bf16-mixed on a GPU before compute capability 8.0 runs (emulated,
    slower than fp32) with one warning naming the capability and the settings that avoid it;
    nothing to say for fp32, on a CPU, or on a GPU that computes in bf16."""
    from sdpo.engine.precision import emulated_bf16_warning, resolve_precision

    asked = []  # the devices torch.cuda was asked about

    def capability(device=None):
        asked.append(device)
        return (7, 0)

    # a V100: bf16 only by emulation
    monkeypatch.setattr("sdpo.engine.precision.bf16_support", lambda device: "emulated")
    monkeypatch.setattr(torch.cuda, "get_device_capability", capability)
    run = emulated_bf16_warning("bf16-mixed", "cuda:1")
    assert run == (
        'train.precision = "bf16-mixed" on this GPU (compute capability 7.0; bf16 arithmetic '
        "needs 8.0 or later) runs emulated bf16, slower than fp32; a run with "
        'train.precision = "fp32" or "auto" (fp32 on this GPU) avoids it'
    )
    assert asked == [torch.device("cuda:1")]
    score = emulated_bf16_warning("bf16", torch.device("cuda"), key="--precision")
    assert score.startswith("--precision bf16 on this GPU (compute capability 7.0;")
    assert score.endswith("--precision fp32 or --precision auto (fp32 on this GPU) avoids it")
    for precision in ("fp32", resolve_precision("auto", "cuda")):
        assert emulated_bf16_warning(precision, "cuda") is None
    asked.clear()
    for precision in ("bf16", "bf16-mixed"):
        assert emulated_bf16_warning(precision, "cpu") is None
    monkeypatch.setattr("sdpo.engine.precision.bf16_support", lambda device: "native")
    for precision in ("bf16", "bf16-mixed"):  # an A100 or later
        assert emulated_bf16_warning(precision, "cuda") is None
    assert asked == []


def test_score_reads_columns_named_otherwise_and_refuses_bad_input(
    tiny_model_dir, tmp_path, capsys
):
    data = write_pairs(tmp_path / "pairs.jsonl", n=5, seed=4)
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    renamed = tmp_path / "renamed.jsonl"
    renamed.write_text(
        "".join(
            json.dumps({"q": r["prompt"], "good": r["chosen"], "bad": r["rejected"]}) + "\n"
            for r in rows
        )
    )
    base = ["score", "--model", str(tiny_model_dir)]
    outs = []
    for path, extra in ((data, []), (renamed, ["--columns", "prompt=q, chosen=good,rejected=bad"])):
        out = tmp_path / f"{path.stem}.scores.jsonl"
        assert main([*base, "--data", str(path), "--out", str(out), *extra]) == 0
        outs.append(out.read_text())
    assert outs[0] == outs[1]  # the same pairs, the same numbers
    capsys.readouterr()
    for extra, words in (
        (["--columns", "prompt"], "is not FIELD=COLUMN"),
        (["--columns", "answer=q"], "unknown field 'answer'"),
        (["--columns", "prompt=question"], "'question' (the source's columns.prompt) is missing"),
    ):
        assert main([*base, "--data", str(renamed), *extra]) == EXIT_INPUT
        assert words in capsys.readouterr().err
    assert main([*base, "--data", str(tmp_path / "nothing.jsonl")]) == EXIT_INPUT
    assert "file not found" in capsys.readouterr().err
    assert main(["score", "--model", str(tmp_path / "no-model"), "--data", str(data)]) == EXIT_INPUT
    assert "--model = '" in (err := capsys.readouterr().err) and "no-model' does not exist" in err


def test_demo_refuses_a_negative_seed_and_a_file_as_its_folder_before_any_work(tmp_path, capsys):
    # both were tracebacks: the seed after the SFT stage, the file at the folder's creation
    with pytest.raises(SystemExit) as exit_:
        main(["demo", "--seed", "-1", "--output-dir", str(tmp_path / "demo")])
    assert exit_.value.code == EXIT_INPUT
    assert "--seed: must be an integer >= 0, got -1" in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()
    (tmp_path / "file").write_text("")
    assert main(["demo", "--output-dir", str(tmp_path / "file")]) == EXIT_INPUT
    assert "--output-dir " in (err := capsys.readouterr().err) and "is a file" in err
    assert main(["demo", "--output-dir", str(tmp_path / "file" / "sub")]) == EXIT_WRITE
    assert "could not create --output-dir" in capsys.readouterr().err


def test_demo_under_torchrun_with_several_ranks_is_refused_before_any_work(
    tmp_path, capsys, monkeypatch
):
    # each rank ran the whole demo into the same folder at once
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert main(["demo", "--quick", "--output-dir", str(tmp_path / "demo")]) == EXIT_INPUT
    assert capsys.readouterr().err == ""  # said by rank 0 alone
    monkeypatch.setenv("RANK", "0")
    assert main(["demo", "--quick", "--output-dir", str(tmp_path / "demo")]) == EXIT_INPUT
    assert "start it without torchrun" in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()


def test_demo_quick_runs_end_to_end(tmp_path):
    """The shortened demo, in a subprocess exactly as a user starts it."""
    proc = subprocess.run(
        [sys.executable, "-m", "sdpo", "demo", "--quick", "--output-dir", str(tmp_path / "demo")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "held-out results" in proc.stdout
    summary = json.loads((tmp_path / "demo" / "demo_summary.json").read_text())
    models = [r["model"] for r in summary["rows"]]
    assert models == ["SFT", "DPO (all data at once)", "sDPO easy-to-hard", "sDPO random split"]
    for r in summary["rows"]:
        assert 0.0 <= r["task_accuracy"] <= 1.0 and 0.0 <= r["preference_accuracy"] <= 1.0
    # each step's mean γ_ref on its chunk, as numbers (the SFT model has no step)
    assert [len(r["gamma_ref"]) for r in summary["rows"]] == [0, 1, 3, 3]
    assert all(isinstance(g, float) for r in summary["rows"] for g in r["gamma_ref"])
    for name in ("dpo", "sdpo_easy_to_hard", "sdpo_random"):
        assert (tmp_path / "demo" / name / "sdpo_report.json").is_file()
    # what the README's demo section says the folder holds
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme.split("## What `sdpo demo` does")[1].split("\n## ")[0]
    named = re.findall(r"`([\w.]+/?)`", section.split("Outputs land in")[1])
    files = [n for n in named if n.endswith((".json", ".jsonl", "/"))]
    assert len(files) >= 9, files
    for name in files:
        where = tmp_path / "demo" / ("data/" if name.endswith(".jsonl") else "") / name
        assert where.exists(), f"the README says the demo writes {name}"
    # and it holds nothing the README does not name (a tokenizer folder was left there)
    top = {n.rstrip("/") for n in files if not n.endswith(".jsonl")}
    assert {p.name for p in (tmp_path / "demo").iterdir()} == top
    for name in ("dpo", "sdpo_easy_to_hard", "sdpo_random"):
        assert (tmp_path / "demo" / name / "config.toml").is_file()
    assert (tmp_path / "demo" / "sft" / "config.json").is_file()


def test_version_prints_the_installed_version(capsys):
    # it was refused as a missing COMMAND
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out == f"sdpo {version('sdpo')}\n"


def test_help_explains_every_subcommand():
    for sub in ("train", "score", "demo"):
        proc = subprocess.run(
            [sys.executable, "-m", "sdpo", sub, "--help"], capture_output=True, text=True
        )
        assert proc.returncode == 0 and "usage: sdpo" in proc.stdout


def test_help_states_every_default_an_option_has():
    """``sdpo score --help`` and the others say what an option left out means: every option
    with a default value (not a flag, not unset) writes ``default: VALUE`` in its help."""
    from sdpo.cli import build_parser

    (sub,) = [a for a in build_parser()._actions if isinstance(a.choices, dict)]
    checked = 0
    for command, parser in sub.choices.items():
        for action in parser._actions:
            if action.default in (None, False, [], argparse.SUPPRESS):
                continue
            pattern = rf"\bdefault:? {re.escape(str(action.default))}\b"
            assert re.search(pattern, action.help or ""), (
                f"sdpo {command} {action.option_strings[0]}: its help does not state its "
                f"default {action.default!r}: {action.help!r}"
            )
            checked += 1
    assert checked >= 7


def test_config_prints_every_key_and_its_output_loads_back_to_the_same_config(
    tiny_model_dir, tmp_path, capsys
):
    from sdpo.config import config_to_dict, load_config

    src = _toml(tmp_path, tiny_model_dir)
    assert main(["config", "--config", str(src), "--set", "loss.beta=0.25"]) == 0
    text = capsys.readouterr().out
    assert "learning_rate = 5e-07" in text and "beta = 0.25" in text
    assert "# optional, not set:" in text and "loss.rpo_alpha" in text
    printed = tmp_path / "printed.toml"
    printed.write_text(text)
    want = config_to_dict(load_config(src, ["loss.beta=0.25"]))
    assert config_to_dict(load_config(printed)) == want
    assert main(["config", "--set", "train.lr=1"]) == 2  # unknown key, named
    assert "train.learning_rate" in capsys.readouterr().err


def _dotted_keys(d: dict, prefix: str = "") -> set[str]:
    """Every key of nested tables as a dotted path, a list of tables' items as ``key[].``."""
    keys = set()
    for key, value in d.items():
        if isinstance(value, dict):
            keys |= _dotted_keys(value, f"{prefix}{key}.")
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for item in value:
                keys |= _dotted_keys(item, f"{prefix}{key}[].")
        else:
            keys.add(f"{prefix}{key}")
    return keys


def test_config_names_every_key_at_any_depth_set_or_not(tiny_model_dir, tmp_path, capsys):
    """``sdpo config`` shows every key: with its value, or, unset (TOML has no null), in the
    closing comment; also a data source's own keys (``subset``, ``columns.prompt``)."""
    from sdpo.config import config_to_dict, load_config, tomllib

    src = _toml(tmp_path, tiny_model_dir)
    assert main(["config", "--config", str(src)]) == 0
    text = capsys.readouterr().out
    body, _, comment = text.partition("\n# optional, not set: ")
    shown = _dotted_keys(tomllib.loads(body)) | set(comment.strip().split(", "))
    every = _dotted_keys(config_to_dict(load_config(src)))
    assert "data.sources[].subset" in every and "data.sources[].columns.prompt" in every
    assert every <= shown, f"keys sdpo config does not show: {sorted(every - shown)}"


@pytest.mark.parametrize(
    ("words", "says"),
    [
        (["train.learning_rate", "1e-6"], "--set train.learning_rate=1e-6"),
        (["train.learning_rate=", "1e-6"], "--set train.learning_rate=1e-6"),
        (["train.learning_rate", "=1e-6"], "--set train.learning_rate=1e-6"),
        (["train.epochs", "-1"], "--set train.epochs=-1"),
        (["train.learning_rate"], "--set train.learning_rate=VALUE"),
        (["loss.loss_type=[1,", "2]"], "--set 'loss.loss_type=[1, 2]'"),
    ],
)
@pytest.mark.parametrize("command", ["train", "config"])
def test_a_set_written_with_a_space_is_refused_showing_the_form_to_write(
    tmp_path, capsys, command, words, says
):
    argv = [command, "--config", str(tmp_path / "run.toml"), "--set", *words, "--no-progress"]
    if command == "config":
        argv.pop()
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == EXIT_INPUT
    err = capsys.readouterr().err
    # under the command's own usage, not argparse's 'unrecognized arguments' under sdpo's
    assert err.startswith(f"usage: sdpo {command} ") and "unrecognized" not in err
    assert f"sdpo {command}: error: --set takes" in err and says in err


def test_config_refuses_overwrite_without_out(tmp_path, capsys):
    """--overwrite only lets --out replace a file: without --out it would do nothing."""
    trl = tmp_path / "dpo.json"
    trl.write_text("{}")
    for argv in (["config", "--overwrite"], ["config", "--from-trl", str(trl), "--overwrite"]):
        assert main(argv) == EXIT_INPUT
        captured = capsys.readouterr()
        assert "--overwrite only applies with --out" in captured.err and not captured.out


def test_train_stops_with_exit_code_3_on_a_non_finite_loss(tiny_model_dir, tmp_path, capsys):
    """A learning rate of 1e30 blows the weights past fp32 after the first update: the run
    stops at the next step with exit code 3, names the step and writes no model for it."""
    cfg = _toml(tmp_path, tiny_model_dir)
    code = main(
        ["train", "--config", str(cfg), "--set", "train.learning_rate=1e30", "--no-progress"]
    )
    err = capsys.readouterr().err
    assert code == 3, err
    assert "non-finite loss or gradient" in err and "optimizer step 2" in err
    assert "skip_nonfinite_batches" in err
    assert not (tmp_path / "out" / "step-1" / "model.safetensors").exists()


def test_demo_runs_on_one_thread_unless_omp_num_threads_is_set(monkeypatch, tmp_path):
    import sdpo.demo

    seen = []
    monkeypatch.setattr(sdpo.demo, "run_demo", lambda **kw: seen.append(torch.get_num_threads()))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        assert main(["demo", "--output-dir", str(tmp_path)]) == 0
        monkeypatch.delenv("OMP_NUM_THREADS")
        assert main(["demo", "--output-dir", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(before)
    assert seen == [2, 1]


def test_score_counts_pairs_cut_to_identical_token_ids(tiny_model_dir, tmp_path, capsys):
    """Rejected = chosen + one word: cut to 2 completion tokens, most pairs become the same ids
    (γ = 0), which the text-level identical-pair check cannot see."""
    data = write_pairs(tmp_path / "near.jsonl", n=8, seed=3, kind="near")
    argv = ["score", "--model", str(tiny_model_dir), "--data", str(data), "--no-progress"]
    assert main([*argv, "--max-length", "5", "--max-prompt-length", "3"]) == 0
    assert "7 pair(s) with identical chosen and rejected token ids" in capsys.readouterr().out
    assert main(argv) == 0  # uncut: no pair is identical
    assert "identical chosen and rejected" not in capsys.readouterr().out


def test_score_truncation_keeps_the_prompt_end_a_run_keeps(tiny_model_dir, tmp_path):
    """--truncation keep_start scores the pairs a run with data.truncation = "keep_start"
    trains on (the prompt's start kept), as the run's reference values are; by default the
    prompt's end is kept, as data.truncation's default."""
    from sdpo.engine.checkpoint import load_pretrained
    from sdpo.engine.scoring import score_pairs
    from sdpo.engine.tokenize import PairTokenizer, tokenize_pairs

    data = write_pairs(tmp_path / "pairs.jsonl", n=6, seed=5)
    rows = [json.loads(x) for x in data.read_text().splitlines()]
    model, tokenizer = load_pretrained(tiny_model_dir), PairTokenizer.from_dir(tiny_model_dir)
    argv = ["score", "--model", str(tiny_model_dir), "--data", str(data), "--no-progress"]
    argv += ["--max-length", "8", "--max-prompt-length", "3", "--impl", "torch"]
    got = {}
    for truncation, flag in (("keep_end", []), ("keep_start", ["--truncation", "keep_start"])):
        out = tmp_path / f"{truncation}.jsonl"
        assert main([*argv, "--out", str(out), *flag]) == 0
        got[truncation] = [json.loads(x)["logp_chosen"] for x in out.read_text().splitlines()]
        pairs, _ = tokenize_pairs(
            rows, tokenizer, max_length=8, max_prompt_length=3, truncation=truncation
        )
        want = score_pairs(model, pairs, max_tokens_per_batch=4096, impl="torch")
        assert got[truncation] == want.chosen_logps.tolist()
    assert got["keep_start"] != got["keep_end"]


def test_score_out_of_memory_says_what_to_lower_and_writes_nothing(
    tiny_model_dir, tmp_path, capsys, monkeypatch
):
    """Out of memory while scoring exits 4 (as train does) with what holds the memory and how
    to lower it: bf16 weights (the default precision may keep fp32 ones), a smaller batch, or
    the model sharded; no traceback and no --out file."""
    from sdpo.engine import resume

    data = write_pairs(tmp_path / "pairs.jsonl", n=3, seed=4)
    out = tmp_path / "scores.jsonl"
    monkeypatch.setattr(resume, "_fault_counts", {})
    monkeypatch.setenv("SDPO_FAULT_AT", "score_batch:1:OOM")
    argv = ["score", "--model", str(tiny_model_dir), "--data", str(data), "--out", str(out)]
    assert main([*argv, "--no-progress", "--max-tokens-per-batch", "512"]) == EXIT_OUT_OF_MEMORY
    said = capsys.readouterr().err
    assert "out of memory scoring with precision fp32" in said and "Traceback" not in said
    assert "--precision bf16" in said and "--max-tokens-per-batch (now 512)" in said
    assert "--fsdp under torchrun" in said and not out.exists()


def test_score_refuses_an_out_path_it_cannot_write_before_scoring(tiny_model_dir, tmp_path, capsys):
    """A folder, a path under a file, or the --data file itself (by another spelling too)
    given as --out is an input error named before the model is loaded, not a traceback after
    every pair is scored, nor the pairs replaced by their scores; nothing is left behind."""
    data = write_pairs(tmp_path / "pairs.jsonl", n=3, seed=4)
    pairs = data.read_bytes()
    base = ["score", "--model", str(tiny_model_dir), "--data", str(data), "--no-progress"]
    folder = tmp_path / "scores"
    folder.mkdir()
    for out, words in (
        (folder, "is a folder"),
        (data / "s.jsonl", "is a file, not a folder"),
        (folder / ".." / data.name, "is the --data file"),
    ):
        before = sorted(tmp_path.rglob("*"))
        assert main([*base, "--out", str(out)]) == EXIT_INPUT
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err and "pairs:" not in err
        assert sorted(tmp_path.rglob("*")) == before
        assert data.read_bytes() == pairs
    # with --overwrite too: the pairs are never replaced by their scores
    assert main([*base, "--out", str(folder / ".." / data.name), "--overwrite"]) == EXIT_INPUT
    assert "is the --data file" in capsys.readouterr().err and data.read_bytes() == pairs


def test_score_replaces_an_existing_out_file_only_with_overwrite(tiny_model_dir, tmp_path, capsys):
    """An existing --out is refused before the model loads and kept as it was, as sdpo config
    --from-trl --out refuses one; --overwrite replaces it, and goes only with --out."""
    data = write_pairs(tmp_path / "pairs.jsonl", n=3, seed=4)
    base = ["score", "--model", str(tiny_model_dir), "--data", str(data), "--no-progress"]
    out = tmp_path / "scores.jsonl"
    out.write_text("earlier scores\n")
    assert main([*base, "--out", str(out)]) == EXIT_INPUT
    err = capsys.readouterr().err
    assert f"--out {out} exists; pass --overwrite" in err and "pairs:" not in err
    assert out.read_text() == "earlier scores\n"
    assert main([*base, "--overwrite"]) == EXIT_INPUT
    assert "--overwrite only applies with --out" in capsys.readouterr().err
    assert main([*base, "--out", str(out), "--overwrite"]) == 0
    assert len(out.read_text().splitlines()) == 3 and "earlier" not in out.read_text()


def test_score_reads_the_split_named_by_split(tiny_model_dir, tmp_path):
    """A data set folder with train and test files: --split test scores the test pairs."""
    folder = tmp_path / "pairs_set"
    (folder / "data").mkdir(parents=True)
    write_pairs(folder / "data" / "train-00000-of-00001.jsonl", n=4, seed=4)
    test = write_pairs(folder / "data" / "test-00000-of-00001.jsonl", n=3, seed=5)
    base = ["score", "--model", str(tiny_model_dir), "--no-progress"]
    got = {}
    for name, data, extra in (("split", folder, ["--split", "test"]), ("file", test, [])):
        out = tmp_path / f"{name}.jsonl"
        assert main([*base, "--data", str(data), "--out", str(out), *extra]) == 0
        got[name] = out.read_text()
    assert got["split"] == got["file"] and len(got["split"].splitlines()) == 3


def test_score_refuses_a_split_of_a_single_file(tiny_model_dir, tmp_path, capsys):
    data = write_pairs(tmp_path / "pairs.jsonl", n=3, seed=4)
    args = ["score", "--model", str(tiny_model_dir), "--data", str(data), "--no-progress"]
    assert main([*args, "--split", "test"]) == EXIT_INPUT
    err = capsys.readouterr().err
    assert f"sdpo: input error: {data}: split 'test' was asked of a data file" in err
    assert "--split" in err and "pairs:" not in err


def test_a_data_warning_is_one_line_without_sdpo_s_source_location(
    tiny_model_dir, tmp_path, capsys
):
    data = write_pairs(tmp_path / "pairs.jsonl", n=3, seed=4)
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    rows[1]["rejected"] = rows[1]["chosen"]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert (
        main(["score", "--model", str(tiny_model_dir), "--data", str(data), "--no-progress"]) == 0
    )
    err = capsys.readouterr().err
    assert f"sdpo: warning: {data}: 1 pair(s) have chosen identical to rejected" in err
    assert ".py:" not in err and "DataWarning" not in err


def test_the_resume_command_continues_the_run_from_any_folder(tmp_path, monkeypatch):
    """A relative --set path starts at the working folder: the command changes to it first."""
    import shlex

    from sdpo.cli import build_parser, resume_command

    (tmp_path / "a b").mkdir()
    monkeypatch.chdir(tmp_path / "a b")
    args = build_parser().parse_args(["train", "--config", "run.toml", "--no-progress"])
    config = shlex.quote(str(tmp_path / "a b" / "run.toml"))
    assert resume_command(args) == f"sdpo train --config {config} --no-progress --resume"
    args = build_parser().parse_args(["train", "--config", "run.toml", "--set", "output_dir=o"])
    assert resume_command(args) == (
        f"cd {shlex.quote(str(tmp_path / 'a b'))} && "
        f"sdpo train --config {config} --set output_dir=o --resume"
    )
