"""Hostile input at the command line: every kind of bad data row, a prompt longer than the model's
context, a tokenizer that does not belong to the model, a model folder with a missing shard or
mismatched shapes. Each is refused before training with exit code 2 and one message naming the
file, the row or key, and the fix (no traceback), and a previous run's outputs in the output
folder survive even with --overwrite. (Row-level cases are also tested at the reader in
test_data.py, with a hypothesis test feeding it random rows; model folder cases in
test_checkpoint.py.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from sdpo.cli import EXIT_INPUT, main
from sdpo.engine.checkpoint import load_pretrained, save_pretrained
from sdpo.engine.tiny import build_tokenizer, write_tiny_model
from tests.conftest import WORDS, write_pairs

GOOD = {"prompt": "w1 w2", "chosen": "w3", "rejected": "w30"}


def _toml(tmp_path: Path, model_dir: Path, data: Path, **data_keys) -> Path:
    extra = "".join(f"{k} = {json.dumps(v)}\n" for k, v in data_keys.items())
    cfg = tmp_path / "run.toml"
    cfg.write_text(
        f'output_dir = "out"\n[model]\npath = "{model_dir}"\n[data]\npath = "{data}"\n'
        f"max_length = 32\nmax_prompt_length = 16\n{extra}[train]\npairs_per_step = 4\n"
        'max_tokens_per_batch = 128\n[kernels]\nimpl = "torch"\n'
    )
    return cfg


def _refused(cfg: Path, capsys, *, expect: list[str]) -> str:
    """Run `sdpo train --overwrite` over a finished run; it must exit 2 naming ``expect`` and
    leave that run's outputs as they were."""
    out = cfg.parent / "out"
    marker = out / "step-1" / "model.safetensors"
    before = marker.read_bytes() if marker.is_file() else None
    listing = sorted(p.relative_to(out) for p in out.rglob("*")) if out.exists() else None
    code = main(["train", "--config", str(cfg), "--no-progress", "--overwrite"])
    err = capsys.readouterr().err
    assert code == EXIT_INPUT, err
    assert "Traceback" not in err
    for text in expect:
        assert text in err, (text, err)
    if before is not None:
        assert marker.read_bytes() == before
        assert sorted(p.relative_to(out) for p in out.rglob("*")) == listing
    return err


@pytest.fixture
def finished_run(tiny_model_dir, tmp_path):
    """A good run's outputs in tmp_path/out, to be left alone by every refused run."""
    data = write_pairs(tmp_path / "good.jsonl", n=6, seed=1)
    cfg = _toml(tmp_path, tiny_model_dir, data)
    assert main(["train", "--config", str(cfg), "--no-progress"]) == 0
    return tmp_path


BAD_LINES = {
    "malformed JSON": (b'{"prompt": "w1", "chosen": "w2", "rejected": }\n', ["line 2", "JSON"]),
    "missing field": (b'{"prompt": "w1", "chosen": "w2"}\n', ["line 2", "'rejected'"]),
    "wrong type": (b'{"prompt": "w1", "chosen": 7, "rejected": "w3"}\n', ["line 2", "'chosen'"]),
    "empty string": (b'{"prompt": " ", "chosen": "w2", "rejected": "w3"}\n', ["line 2", "empty"]),
    "non-UTF-8": (b'{"prompt": "w1 \xff", "chosen": "w2", "rejected": "w3"}\n', ["UTF-8"]),
}


@pytest.mark.parametrize("case", list(BAD_LINES))
def test_bad_data_row_is_refused_naming_file_and_line(finished_run, tiny_model_dir, capsys, case):
    line, expect = BAD_LINES[case]
    data = finished_run / "bad.jsonl"
    data.write_bytes(json.dumps(GOOD).encode() + b"\n" + line)
    cfg = _toml(finished_run, tiny_model_dir, data)
    _refused(cfg, capsys, expect=[str(data), "line 2", "Fix:", *expect])


