"""`sdpo config --from-trl FILE`: a TRL DPO config file as sdpo's TOML, loaded back by sdpo's
own loader (the values checked), the options left out named in comments, bad files refused."""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import json
import sys
from pathlib import Path

import pytest

from sdpo.cli import EXIT_INPUT, main
from sdpo.config import load_config
from sdpo.from_trl import PEFT_DEFAULTS, TRL_DEFAULTS

# as TRL's example configs write one (trl dpo --config dpo.yaml)
TRL_YAML = """\
# Model arguments
model_name_or_path: Qwen/Qwen2-0.5B-Instruct
model_revision: main
dtype: float32
attn_implementation: flash_attention_2

# Data arguments
dataset_name: trl-lib/ultrafeedback_binarized
dataset_train_split: train
dataset_num_proc: 12

# DPO arguments
learning_rate: 5e-7  # YAML 1.1 reads this as text; TRL's parser as the number
beta: 0.1
loss_type: sigmoid
per_device_train_batch_size: 4
gradient_accumulation_steps: 8
bf16: true
max_length: 1024
gradient_checkpointing: true
logging_steps: 10
report_to: none
num_train_epochs: 1
warmup_ratio: 0.1
lr_scheduler_type: cosine
max_steps: 500
optim: adamw_torch_fused
torch_compile: true
push_to_hub: true
hub_model_id: me/qwen-dpo
output_dir: runs/qwen-dpo
seed: 7
max_prompt_length: 512
"""


def _convert(tmp_path: Path, name: str, text: str, *extra: str) -> tuple[int, Path]:
    src = tmp_path / name
    src.write_text(text)
    out = tmp_path / "run.toml"
    code = main(["config", "--from-trl", str(src), "--out", str(out), *extra])
    return code, out


