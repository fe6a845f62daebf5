"""Run configuration: TOML reading, --set overrides, error messages, path resolution, the TOML
writer's round trip and per-step sDPO settings."""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from sdpo.config import (
    ConfigError,
    RunConfig,
    config_from_dict,
    config_to_dict,
    load_config,
    parse_override,
    step_settings,
    toml_dumps,
    write_resolved_config,
)

MINIMAL = """
output_dir = "runs/a"
[model]
path = "models/sft"
[data]
path = "data/prefs.jsonl"
"""


def write(tmp_path: Path, text: str, name: str = "run.toml") -> Path:
    p = tmp_path / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text, encoding="utf-8")
    return p


def test_minimal_file_gets_zephyr_style_defaults(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL))
    assert (cfg.train.learning_rate, cfg.loss.beta, cfg.train.schedule) == (5e-7, 0.1, "linear")
    assert cfg.train.warmup_ratio == 0.1 and cfg.train.adam_betas == [0.9, 0.999]
    assert cfg.sdpo.steps == 1 and cfg.sdpo.reset_optimizer is True
    # the data.path shorthand becomes one named source
    assert [(s.name, s.split) for s in cfg.data.sources] == [("prefs", "train")]
    assert cfg.data.path is None


def test_relative_paths_resolve_against_the_config_folder(tmp_path, monkeypatch):
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    text = """
output_dir = "../runs/x"
[model]
path = "models/sft"
[[data.sources]]
name = "local"
path = "data/a.jsonl"
[[data.sources]]
name = "hub"
path = "Intel/orca_dpo_pairs"
[[data.sources]]
name = "abs"
path = "/abs/b.parquet"
[[data.sources]]
name = "home"
path = "~/c.csv"
[sdpo]
reference = "./ref"
cache_dir = "cache"
"""
    config = write(tmp_path, text, "configs/run.toml")
    base = tmp_path / "configs"
    # a model value shaped like a hub id (namespace/name) is a hub model unless that folder exists
    assert load_config(config).model.path == "models/sft"
    (base / "models" / "sft").mkdir(parents=True)
    cfg = load_config(config)
    assert cfg.output_dir == str(tmp_path / "runs" / "x")
    assert cfg.model.path == str(base / "models" / "sft")
    paths = {s.name: s.path for s in cfg.data.sources}
    assert paths["local"] == str(base / "data" / "a.jsonl")
    assert paths["hub"] == "Intel/orca_dpo_pairs"  # a hub data set name is left alone
    assert paths["abs"] == "/abs/b.parquet"
    assert paths["home"] == os.path.expanduser("~/c.csv")
    assert cfg.sdpo.reference == str(base / "ref")
    assert cfg.sdpo.cache_dir == str(base / "cache")


def test_hub_like_name_that_exists_locally_is_resolved(tmp_path):
    (tmp_path / "org" / "set").mkdir(parents=True)
    text = MINIMAL.replace('path = "data/prefs.jsonl"', 'path = "org/set"')
    cfg = load_config(write(tmp_path, text))
    assert cfg.data.sources[0].path == str(tmp_path / "org" / "set")


def test_set_paths_resolve_against_the_working_directory(tmp_path, monkeypatch):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    cfg = load_config(
        write(tmp_path, MINIMAL, "conf/run.toml"),
        ["model.path=m2", "data.sources=[{path = 'd/x.jsonl'}]"],
    )
    assert cfg.model.path == str(cwd / "m2")
    assert cfg.data.sources[0].path == str(cwd / "d" / "x.jsonl")
    assert cfg.output_dir == str(tmp_path / "conf" / "runs" / "a")  # from the file


def test_set_overrides_parse_toml_literals_and_plain_strings(tmp_path):
    cfg = load_config(
        write(tmp_path, MINIMAL),
        [
            "train.learning_rate=1e-6",  # float
            "train.epochs=3",  # int
            "train.shuffle=false",  # bool
            "train.adam_betas=[0.8, 0.95]",  # list
            "loss.loss_type=ipo",  # unquoted string
            'train.schedule="cosine"',  # quoted string
            "loss.rpo_alpha=0.5",  # optional set
            "kernels.chunk_tokens=4096",  # a section the file does not have
            "model.path=/m/123",
            "sdpo.steps=2",
            "sdpo.partition=random",
            "sdpo.beta=[0.1, 0.2]",
        ],
    )
    assert cfg.train.learning_rate == 1e-6 and isinstance(cfg.train.learning_rate, float)
    assert cfg.train.epochs == 3 and cfg.train.shuffle is False
    assert cfg.train.adam_betas == [0.8, 0.95]
    assert cfg.loss.loss_type == "ipo" and cfg.train.schedule == "cosine"
    assert cfg.loss.rpo_alpha == 0.5 and cfg.kernels.chunk_tokens == 4096
    assert cfg.model.path == "/m/123"
    assert step_settings(cfg, 2) == (0.2, 1e-6)


