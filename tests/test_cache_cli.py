"""``sdpo cache list`` and ``sdpo cache prune``: a cache folder described from its files'
headers alone, and only sdpo's cache files removed, never a temporary file of a write in
progress nor a file that is not sdpo's. The files are real: one tiny run's shared cache folder
(initial, step-2, tokens-train) and more reference caches written by ``RefLogprobCache``."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors
import safetensors.numpy
import safetensors.torch
from safetensors import safe_open

from sdpo.cache import RefLogprobCache, keyed_cache_path
from sdpo.cache_folder import remove_entry, scan_cache_folder
from sdpo.cli import main
from sdpo.config import config_from_dict
from sdpo.engine.files import atomic_open
from sdpo.engine.token_cache import load_tokenized
from sdpo.runner import run_training
from tests.conftest import WORDS, two_source_config, write_tiny_model
from tests.test_cache import make_key, random_values

DAY = 86400


@pytest.fixture(scope="module")
def shared_run(tmp_path_factory) -> Path:
    """A finished two-step run "a" whose caches went to the shared folder "shared"."""
    root = tmp_path_factory.mktemp("cache-cli")
    model = write_tiny_model(root / "model", words=WORDS, hidden_size=32, seed=1)
    d = two_source_config(root, model, out="a", far=4, near=4, sdpo={"cache_dir": "shared"})
    run_training(config_from_dict(d, base_dir=root), progress=False)
    assert len(list((root / "shared").iterdir())) == 3
    return root


@pytest.fixture
def folder(shared_run: Path, tmp_path: Path) -> Path:
    """A copy of the run's shared cache folder, every file written and last read a day ago."""
    copy = shutil.copytree(shared_run / "shared", tmp_path / "cache")
    for path in copy.iterdir():
        _age(path, days=1)
    return copy


def _age(path: Path, *, days: float, read_days: float | None = None) -> None:
    """Set ``path``'s write time ``days`` ago and its access time ``read_days`` ago (the same
    by default)."""
    now = time.time()
    read = days if read_days is None else read_days
    os.utime(path, (now - read * DAY, now - days * DAY), follow_symlinks=False)


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["cache", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def _listing(capsys, folder: Path) -> dict[str, dict]:
    code, out, _ = _cli(capsys, "list", str(folder), "--json")
    assert code == 0
    return {f["file"]: f for f in json.loads(out)["files"]}


def _metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), "np") as f:
        return f.metadata()


def _by_name(folder: Path, stem: str) -> Path:
    (path,) = folder.glob(f"{stem}-*.safetensors")
    return path


def test_list_names_each_files_kind_key_fields_pairs_and_size(folder, capsys):
    initial, step2 = _by_name(folder, "initial"), _by_name(folder, "step-2")
    tokens = _by_name(folder, "tokens-train")
    code, out, err = _cli(capsys, "list", str(folder))
    assert code == 0 and err == ""
    lines = {line.split()[0]: line for line in out.splitlines()[2:-1]}
    assert out.splitlines()[0] == f"cache folder: {folder} (a cache folder)"
    fields = {}
    for path, kind in ((initial, "initial"), (step2, "step 2")):
        meta = _metadata(path)
        model = json.loads(meta["key.model_fingerprint"])[:12]
        data = json.loads(meta["key.data_fingerprint"])[:12]
        words = lines[path.name].split()
        assert words[1 : 1 + len(kind.split())] == kind.split()
        fields[kind] = words[1 + len(kind.split()) :][:3]
        assert fields[kind] == [model, data, "4"], lines[path.name]
        assert lines[path.name].endswith("fp32 torch len 32/16 keep_end")
    # step 2's reference is M_1 on chunk 2, the initial model's is M_0 on chunk 1
    assert fields["initial"][0] != fields["step 2"][0]
    assert fields["initial"][1] != fields["step 2"][1]
    token_key = json.loads(_metadata(tokens)["key"])
    assert lines[tokens.name].split()[1:6] == [
        "tokens",
        "train",
        token_key["tokenizer_fingerprint"][:12],
        "far+near",
        "8",
    ]
    total = sum(p.stat().st_size for p in folder.iterdir())
    assert out.splitlines()[-1].startswith("total: 3 entries, ")
    assert f"{total / 1000:.1f} kB (3 readable)" in out.splitlines()[-1]

    listed = _listing(capsys, folder)
    assert set(listed) == {initial.name, step2.name, tokens.name}
    for path in (initial, step2):
        meta = _metadata(path)
        key = {k.removeprefix("key."): json.loads(v) for k, v in meta.items() if k[:4] == "key."}
        entry = listed[path.name]
        assert entry["key"] == key
        assert entry["status"] == "ok" and entry["kind"] == (
            "initial" if path == initial else "step 2"
        )
        assert entry["digest"] == path.name.rsplit("-", 1)[1][:16]
        assert entry["size"] == path.stat().st_size
        assert entry["modified"] == pytest.approx(path.stat().st_mtime)
    assert listed[tokens.name]["key"] == token_key
    with safe_open(str(tokens), "np") as f:
        assert listed[tokens.name]["pairs"] == f.get_slice("index").get_shape()[0] == 8


