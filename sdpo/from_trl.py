"""``sdpo config --from-trl FILE``: a TRL DPO config file (YAML or JSON, as ``trl dpo --config``
reads it: DPOConfig and TrainingArguments fields with ModelConfig and ScriptArguments ones) as an
sdpo TOML config.

A key with an exact equivalent is written in its section; a key absent from the file that TRL
1.16 would set to a value other than sdpo's default is written with TRL's default, so the run is
the one TRL would train. Every other key goes into comments at the top, each with its value and
why it was left out. The text loads with ``load_config`` (the tests check it)."""

from __future__ import annotations

import json
import math
import os
import textwrap
from pathlib import Path
from typing import Any

from sdpo.config import (
    _TRL_NAMES,
    ConfigError,
    _toml_key,
    _toml_value,
    config_from_dict,
    tomllib,
)

# the loss types whose loss TRL 1.16 computes with label_smoothing (and aot, aot_unpaired, which
# sdpo has not): its sigmoid ignores it, which sdpo reads as cDPO
TRL_SMOOTHED_TYPES = ("robust", "exo_pair")

# TRL 1.16's defaults (DPOConfig on transformers 5) that differ from sdpo's, for keys absent
# from the file; tests/test_from_trl.py checks them against DPOConfig when trl is installed.
TRL_DEFAULTS: dict[str, Any] = {
    "learning_rate": 1e-6,
    "num_train_epochs": 3,
    "seed": 42,
    "warmup_steps": 0,
    "gradient_checkpointing": True,
    "logging_steps": 10,
    "save_steps": 500,
    "max_length": 1024,
    "truncation_mode": "keep_start",
    "per_device_train_batch_size": 8,
    "gradient_accumulation_steps": 1,
}

# TRL 1.16's ModelConfig defaults for its LoRA adapter (``use_peft``), written when the file
# turns the adapter on and leaves them out; tests/test_from_trl.py checks them against TRL's.
PEFT_DEFAULTS: dict[str, Any] = {
    "lora_r": 16,
    "lora_alpha": 32,
    "lora_dropout": 0.05,
}
# what PEFT targets when lora_target_modules is null: q_proj and v_proj for Llama, Mistral,
# Mixtral, Qwen2, Qwen3 and Gemma models (its per-model-type table)
PEFT_DEFAULT_TARGETS = ["q_proj", "v_proj"]
_LORA_KEYS = (
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "lora_target_modules",
    "use_rslora",
    "use_dora",
    "lora_modules_to_save",
    "lora_target_parameters",
    "lora_task_type",
)

# keys read below and the type each must have ("number": int or float, "int": a whole number)
_TYPES: dict[str, str] = {
    "model_name_or_path": "str",
    "model_revision": "str",
    "dataset_name": "str",
    "dataset_train_split": "str",
    "dataset_config": "str or null",
    "output_dir": "str",
    "learning_rate": "number",
    "beta": "number",
    "loss_type": "str or list",
    "loss_weights": "list or null",
    "label_smoothing": "number",
    "rpo_alpha": "number or null",
    "ld_alpha": "number or null",
    "use_weighting": "bool",
    "router_aux_loss_coef": "number or null",
    "reference_free": "bool",
    "discopop_tau": "number",
    "f_divergence_type": "str",
    "f_alpha_divergence_coef": "number",
    "max_length": "int or null",
    "truncation_mode": "str",
    "warmup_ratio": "number",
    "warmup_steps": "number",
    "lr_scheduler_type": "str",
    "num_train_epochs": "number",
    "seed": "int",
    "gradient_checkpointing": "bool",
    "activation_checkpointing": "bool or null",
    "bf16": "bool or null",
    "fp16": "bool",
    "max_grad_norm": "number",
    "weight_decay": "number",
    "adam_beta1": "number",
    "adam_beta2": "number",
    "adam_epsilon": "number",
    "logging_steps": "number",
    "save_steps": "number",
    "eval_steps": "number or null",
    "report_to": "str or list",
    "run_name": "str or null",
    "save_total_limit": "int or null",
    "save_strategy": "str",
    "per_device_train_batch_size": "int",
    "gradient_accumulation_steps": "int",
    "use_peft": "bool",
    "lora_r": "int",
    "lora_alpha": "number",
    "lora_dropout": "number",
    "lora_target_modules": "str or list or null",
    "use_rslora": "bool",
    "use_dora": "bool",
}