def test_a_trl_yaml_config_converts_to_a_toml_that_sdpo_loads_with_its_values(
    tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    code, out = _convert(tmp_path, "dpo.yaml", TRL_YAML)
    assert code == 0
    cfg = load_config(out)
    assert cfg.model.path == "Qwen/Qwen2-0.5B-Instruct" and cfg.model.revision == "main"
    assert cfg.model.gradient_checkpointing is True
    (source,) = cfg.data.sources
    assert source.path == "trl-lib/ultrafeedback_binarized" and source.split == "train"
    assert cfg.data.max_length == 1024
    assert cfg.data.truncation == "keep_start" and cfg.data.max_prompt_length == 1023
    assert cfg.train.learning_rate == 5e-7 and cfg.loss.beta == 0.1
    assert cfg.loss.loss_type == "sigmoid"
    assert cfg.train.pairs_per_step == 32  # 4 x 8 x world size 1
    assert cfg.train.precision == "bf16-mixed"
    assert cfg.train.log_every == 10 and cfg.log.report_to == []
    assert cfg.train.epochs == 1 and cfg.train.seed == 7
    assert cfg.train.warmup_ratio == 0.1 and cfg.train.schedule == "cosine"
    assert cfg.train.save_every == 500  # TRL's default save_steps
    assert cfg.output_dir == str(tmp_path / "runs" / "qwen-dpo")
    assert cfg.sdpo.steps == 1 and cfg.sdpo.partition == "easy_to_hard"
    text = out.read_text()
    header = text[: text.index("output_dir =")]
    for key in ("attn_implementation", "dataset_num_proc", "max_steps", "optim"):
        assert f"#   {key} = " in header, key
    # the existing explanations are reused, with the value
    assert "#   max_steps = 500: sdpo has no step cap" in header
    assert "#   max_prompt_length = 512: TRL 1.16 has none" in header
    assert "#   torch_compile = true: 'model.compile' = true compiles" in header
    assert "#   attn_implementation = \"flash_attention_2\": 'model.attn_backend'" in header
    assert "world size 1 (assumed; give --world-size N)" in text
    assert "[sdpo]\nsteps = 1  # sdpo's own" in text


def test_json_world_size_defaults_and_overwrite(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "pairs.jsonl"
    data.write_text("")
    trl = {
        "model_name_or_path": "org/model",
        "dataset_name": "pairs.jsonl",
        "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 4,
        "loss_type": ["sigmoid", "sft"],
        "loss_weights": [1.0, 0.5],
        "lr_scheduler_type": "constant",
        "bf16": False,
        "report_to": ["wandb", "mlflow"],
    }
    code, out = _convert(tmp_path, "dpo.json", json.dumps(trl), "--world-size", "8")
    assert code == 0
    cfg = load_config(out)
    assert cfg.data.sources[0].path == str(data)  # a local file, as TRL reads it from here
    assert cfg.train.pairs_per_step == 2 * 4 * 8
    assert cfg.loss.loss_type == ["sigmoid", "sft"] and cfg.loss.loss_weights == [1.0, 0.5]
    assert cfg.train.schedule == "constant" and cfg.train.warmup_steps == 0
    assert cfg.train.precision == "fp32" and cfg.log.report_to == ["wandb"]
    # bf16 weights under bf16 autocast: sdpo's bf16
    bf16 = tmp_path / "bf16.json"
    bf16.write_text(json.dumps({**trl, "bf16": True, "torch_dtype": "bfloat16"}))
    assert main(["config", "--from-trl", str(bf16)]) == 0
    assert 'precision = "bf16"  # torch_dtype bfloat16' in capsys.readouterr().out
    # keys the file leaves out take TRL's defaults where sdpo's differ
    assert cfg.train.learning_rate == 1e-6 and cfg.train.epochs == 3 and cfg.train.seed == 42
    assert cfg.data.max_length == 1024 and cfg.data.truncation == "keep_start"
    assert '#   report_to = ["wandb", "mlflow"]' in out.read_text()
    # an existing --out is kept unless --overwrite
    before = out.read_text()
    assert _convert(tmp_path, "dpo.json", "{}")[0] == EXIT_INPUT
    assert "pass --overwrite" in capsys.readouterr().err
    assert out.read_text() == before
    assert main(["config", "--out", str(out)]) == EXIT_INPUT  # --out needs --from-trl


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("bad.yaml", "a: [1, 2\n", "is not valid YAML"),
        ("bad.json", "{not json", "is not valid JSON"),
        ("list.yaml", "- beta\n- 0.1\n", "must hold a mapping"),
        ("type.yaml", "model_name_or_path: m\nbeta: high\n", "key 'beta' must be a finite number"),
        ("type.json", '{"per_device_train_batch_size": 2.5}', "'per_device_train_batch_size'"),
        ("range.yaml", "beta: -1\n", "beta must be a finite number > 0"),
        ("peft.yaml", "use_peft: true\nlora_r: 0\n", "key 'lora_r' must be >= 1 with use_peft"),
    ],
)
def test_bad_trl_files_exit_2_naming_the_file_and_key(tmp_path, capsys, name, text, message):
    src = tmp_path / name
    src.write_text(text)
    assert main(["config", "--from-trl", str(src)]) == EXIT_INPUT
    err = capsys.readouterr().err
    assert message in err
    if "must be" in message and "range" not in name:
        assert str(src) in err


def _field_defaults(path: Path, cls: str) -> dict[str, object]:
    """The literal defaults of the dataclass fields of ``cls`` in the source file ``path``
    (read, not imported: importing trl takes seconds)."""
    found: dict[str, object] = {}
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not (isinstance(node, ast.ClassDef) and node.name == cls):
            continue
        for st in node.body:
            if not (isinstance(st, ast.AnnAssign) and isinstance(st.target, ast.Name)):
                continue
            value = st.value
            if isinstance(value, ast.Call) and getattr(value.func, "id", "") == "field":
                value = next((kw.value for kw in value.keywords if kw.arg == "default"), None)
            if value is None:
                continue
            with contextlib.suppress(ValueError):  # a default that is not a literal
                found[st.target.id] = ast.literal_eval(value)
    return found


def test_trl_defaults_are_trls():
    specs = [importlib.util.find_spec(name) for name in ("trl", "transformers")]
    if not all(specs):
        pytest.skip("trl and transformers are not installed")
    trl, transformers = (Path(spec.origin).parent for spec in specs)
    # DPOConfig's own fields, then TRL's base config, then transformers' TrainingArguments
    defaults = _field_defaults(transformers / "training_args.py", "TrainingArguments")
    defaults |= _field_defaults(trl / "trainer" / "base_config.py", "_BaseConfig")
    defaults |= _field_defaults(trl / "trainer" / "dpo_config.py", "DPOConfig")
    for key, value in TRL_DEFAULTS.items():
        assert defaults[key] == value, key
    model_config = _field_defaults(trl / "trainer" / "model_config.py", "ModelConfig")
    for key, value in PEFT_DEFAULTS.items():
        assert model_config[key] == value, key
    assert model_config["lora_target_modules"] is None  # PEFT's per-model-type default