def test_set_none_clears_an_optional_key_and_numbers_can_be_strings(tmp_path):
    text = MINIMAL + '\n[loss]\nrpo_alpha = 1.0\n[sdpo]\nreference = "/ref"\n'
    cfg = load_config(write(tmp_path, text), ["loss.rpo_alpha=none", "sdpo.reference=null"])
    assert cfg.loss.rpo_alpha is None and cfg.sdpo.reference is None
    # a str field given a number on the command line keeps the text as typed
    with pytest.raises(ConfigError, match=r"name .* must be str, got float 1000.0"):
        # inside a list the value is TOML's: only a whole --set value falls back to its text
        load_config(write(tmp_path, text), ["data.sources=[{name=1e3, path='/d.jsonl'}]"])
    cfg = load_config(write(tmp_path, text), ["output_dir=/runs/007"])
    assert cfg.output_dir == "/runs/007"


def test_data_path_and_sources_are_one_setting(tmp_path):
    both = MINIMAL + "[[data.sources]]\npath = '/x.jsonl'\n"
    with pytest.raises(ConfigError, match="data.path and data.sources are both set"):
        load_config(write(tmp_path, both))
    # on the command line, setting one spelling replaces the file's other one
    cfg = load_config(write(tmp_path, MINIMAL), ["data.sources=[{path='/a.jsonl'}]"])
    assert [s.path for s in cfg.data.sources] == ["/a.jsonl"]
    cfg = load_config(
        write(tmp_path, both.replace('path = "data/prefs.jsonl"', "")), ["data.path=/b.csv"]
    )
    assert [(s.name, s.path) for s in cfg.data.sources] == [("b", "/b.csv")]


def test_set_later_override_wins_and_the_file_is_not_touched(tmp_path):
    path = write(tmp_path, MINIMAL)
    before = path.read_text()
    cfg = load_config(path, ["train.seed=1", "train.seed=2"])
    assert cfg.train.seed == 2 and path.read_text() == before


@pytest.mark.parametrize("text", ["train.epochs", "=3", "train..epochs=3", ""])
def test_malformed_set_is_explained(text):
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_override(text)


def test_set_into_a_non_table_is_explained(tmp_path):
    with pytest.raises(ConfigError, match="data.sources is not a table.*as a whole"):
        load_config(write(tmp_path, MINIMAL), ["data.sources=[]", "data.sources.path=x"])
    with pytest.raises(ConfigError, match="output_dir is not a table"):
        load_config(write(tmp_path, MINIMAL), ["output_dir.x=1"])


@pytest.mark.parametrize(
    ("extra", "overrides", "message"),
    [
        ("[train]\nlearnin_rate = 1e-6\n", [], "unknown key 'train.learnin_rate'.*did you mean 'train.learning_rate'"),
        ("[train]\nbeta = 0.2\n", [], "unknown key 'train.beta'.*did you mean 'loss.beta'"),
        ("[trian]\nepochs = 1\n", [], "unknown section 'trian'.*did you mean 'train'\\?$"),
        # flat TRL-style keys at the top level: the section that holds them
        ("", ["learning_rate=1e-6"], "unknown key 'learning_rate' .*did you mean 'train.learning_rate'\\?$"),
        ("", ["loss_type='ipo'"], "unknown key 'loss_type' .*did you mean 'loss.loss_type'"),
        ("", ["fsdp=true"], "unknown key 'fsdp' .*did you mean 'train.fsdp'"),
        ("[sdpo]\nstep = 2\n", [], "unknown key 'sdpo.step'.*did you mean 'sdpo.steps'"),
        ("[train]\nmodell = 2\n", [], "unknown key 'train.modell'.*valid keys here: 'train.learning_rate'"),
        ("[train]\nlabel_smothing = 0.1\n", [], "unknown key 'train.label_smothing'.*did you mean 'loss.label_smoothing'"),
        ("[loss]\noutput_dr = 'x'\n", [], "unknown key 'loss.output_dr'.*did you mean 'output_dir'.*top-level keys go before"),
        ("", ["model.zzz=1"], r"unknown key 'model.zzz' \(from --set model.zzz=1\).*valid keys here: 'model.path'"),
        ("", ["data.sources=[{nme='a', path='/a.jsonl'}]"], r"unknown key 'data.sources\[0\].nme'.*did you mean 'data.sources\[0\].name'"),
    ],
)  # fmt: skip
def test_unknown_keys_name_the_closest_valid_key(tmp_path, extra, overrides, message):
    path = write(tmp_path, MINIMAL + extra)
    with pytest.raises(ConfigError, match=message) as info:
        load_config(path, overrides)
    if not overrides:
        assert str(path) in str(info.value)