def test_list_reads_no_tensors_and_leaves_the_files_access_times(folder, capsys, monkeypatch):
    probe = folder / "probe"
    shutil.copy(_by_name(folder, "initial"), probe)
    _age(probe, days=1, read_days=2)  # read before it was written: the next read sets it
    probe.read_bytes()
    if probe.stat().st_atime < time.time() - DAY:
        pytest.skip("this file system records no reads (noatime): nothing to leave as it was")
    probe.unlink()
    for path in folder.iterdir():
        _age(path, days=1, read_days=2)
    before = {p.name: p.stat().st_atime_ns for p in folder.iterdir()}

    def no_whole_file(*args, **kwargs):
        raise AssertionError("the listing read a whole file or its tensors")

    monkeypatch.setattr(pathlib.Path, "read_bytes", no_whole_file)
    monkeypatch.setattr(safetensors.torch, "load", no_whole_file)
    monkeypatch.setattr(safetensors.numpy, "load", no_whole_file)
    monkeypatch.setattr(safetensors, "safe_open", no_whole_file)
    listed = _listing(capsys, folder)
    assert [f["status"] for f in listed.values()] == ["ok"] * 3
    assert {p.name: p.stat().st_atime_ns for p in folder.iterdir()} == before
    # "last used" is the later of the write and the read: here the write, a day ago
    for f in listed.values():
        assert f["last_used"] == pytest.approx(f["modified"])