def test_use_peft_becomes_a_lora_section_with_trl_s_adapter_options(tmp_path):
    base = "model_name_or_path: org/m\ndataset_name: org/pairs\n"
    lora = "lora_r: 8\nlora_alpha: 16\nlora_dropout: 0.1\nlora_target_modules: all-linear\n"
    code, out = _convert(tmp_path, "peft.yaml", base + "use_peft: true\n" + lora)
    assert code == 0
    cfg = load_config(out)
    assert (cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout) == (8, 16.0, 0.1)
    assert len(cfg.lora.targets) == 7 and cfg.lora.use_rslora is False
    assert "#   lora_" not in out.read_text() and "#   use_peft" not in out.read_text()
    out.unlink()
    # TRL's defaults where the file leaves them out; PEFT's q_proj, v_proj for null targets
    extra = "use_rslora: true\nuse_dora: true\nlora_target_modules: null\n"
    code, out = _convert(tmp_path, "peft.yaml", base + "use_peft: true\n" + extra)
    assert code == 0
    cfg = load_config(out)
    assert (cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout) == (16, 32.0, 0.05)
    assert cfg.lora.targets == ["q_proj", "v_proj"] and cfg.lora.use_rslora is True
    assert "#   use_dora = true: DoRA is not offered" in out.read_text()
    out.unlink()
    # without use_peft TRL trains no adapter: the lora_* options are listed, not applied
    code, out = _convert(tmp_path, "peft.yaml", base + lora)
    assert code == 0
    assert load_config(out).lora.rank == 0
    assert "#   lora_r = 8: use_peft is not true" in out.read_text()


def test_a_test_split_is_held_out_data_when_trl_would_evaluate_on_it(tmp_path):
    # `trl dpo` evaluates on dataset_test_split only when eval_strategy is not "no" (its default)
    base = "model_name_or_path: org/m\ndataset_name: org/pairs\ndataset_test_split: test\n"
    code, out = _convert(tmp_path, "eval.yaml", base + "eval_strategy: steps\neval_steps: 50\n")
    assert code == 0
    cfg = load_config(out)
    (held_out,) = cfg.data.eval_sources
    assert held_out.path == "org/pairs" and held_out.split == "test"
    assert cfg.train.eval_every == 50
    out.unlink()
    code, out = _convert(tmp_path, "no_eval.yaml", base + "eval_steps: 50\n")
    assert code == 0
    cfg = load_config(out)
    assert not cfg.data.eval_sources and not cfg.train.eval_every
    header = out.read_text().split("output_dir =")[0]
    assert '#   dataset_test_split = "test": TRL evaluates on it only when eval_strategy' in header
    assert "#   eval_steps = 50: TRL evaluates every eval_steps only with eval_strategy" in header
    out.unlink()
    # at each epoch's end, TRL does not read eval_steps: held out, scored after each sDPO step
    code, out = _convert(tmp_path, "epoch.yaml", base + "eval_strategy: epoch\neval_steps: 50\n")
    assert code == 0
    cfg = load_config(out)
    assert cfg.data.eval_sources[0].split == "test" and not cfg.train.eval_every
    assert "#   eval_steps = 50: TRL evaluates every eval_steps only" in out.read_text()
    out.unlink()
    # eval_strategy 'steps' without eval_steps: transformers evaluates every logging_steps
    code, out = _convert(tmp_path, "log.yaml", base + "eval_strategy: steps\nlogging_steps: 3\n")
    assert code == 0 and load_config(out).train.eval_every == 3
    out.unlink()
    plain = "model_name_or_path: org/m\ndataset_name: org/pairs\n"
    code, out = _convert(tmp_path, "steps.yaml", plain + "eval_strategy: steps\neval_steps: 50\n")
    assert code == 0  # no test split: nothing to score
    assert "#   eval_steps = 50: sdpo's 'train.eval_every' needs held-out pairs" in out.read_text()