def test_trl_option_names_say_what_they_are_here(tmp_path):
    import re

    from sdpo.config import _TRL_NAMES, RunConfig, _all_keys

    path = write(tmp_path, MINIMAL + "[train]\nper_device_train_batch_size = 4\n")
    with pytest.raises(ConfigError, match="TRL's option 'per_device_train_batch_size'.*"
                       "'train.pairs_per_step'"):  # fmt: skip
        load_config(path)
    with pytest.raises(ConfigError, match="TR-DPO is not offered"):
        load_config(write(tmp_path, MINIMAL), ["loss.sync_ref_model=true"])
    with pytest.raises(ConfigError, match="it is 'model.path' here"):
        load_config(write(tmp_path, MINIMAL), ["model_name_or_path=org/name"])
    with pytest.raises(ConfigError, match="PEFT's option 'r'. it is 'lora.rank' here"):
        load_config(write(tmp_path, MINIMAL), ["lora.r=16"])
    with pytest.raises(ConfigError, match="TRL's option 'max_steps'. sdpo has no step cap"):
        load_config(write(tmp_path, MINIMAL), ["train.max_steps=100"])
    with pytest.raises(ConfigError, match="TRL's option 'resume_from_checkpoint'.*--resume"):
        load_config(write(tmp_path, MINIMAL), ["resume_from_checkpoint=true"])
    # every key a hint names exists
    keys = set(_all_keys(RunConfig))
    for name, hint in _TRL_NAMES.items():
        for named in re.findall(r"'([a-z_]+\.[a-z_]+)'", hint):
            assert named in keys, (name, named)