def _damaged_outdated_foreign_and_temporary(folder: Path) -> dict[str, str]:
    """Entries beside the run's files, each with the status a listing gives it."""
    initial, tokens = _by_name(folder, "initial"), _by_name(folder, "tokens-train")
    blob = initial.read_bytes()
    (folder / "step-3.safetensors").write_bytes(blob[: len(blob) // 2])  # cut short
    (folder / "step-4.safetensors").write_bytes(blob + b"\0" * 16)  # more than its header says
    (folder / "reference.safetensors").write_bytes(b"not a safetensors file at all")
    shutil.copy(tokens, folder / "initial-0123456789abcdef.safetensors")  # a token cache
    # an older format version, written as the writer writes (its tensors and key kept)
    meta, tensors = _metadata(initial), safetensors.torch.load_file(initial)
    meta["sdpo_ref_cache_version"] = "1"
    safetensors.torch.save_file(tensors, folder / "eval-initial.safetensors", metadata=meta)
    # a safetensors file of another program under a cache's name, and other entries
    safetensors.torch.save_file({"w": tensors["chosen_logps"]}, folder / "initial.safetensors")
    (folder / "notes.txt").write_text("sweep notes\n")
    (folder / "old").mkdir()
    (folder / "step-5.safetensors").symlink_to(initial)
    (folder / f".{initial.name}.k3x_9q2a.tmp").write_bytes(blob[:100])  # a write in progress
    return {
        "step-3.safetensors": "damaged",
        "step-4.safetensors": "damaged",
        "reference.safetensors": "damaged",
        "initial-0123456789abcdef.safetensors": "damaged",
        "eval-initial.safetensors": "outdated",
        "initial.safetensors": "foreign",
        "notes.txt": "foreign",
        "old": "foreign",
        "step-5.safetensors": "foreign",
        f".{initial.name}.k3x_9q2a.tmp": "writing",
    }


def test_damaged_outdated_foreign_and_temporary_entries_are_listed_as_such(folder, capsys):
    expected = _damaged_outdated_foreign_and_temporary(folder)
    listed = _listing(capsys, folder)
    assert {n: f["status"] for n, f in listed.items() if n in expected} == expected
    assert [f["status"] for n, f in listed.items() if n not in expected] == ["ok"] * 3
    assert "truncated" in listed["step-3.safetensors"]["problem"]
    assert (
        "holds a token cache under a reference cache's name"
        in (listed["initial-0123456789abcdef.safetensors"]["problem"])
    )
    assert listed["eval-initial.safetensors"]["pairs"] == 4  # an old file is still described
    code, out, _ = _cli(capsys, "list", str(folder))
    assert code == 0
    lines = {line.split()[0]: line for line in out.splitlines()[2:-1]}
    for name, status in expected.items():
        assert f"  {status}: " in lines[name], lines[name]
    assert out.splitlines()[-1].endswith(
        "(3 readable, 1 of an older format version, 4 damaged, 1 temporary (writes in "
        "progress), 4 not sdpo cache files)"
    )


def test_prune_older_than_removes_only_sdpo_cache_files_unused_for_that_long(folder, capsys):
    recent = _by_name(folder, "initial")
    old = [_by_name(folder, "step-2"), _by_name(folder, "tokens-train")]
    others = _damaged_outdated_foreign_and_temporary(folder)
    old += [folder / "step-3.safetensors", folder / "eval-initial.safetensors"]
    for path in folder.iterdir():
        _age(path, days=40)
    _age(recent, days=40, read_days=3)  # written long ago, read by a run three days ago
    before = {p.name: p.stat().st_size for p in folder.iterdir()}
    would_go = {"step-3.safetensors", "step-4.safetensors", "reference.safetensors"}
    would_go |= {"initial-0123456789abcdef.safetensors", *(p.name for p in old)}

    code, out, err = _cli(capsys, "prune", str(folder), "--older-than", "30d", "--dry-run")
    assert code == 0 and err == ""
    named = {line.split()[2] for line in out.splitlines() if line.startswith("would remove ")}
    assert named == would_go
    freed = sum(before[n] for n in would_go)
    assert out.splitlines()[-1] == (
        f"would free {freed / 1000:.1f} kB in 7 files; 1 cache file would stay (dry run: "
        "nothing removed)"
    )
    assert {p.name: p.stat().st_size for p in folder.iterdir()} == before
    code, out, _ = _cli(capsys, "prune", str(folder), "--older-than", "30d", "--dry-run", "--json")
    assert json.loads(out)["freed_bytes"] == freed

    code, out, _ = _cli(capsys, "prune", str(folder), "--older-than", "30d", "--json")
    assert code == 0
    result = json.loads(out)
    assert {f["file"] for f in result["removed"]} == would_go and result["freed_bytes"] == freed
    left = {p.name for p in folder.iterdir()}
    assert left == set(before) - would_go
    # never a temporary file, a link (nor what it points to), a folder or another program's file
    assert {n for n, s in others.items() if s in ("foreign", "writing")} <= left
    assert recent.name in left


def test_prune_keep_last_keeps_the_newest_files_of_each_name(folder, capsys):
    plain = folder / "initial.safetensors"
    written = []
    for i, days in enumerate((10, 50, 20, 60)):  # four more initial models' values
        path = keyed_cache_path(plain, make_key(model_fingerprint=f"{i:064x}"))
        RefLogprobCache(path).save(
            random_values(7, seed=i), make_key(model_fingerprint=f"{i:064x}")
        )
        _age(path, days=days)
        written.append(path)
    RefLogprobCache(plain).save(random_values(5, seed=9), make_key())  # a plain name counts too
    _age(plain, days=30)

    code, out, _ = _cli(capsys, "prune", str(folder), "--keep-last", "2", "--json")
    assert code == 0
    removed = {f["file"] for f in json.loads(out)["removed"]}
    # initial: the run's (a day ago) and the one of 10 days ago stay; step-2 and tokens-train
    # have one file each, which stays
    assert removed == {written[1].name, written[2].name, written[3].name, plain.name}
    assert len(list(folder.iterdir())) == 4

    # with an age: of what is past the newest file of its name, only what is also that old
    code, out, _ = _cli(capsys, "prune", str(folder), "--keep-last", "0", "--older-than", "5d")
    assert code == 0
    assert [line.split()[1] for line in out.splitlines() if line.startswith("removed ")] == [
        written[0].name
    ]


def test_prune_unusable_removes_damaged_and_outdated_files_only(folder, capsys):
    run_files = {p.name for p in folder.iterdir()}
    statuses = _damaged_outdated_foreign_and_temporary(folder)
    unusable = {n for n, s in statuses.items() if s in ("damaged", "outdated")}
    code, out, _ = _cli(capsys, "prune", str(folder), "--unusable")
    assert code == 0
    assert {line.split()[1] for line in out.splitlines() if line.startswith("removed ")} == unusable
    assert {p.name for p in folder.iterdir()} == (set(statuses) - unusable) | run_files
    assert "left alone: 1 temporary file" in out


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["list", "{root}"], "is not an sdpo cache folder: none of its"),
        (["prune", "{root}", "--older-than", "1s"], "a: a run's output folder"),
        (["list", "{root}/model"], "Pass a cache folder (OUTPUT_DIR/cache, or the folder"),
        (["prune", "{root}/far.jsonl", "--unusable"], "is a file, not a cache folder"),
        (["prune", "{cache}/step-2.safetensors", "--unusable"], "pass the folder that holds it"),
        (["list", "{root}/missing"], "does not exist; pass a cache folder"),
        (["prune", "{cache}"], "say which files to remove: --older-than AGE (e.g. 30d)"),
        (
            ["list", "{root}/old.toml"],
            "?; to list or prune the run's cache, pass its cache folder itself",
        ),
    ],
)
def test_a_path_or_prune_that_names_no_cache_folder_or_selector_is_refused(
    shared_run, tmp_path, capsys, argv, says
):
    root = tmp_path / "root"
    shutil.copytree(shared_run, root, ignore=shutil.ignore_patterns("shared", "checkpoints"))
    cache = shutil.copytree(shared_run / "shared", tmp_path / "cache")
    shutil.copy(_by_name(cache, "step-2"), cache / "step-2.safetensors")
    (root / "old.toml").write_text('output_dir = "a"\n[train]\nlearning_rat = 1e-6\n')
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    code, out, err = _cli(capsys, *(a.format(root=root, cache=cache) for a in argv))
    assert (code, out) == (2, "")
    assert err.startswith("sdpo: ") and says in err, err
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