def test_enormous_line_is_refused(finished_run, tiny_model_dir, capsys):
    data = finished_run / "huge.jsonl"
    with open(data, "wb") as f:
        f.write(json.dumps(GOOD).encode() + b"\n")
        f.write(b'{"prompt": "' + b"w1 " * (6 * 2**20) + b'"')  # 18 MB, no newline
    cfg = _toml(finished_run, tiny_model_dir, data)
    _refused(cfg, capsys, expect=[str(data), "line 2", "longer than"])


def test_identical_pair_with_error_policy_is_refused(finished_run, tiny_model_dir, capsys):
    data = finished_run / "same.jsonl"
    same = {"prompt": "w1", "chosen": "w2 w3", "rejected": "w2 w3"}
    data.write_text(json.dumps(GOOD) + "\n" + json.dumps(same) + "\n")
    cfg = _toml(finished_run, tiny_model_dir, data, identical_pairs="error")
    _refused(cfg, capsys, expect=[str(data), "line 2", "identical", "identical_pairs"])


def test_prompt_longer_than_the_model_context_is_refused(tmp_path, capsys):
    model = write_tiny_model(tmp_path / "model", words=WORDS, hidden_size=32, seed=1)
    config = json.loads((model / "config.json").read_text())
    config["max_position_embeddings"] = 12
    (model / "config.json").write_text(json.dumps(config))
    data = tmp_path / "long.jsonl"
    long = {"prompt": " ".join(WORDS[:14]), "chosen": "w1", "rejected": "w2"}
    data.write_text(json.dumps(GOOD) + "\n" + json.dumps(long) + "\n")
    cfg = _toml(tmp_path, model, data)
    expect = [str(data), "line 2, field 'prompt'", "max_position_embeddings 12", "max_length"]
    _refused(cfg, capsys, expect=expect)
    assert not (tmp_path / "out").exists()  # nothing written


def test_tokenizer_larger_than_the_model_vocabulary_is_refused(tmp_path, capsys):
    model = write_tiny_model(tmp_path / "model", words=WORDS, hidden_size=32, seed=1)
    build_tokenizer(model, words=WORDS + [f"x{i}" for i in range(9)])  # ids past the embedding
    data = write_pairs(tmp_path / "d.jsonl", n=4, seed=2)
    cfg = _toml(tmp_path, model, data)
    err = _refused(cfg, capsys, expect=["tokenizer.json", "vocab_size", "does not belong"])
    assert "config.json" in err
    assert not (tmp_path / "out").exists()


def test_model_folder_with_a_missing_shard_is_refused(finished_run, tiny_model_dir, capsys):
    sharded = finished_run / "sharded"
    save_pretrained(load_pretrained(tiny_model_dir), sharded, max_shard_bytes=20_000)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / name, sharded / name)
    shard = sorted(sharded.glob("model-*.safetensors"))[1]
    shard.unlink()
    cfg = _toml(finished_run, sharded, finished_run / "good.jsonl")
    _refused(cfg, capsys, expect=[str(shard), "missing", "model.safetensors.index.json"])