@pytest.mark.parametrize(
    ("extra", "overrides", "message"),
    [
        ("[train]\nlearning_rate = 'fast'\n", [], "train.learning_rate .*run.toml.* must be float, got str 'fast'"),
        ("", ["train.learning_rate=fast"], r"train.learning_rate \(from --set train.learning_rate=fast\) must be float, got str 'fast'"),
        ("[train]\nepochs = 1.5\n", [], "train.epochs .* must be int, got float 1.5"),
        ("[train]\nepochs = true\n", [], "train.epochs .* must be int, got bool True"),
        ("[train]\nshuffle = 1\n", [], "train.shuffle .* must be bool, got int 1"),
        ("[train]\nadam_betas = 0.9\n", [], "train.adam_betas .* must be list of float, got float 0.9"),
        ("[sdpo]\nsteps = 2\nbeta = 0.1\n", [], r"sdpo.beta .* must be list of float, got float 0.1: one value per sDPO step \(e.g. \[0.1, 0.1\]\); one value for every step is loss.beta \(a key written anywhere below the \[sdpo\] header belongs to \[sdpo\]\)$"),
        ("", ["sdpo.learning_rate=1e-6"], r"sdpo.learning_rate \(from --set sdpo.learning_rate=1e-6\) must be list of float, got float 1e-06: one value per sDPO step \(e.g. \[1e-06, 1e-06\]\); one value for every step is train.learning_rate$"),
        ("[kernels]\nchunk_tokens = 'big'\n", [], "kernels.chunk_tokens .* must be int or none, got str 'big'"),
        ("[kernels]\nmax_chunk_tokens = 0\n", [], "kernels.max_chunk_tokens must be >= 1, got 0"),
        ("", ["model=3"], r"\[model\] \(from --set model=3\) must be a table"),
        ("", ["data.sources=[1]"], r"data.sources\[0\]\] .*must be a table of keys, got int 1"),
        ("", ["data.sources=['a.jsonl']"], r"got str 'a.jsonl'; write each source as a table, \{ path = \"a.jsonl\" \} .*, or one source alone as data.path$"),
        ("", ["data.eval_sources=['h.jsonl']"], r"got str 'h.jsonl'; write each source as a table, \{ path = \"h.jsonl\" \} \(name, optional, defaults to the file's name\)$"),
    ],
)  # fmt: skip
def test_wrong_types_name_key_expected_type_and_value(tmp_path, extra, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, MINIMAL + extra), overrides)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["sdpo.steps=3", "sdpo.partition=random", "sdpo.beta=[0.1, 0.2]"], "sdpo.beta has 2 values but sdpo.steps = 3"),
        (["sdpo.steps=2", "sdpo.partition=random", "sdpo.learning_rate=[1e-6]"], "sdpo.learning_rate has 1 values but sdpo.steps = 2"),
        (["sdpo.steps=2"], "one chunk per data source, but there are 1 source.*sdpo.steps = 2"),
        (["sdpo.partition=hardest"], "sdpo.partition = 'hardest' is not an option"),
        (["train.tokens_per_step=100", "train.pairs_per_step=4"], "both set"),
        (["data.max_length=9000"], "max_tokens_per_batch .16384. is below 2 x data.max_length .18000."),
        (["data.max_prompt_length=1024"], "must be smaller than data.max_length"),
        (["loss.beta=-1"], r"loss.beta must be a finite number > 0, got -1.0 \(in .*after --set loss.beta=-1\)"),
        (["loss.loss_type=kto"], "loss.loss_type must be one of"),
        (["train.precision=fp16"], "train.precision = 'fp16' is not an option"),
        (["model.attn_backend=xformers"], "model.attn_backend"),
        (["data.sources=[{path='/a/x.jsonl'}, {path='/b/x.jsonl'}]"], "two sources are named 'x'"),
        (["train.warmup_ratio=1.0"], r"train.warmup_ratio must be in \[0, 1\)"),
        (["train.loss_path=chunked"], "train.loss_path = 'chunked' is not an option"),
        (["data.eval_fraction=1.0"], r"data.eval_fraction must be >= 0 and < 1"),
        (["data.eval_fraction=0.1", "data.eval_sources=[{path='/a/held.jsonl'}]"], "data.eval_fraction and data.eval_sources are both set"),
    ],
)  # fmt: skip
def test_invalid_values_are_rejected_with_the_key_and_the_fix(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, MINIMAL), overrides)