@pytest.mark.parametrize("age", ["30", "3x", "-1d", "d", "nand"])
def test_an_age_without_a_unit_or_below_zero_is_a_usage_error(folder, capsys, age):
    with pytest.raises(SystemExit) as stop:
        main(["cache", "prune", str(folder), f"--older-than={age}"])
    assert stop.value.code == 2
    assert "--older-than: must be a number >= 0 and a unit" in capsys.readouterr().err
    assert len(list(folder.iterdir())) == 3


def test_an_output_folder_or_toml_config_stands_for_its_runs_cache_folder(
    shared_run, tmp_path, capsys
):
    code, out, _ = _cli(capsys, "list", str(shared_run / "a"))
    assert code == 0
    assert out.splitlines()[0] == (
        f"cache folder: {shared_run / 'shared'} (sdpo.cache_dir of {shared_run / 'a'}/config.toml)"
    )
    assert out.splitlines()[-1].startswith("total: 3 entries")

    # a config's relative sdpo.cache_dir is read from the config's folder
    toml = (shared_run / "a" / "config.toml").read_text()
    (tmp_path / "run.toml").write_text(toml.replace(str(shared_run / "shared"), "caches"))
    (tmp_path / "caches").mkdir()
    code, out, _ = _cli(capsys, "list", str(tmp_path / "run.toml"), "--json")
    assert code == 0 and json.loads(out)["cache_folder"] == str(tmp_path / "caches")
    assert json.loads(out)["files"] == []

    # without sdpo.cache_dir: the run's own OUTPUT_DIR/cache, which it has not written yet
    own = toml.replace(f'cache_dir = "{shared_run / "shared"}"\n', "")
    own = own.replace(str(shared_run / "a"), str(tmp_path / "b"))
    (tmp_path / "own.toml").write_text(own)
    code, out, _ = _cli(capsys, "list", str(tmp_path / "own.toml"))
    assert code == 0
    assert out.splitlines() == [
        f"cache folder: {tmp_path / 'b' / 'cache'} (the run's own cache folder: "
        f"{tmp_path / 'own.toml'} sets no sdpo.cache_dir)",
        "no files (the folder does not exist yet)",
    ]
    # a folder that holds a run's config but is not its output folder: the config's output_dir
    (tmp_path / "project").mkdir()
    shutil.copy(tmp_path / "own.toml", tmp_path / "project" / "config.toml")
    code, out, _ = _cli(capsys, "list", str(tmp_path / "project"))
    assert code == 0 and out.startswith(f"cache folder: {tmp_path / 'b' / 'cache'} (")
    # an output folder moved since its run: its own cache folder
    moved = shutil.copytree(shared_run / "a", tmp_path / "moved")
    (moved / "config.toml").write_text(own)
    shutil.copytree(shared_run / "shared", moved / "cache")
    code, out, _ = _cli(capsys, "list", str(moved))
    assert code == 0 and out.startswith(f"cache folder: {moved / 'cache'} (")
    assert out.splitlines()[-1].startswith("total: 3 entries")


