"""Models named by hub id (``sdpo.engine.hub``), read through huggingface_hub's own cache.

No network here: each test publishes tiny models into a hub cache folder laid out as
huggingface_hub writes it (``models--ORG--NAME/refs/<branch>`` holding a commit,
``snapshots/<commit>/`` holding the files), and huggingface_hub resolves ids, branches, tags
and commits against it offline (``local_files_only``, or ``HF_HUB_OFFLINE=1`` in a fresh
process, which is how a user without network runs)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from sdpo.cli import main
from sdpo.config import ConfigError, load_config
from sdpo.engine.hub import HUB_FETCHES, HubModelError, is_hub_model_id, resolve_model_folder
from sdpo.engine.tiny import write_tiny_model
from tests.conftest import WORDS, two_source_config, write_pairs

MAIN, V1 = "a" * 40, "b" * 40  # the two commits of org/tiny


def _publish(cache: Path, repo: str, commit: str, folder: Path, *, refs: tuple[str, ...]) -> Path:
    """Put ``folder``'s files into ``cache`` as the snapshot ``commit`` of ``repo``, as the hub
    client lays them out: each file's bytes under ``blobs/`` and a relative symlink to it in
    the snapshot folder."""
    storage = cache / f"models--{repo.replace('/', '--')}"
    snapshot = storage / "snapshots" / commit
    (storage / "blobs").mkdir(parents=True, exist_ok=True)
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        blob = storage / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.copyfile(file, blob)
        link = snapshot / file.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (storage / "refs").mkdir(parents=True, exist_ok=True)
    for ref in refs:
        (storage / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture
def hub(tmp_path: Path) -> Path:
    """A hub cache with org/tiny at two commits (main and the tag v1, other weights), each with
    files sdpo does not read (a .bin copy, an original/ folder), and org/bin-only."""
    cache = tmp_path / "hub"
    for commit, seed, refs in ((MAIN, 1, ("main",)), (V1, 2, ("v1",))):
        folder = write_tiny_model(tmp_path / f"src-{seed}", words=WORDS, hidden_size=32, seed=seed)
        (folder / "pytorch_model.bin").write_bytes(b"not read")
        (folder / "original").mkdir()
        (folder / "original" / "consolidated.00.pth").write_bytes(b"not read")
        _publish(cache, "org/tiny", commit, folder, refs=refs)
    bin_only = write_tiny_model(tmp_path / "src-bin", words=WORDS, hidden_size=32, seed=3)
    for weights in bin_only.glob("*.safetensors"):
        weights.rename(weights.with_suffix(".bin"))
    _publish(cache, "org/bin-only", MAIN, bin_only, refs=("main",))
    return cache


def test_hub_ids_are_told_from_paths():
    for value in ("Qwen/Qwen2.5-0.5B-Instruct", "meta-llama/Llama-3.2-1B", "org/tiny_v1.5"):
        assert is_hub_model_id(value), value
    for value in ("./org/tiny", "../org/tiny", "/models/x", "~/x/y", "model", "a/b/c", "a/.."):
        assert not is_hub_model_id(value), value


def test_a_hub_id_resolves_to_its_snapshot_at_a_branch_tag_or_commit(hub, tmp_path):
    def resolve(value, revision=None):
        return resolve_model_folder(value, revision=revision, cache_dir=hub, local_files_only=True)

    main_folder = resolve("org/tiny")
    assert main_folder.name == MAIN and (main_folder / "config.json").is_file()
    assert resolve("org/tiny", "v1").name == V1
    assert resolve("org/tiny", V1).name == V1
    a, b = (load_file(resolve("org/tiny", r) / "model.safetensors") for r in ("main", "v1"))
    assert any(not a[k].equal(b[k]) for k in a)  # two commits, two models

    # a local folder is itself; a path-shaped value that is missing is left for the checkpoint
    # checks to report; a local folder with a revision is refused
    local = write_tiny_model(tmp_path / "local", words=WORDS, hidden_size=32, seed=1)
    assert resolve(str(local)) == local
    assert resolve("no-such-folder") == Path("no-such-folder")
    with pytest.raises(HubModelError, match="applies to hub models only"):
        resolve(str(local), "v1")


def test_a_hub_model_that_cannot_be_read_is_a_clear_error(hub):
    def resolve(value, revision=None):
        return resolve_model_folder(
            value, revision=revision, key="model.path", cache_dir=hub, local_files_only=True
        )

    with pytest.raises(HubModelError, match=r"model.path = 'org/missing' is not an existing"):
        resolve("org/missing")
    with pytest.raises(HubModelError, match=r"at revision 'v2' failed.*HF_HUB_OFFLINE"):
        resolve("org/tiny", "v2")
    with pytest.raises(HubModelError, match="no safetensors weights"):
        resolve("org/bin-only")


def test_the_config_keeps_hub_ids_and_refuses_a_revision_for_a_local_folder(tmp_path):
    (tmp_path / "run.toml").write_text(
        'output_dir = "out"\n[model]\npath = "org/tiny"\nrevision = "v1"\n'
        '[data]\npath = "pairs.jsonl"\n[sdpo]\nreference = "org/ref"\n'
    )
    cfg = load_config(tmp_path / "run.toml")
    assert (cfg.model.path, cfg.model.revision, cfg.sdpo.reference) == ("org/tiny", "v1", "org/ref")
    # a folder of that name next to the config is a local folder, resolved as before
    (tmp_path / "org" / "tiny").mkdir(parents=True)
    with pytest.raises(ConfigError, match="model.revision = 'v1' applies to a hub model id"):
        load_config(tmp_path / "run.toml")
    cfg = load_config(tmp_path / "run.toml", overrides=["model.revision=null"])
    assert cfg.model.path == str(tmp_path / "org" / "tiny")
    # the reference's revision, likewise
    overrides = ["model.revision=null", "sdpo.reference_revision=v1"]
    assert load_config(tmp_path / "run.toml", overrides).sdpo.reference_revision == "v1"
    overrides.append("sdpo.reference=./local-ref")
    with pytest.raises(ConfigError, match="sdpo.reference_revision = 'v1' applies to a hub"):
        load_config(tmp_path / "run.toml", overrides)


def _run_config(tmp_path: Path, model: str, revision: str | None, out: str, sdpo: str = "") -> Path:
    data = write_pairs(tmp_path / "pairs.jsonl", n=12, seed=3)
    config = tmp_path / f"{out}.toml"
    revision_line = "" if revision is None else f'revision = "{revision}"\n'
    config.write_text(
        f'output_dir = "{out}"\n[model]\npath = "{model}"\n{revision_line}'
        f'[data]\npath = "{data.name}"\nmax_length = 32\nmax_prompt_length = 16\n'
        '[train]\npairs_per_step = 4\nmax_tokens_per_batch = 128\n[kernels]\nimpl = "torch"\n'
        f"[sdpo]\n{sdpo}"
    )
    return config


def _records(out: Path) -> list[dict]:
    drop = ("tokens_per_s", "time_s", "elapsed_s")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in drop and "time" not in k} for r in records]


def test_sdpo_train_and_score_read_a_hub_model_offline_as_its_local_folder(hub, tmp_path):
    """A fresh process with HF_HUB_OFFLINE=1 and HF_HUB_CACHE, as a user runs: `sdpo train` on
    org/tiny at tag v1 trains exactly as on that snapshot's folder given as a path, the config
    keeps the id, and `sdpo score --model org/tiny --revision v1` scores with those weights."""
    env = {**os.environ, "HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HOME", None)

    def sdpo(*args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "sdpo", *args]
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)

    # the reference: the same hub model at another commit (a separate reference)
    reference = 'reference = "org/tiny"\nreference_revision = "main"\n'
    hub_run = _run_config(tmp_path, "org/tiny", "v1", "hub-out", reference)
    done = sdpo("train", "--config", str(hub_run), "--no-progress")
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"model.path org/tiny: hub snapshot {V1}" in done.stdout + done.stderr
    assert f"sdpo.reference org/tiny: hub snapshot {MAIN}" in done.stdout + done.stderr
    saved = (tmp_path / "hub-out" / "config.toml").read_text()
    assert 'path = "org/tiny"' in saved and 'revision = "v1"' in saved

    snapshot = hub / "models--org--tiny" / "snapshots" / V1
    main_snapshot = hub / "models--org--tiny" / "snapshots" / MAIN
    local_run = _run_config(
        tmp_path, str(snapshot), None, "local-out", f'reference = "{main_snapshot}"\n'
    )
    assert main(["train", "--config", str(local_run), "--no-progress"]) == 0
    records = _records(tmp_path / "hub-out")
    assert len(records) == 3 and "logps/chosen" in records[0]
    assert records == _records(tmp_path / "local-out")

    data = str(tmp_path / "pairs.jsonl")
    scored = sdpo(
        "score",
        "--model",
        "org/tiny",
        "--revision",
        "v1",
        "--data",
        data,
        "--out",
        str(tmp_path / "hub.jsonl"),
    )
    assert scored.returncode == 0, scored.stderr[-3000:]
    local_out = str(tmp_path / "local.jsonl")
    assert main(["score", "--model", str(snapshot), "--data", data, "--out", local_out]) == 0
    assert (tmp_path / "hub.jsonl").read_text() == (tmp_path / "local.jsonl").read_text()

    # a hub model that is not in the cache: exit code 2, the key and what to do, nothing written
    missing = _run_config(tmp_path, "org/missing", None, "missing-out")
    done = sdpo("train", "--config", str(missing), "--no-progress")
    assert done.returncode == 2, done.stderr[-3000:]
    assert "model.path = 'org/missing' is not an existing folder" in done.stderr
    assert not (tmp_path / "missing-out").exists()


def test_a_lora_adapter_names_a_hub_base_model_by_id_and_commit(hub, tmp_path, monkeypatch):
    """Step 1's PEFT adapter on a hub model names its base as PEFT does, by hub id with the
    commit the run trained on as its revision (not the snapshot's path, which names it in this
    machine's hub cache only), and PEFT's AutoPeftModelForCausalLM loads that base from the hub
    (here the cache, offline) and merges the adapter into step-1/'s weights."""
    from huggingface_hub import constants

    from sdpo.config import config_from_dict
    from sdpo.runner import run_training

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    d = two_source_config(tmp_path, "org/tiny", far=4, near=4, sdpo={"steps": 1})
    d["model"]["revision"] = "v1"
    d["lora"] = {"rank": 2, "alpha": 4.0}
    cfg = config_from_dict(d)
    run_training(cfg, progress=False)
    folder = Path(cfg.output_dir) / "step-1" / "adapter"
    config = json.loads((folder / "adapter_config.json").read_text())
    assert (config["base_model_name_or_path"], config["revision"]) == ("org/tiny", V1)
    peft = pytest.importorskip("peft")
    import torch

    model = peft.AutoPeftModelForCausalLM.from_pretrained(
        str(folder), dtype=torch.float32, cache_dir=str(hub), local_files_only=True
    ).merge_and_unload()
    step = load_file(Path(cfg.output_dir) / "step-1" / "model.safetensors")
    assert {k: v for k, v in model.state_dict().items() if k in step}.keys() == step.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in step.items())