_TRACKERS = ("tensorboard", "wandb")


def read_trl_file(path: str | os.PathLike) -> dict[str, Any]:
    """The mapping in a TRL config file: JSON by its suffix ``.json``, else YAML (JSON is YAML
    too). PyYAML comes with ``datasets``; without it only JSON is read."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"TRL config file {path} does not exist") from None
    except UnicodeDecodeError:  # a checkpoint's training_args.bin: TrainingArguments pickled
        raise ConfigError(
            f"TRL config file {path} is not text (YAML or JSON). A checkpoint's "
            "training_args.bin is the pickled DPOConfig: write it as JSON where trl is installed, "
            "python -c \"import torch; print(torch.load('training_args.bin', "
            'weights_only=False).to_json_string())" > args.json, add model_name_or_path and '
            "dataset_name to it, and convert that"
        ) from None
    except OSError as e:
        raise ConfigError(f"TRL config file {path} cannot be read: {e}") from None
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
    else:
        try:
            import yaml
        except ModuleNotFoundError:
            raise ConfigError(
                f"{path}: reading YAML needs PyYAML (pip install pyyaml), or give the config as "
                "a .json file"
            ) from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML or JSON: {e}") from None
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise ConfigError(
            f"{path} must hold a mapping of TRL option names to values (as `trl dpo --config` "
            f"reads), got {type(data).__name__}"
        )
    return data


def _check_type(source: str, key: str, value: Any) -> Any:
    """``value`` of ``key`` checked against its type; a number written as text (PyYAML reads
    ``5e-7``, without a dot, as a string; TRL's argument parser converts it) as the number."""
    want = _TYPES.get(key)
    if want is None:
        return value
    if isinstance(value, str) and ("number" in want or "int" in want):
        try:
            number = float(value)
        except ValueError:
            pass
        else:
            if "int" in want and not number.is_integer():
                value = number  # refused below, as the number it is
            else:
                value = int(number) if "int" in want else number
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = {
        "str": isinstance(value, str),
        "number": number and math.isfinite(value),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "bool": isinstance(value, bool),
        "list": isinstance(value, list),
        "null": value is None,
    }
    if not any(ok.get(kind, False) for kind in want.split(" or ")):
        shown = "a finite number" if want.startswith("number") else want
        raise ConfigError(
            f"{source}: key {key!r} must be {shown}, got {type(value).__name__} {value!r}"
        )
    return value


def _whole(value: float) -> int | None:
    """``value`` as an int when it is a whole number >= 1 (TRL types step counts as floats)."""
    return int(value) if value >= 1 and float(value).is_integer() else None


def convert_trl_config(
    trl: dict[str, Any], *, source: str = "the TRL config", world_size: int = 1
) -> str:
    """The sdpo TOML config text equivalent to the TRL options ``trl`` (see the module
    docstring). ``source`` names the file in errors; ``world_size``: the number of processes
    TRL would run on (pairs per optimizer step = batch size x accumulation x world size)."""
    trl = {key: _check_type(source, key, value) for key, value in trl.items()}
    if "evaluation_strategy" in trl and "eval_strategy" not in trl:  # transformers < 4.46
        trl = {("eval_strategy" if k == "evaluation_strategy" else k): v for k, v in trl.items()}
    given = dict(trl)
    t = {**TRL_DEFAULTS, **trl}
    dropped: list[tuple[str, Any, str]] = []
    notes: dict[str, str] = {}  # "section.key" -> comment
    out: dict[str, dict[str, Any]] = {
        "": {},
        "model": {},
        "data": {},
        "train": {},
        "loss": {},
        "sdpo": {},
        "log": {},
        "lora": {},
    }
    used: set[str] = set()

    def put(section: str, key: str, value: Any, *trl_keys: str, note: str = "") -> None:
        out[section][key] = value
        used.update(trl_keys)
        defaults = [k for k in trl_keys if k not in given and k in TRL_DEFAULTS]
        if defaults:
            note = "; ".join(filter(None, [note, "TRL's default " + ", ".join(defaults)]))
        if note:
            notes[f"{section}.{key}"] = note

    def drop(key: str, why: str) -> None:
        used.add(key)
        if key in given:
            dropped.append((key, given[key], why))

    def local(value: str) -> str:  # TRL reads relative paths against the working directory
        return str(Path(value).resolve()) if Path(value).expanduser().exists() else value

    # model and data
    if "model_name_or_path" in t:
        put("model", "path", local(t["model_name_or_path"]), "model_name_or_path")
    if "model_revision" in t:
        put("model", "revision", t["model_revision"], "model_revision")
    mixture = t.get("datasets")
    if mixture:  # `trl dpo` reads a mixture of data sets (its `datasets`) over dataset_name
        out["data"]["sources"] = _mixture_sources(source, mixture, local, dropped)
        used.update(("datasets", "streaming", "dataset_config", "dataset_train_split"))
        if "dataset_name" in given:
            dropped.append(
                ("dataset_name", given["dataset_name"], "`trl dpo` reads datasets over it")
            )
            used.add("dataset_name")
        size = t.get("test_split_size")
        if isinstance(size, float) and 0 < size < 1:
            put(
                "data",
                "eval_fraction",
                size,
                "test_split_size",
                *(("eval_strategy",) if t.get("eval_strategy", "no") != "no" else ()),
                note="held out of training as TRL's test split, and scored after each sDPO step",
            )
        elif size is not None:
            drop("test_split_size", "a number of rows has no equivalent: give a share below 1")
        else:
            used.add("test_split_size")
        drop(
            "dataset_test_split",
            "the held-out share of a mixture is 'data.eval_fraction' here (test_split_size)",
        )
    elif "dataset_name" in t:
        src = {"path": local(t["dataset_name"])}
        if "dataset_train_split" in t:
            src["split"] = t["dataset_train_split"]
        if t.get("dataset_config") is not None:  # datasets' config name: the data set's subset
            src["subset"] = t["dataset_config"]
        used.update(("dataset_name", "dataset_train_split", "dataset_config"))
        out["data"]["sources"] = [src]
        # `trl dpo` evaluates on dataset_test_split only when eval_strategy is not "no"
        if "dataset_test_split" in given and t.get("eval_strategy", "no") != "no":
            test = {"path": src["path"], "split": t["dataset_test_split"]}
            if "subset" in src:
                test["subset"] = src["subset"]
            put(
                "data",
                "eval_sources",
                [test],
                "dataset_test_split",
                "eval_strategy",
                note="scored after each sDPO step (and every train.eval_every steps)"
                + (
                    "; eval_strategy 'epoch' has no fixed equivalent: one evaluation per epoch "
                    "is train.eval_every = ceil(training pairs / train.pairs_per_step)"
                    if t.get("eval_strategy") == "epoch"
                    else ""
                ),
            )
        else:
            drop(
                "dataset_test_split",
                "TRL evaluates on it only when eval_strategy is not 'no' (its default): with one, "
                "it becomes 'data.eval_sources'",
            )
    elif isinstance(t.get("dataset_mixer"), dict) and t["dataset_mixer"]:
        # the alignment handbook's recipes: {data set: share of its train splits} and the
        # splits to read, those named *train* for training and *test* for evaluation
        mixer = t["dataset_mixer"]
        splits = t.get("dataset_splits") or ["train", "test"]
        if not isinstance(splits, list) or not all(isinstance(x, str) for x in splits):
            raise ConfigError(f"{source}: key 'dataset_splits' must be a list of split names")
        train = [x for x in splits if "train" in x]
        test = [x for x in splits if "train" not in x and "test" in x]
        out["data"]["sources"] = [
            {"path": local(name), "split": split} for name in mixer for split in train
        ]
        used.update(("dataset_mixer", "dataset_splits"))
        shares = {name: frac for name, frac in mixer.items() if frac != 1}
        if shares:
            dropped.append(
                ("dataset_mixer", shares, "every pair of each source is read (no sampling)")
            )
        if test and t.get("eval_strategy", "no") != "no":
            put(
                "data",
                "eval_sources",
                [{"path": local(name), "split": split} for name in mixer for split in test],
                "eval_strategy",
                note="dataset_splits' test splits, scored after each sDPO step",
            )
    out[""]["output_dir"] = str(Path(t.get("output_dir") or "trainer_output").resolve())
    used.add("output_dir")
    if "output_dir" not in given:
        notes[".output_dir"] = "TRL's default output_dir"

    # lengths: TRL 1.16 cuts the whole sequence to max_length keeping its start
    if t.get("max_length") is None:
        drop("max_length", "null (no truncation) has no equivalent: sdpo always cuts at a length")
        used.add("truncation_mode")
    else:
        max_length = int(t["max_length"])
        put("data", "max_length", max_length, "max_length")
        if t.get("truncation_mode") == "keep_start":
            put(
                "data",
                "truncation",
                "keep_start",
                "truncation_mode",
                note="TRL 1.16's keep_start: the whole sequence keeps its start",
            )
            out["data"]["max_prompt_length"] = max(1, max_length - 1)
            notes["data.max_prompt_length"] = "max_length - 1, as TRL's keep_start"
        else:
            keep_end = t.get("truncation_mode") == "keep_end"
            drop(
                "truncation_mode",
                "TRL's keep_end keeps each whole sequence's last max_length tokens, which no "
                "setting here reproduces: this run cuts a long pair's prompt to "
                "'data.max_prompt_length' keeping its end ('data.truncation' = 'keep_end'), "
                "then each completion's end"
                if keep_end
                else _TRL_NAMES["truncation_mode"],
            )
            if keep_end:
                out["data"]["truncation"] = "keep_end"
                out["data"]["max_prompt_length"] = max(1, max_length // 2)
                notes["data.truncation"] = "nearest to TRL's keep_end (see above)"
                notes["data.max_prompt_length"] = "half of max_length, sdpo's default"
        if 2 * max_length > 16384:
            out["train"]["max_tokens_per_batch"] = 2 * max_length
            notes["train.max_tokens_per_batch"] = "room for one pair of max_length sequences"

    drop(
        "max_prompt_length",
        "TRL 1.16 has none (its earlier releases cut the prompt to it first, as sdpo's "
        "'data.max_prompt_length' with 'data.truncation' does): set them to cut that way",
    )

    # optimisation
    for trl_key, key, kind in (
        ("learning_rate", "learning_rate", float),
        ("seed", "seed", int),
        ("max_grad_norm", "max_grad_norm", float),
        ("weight_decay", "weight_decay", float),
        ("adam_epsilon", "adam_eps", float),
    ):
        if trl_key in t:
            put("train", key, kind(t[trl_key]), trl_key)
    if "adam_beta1" in t or "adam_beta2" in t:
        betas = [float(t.get("adam_beta1", 0.9)), float(t.get("adam_beta2", 0.999))]
        put("train", "adam_betas", betas, "adam_beta1", "adam_beta2")
    epochs = _whole(t["num_train_epochs"])
    if epochs is None:
        drop("num_train_epochs", "sdpo trains whole epochs only ('train.epochs')")
    else:
        put("train", "epochs", epochs, "num_train_epochs")
    # transformers 5's activation_checkpointing, when set, wins over its older name
    checkpointing = given.get("activation_checkpointing")
    used.add("activation_checkpointing")
    if checkpointing is not None:
        out["model"]["gradient_checkpointing"] = checkpointing
        used.add("gradient_checkpointing")
        notes["model.gradient_checkpointing"] = "activation_checkpointing"
    else:
        out["model"]["gradient_checkpointing"] = bool(t["gradient_checkpointing"])
        used.add("gradient_checkpointing")
        if "gradient_checkpointing" not in given:
            notes["model.gradient_checkpointing"] = "TRL's default gradient_checkpointing"

    # warm-up and schedule (transformers 5: a warmup_steps below 1 is a ratio)
    warmup = t.get("warmup_steps", 0)
    if "warmup_ratio" in given:
        put("train", "warmup_ratio", float(t["warmup_ratio"]), "warmup_ratio")
    if "warmup_ratio" in given and warmup == 0:  # transformers 4: 0 steps leave the ratio
        used.add("warmup_steps")
    elif "warmup_steps" in given or "warmup_ratio" not in given:
        if 0 < warmup < 1:
            put("train", "warmup_ratio", float(warmup), "warmup_steps", note="a ratio below 1")
        elif float(warmup).is_integer() and warmup >= 0:
            put("train", "warmup_steps", int(warmup), "warmup_steps")
        else:
            drop("warmup_steps", "not a whole number of steps nor a ratio below 1")
    schedule = t.get("lr_scheduler_type", "linear")
    if schedule in ("linear", "cosine", "constant_with_warmup"):
        name = "constant" if schedule == "constant_with_warmup" else schedule
        put("train", "schedule", name, "lr_scheduler_type")
    elif schedule == "constant":  # transformers' constant has no warm-up
        put("train", "schedule", "constant", "lr_scheduler_type")
        out["train"].pop("warmup_ratio", None)
        out["train"]["warmup_steps"] = 0
        notes["train.warmup_steps"] = "transformers' constant schedule has no warm-up"
    else:
        drop("lr_scheduler_type", "sdpo's schedules are linear, cosine and constant")

    # batch: pairs per optimizer step
    bs, ga = t["per_device_train_batch_size"], t["gradient_accumulation_steps"]
    pairs = bs * ga * world_size
    if pairs >= 1:
        put(
            "train",
            "pairs_per_step",
            pairs,
            "per_device_train_batch_size",
            "gradient_accumulation_steps",
            note=f"{bs} x {ga} x world size {world_size}"
            + (" (assumed; give --world-size N)" if world_size == 1 else ""),
        )

    # precision: TRL's bf16 (default: not fp16) is autocast over weights in the model's dtype
    # (ModelConfig's dtype, float32 by default): fp32 weights = bf16-mixed, bf16 weights = bf16
    # (ModelConfig's dtype, float32 by default), which `trl dpo` lets model_init_kwargs override
    dtype_key = "dtype" if "dtype" in given else "torch_dtype"
    dtype = given.get(dtype_key, "float32")
    init = given.get("model_init_kwargs")
    if isinstance(init, dict):
        for key in ("torch_dtype", "dtype"):
            if init.get(key) is not None:
                dtype_key, dtype = f"model_init_kwargs.{key}", init[key]
        for key in ("dtype", "torch_dtype"):
            if dtype_key.startswith("model_init_kwargs") and key in given:
                dropped.append((key, given[key], f"{dtype_key} overrides it, as in `trl dpo`"))
        rest = {k: v for k, v in init.items() if k not in ("dtype", "torch_dtype")}
        if rest != init:  # what is read of it: its dtype, in train.precision below
            used.add("model_init_kwargs")
            if rest:
                dropped.append(
                    ("model_init_kwargs", rest, "no equivalent in sdpo (its dtype is read)")
                )
    used.update(("dtype", "torch_dtype", "fp16", "bf16"))
    if t.get("fp16"):
        drop("fp16", _TRL_NAMES["fp16"])
    elif dtype not in ("float32", "bfloat16"):
        why = (
            f"the weights' dtype follows 'train.precision' here: set it to 'bf16' (bf16 "
            f"weights) or 'bf16-mixed' (fp32 weights, bf16 autocast){' and see bf16' if dtype == 'auto' else ''}"
        )
        if dtype_key in given:
            drop(dtype_key, why)
        else:
            dropped.append((dtype_key, dtype, why))
        if "bf16" in given:
            dropped.append(("bf16", given["bf16"], f"goes with {dtype_key} above"))
    else:
        bf16 = t.get("bf16")
        bf16 = True if bf16 is None else bf16
        if dtype == "bfloat16":
            value = "bf16"
            note = f"{dtype_key} bfloat16: bf16 weights"
        else:
            value = "bf16-mixed" if bf16 else "fp32"
            note = "fp32 weights, bf16 autocast" if bf16 else "fp32 weights"
        if "bf16" not in given:
            note += "; TRL's default bf16"
        out["train"]["precision"] = value
        notes["train.precision"] = note

    # logging, saving, evaluation (transformers evaluates every logging_steps under
    # eval_strategy 'steps' when eval_steps is unset)
    if t.get("eval_strategy") == "steps" and not t.get("eval_steps"):
        t["eval_steps"] = t["logging_steps"]
    for trl_key, key in (
        ("logging_steps", "log_every"),
        ("save_steps", "save_every"),
        ("eval_steps", "eval_every"),
    ):
        value = t.get(trl_key)
        if value is None:
            used.add(trl_key)
            continue
        steps = _whole(value)
        if steps is None:
            drop(trl_key, "a share of the run's steps has no equivalent: give a whole number")
        elif trl_key == "eval_steps" and t.get("eval_strategy") != "steps":
            drop(
                trl_key,
                f"TRL evaluates every eval_steps only with eval_strategy 'steps' (here "
                f"{t.get('eval_strategy', 'no')!r}); held-out pairs are scored after each sDPO step",
            )
        elif trl_key == "eval_steps" and (
            out["data"].get("eval_sources") or out["data"].get("eval_fraction")
        ):
            put("train", key, steps, trl_key)
            if "eval_steps" not in given:  # transformers' fallback for eval_strategy 'steps'
                notes["train.eval_every"] = "logging_steps, as TRL's unset eval_steps"
        elif trl_key == "eval_steps":
            drop(
                trl_key,
                "sdpo's 'train.eval_every' needs held-out pairs ('data.eval_fraction' or "
                "'data.eval_sources'): set them with it",
            )
        else:
            put("train", key, steps, trl_key)
    strategy = t.get("save_strategy", "steps")
    if strategy == "no" and "save_every" in out["train"]:
        out["train"]["save_every"] = 0
        used.update(("save_strategy", "save_steps"))
        notes["train.save_every"] = (
            "save_strategy 'no': checkpoints only at the end of each sDPO step (for --resume)"
        )
    elif strategy == "steps":
        used.add("save_strategy")
    elif strategy == "epoch":
        # no fixed equivalent: an epoch's optimizer steps depend on the number of pairs read
        drop(
            "save_strategy",
            "sdpo saves by optimizer steps, not at the end of each epoch: 'train.save_every' "
            "(checkpoints also at the end of each sDPO step, here the end of training); one "
            "checkpoint per epoch is train.save_every = ceil(training pairs / "
            "train.pairs_per_step)",
        )
        if "save_every" in out["train"]:
            notes["train.save_every"] = (
                "save_steps, which TRL ignores under save_strategy 'epoch' (see above)"
            )
    steps = t.get("max_steps")
    if isinstance(steps, int) and not isinstance(steps, bool) and steps <= 0:
        used.add("max_steps")  # TRL's default -1: no cap, the epochs decide, as here
    limit = t.get("save_total_limit")
    if limit is not None and limit >= 1:
        put("train", "keep_checkpoints", int(limit), "save_total_limit")
    elif limit is None:
        used.add("save_total_limit")
    if t.get("run_name") is not None:
        put("log", "run_name", t["run_name"], "run_name")
    else:
        used.add("run_name")
    report = t.get("report_to", "none")
    names = [report] if isinstance(report, str) else list(report)
    if names in (["none"], []):
        put("log", "report_to", [], "report_to")
    elif names == ["all"]:  # transformers: every integration installed
        from sdpo.tracking import missing_tracker_packages

        missing = missing_tracker_packages(_TRACKERS)
        kept = [n for n in _TRACKERS if not any(m.startswith(n + " ") for m in missing)]
        put("log", "report_to", kept, "report_to", note="'all': the trackers installed here")
    else:
        kept = [n for n in names if n in _TRACKERS]
        put("log", "report_to", kept, "report_to")
        if len(kept) != len(names):
            dropped.append(("report_to", report, f"sdpo reports to {' and '.join(_TRACKERS)} only"))

    # the loss
    if "beta" in t:
        put("loss", "beta", float(t["beta"]), "beta")
    if "loss_type" in t:
        types = t["loss_type"]
        put(
            "loss",
            "loss_type",
            types[0] if isinstance(types, list) and len(types) == 1 else types,
            "loss_type",
        )
    if t.get("loss_weights") is not None:
        put("loss", "loss_weights", [float(w) for w in t["loss_weights"]], "loss_weights")
    else:  # null: each loss type weighs 1, as here
        used.add("loss_weights")
    types = t.get("loss_type", "sigmoid")
    types = [types] if isinstance(types, str) else types
    smoothed = set(types) & set(TRL_SMOOTHED_TYPES)
    if t.get("label_smoothing") and not smoothed:
        # TRL reads it for these types only and ignores it otherwise; sdpo refuses it there,
        # and reads it for sigmoid as cDPO, which TRL 1.16's sigmoid is not
        drop(
            "label_smoothing",
            f"TRL ignores it for loss_type {types}: it applies to "
            f"{', '.join(TRL_SMOOTHED_TYPES)} only",
        )
        t["label_smoothing"] = None
    smoothing_note = (
        "TRL 1.16's sigmoid ignores it (it smooths "
        f"{', '.join(sorted(smoothed))} alone); here it smooths the sigmoid term too, as cDPO"
        if t.get("label_smoothing") and "sigmoid" in types
        else ""
    )
    if t.get("discopop_tau", 0.05) != 0.05 and "discopop" not in types:
        drop("discopop_tau", f"TRL ignores it for loss_type {types}: it applies to discopop only")
        t["discopop_tau"] = None
    for key in ("label_smoothing", "rpo_alpha", "ld_alpha", "discopop_tau", "router_aux_loss_coef"):
        if t.get(key) is not None:
            note = smoothing_note if key == "label_smoothing" else ""
            put("loss", key, float(t[key]), key, note=note)
        elif key in t:  # null: TRL's default, and sdpo's
            used.add(key)
    for key in ("use_weighting", "reference_free", "f_divergence_type"):
        if key in t:
            put("loss", key, t[key], key)
    if "f_alpha_divergence_coef" in given:
        if t["f_alpha_divergence_coef"] == 0.5:
            put("loss", "f_alpha_divergence_coef", 0.5, "f_alpha_divergence_coef")
        else:
            drop(
                "f_alpha_divergence_coef",
                "TRL 1.16's code uses 1 - c where its description and sdpo use c; set "
                "'loss.f_alpha_divergence_coef' to the value you mean",
            )

    # LoRA: with use_peft, `trl dpo` trains a PEFT LoRA adapter from ModelConfig's lora_* options
    if given.get("use_peft"):
        lora = {**PEFT_DEFAULTS, **given}

        def put_lora(key: str, value: Any, trl_key: str, note: str = "") -> None:
            out["lora"][key] = value
            used.add(trl_key)
            if trl_key not in given:
                note = "; ".join(filter(None, [note, f"TRL's default {trl_key}"]))
            if note:
                notes[f"lora.{key}"] = note

        used.add("use_peft")
        if lora["lora_r"] < 1:  # rank 0 is no adapter here; PEFT refuses it
            raise ConfigError(
                f"{source}: key 'lora_r' must be >= 1 with use_peft, got {lora['lora_r']}"
            )
        put_lora("rank", lora["lora_r"], "lora_r", note="use_peft: a LoRA adapter")
        put_lora("alpha", float(lora["lora_alpha"]), "lora_alpha")
        put_lora("dropout", float(lora["lora_dropout"]), "lora_dropout")
        targets = lora.get("lora_target_modules")
        if targets is None:
            out["lora"]["targets"] = PEFT_DEFAULT_TARGETS
            used.add("lora_target_modules")
            notes["lora.targets"] = (
                "lora_target_modules null: PEFT's default for Llama, Mistral, Qwen and Gemma models"
            )
        else:
            put_lora("targets", targets, "lora_target_modules")
        if "use_rslora" in given:
            put_lora("use_rslora", given["use_rslora"], "use_rslora")
        if given.get("use_dora"):
            drop("use_dora", "DoRA is not offered: the adapter here is plain LoRA")
        for key in ("lora_modules_to_save", "lora_target_parameters"):
            if given.get(key) is not None:
                drop(key, "sdpo's adapter trains the projections in 'lora.targets' only")
            else:
                used.add(key)
        if given.get("lora_task_type", "CAUSAL_LM") == "CAUSAL_LM":
            used.add("lora_task_type")
        else:
            drop("lora_task_type", "sdpo trains causal language models (CAUSAL_LM)")
    else:
        for key in _LORA_KEYS:
            drop(key, "use_peft is not true: TRL trains no adapter (set 'lora.rank' for one)")
        used.add("use_peft")

    # sdpo's own keys: a TRL config is plain DPO
    out["sdpo"]["steps"] = 1
    out["sdpo"]["partition"] = "easy_to_hard"
    notes["sdpo.steps"] = "sdpo's own: 1 is plain DPO, as TRL; T > 1 trains T chunks in turn"
    notes["sdpo.partition"] = "sdpo's own: how the data is cut into sdpo.steps chunks"

    unset: list[str] = []  # null, empty: TRL's "not set" (a saved DPOConfig has many)
    for key, value in given.items():
        if key in used:
            continue
        if value is None or value == [] or value == {}:
            unset.append(key)
            continue
        why = _TRL_NAMES.get(key, "no equivalent in sdpo")
        dropped.append((key, value, why))
    text = _render(out, notes, dropped, source, unset)
    loaded = tomllib.loads(text)
    # `trl dpo` also takes the model and data on its command line: the file may lack them
    missing = [key for key in ("model_name_or_path", "dataset_name") if t.get(key) is None]
    if t.get("datasets") or out["data"].get("sources"):
        missing = [key for key in missing if key != "dataset_name"]
    if missing:  # the other values are checked first, around placeholders
        loaded["model"]["path"] = "model"
        loaded["data"]["sources"] = [{"path": "pairs.jsonl"}]
    try:  # what is written loads: a value sdpo refuses is named now, with the file
        config_from_dict(loaded)
    except ConfigError as e:
        raise ConfigError(f"{source}: the converted config is refused: {e}") from None
    if missing:
        raise ConfigError(
            f"{source}: no {' and no '.join(repr(k) for k in missing)}: add "
            + " and ".join(f"{k}: NAME" for k in missing)
            + " (a local path or a hub id) to the file; options given to `trl dpo` on its "
            "command line are not read here"
        )
    return text


def _mixture_sources(
    source: str, mixture: Any, local: Any, dropped: list[tuple[str, Any, str]]
) -> list[dict[str, Any]]:
    """The data sources of TRL's ``datasets`` list (``DatasetConfig`` entries: path, name,
    split, ...), one per entry, the options without an equivalent added to ``dropped``."""
    if not isinstance(mixture, list):
        raise ConfigError(
            f"{source}: key 'datasets' must be a list of mappings with a 'path', got "
            f"{type(mixture).__name__}"
        )
    sources = []
    for i, entry in enumerate(mixture):
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            raise ConfigError(
                f"{source}: datasets[{i}] must be a mapping with a 'path' (a file, a folder or a "
                f"hub data set), got {entry!r}"
            )
        src = {"path": local(entry["path"]), "split": entry.get("split") or "train"}
        if entry.get("name") is not None:  # datasets' config name: the data set's subset
            src["subset"] = entry["name"]
        for key, value in entry.items():
            if key in ("path", "split", "name") or value is None:
                continue
            why = {
                "fraction": "every pair of each source is read (no sampling of a mixture)",
                "columns": "the columns read are prompt, chosen and rejected (a source's "
                "'columns' maps other names to them)",
            }.get(key, "no equivalent in sdpo: give the files as a source's 'path'")
            dropped.append((f"datasets[{i}].{key}", value, why))
        sources.append(src)
    return sources


def _render(
    out: dict[str, dict[str, Any]],
    notes: dict[str, str],
    dropped: list[tuple[str, Any, str]],
    source: str,
    unset: list[str] = (),
) -> str:
    lines = [f"# sdpo config converted from the TRL DPO config {source}"]
    if dropped:
        lines.append("# TRL options left out (no equivalent here, or a different meaning):")
        for key, value, why in dropped:
            shown = json.dumps(value, default=str)
            lines.append(f"#   {key} = {shown}: {why}")
    if unset:
        text = "TRL options left out as unset (null or empty): " + ", ".join(unset)
        lines.extend(textwrap.wrap(text, 98, initial_indent="# ", subsequent_indent="#   "))

    def line(section: str, key: str, value: Any) -> str:
        text = f"{_toml_key(key)} = {_toml_value(value)}"
        note = notes.get(f"{section}.{key}")
        return f"{text}  # {note}" if note else text

    for key, value in out[""].items():
        lines.append(line("", key, value))
    for section, values in out.items():
        if not section:
            continue
        scalars = {k: v for k, v in values.items() if k != "sources"}
        if scalars:
            lines.extend(["", f"[{section}]"])
            lines.extend(line(section, k, v) for k, v in scalars.items())
        for src in values.get("sources", []):
            lines.extend(["", "[[data.sources]]"])
            lines.extend(line("data.sources", k, v) for k, v in src.items())
    return "\n".join(lines) + "\n"