def test_a_file_written_again_after_it_was_read_is_kept(folder):
    (entry,) = [e for e in scan_cache_folder(folder) if e.name == "initial"]
    RefLogprobCache(entry.path).save(random_values(4, seed=3), make_key())  # a run rewrote it
    assert remove_entry(entry) == "written again since it was read"
    assert entry.path.is_file()
    (entry,) = [e for e in scan_cache_folder(folder) if e.name == "initial"]
    assert remove_entry(entry) is None and not entry.path.exists()


def test_a_run_whose_files_were_pruned_scores_and_tokenizes_them_again(
    shared_run, tmp_path, capsys
):
    shared = shutil.copytree(shared_run / "shared", tmp_path / "shared")
    code, out, _ = _cli(capsys, "prune", str(shared), "--keep-last", "0")
    assert code == 0 and list(shared.iterdir()) == []
    d = two_source_config(
        shared_run,
        shared_run / "model",
        out=str(tmp_path / "b"),
        far=4,
        near=4,
        sdpo={"cache_dir": str(shared)},
    )
    runner = run_training(config_from_dict(d), progress=False)
    assert runner.scoring_calls == 2  # initial (chunk 1) and step-2, as the first run
    log = capsys.readouterr().out
    assert "none for this key yet; tokenizing" in log
    assert "none for this key yet; scoring" in log
    assert sorted(p.name for p in shared.iterdir()) == sorted(
        p.name for p in (shared_run / "shared").iterdir()
    )


def test_a_write_in_progress_is_left_alone_and_completes(folder, capsys):
    """The atomic writer's own temporary file, mid-write: listed as such, never removed, even
    when its times say it is old (a write that stalls); the write then lands under its name."""
    path = keyed_cache_path(folder / "initial.safetensors", make_key())
    values = random_values(6, seed=4)
    blob = safetensors.torch.save(values.tensors(), metadata={"sdpo_ref_cache_version": "2"})
    with atomic_open(path, "wb") as f:
        f.write(blob[:50])
        f.flush()
        (temp,) = folder.glob(".*.tmp")
        _age(temp, days=40)
        assert _listing(capsys, folder)[temp.name]["status"] == "writing"
        code, out, _ = _cli(capsys, "prune", str(folder), "--older-than", "1d", "--unusable")
        assert code == 0 and "would" not in out and temp.is_file()
        assert "left alone: 1 temporary file (a write in progress" in out
        f.write(blob[50:])
    assert not temp.exists() and path.read_bytes() == blob


@pytest.mark.parametrize(
    ("blob", "says"),
    [
        (b"\x05\x00\x00", "file is 3 bytes, too short for a safetensors header"),
        ((99).to_bytes(8, "little") + b"{}", "header length runs past the end of the file"),
        ((4).to_bytes(8, "little") + b"{\xff }", "header is not valid JSON"),
        ((2).to_bytes(8, "little") + b"[]", "header is not a JSON object"),
    ],
    ids=["short", "past-the-end", "not-json", "not-an-object"],
)
def test_a_damaged_header_is_named_alike_by_the_listing_and_both_caches_readers(
    tmp_path, capsys, blob, says
):
    for name in ("initial.safetensors", "tokens-train.safetensors"):
        (tmp_path / name).write_bytes(blob)
    listed = _listing(capsys, tmp_path)
    assert {f["status"] for f in listed.values()} == {"damaged"}
    assert all(f["problem"].startswith(says) for f in listed.values()), listed
    _, why = RefLogprobCache(tmp_path / "initial.safetensors").load(make_key())
    assert why.startswith(f"unreadable: {says}")
    _, why = load_tokenized(tmp_path / "tokens-train.safetensors", {"sources": []})
    assert why.startswith(f"unreadable: {says}")