def _fetch_on_every_rank(cache: Path, value: str, revision: str | None) -> str:
    """One rank of a gloo group: the hub client configured as HF_HUB_CACHE and HF_HUB_OFFLINE=1
    would at its import (the ranks are forked from a process that imported it already)."""
    from huggingface_hub import constants

    from sdpo.runner import RunInputError, model_folder

    constants.HF_HUB_CACHE, constants.HF_HUB_OFFLINE = str(cache), True
    try:
        return str(model_folder(value, key="model.path", revision=revision))
    except RunInputError as e:
        return f"RunInputError: {e}"


def test_under_torchrun_rank_0_fetches_and_every_rank_gets_its_folder_or_its_error(hub, tmp_path):
    from tests.test_distributed import _spawn

    folders = _spawn(tmp_path, _fetch_on_every_rank, hub, "org/tiny", "v1")
    assert folders == [str(hub / "models--org--tiny" / "snapshots" / V1)] * 2
    errors = _spawn(tmp_path, _fetch_on_every_rank, hub, "org/missing", None)
    for error in errors:  # rank 0's error, raised on every rank
        assert error.startswith("RunInputError: model.path = 'org/missing' is not an existing")


def test_the_fetches_take_the_files_sdpo_reads_and_the_named_chat_templates():
    """huggingface_hub's own filter over a model repository's listing, with the patterns of each
    fetch: top-level weights, JSON and templates, additional_chat_templates/ and the folders of a
    processor's other tokenizers without weights, nothing else."""
    from huggingface_hub.utils import filter_repo_objects

    listing = [
        "config.json",
        "generation_config.json",
        "model-00001-of-00002.safetensors",
        "model.safetensors.index.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "additional_chat_templates/tool_use.jinja",
        "additional_chat_templates/rag.jinja",
        "qformer_tokenizer/tokenizer_config.json",
        "qformer_tokenizer/vocab.txt",
        "pytorch_model.bin",
        "original/consolidated.00.pth",
        "original/params.json",
        "original/tokenizer.model",
        "onnx/model.safetensors",
        "audio_tokenizer/model.safetensors",
        "README.md",
    ]
    fetched = set()
    for allow, ignore in HUB_FETCHES:
        fetched |= set(filter_repo_objects(listing, allow_patterns=allow, ignore_patterns=ignore))
    assert fetched == set(listing[:11])