def test_model_folder_with_mismatched_shapes_is_refused(finished_run, tiny_model_dir, capsys):
    broken = finished_run / "broken"
    shutil.copytree(tiny_model_dir, broken)
    config = json.loads((broken / "config.json").read_text())
    config["intermediate_size"] += 5  # the weights say otherwise
    (broken / "config.json").write_text(json.dumps(config))
    cfg = _toml(finished_run, broken, finished_run / "good.jsonl")
    _refused(cfg, capsys, expect=["mlp", "has shape", "config.json"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CUDA backends may run here")
@pytest.mark.parametrize("backend", ["flash", "varlen"])
def test_cuda_attention_backend_on_a_cpu_is_refused_before_the_output_folder(
    tmp_path, tiny_model_dir, capsys, backend
):
    """``model.attn_backend = "flash"`` or ``"varlen"`` on a CPU is an input error naming the
    key and the way out, before ``--overwrite`` clears the old outputs (not a traceback at the
    first forward, with the output folder already prepared)."""
    cfg = _toml(tmp_path, tiny_model_dir, write_pairs(tmp_path / "d.jsonl", n=4, seed=1))
    cfg.write_text(cfg.read_text().replace("[model]\n", f'[model]\nattn_backend = "{backend}"\n'))
    old = {"config.toml": "output_dir = 'out'\n", "metrics.jsonl": '{"loss": 0.5}\n'}
    for name, text in old.items():
        (tmp_path / "out").mkdir(exist_ok=True)
        (tmp_path / "out" / name).write_text(text)
    _refused(cfg, capsys, expect=[f"model.attn_backend = '{backend}'", "cpu", '"auto"'])
    assert {p.name: p.read_text() for p in (tmp_path / "out").iterdir()} == old


@pytest.mark.parametrize("key", ["model.path", "sdpo.reference"])
def test_missing_model_folder_is_refused_naming_its_key(tmp_path, tiny_model_dir, capsys, key):
    """A model folder that is not there (a typo in the path) is named with the key that gives
    it, so a run with a separate reference says which of the two is wrong."""
    cfg = _toml(tmp_path, tiny_model_dir, write_pairs(tmp_path / "d.jsonl", n=4, seed=1))
    missing = tmp_path / "no-such-model"
    code = main(["train", "--config", str(cfg), "--no-progress", "--set", f'{key}="{missing}"'])
    err = capsys.readouterr().err
    assert code == EXIT_INPUT, err
    assert f"{key} = '{missing}' does not exist" in err
    assert "model folder" in err and "hub model id" in err
    assert not (tmp_path / "out").exists()


def test_overwrite_refuses_to_delete_an_input_inside_the_old_outputs(
    tmp_path, tiny_model_dir, capsys
):
    """A new run from the old run's ``step-1/`` into the same output folder with --overwrite:
    the old outputs would be cleared before the model loads, deleting the model the run starts
    from; it is refused naming the key, and the old run is left as it was."""
    data = write_pairs(tmp_path / "d.jsonl", n=4, seed=1)
    old_step = tmp_path / "out" / "step-1"
    shutil.copytree(tiny_model_dir, old_step)
    (tmp_path / "out" / "config.toml").write_text("output_dir = 'out'\n")
    shutil.copy(data, old_step / "pairs.jsonl")
    for named, path in (("model.path = ", old_step), ("the data ", old_step / "pairs.jsonl")):
        model = old_step if path == old_step else tiny_model_dir
        cfg = _toml(tmp_path, model, data if path == old_step else path)
        err = _refused(cfg, capsys, expect=[f"{named}'{path}'", "--overwrite would delete"])
        assert "another output_dir" in err
        assert (old_step / "model.safetensors").is_file() and (old_step / "pairs.jsonl").is_file()


def test_a_completion_that_runs_past_the_model_context_is_named_not_the_prompt(tmp_path, capsys):
    """A short prompt with a long completion: the error names the completion's field (the
    prompt alone fits), so the user does not look for the fault in the prompt."""
    model = write_tiny_model(tmp_path / "model", words=WORDS, hidden_size=32, seed=1)
    config = json.loads((model / "config.json").read_text())
    config["max_position_embeddings"] = 12
    (model / "config.json").write_text(json.dumps(config))
    data = tmp_path / "long.jsonl"
    long = {"prompt": "w1 w2", "chosen": "w3", "rejected": " ".join(WORDS[:14])}
    data.write_text(json.dumps(GOOD) + "\n" + json.dumps(long) + "\n")
    cfg = _toml(tmp_path, model, data)
    _refused(cfg, capsys, expect=["line 2, field 'rejected'", "max_position_embeddings 12"])