def test_listing_and_pruning_a_cache_folder_import_no_torch(folder):
    """The command reads a few headers: torch's import (seconds) is not part of it."""
    program = (
        "import sys\n"
        "from sdpo.cli import main\n"
        f"assert main(['cache', 'list', {str(folder)!r}]) == 0\n"
        f"assert main(['cache', 'prune', {str(folder)!r}, '--keep-last', '0', '--dry-run']) == 0\n"
        "print(sorted(m for m in ('torch', 'numpy', 'safetensors') if m in sys.modules))\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, check=True
    )
    assert run.stdout.splitlines()[-1] == "[]", run.stdout


def test_an_age_in_capital_m_is_refused_not_read_as_minutes(folder, capsys):
    """6M reads as six months to many; as six minutes it would remove a month's files."""
    with pytest.raises(SystemExit) as stop:
        main(["cache", "prune", str(folder), "--older-than", "6M"])
    assert stop.value.code == 2
    assert "M is not a unit here: m is minutes; give months in days, e.g. 180d" in (
        capsys.readouterr().err
    )
    assert len(list(folder.iterdir())) == 3
    code, out, _ = _cli(capsys, "prune", str(folder), "--older-than", "2D", "--dry-run")
    assert code == 0 and "would free 0 B in 0 files" in out  # the files are a day old


def test_output_into_a_pipe_whose_reader_left_ends_quietly_with_141(folder):
    """``sdpo cache list DIR | head -1``: the reader leaves before the rest is written. The
    command ends as one a shell's SIGPIPE ended (128 + 13), without a traceback, its work
    done: prune has removed its files."""
    reader, writer = os.pipe()
    os.close(reader)  # no reader from the start: every write of the output fails
    try:
        for argv in (["list", str(folder)], ["prune", str(folder), "--keep-last", "0"]):
            run = subprocess.run(
                [sys.executable, "-m", "sdpo.cli", "cache", *argv],
                stdout=writer,
                stderr=subprocess.PIPE,
                text=True,
            )
            assert (run.returncode, run.stderr) == (141, ""), argv
    finally:
        os.close(writer)
    assert list(folder.iterdir()) == []


def test_files_of_a_later_format_version_are_listed_as_such_and_never_pruned(folder, capsys):
    """A folder that runs of a later sdpo share too: their files are not this sdpo's to judge
    (its runs would score them anew, the later sdpo's runs read them)."""
    initial, tokens = _by_name(folder, "initial"), _by_name(folder, "tokens-train")
    meta = _metadata(initial)
    meta["sdpo_ref_cache_version"] = str(int(meta["sdpo_ref_cache_version"]) + 1)
    later = {"initial-00000000000000aa.safetensors", "tokens-train-00000000000000bb.safetensors"}
    safetensors.torch.save_file(
        safetensors.torch.load_file(initial), folder / min(later), metadata=meta
    )
    meta = _metadata(tokens)
    meta["sdpo_token_cache_version"] = str(int(meta["sdpo_token_cache_version"]) + 1)
    safetensors.numpy.save_file(
        safetensors.numpy.load_file(tokens), folder / max(later), metadata=meta
    )
    listed = _listing(capsys, folder)
    assert {listed[n]["status"] for n in later} == {"later"}
    assert all("written by a later sdpo" in listed[n]["problem"] for n in later)
    code, out, _ = _cli(capsys, "list", str(folder))
    assert out.splitlines()[-1].endswith("(3 readable, 2 of a later format version)")

    code, out, _ = _cli(
        capsys, "prune", str(folder), "--unusable", "--older-than", "0s", "--keep-last", "0"
    )
    assert code == 0
    code, out, _ = _cli(capsys, "prune", str(folder), "--older-than", "0s", "--keep-last", "0")
    assert code == 0 and "left alone: 2 entries" in out
    assert {p.name for p in folder.iterdir()} == later


@pytest.mark.parametrize("action", [["list"], ["prune", "--keep-last", "0"]])
def test_an_empty_path_is_refused_not_read_as_the_working_folder(
    folder, capsys, monkeypatch, action
):
    """``sdpo cache prune "$CACHE" --keep-last 0`` with CACHE unset, run inside a cache folder."""
    monkeypatch.chdir(folder)
    with pytest.raises(SystemExit) as stop:
        main(["cache", action[0], "", *action[1:]])
    assert stop.value.code == 2
    assert "argument PATH: is empty: name a cache folder" in capsys.readouterr().err
    assert len(list(folder.iterdir())) == 3
