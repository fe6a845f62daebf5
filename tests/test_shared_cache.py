"""A cache folder runs share (``sdpo.cache_dir``): each file is named by its key's digest, so
runs with other settings keep their files side by side and each finds its own; files with the
plain names (a run's own cache folder, earlier releases) are still read. Real runs of a tiny
model."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
from safetensors import safe_open

from sdpo.config import config_from_dict
from sdpo.runner import OutputDirError, run_training
from tests.conftest import two_source_config

KEYED = re.compile(r"(.+)-([0-9a-f]{16})\.safetensors")


def _config(tmp_path: Path, model_dir: Path, *, out: str, cache_dir: Path | None, **data):
    sdpo = {"cache_dir": str(cache_dir)} if cache_dir is not None else {}
    d = two_source_config(tmp_path, model_dir, out=out, far=4, near=4, data=data, sdpo=sdpo)
    return config_from_dict(d)


def _stored_key_digest(path: Path) -> str:
    """sha256 of the key a cache file holds, computed from its metadata alone."""
    with safe_open(str(path), "np") as f:
        meta = f.metadata()
    if "key" in meta:  # a token cache: the key as one JSON object
        key = json.loads(meta["key"])
    else:  # a reference cache: one JSON value per key field
        key = {k.removeprefix("key."): json.loads(v) for k, v in meta.items() if k[:4] == "key."}
    text = json.dumps(key, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _files(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


def test_runs_with_other_data_settings_keep_their_files_side_by_side(
    tiny_model_dir, tmp_path, capsys
):
    shared = tmp_path / "shared"
    a = _config(tmp_path, tiny_model_dir, out="a", cache_dir=shared)
    b = _config(tmp_path, tiny_model_dir, out="b", cache_dir=shared, max_length=24)
    assert run_training(a, progress=False).scoring_calls == 2  # initial (chunk 1), step-2
    assert run_training(b, progress=False).scoring_calls == 2  # other tokens: all its own
    files = _files(shared)
    # two of each name, one per run, each named by the digest of the key it holds
    stems = sorted(KEYED.fullmatch(name)[1] for name in files)
    assert stems == sorted(["tokens-train", "initial", "step-2"] * 2)
    for name in files:
        assert _stored_key_digest(shared / name).startswith(KEYED.fullmatch(name)[2]), name
    assert not (tmp_path / "a" / "cache").exists()  # nothing in the runs' own folders

    capsys.readouterr()
    again = run_training(a, progress=False, overwrite=True)  # b wrote after a: a's files stay
    assert again.scoring_calls == 0
    log = capsys.readouterr().out
    reused = re.findall(r"(?:token|reference) cache (\S+): reused", log)
    assert sorted(KEYED.fullmatch(n)[1] for n in reused) == ["initial", "step-2", "tokens-train"]
    assert set(reused) < set(files)
    assert _files(shared) == files  # read, nothing written again


def test_plain_names_are_read_and_a_runs_own_folder_keeps_one_file_per_name(
    tiny_model_dir, tmp_path, capsys
):
    own = _config(tmp_path, tiny_model_dir, out="a", cache_dir=None)
    run_training(own, progress=False)
    plain = sorted(p.name for p in (tmp_path / "a" / "cache").iterdir())
    assert plain == ["initial.safetensors", "step-2.safetensors", "tokens-train.safetensors"]

    # a shared folder that an earlier release filled (the plain names): its files are reused
    shared = tmp_path / "shared"
    shutil.copytree(tmp_path / "a" / "cache", shared)
    capsys.readouterr()
    other = _config(tmp_path, tiny_model_dir, out="b", cache_dir=shared)
    assert run_training(other, progress=False).scoring_calls == 0
    log = capsys.readouterr().out
    assert "reference cache initial.safetensors: reused" in log
    assert "token cache tokens-train.safetensors: reused" in log
    assert sorted(p.name for p in shared.iterdir()) == plain

    # the run's own folder: other data settings replace its files, the folder does not grow
    changed = _config(tmp_path, tiny_model_dir, out="a", cache_dir=None, max_length=24)
    assert run_training(changed, progress=False, overwrite=True).scoring_calls == 2
    assert sorted(p.name for p in (tmp_path / "a" / "cache").iterdir()) == plain


def test_a_resume_on_other_token_ids_names_what_changed_since_its_own_file(
    tiny_model_dir, tmp_path
):
    """The refusal compares with the token cache the run's checkpoint names, not with a file
    another run of the folder wrote since (here under another max_length)."""
    shared = tmp_path / "shared"
    a = _config(tmp_path, tiny_model_dir, out="a", cache_dir=shared)
    run_training(a, progress=False)
    b = _config(tmp_path, tiny_model_dir, out="b", cache_dir=shared, max_length=24)
    run_training(b, progress=False)
    (own,) = [p for p in shared.glob("tokens-train-*") if json.loads(_meta(p))["max_length"] == 32]
    near = _change_first_row(Path(a.data.sources[1].path))
    with pytest.raises(OutputDirError, match="token ids differ") as e:
        run_training(a, progress=False, resume=True)
    assert f"(since {own} was written: data source near ({near}) changed)" in str(e.value)


def _change_first_row(path: Path) -> Path:
    """``path``, a jsonl source, with its first row's chosen completion changed."""
    rows = path.read_text().splitlines()
    row = json.loads(rows[0])
    row["chosen"] += " mat"
    path.write_text("\n".join([json.dumps(row), *rows[1:]]) + "\n")
    return path