def test_missing_required_values_are_explained(tmp_path):
    with pytest.raises(
        ConfigError, match="unknown key 'outptu_dir'.*did you mean 'output_dir'\\?$"
    ):
        load_config(write(tmp_path, "outptu_dir = 'x'\n" + MINIMAL))
    with pytest.raises(ConfigError, match="unknown key 'beta' .*did you mean 'loss.beta'"):
        load_config(write(tmp_path, "beta = 0.2\n" + MINIMAL))
    with pytest.raises(ConfigError, match="output_dir is required"):
        load_config(write(tmp_path, MINIMAL.replace('output_dir = "runs/a"', "")))
    with pytest.raises(ConfigError, match="model.path is missing"):
        load_config(write(tmp_path, MINIMAL.replace('path = "models/sft"', "")))
    with pytest.raises(ConfigError, match="no preference data"):
        load_config(write(tmp_path, MINIMAL.replace('path = "data/prefs.jsonl"', "")))
    with pytest.raises(ConfigError, match=r"data.sources\[0\].path is required"):
        load_config(write(tmp_path, MINIMAL), ["data.sources=[{name='x'}]"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_config(write(tmp_path, "output_dir = \n"))


def test_a_config_that_is_a_folder_binary_or_a_trl_yaml_is_refused_saying_what_to_give(tmp_path):
    # a folder and a binary file were tracebacks; a TRL user's YAML or JSON is pointed to the
    # command that converts it
    with pytest.raises(ConfigError, match="is a folder: give the run's TOML file"):
        load_config(tmp_path)
    (tmp_path / "training_args.bin").write_bytes(b"PK\x03\x04" + bytes(range(128, 256)))
    with pytest.raises(ConfigError, match="is not text: give the run's TOML file"):
        load_config(tmp_path / "training_args.bin")
    (tmp_path / "dpo.yaml").write_text("beta: 0.1\nlearning_rate: 5e-7\n")
    with pytest.raises(ConfigError, match="not valid TOML") as error:
        load_config(tmp_path / "dpo.yaml")
    assert f"`sdpo config --from-trl {tmp_path / 'dpo.yaml'} --out run.toml`" in str(error.value)


def test_step_settings_use_per_step_overrides_else_the_shared_values(tmp_path):
    text = MINIMAL.replace(
        '[data]\npath = "data/prefs.jsonl"',
        '[[data.sources]]\npath="/a.jsonl"\n[[data.sources]]\npath="/b.jsonl"\n'
        '[[data.sources]]\npath="/c.jsonl"',
    )
    cfg = load_config(write(tmp_path, text), ["sdpo.steps=3", "train.learning_rate=2e-7"])
    assert [step_settings(cfg, t) for t in (1, 2, 3)] == [(0.1, 2e-7)] * 3
    cfg = load_config(
        write(tmp_path, text), ["sdpo.steps=3", "sdpo.beta=[0.1, 0.3, 0.5]", "sdpo.learning_rate=[1, 2e-7, 3e-7]"]
    )  # fmt: skip
    assert [step_settings(cfg, t) for t in (1, 2, 3)] == [(0.1, 1.0), (0.3, 2e-7), (0.5, 3e-7)]
    for bad in (0, 4):
        with pytest.raises(ValueError, match="out of range 1..3"):
            step_settings(cfg, bad)


def non_default_config(root: Path) -> RunConfig:
    d = {
        "output_dir": str(root / "out dir"),
        "model": {"path": str(root / "m"), "attn_backend": "sdpa",
                  "gradient_checkpointing": True, "compile": True},
        "data": {
            "sources": [
                {"name": 'q"uote\\back\tslash é\u0001', "path": str(root / "a.jsonl"), "split": "dev"},
                {"path": "Org/hub_set"},
            ],
            "max_length": 301, "max_prompt_length": 117, "truncation": "keep_start",
            "identical_pairs": "drop",
        },
        "train": {"learning_rate": 3.3e-7, "epochs": 2, "max_tokens_per_batch": 1237,
                  "tokens_per_step": 5000, "warmup_ratio": 0.05, "schedule": "cosine",
                  "weight_decay": 0.01, "adam_betas": [0.85, 0.97], "adam_eps": 1e-6,
                  "max_grad_norm": 0.0, "seed": 7, "log_every": 3, "save_every": 11,
                  "precision": "bf16-mixed", "shuffle": False, "loss_path": "plain"},
        "loss": {"loss_type": "robust", "beta": 0.25, "label_smoothing": 0.1, "rpo_alpha": 0.3,
                 "reference_free": True},
        "kernels": {"impl": "torch", "chunk_tokens": 513},
        "sdpo": {"steps": 2, "partition": "easy_to_hard", "reference": str(root / "ref"),
                 "reset_optimizer": False, "beta": [0.1, 0.2], "learning_rate": [1e-7, 5e-8],
                 "score_tokens_per_batch": 9999, "cache_dir": str(root / "cache")},
    }  # fmt: skip
    return config_from_dict(d)


def test_resolved_config_round_trips_through_toml(tmp_path):
    cfg = non_default_config(tmp_path)
    out = tmp_path / "run" / "config.toml"
    write_resolved_config(cfg, out)
    assert sorted(p.name for p in out.parent.iterdir()) == ["config.toml"]  # no temp files left
    again = load_config(out)
    assert again == cfg
    assert config_to_dict(again) == config_to_dict(cfg)
    # defaults round trip too (None values are left out and read back as None)
    minimal = config_from_dict(
        {"output_dir": "/o", "model": {"path": "/m"}, "data": {"path": "/d.jsonl"}}
    )
    write_resolved_config(minimal, out)
    assert load_config(out) == minimal


def test_toml_writer_output_is_read_back_identically_by_tomllib():
    d = {
        "a": 1, "b": -2.5e-300, "c": float("inf"), "s": "line\nbreak \x7f \\ \" ' ü 🙂",
        "l": [1, 2], "e": [], "t": {"x": True, "nested": {"y": "z"}, "odd key": 1},
        "arr": [{"k": 1}, {"k": 2, "sub": {"q": [0.5]}}],
    }  # fmt: skip
    assert tomllib.loads(toml_dumps(d)) == d


def optional_fields(cls: type, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from optional_fields(tp, f"{prefix}{f.name}.")
        elif typing.get_origin(tp) in (types.UnionType, typing.Union) and type(
            None
        ) in typing.get_args(tp):
            yield f"{prefix}{f.name}", f.default


def test_every_optional_key_defaults_to_none_so_omitting_it_round_trips():
    fields = dict(optional_fields(RunConfig))
    assert "loss.rpo_alpha" in fields and "sdpo.reference" in fields
    assert all(default is None for default in fields.values()), fields


def test_loss_type_takes_a_string_or_a_list_with_weights(tmp_path):
    path = write(
        tmp_path,
        MINIMAL + '\n[loss]\nloss_type = ["sigmoid", "bco_pair"]\nloss_weights = [0.8, 0.2]\n',
    )
    cfg = load_config(path)
    assert cfg.loss.loss_types == ("sigmoid", "bco_pair") and cfg.loss.weights == (0.8, 0.2)
    out = tmp_path / "resolved" / "config.toml"
    write_resolved_config(cfg, out)
    assert load_config(out) == cfg  # a list round-trips as a list
    again = load_config(path, ['loss.loss_type=["ipo", "hinge"]', "loss.loss_weights=none"])
    assert again.loss.loss_types == ("ipo", "hinge") and again.loss.loss_weights is None
    assert load_config(path, ["loss.loss_type=hinge", "loss.loss_weights=[2]"]).loss.weights == (
        2.0,
    )
    with pytest.raises(ConfigError, match="loss.loss_type"):
        load_config(path, ["loss.loss_type=[1, 2]"])


def test_a_source_column_map_is_read_and_checked(tmp_path):
    text = (
        'output_dir = "o"\n[model]\npath = "m"\n[[data.sources]]\nname = "orca"\n'
        'path = "orca.jsonl"\ncolumns = { prompt = "question", system = "system" }\n'
    )
    cfg = load_config(write(tmp_path, text))
    assert cfg.data.sources[0].columns.as_dict() == {"prompt": "question", "system": "system"}
    out = tmp_path / "resolved" / "config.toml"
    write_resolved_config(cfg, out)
    assert load_config(out) == cfg
    with pytest.raises(ConfigError, match="columns.answer"):
        load_config(write(tmp_path, text.replace("prompt =", "answer =")))


def test_max_prompt_length_defaults_to_half_of_max_length(tmp_path):
    """As 512 of TRL's 1024: a shorter max_length needs no max_prompt_length of its own, and the
    resolved config keeps the number (a run saved with 512 resumes under the default)."""
    path = write(tmp_path, MINIMAL)
    assert load_config(path).data.max_prompt_length == 512
    assert load_config(path, ["data.max_length=257"]).data.max_prompt_length == 128
    explicit = load_config(path, ["data.max_length=257", "data.max_prompt_length=200"])
    assert explicit.data.max_prompt_length == 200
    with pytest.raises(ConfigError, match=r"max_prompt_length \(300\) must be smaller"):
        load_config(path, ["data.max_length=257", "data.max_prompt_length=300"])


def test_identical_pairs_takes_exactly_the_data_readers_policies(tmp_path):
    """Every value the loader accepts is one the data reader takes, so a run never passes its
    config check and then fails on reading ('keep' did: the reader has no such policy)."""
    from sdpo.engine.data import IDENTICAL_POLICIES, read_preference_file

    data = tmp_path / "pairs.jsonl"
    data.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n', encoding="utf-8")
    path = write(tmp_path, MINIMAL)
    for policy in IDENTICAL_POLICIES:
        cfg = load_config(path, [f"data.identical_pairs={policy}"])
        read_preference_file(data, identical=cfg.data.identical_pairs)
    with pytest.raises(ConfigError, match=r"data.identical_pairs = 'keep' is not an option"):
        load_config(path, ["data.identical_pairs=keep"])