def test_dataset_config_is_the_sources_subset(tmp_path):
    base = "model_name_or_path: org/m\ndataset_name: org/pairs\ndataset_test_split: test\n"
    extra = "dataset_config: hard\neval_strategy: epoch\n"
    code, out = _convert(tmp_path, "subset.yaml", base + extra)
    assert code == 0 and "# TRL options left out" not in out.read_text()
    cfg = load_config(out)
    (train,), (held_out,) = cfg.data.sources, cfg.data.eval_sources
    assert (train.subset, train.split) == ("hard", "train")
    assert (held_out.subset, held_out.split) == ("hard", "test")
    out.unlink()
    code, out = _convert(tmp_path, "none.yaml", base + "dataset_config: null\n")
    assert code == 0 and load_config(out).data.sources[0].subset is None
    assert "#   dataset_config" not in out.read_text() and "subset =" not in out.read_text()


def test_router_aux_loss_coef_becomes_the_loss_key_and_null_is_the_model_s(tmp_path):
    # TRL's DPOConfig.router_aux_loss_coef (None: the model config's; a number overrides it)
    base = "model_name_or_path: org/m\ndataset_name: org/pairs\n"
    code, out = _convert(tmp_path, "moe.yaml", base + "router_aux_loss_coef: 0\n")
    assert code == 0 and load_config(out).loss.router_aux_loss_coef == 0.0
    assert "#   router_aux_loss_coef" not in out.read_text()
    out.unlink()
    code, out = _convert(tmp_path, "moe.yaml", base + "router_aux_loss_coef: 2e-2\n")
    assert code == 0 and load_config(out).loss.router_aux_loss_coef == 0.02
    out.unlink()
    nulls = "router_aux_loss_coef: null\nrpo_alpha: null\nld_alpha: null\n"
    code, out = _convert(tmp_path, "moe.yaml", base + nulls)
    assert code == 0 and load_config(out).loss.router_aux_loss_coef is None
    text = out.read_text()  # TRL's defaults and sdpo's: nothing written, nothing left out
    for key in ("router_aux_loss_coef", "rpo_alpha", "ld_alpha"):
        assert f"#   {key}" not in text and f"\n{key}" not in text, key


def test_max_steps_minus_one_is_no_cap_as_here_and_not_listed_as_left_out(tmp_path):
    base = "model_name_or_path: org/m\ndataset_name: org/pairs\n"
    code, out = _convert(tmp_path, "steps.yaml", base + "max_steps: -1\n")
    assert code == 0 and "#   max_steps" not in out.read_text()
    assert "# TRL options left out" not in out.read_text()
    out.unlink()
    code, out = _convert(tmp_path, "steps.yaml", base + "max_steps: 20\n")
    assert code == 0 and "#   max_steps = 20: sdpo has no step cap" in out.read_text()


def test_save_strategy_save_total_limit_and_run_name_are_translated(tmp_path):
    base = "model_name_or_path: org/m\ndataset_name: org/pairs\nsave_steps: 20\n"
    extra = "save_strategy: steps\nsave_total_limit: 1\nrun_name: my-run\n"
    code, out = _convert(tmp_path, "save.yaml", base + extra)
    assert code == 0
    cfg = load_config(out)
    assert cfg.train.save_every == 20 and cfg.train.keep_checkpoints == 1
    assert cfg.log.run_name == "my-run"
    assert "# TRL options left out" not in out.read_text()
    out.unlink()
    # TRL saves nothing: checkpoints only at the end of each sDPO step
    code, out = _convert(tmp_path, "save.yaml", base + 'save_strategy: "no"\n')
    assert code == 0 and load_config(out).train.save_every == 0
    assert "# TRL options left out" not in out.read_text()
    out.unlink()
    # no per-epoch saving here: the note says what is done instead and how to get one per epoch
    code, out = _convert(tmp_path, "save.yaml", base + "save_strategy: epoch\n")
    text = out.read_text()
    assert code == 0 and load_config(out).train.save_every == 20
    assert '#   save_strategy = "epoch": sdpo saves by optimizer steps' in text
    assert "train.save_every = ceil(training pairs / train.pairs_per_step)" in text
    assert "save_every = 20  # save_steps, which TRL ignores under save_strategy 'epoch'" in text