def _meta(path: Path) -> str:
    with safe_open(str(path), "np") as f:
        return f.metadata()["key"]


def test_a_resume_whose_own_token_cache_is_gone_names_no_other_runs_file(tiny_model_dir, tmp_path):
    """The file the run's checkpoint names was deleted: the refusal does not compare with the
    plain-named file of the shared folder (another run's, here an earlier release's under
    another max_length), nor name the deleted file as compared."""
    shared = tmp_path / "shared"
    a = _config(tmp_path, tiny_model_dir, out="a", cache_dir=shared)
    run_training(a, progress=False)
    b = _config(tmp_path, tiny_model_dir, out="b", cache_dir=None, max_length=24)
    run_training(b, progress=False)
    shutil.copy(tmp_path / "b" / "cache" / "tokens-train.safetensors", shared)
    (own,) = shared.glob("tokens-train-*")
    own.unlink()
    _change_first_row(Path(a.data.sources[1].path))
    with pytest.raises(OutputDirError, match="token ids differ") as e:
        run_training(a, progress=False, resume=True)
    assert "max_length" not in str(e.value)
    assert str(own) not in str(e.value)
    assert "a data file, the tokenizer files or sdpo's tokenization changed" in str(e.value)


def test_a_shared_folders_files_under_an_earlier_fingerprint_are_reused(
    tmp_path, monkeypatch, capsys
):
    """Files a release wrote in a shared folder under its digest's name, for weights it
    fingerprinted otherwise (a Qwen's window without its sliding layers), are found under the
    earlier fingerprint's digest, as plain-named files are, and not scored anew."""
    from sdpo.engine.model import ModelConfig
    from tests.conftest import write_partly_sliding_qwen

    m0 = write_partly_sliding_qwen(tmp_path / "m0")
    shared = tmp_path / "shared"
    now = ModelConfig.architecture_dict

    def earlier_recipe(config: ModelConfig) -> dict:
        return {k: v for k, v in now(config).items() if k != "sliding_layers"}

    monkeypatch.setattr(ModelConfig, "architecture_dict", earlier_recipe)
    a = _config(tmp_path, m0, out="a", cache_dir=shared)
    assert run_training(a, progress=False).scoring_calls == 2
    monkeypatch.setattr(ModelConfig, "architecture_dict", now)
    capsys.readouterr()
    b = _config(tmp_path, m0, out="b", cache_dir=shared)
    assert run_training(b, progress=False).scoring_calls == 0
    assert "reused (written under the fingerprint" in capsys.readouterr().out