def test_report_to_all_is_every_tracker_installed(tmp_path, monkeypatch):
    base = "model_name_or_path: org/m\ndataset_name: org/pairs\nreport_to: all\n"
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` fail
    monkeypatch.setitem(sys.modules, "tensorboard", sys.modules.get("tensorboard") or object())
    code, out = _convert(tmp_path, "all.yaml", base)
    assert code == 0
    assert load_config(out).log.report_to == ["tensorboard"]
    assert "#   report_to" not in out.read_text()


def test_a_saved_dpo_config_json_converts_its_nulls_as_unset_and_activation_checkpointing(
    tmp_path, monkeypatch, capsys
):
    # DPOConfig(...).to_json_string() writes every field, unset ones as null; transformers 5
    # names gradient checkpointing activation_checkpointing (the old name its alias)
    monkeypatch.chdir(tmp_path)
    saved = {
        "model_name_or_path": "m",
        "dataset_name": "pairs.jsonl",
        "output_dir": "out",
        "loss_type": ["sigmoid"],
        "loss_weights": None,
        "run_name": None,
        "hub_model_id": None,
        "fsdp_config": None,
        "debug": [],
        "activation_checkpointing": False,
        "activation_checkpointing_kwargs": None,
    }
    code, out = _convert(tmp_path, "args.json", json.dumps(saved))
    assert code == 0, capsys.readouterr().err
    cfg = load_config(out)
    assert cfg.model.gradient_checkpointing is False  # not TRL's default True
    assert cfg.loss.loss_weights is None and cfg.log.run_name is None
    text = out.read_text()
    left_out = [line for line in text.splitlines() if line.startswith("#   ")]
    assert not any(k in line for line in left_out for k in ("loss_weights", "run_name ="))
    comments = " ".join(line.lstrip("# ") for line in text.splitlines() if line.startswith("#"))
    assert "left out as unset (null or empty): hub_model_id, fsdp_config, debug, " in comments
    assert "debug, activation_checkpointing_kwargs" in comments


@pytest.mark.parametrize("key", ["model_name_or_path", "dataset_name"])
def test_a_trl_file_without_model_or_data_names_the_trl_key_to_add(tmp_path, capsys, key):
    given = {"model_name_or_path": "m", "dataset_name": "pairs.jsonl", "beta": 0.1}
    del given[key]
    code, out = _convert(tmp_path, "dpo.json", json.dumps(given))
    err = capsys.readouterr().err
    assert code == EXIT_INPUT and not out.exists()
    assert f"dpo.json: no '{key}': add {key}: NAME" in err and "--set" not in err


def test_model_init_kwargs_dtype_sets_the_precision_as_trl_dpo_loads_the_weights(tmp_path):
    # `trl dpo` updates its model kwargs (ModelConfig's dtype) with model_init_kwargs
    base = {"model_name_or_path": "m", "dataset_name": "pairs.jsonl", "dtype": "float32"}
    init = {"dtype": "bfloat16", "attn_implementation": "sdpa"}
    code, out = _convert(tmp_path, "dpo.json", json.dumps({**base, "model_init_kwargs": init}))
    assert code == 0
    assert load_config(out).train.precision == "bf16"  # bf16 weights, not bf16-mixed
    text = out.read_text()
    assert '#   dtype = "float32": model_init_kwargs.dtype overrides it' in text
    assert '#   model_init_kwargs = {"attn_implementation": "sdpa"}: ' in text


def test_a_mixture_of_data_sets_becomes_the_sources_and_its_test_split_held_out_pairs(
    tmp_path, capsys
):
    # `trl dpo` reads `datasets` (DatasetConfig entries) over dataset_name, and holds out
    # test_split_size of the mixture as its test split
    trl = {
        "model_name_or_path": "m",
        "dataset_name": "ignored",
        "datasets": [
            {"path": "org/easy", "name": "main"},
            {"path": "org/hard", "split": "train_prefs", "fraction": 0.5, "data_dir": None},
        ],
        "test_split_size": 0.1,
        "eval_strategy": "steps",
        "eval_steps": 5,
    }
    code, out = _convert(tmp_path, "mix.json", json.dumps(trl))
    assert code == 0, capsys.readouterr().err
    cfg = load_config(out)
    easy, hard = cfg.data.sources
    assert (easy.path, easy.split, easy.subset) == ("org/easy", "train", "main")
    assert (hard.path, hard.split, hard.subset) == ("org/hard", "train_prefs", None)
    assert cfg.data.eval_fraction == 0.1 and cfg.train.eval_every == 5
    text = out.read_text()
    assert "#   datasets[1].fraction = 0.5: " in text and "data_dir" not in text
    assert '#   dataset_name = "ignored": `trl dpo` reads datasets over it' in text
    assert "eval_strategy =" not in text
    (tmp_path / "run.toml").unlink()
    bad = {**trl, "datasets": [{"split": "train"}]}
    assert _convert(tmp_path, "bad.json", json.dumps(bad))[0] == EXIT_INPUT
    assert "bad.json: datasets[0] must be a mapping with a 'path'" in capsys.readouterr().err


def test_a_pickled_training_args_bin_is_refused_saying_how_to_write_it_as_json(tmp_path, capsys):
    src = tmp_path / "training_args.bin"
    src.write_bytes(b"PK\x03\x04" + bytes(range(128, 256)))  # torch.save's zip, not text
    assert main(["config", "--from-trl", str(src)]) == EXIT_INPUT
    err = capsys.readouterr().err
    assert "is not text (YAML or JSON)" in err and "to_json_string()" in err
    assert "codec" not in err


def test_quantization_remote_code_and_use_cpu_are_left_out_saying_what_applies(tmp_path):
    trl = {
        "model_name_or_path": "m",
        "dataset_name": "pairs.jsonl",
        "load_in_4bit": True,
        "trust_remote_code": True,
        "use_cpu": True,
        "env": {"CUDA_VISIBLE_DEVICES": "0"},  # `trl dpo --config` sets them
    }
    code, out = _convert(tmp_path, "qlora.json", json.dumps(trl))
    assert code == 0
    text = out.read_text()
    assert "#   load_in_4bit = true: quantized weights are not offered" in text
    assert "#   trust_remote_code = true: no code from a model folder is run" in text
    assert "#   use_cpu = true: a run uses the GPU when there is one" in text
    assert '#   env = {"CUDA_VISIBLE_DEVICES": "0"}: set these environment variables' in text
    assert "no equivalent in sdpo" not in text


def test_trl_s_keep_end_is_said_to_differ_and_written_as_the_nearest_settings(tmp_path):
    trl = {"model_name_or_path": "m", "dataset_name": "d.jsonl", "truncation_mode": "keep_end"}
    code, out = _convert(tmp_path, "ke.json", json.dumps({**trl, "max_length": 2048}))
    assert code == 0
    cfg = load_config(out)
    assert cfg.data.truncation == "keep_end" and cfg.data.max_prompt_length == 1024
    text = out.read_text()
    assert "keeps each whole sequence's last max_length tokens, which no setting here" in text
    assert "it is 'data.truncation' here" not in text


def test_an_out_that_is_a_folder_or_the_trl_file_itself_is_refused(tmp_path, capsys):
    src = tmp_path / "dpo.json"
    src.write_text(json.dumps({"model_name_or_path": "m", "dataset_name": "d.jsonl"}))
    before = src.read_text()
    # the TRL file was replaced by the TOML with --overwrite
    assert main(["config", "--from-trl", str(src), "--out", str(src), "--overwrite"]) == 2
    assert "is the --from-trl file" in capsys.readouterr().err and src.read_text() == before
    # a folder was told to pass --overwrite, which then failed to write onto it (exit 74)
    for extra in ([], ["--overwrite"]):
        assert main(["config", "--from-trl", str(src), "--out", str(tmp_path), *extra]) == 2
        assert "is a folder; give the path of a file" in capsys.readouterr().err


def test_warmup_steps_0_beside_a_warmup_ratio_leaves_the_ratio_as_transformers_does(tmp_path):
    # transformers 4's arguments (a saved one has both): warm-up steps when > 0, else the ratio
    trl = {"model_name_or_path": "m", "dataset_name": "d.jsonl", "warmup_ratio": 0.1}
    for steps, ratio, fixed in ((0, 0.1, None), (5, 0.1, 5)):
        code, out = _convert(tmp_path, "wu.json", json.dumps({**trl, "warmup_steps": steps}))
        assert code == 0
        cfg = load_config(out)
        assert (cfg.train.warmup_ratio, cfg.train.warmup_steps) == (ratio, fixed)
        assert "warmup_steps =" not in out.read_text().split("output_dir")[0]  # not left out
        out.unlink()


# the alignment handbook's Zephyr DPO recipe (transformers 4's evaluation_strategy, the
# handbook's dataset_mixer and dataset_splits)
HANDBOOK_YAML = """\
model_name_or_path: alignment-handbook/zephyr-7b-sft-full
dataset_mixer:
  HuggingFaceH4/ultrafeedback_binarized: 1.0
  org/extra: 0.5
dataset_splits:
- train_prefs
- test_prefs
bf16: true
beta: 0.01
do_eval: true
evaluation_strategy: steps
eval_steps: 100
learning_rate: 5.0e-7
"""


def test_the_alignment_handbook_s_recipe_converts_its_data_and_its_evaluation(tmp_path):
    code, out = _convert(tmp_path, "zephyr.yaml", HANDBOOK_YAML)
    assert code == 0
    cfg = load_config(out)
    assert [(s.path, s.split) for s in cfg.data.sources] == [
        ("HuggingFaceH4/ultrafeedback_binarized", "train_prefs"),
        ("org/extra", "train_prefs"),
    ]
    assert [(s.path, s.split) for s in cfg.data.eval_sources] == [
        ("HuggingFaceH4/ultrafeedback_binarized", "test_prefs"),
        ("org/extra", "test_prefs"),
    ]
    assert cfg.train.eval_every == 100  # evaluation_strategy: steps, as eval_strategy
    text = out.read_text()
    assert '#   dataset_mixer = {"org/extra": 0.5}: every pair of each source is read' in text
    assert "#   do_eval = true: held-out pairs are scored whenever" in text
    assert "evaluation_strategy" not in text and "no equivalent in sdpo" not in text


def test_eval_strategy_epoch_is_said_to_have_no_fixed_equivalent(tmp_path):
    trl = {"model_name_or_path": "m", "dataset_name": "d", "dataset_test_split": "test"}
    code, out = _convert(tmp_path, "ep.json", json.dumps({**trl, "eval_strategy": "epoch"}))
    assert code == 0 and load_config(out).data.eval_sources[0].split == "test"
    assert "eval_strategy 'epoch' has no fixed equivalent: one evaluation per epoch" in (
        out.read_text()
    )


def test_label_smoothing_trl_ignores_for_the_loss_type_is_left_out_not_refused(tmp_path, capsys):
    # TRL 1.16 trains ipo with it set (and unread); the converted config was refused
    trl = {"model_name_or_path": "m", "dataset_name": "d", "label_smoothing": 0.1}
    code, out = _convert(tmp_path, "ls.json", json.dumps({**trl, "loss_type": ["ipo"]}))
    assert code == 0, capsys.readouterr().err
    cfg = load_config(out)
    assert cfg.loss.loss_type == "ipo" and cfg.loss.label_smoothing == 0.0
    assert "#   label_smoothing = 0.1: TRL ignores it for loss_type ['ipo']" in out.read_text()
    out.unlink()
    code, out = _convert(tmp_path, "ls.json", json.dumps({**trl, "loss_type": "robust"}))
    assert code == 0 and load_config(out).loss.label_smoothing == 0.1
    out.unlink()
    # so is a discopop_tau for another loss type
    tau = {"model_name_or_path": "m", "dataset_name": "d", "discopop_tau": 0.2}
    code, out = _convert(tmp_path, "tau.json", json.dumps({**tau, "loss_type": "bco_pair"}))
    assert code == 0 and load_config(out).loss.discopop_tau == 0.05
    assert "#   discopop_tau = 0.2: TRL ignores it for loss_type ['bco_pair']" in out.read_text()


def test_label_smoothing_beside_a_sigmoid_loss_says_what_trl_1_16_trains(tmp_path, capsys):
    # TRL 1.16's sigmoid loss does not read label_smoothing (robust and exo_pair do): the file
    # trains plain DPO there, which the converted config trained as cDPO without a word
    trl = {"model_name_or_path": "m", "dataset_name": "d", "label_smoothing": 0.1}
    code, out = _convert(tmp_path, "ls.json", json.dumps(trl))  # TRL's default sigmoid
    assert code == 0, capsys.readouterr().err
    assert load_config(out).loss.label_smoothing == 0.0
    assert "#   label_smoothing = 0.1: TRL ignores it for loss_type ['sigmoid']" in out.read_text()
    out.unlink()
    code, out = _convert(
        tmp_path, "ls.json", json.dumps({**trl, "loss_type": ["sigmoid", "robust"]})
    )
    assert code == 0 and load_config(out).loss.label_smoothing == 0.1
    assert "TRL 1.16's sigmoid ignores it" in out.read_text()
