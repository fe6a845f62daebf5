"""README.md against the code: what a newcomer copies from it must work as written.

- Every TOML block loads with ``sdpo``'s config loader (``sdpo config --config`` prints it), with
  its values; every assignment written in a block's comments (``# warmup_steps = 20``) names a key
  of its section and loads; a list of options in a comment (``auto | sdpo | transformers``) is
  exactly the key's accepted values; a value marked ``(default)`` is the key's default.
- Every ``section.key`` named in the text is a config key, and a ``section.key = value`` or
  ``--set section.key=value`` loads; every ``sdpo.`` dotted name is importable.
- Every command-line flag belongs to the command it is written with (``sdpo score --out``), and
  every command and flag of ``sdpo`` is named somewhere, as is every config key; a flag's
  stated default is its parser's; the ``make`` targets exist and are what the Quick start says;
  the extras named (``sdpo[tracking]``) are pyproject.toml's.
- Every Python block runs as written: a block that takes inputs from the text around it
  (``hf_model``, ``pairs``, ...) gets them from a builder here, chosen by the API it shows.
- Facts stated in lists: the names in ``metrics.jsonl`` (of a tiny run), the resumable config
  keys, the fault-injection points, the exit codes, the checkpoint folder name, the output
  files and folders (a tiny run's, else the code's constants), the files the text names (and
  every benchmark script); the sections a "see ..." points to; and the module docstrings that
  list names.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import math
import re
import typing
from pathlib import Path

import pytest
import torch

from sdpo.cli import build_parser
from sdpo.cli import main as cli_main
from sdpo.config import ConfigError, RunConfig, config_from_dict, load_config, tomllib
from sdpo.losses import LOSS_TYPES

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")

# what a block without output_dir (a section on its own) is loaded with
MINIMAL = """output_dir = "runs/a"
[model]
path = "models/sft"
[data]
path = "data/prefs.jsonl"
"""
SECTIONS = typing.get_type_hints(RunConfig)
CONFIG_SECTIONS = {name for name, tp in SECTIONS.items() if dataclasses.is_dataclass(tp)}
# attributes of the packed model protocol (Embedding), written like config keys
NOT_CONFIG_KEYS = {"model.lm_head_weight", "model.logit_softcap"}
# a value the text gives in a setting it names ("with compiled layers, ..."), loaded in it
CONTEXT = {"model.activation_memory_budget": ["model.compile=true"]}


def _fenced(lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", README, re.S | re.M)


def _spans() -> list[str]:
    """The text's inline code spans, fenced blocks left out."""
    prose = re.sub(r"^```.*?^```", "", README, flags=re.S | re.M)
    return re.findall(r"`([^`\n]+)`", prose)


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # a name inside a module, not a package
        return False


def _fields(section: str) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(SECTIONS[section])}


def _default(section: str, key: str) -> object:
    f = _fields(section)[key]
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def _is_literal(text: str) -> bool:
    try:
        tomllib.loads(f"v = {text}")
    except tomllib.TOMLDecodeError:
        return False
    return True


def _literal(text: str) -> object:
    """A TOML literal's value, else the text itself (a bare option name)."""
    return tomllib.loads(f"v = {text}")["v"] if _is_literal(text) else text


def _assignments(text: str) -> list[tuple[str, str, int]]:
    """``key = value`` in comment text: (key, value text, end of the value), the value being the
    longest prefix that is a TOML literal."""
    found = []
    for m in re.finditer(r"(?<![\w.])([a-z_]+) = ", text):
        rest = _split_comment(text[m.end() :])[0]  # a '#' starts the next comment
        cuts = [i for i in range(1, len(rest) + 1) if i == len(rest) or rest[i] in " ,;:)"]
        for cut in reversed(cuts):
            if _is_literal(rest[:cut]):
                found.append((m.group(1), rest[:cut], m.end() + cut))
                break
        else:
            raise AssertionError(f"README: no TOML value after {m.group(0)!r} in {text!r}")
    return found


def _split_comment(line: str) -> tuple[str, str | None]:
    """(code, comment text after its '#') of a TOML line."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch == "#":
            return line[:i], line[i + 1 :]
    return line, None


@dataclasses.dataclass
class _Comment:
    """One comment of a TOML block with its continuation lines (indented ``#   ...``), and the
    key it is about (the line's own key, or a ``# key: ...`` / ``# key = ...`` opening)."""

    section: str
    key: str | None
    lines: list[str]


def _comments(block: str) -> list[_Comment]:
    section, out = "", []
    for line in block.splitlines():
        head = re.match(r"\s*\[\[?([\w.]+)\]\]?\s*(#|$)", line)
        if head:
            section = head.group(1)
        code, comment = _split_comment(line)
        if comment is None:
            continue
        own = re.match(r"\s*([a-z_]+)\s*=", code)
        opening = re.match(r" ?([a-z_]+)(?::| =)", comment)
        if own:
            out.append(_Comment(section, own.group(1), [comment]))
        elif re.match(r" {2,}", comment) and out and out[-1].section == section:
            out[-1].lines.append(comment)  # a continuation
        elif opening and section in CONFIG_SECTIONS and opening.group(1) in _fields(section):
            out.append(_Comment(section, opening.group(1), [comment]))
        else:
            out.append(_Comment(section, None, [comment]))
    return out


def _accepted_options(section: str, key: str) -> set[str]:
    """The values ``section.key`` accepts, read from the loader's error for a bad one."""
    with pytest.raises(ConfigError) as err:
        _load_minimal([f'{section}.{key}="no-such-option"'])
    message = str(err.value)
    assert "one of " in message, f"{section}.{key} takes no fixed list of options: {message}"
    listed = re.split(r", got | \((?:in|from) ", message.split("one of ", 1)[1])[0]
    return {v.strip(" '\"") for v in listed.split(", ")}


def _load_minimal(overrides: list[str]) -> RunConfig:
    """The minimal config with ``--set`` overrides (as ``sdpo train --set`` reads them)."""
    return config_from_dict(tomllib.loads(MINIMAL), base_dir=ROOT, overrides=overrides)


def _toml_blocks() -> list[str]:
    blocks = _fenced("toml")
    assert len(blocks) >= 5, "README: the TOML blocks were not found"
    return blocks


def _block_text(block: str) -> str:
    return block if "output_dir" in block else MINIMAL + block


def test_every_toml_block_loads_with_its_values(tmp_path, capsys):
    """Each block as written (a section on its own with the required keys added) loads, holds
    its values, and ``sdpo config --config`` prints it."""
    for i, block in enumerate(_toml_blocks()):
        path = tmp_path / f"block{i}.toml"
        path.write_text(_block_text(block), encoding="utf-8")
        cfg = load_config(path)
        for section, values in tomllib.loads(block).items():
            if not isinstance(values, dict) or section == "data":  # data paths are resolved
                continue
            for key, value in values.items():
                assert getattr(getattr(cfg, section), key) == value, (i, section, key)
        assert cli_main(["config", "--config", str(path)]) == 0, capsys.readouterr().err


def test_every_assignment_in_a_toml_comment_is_a_key_that_loads(tmp_path):
    """``# warmup_steps = 20``, ``# path = ... ; revision = "main"``: the assignments of one
    comment line, set together, load on top of their block, or, where they replace one of its
    keys (``or tokens_per_step = ...``), on their own; and the loaded value is the one written."""
    seen = 0
    for i, block in enumerate(_toml_blocks()):
        path = tmp_path / f"block{i}.toml"
        path.write_text(_block_text(block), encoding="utf-8")
        for comment in _comments(block):
            for line in comment.lines:
                found = _assignments(line)
                if not found:
                    continue
                section = comment.section
                assert section in CONFIG_SECTIONS, f"README block {i}: {line!r} outside a section"
                for key, _, _ in found:
                    assert key in _fields(section), (
                        f"README block {i}: '{section}.{key}' in the comment {line.strip()!r} is "
                        f"not a key of [{section}] (keys: {', '.join(_fields(section))})"
                    )
                overrides = [f"{section}.{key}={value}" for key, value, _ in found]
                errors = []
                for base in (path, None):  # the block, else the minimal config alone
                    try:
                        cfg = load_config(base, overrides) if base else _load_minimal(overrides)
                        break
                    except ConfigError as e:
                        errors.append(str(e))
                else:
                    raise AssertionError(
                        f"README block {i}: {line.strip()!r} does not load: {errors}"
                    )
                for key, value, _ in found:
                    if _fields(section)[key].metadata.get("path"):
                        continue  # resolved against the config's folder
                    assert getattr(getattr(cfg, section), key) == _literal(value), (line, key)
                seen += 1
    assert seen >= 10


def test_every_option_list_in_a_toml_comment_is_the_keys_accepted_values():
    """``implementation = "auto"  # auto | sdpo | transformers``: the options written are
    exactly those the loader accepts, so a new option (or a removed one) shows here."""
    checked = []
    for block in _toml_blocks():
        for comment in _comments(block):
            if comment.key is None or comment.section not in CONFIG_SECTIONS:
                continue
            text = " ".join(comment.lines)
            while re.search(r"\([^()]*\)", text):
                text = re.sub(r"\([^()]*\)", "", text)
            listed = re.search(r"(?<![\w.\-])([\w.\-]+(?:\s*\|\s*[\w.\-]+)+)", text)
            if listed is None:
                continue
            options = {o.strip() for o in listed.group(1).split("|")}
            accepted = _accepted_options(comment.section, comment.key)
            assert options == accepted, (
                f"README: the options of {comment.section}.{comment.key} are written as "
                f"{sorted(options)}, the loader accepts {sorted(accepted)}"
            )
            checked.append(f"{comment.section}.{comment.key}")
    assert {"model.implementation", "loss.loss_type", "sdpo.partition"} <= set(checked)


def test_every_default_marked_in_a_toml_comment_is_the_real_default():
    """``rank = 16  # 0 (default)``, ``# epochs = 1 (default)``, ``warn (default) | drop``."""
    checked = 0
    for block in _toml_blocks():
        for comment in _comments(block):
            for line in comment.lines:
                found = _assignments(line)
                marks = [
                    (m.start(), m.group(1) or m.group(2))
                    for m in re.finditer(
                        r"(?<![\w.\-\"'\]])(\S+) \((?:the )?default\)|\(default: ([^)]+)\)", line
                    )
                ]
                for start, text in marks:
                    # the value of an assignment ending there, else the comment's own key
                    own = [(k, v) for k, v, end in found if end == start + len(text)]
                    key, value_text = own[0] if own else (comment.key, text.rstrip(":;,"))
                    assert key is not None, f"README: {line!r} marks a default of no key"
                    value = _literal(value_text)
                    assert _default(comment.section, key) == value, (
                        f"README: {comment.section}.{key} is written with the default "
                        f"{value!r}; the real default is {_default(comment.section, key)!r}"
                    )
                    checked += 1
    assert checked >= 5


def test_every_default_the_text_states_is_the_real_default():
    """In the text: ``train.keep_checkpoints`` (default 2), ``train.async_save = true``, off
    by default, ``sdpo.report_scoring`` ... (where it is on by default)."""
    text = " ".join(README.split())
    claims = [
        (s, k, _literal(v))
        for s, k, v in re.findall(r"`([a-z_]+)\.([a-z_]+)` \(default ([\w.\-]+)", text)
        if _is_literal(v)
    ]
    claims += [
        (s, k, False)
        for s, k in re.findall(r"`([a-z_]+)\.([a-z_]+) = true`[^()]{0,40}?off by default", text)
    ]
    claims += [
        (s, k, True)
        for s, k in re.findall(
            r"`([a-z_]+)\.([a-z_]+)`[^.()]{0,40}\((?:where it is )?on by default", text
        )
    ]
    assert len(claims) >= 4
    for section, key, value in claims:
        assert _default(section, key) == value, (
            f"README: {section}.{key} defaults to {value!r}; it is {_default(section, key)!r}"
        )


def _key_spans() -> list[tuple[str, str, str | None]]:
    """(section, key, value text or None) of every ``section.key`` and ``section.key = value``
    code span of the text, and of every ``--set section.key=value``."""
    out = []
    for span in _spans():
        m = re.fullmatch(r"([a-z_]+)\.([a-z_*]+)(?: = (.+))?", span)
        if m and m.group(1) in CONFIG_SECTIONS and span.split(" ")[0] not in NOT_CONFIG_KEYS:
            section, key, _ = m.groups()
            if section == "sdpo" and key not in _fields(section) and _is_module(f"sdpo.{key}"):
                continue  # a module, such as sdpo.kernels
            out.append(m.groups())
    for m in re.finditer(r"--set ([a-z_]+)\.([a-z_]+)=([^\s`\]]+)", README):
        out.append(m.groups())
    return out


def test_every_config_key_the_text_names_exists_and_its_values_load():
    spans = _key_spans()
    assert len(spans) > 80
    for section, key, value in spans:
        if key == "*":
            continue
        assert key in _fields(section), (
            f"README names '{section}.{key}', which is not a config key "
            f"(keys of [{section}]: {', '.join(_fields(section))})"
        )
        if value is not None and _is_literal(value):  # not a placeholder such as N
            _load_minimal([*CONTEXT.get(f"{section}.{key}", []), f"{section}.{key}={value}"])


def test_every_config_key_is_named_in_the_readme():
    """A user finds every key in the README (``sdpo config`` prints them all with defaults)."""
    named = {(s, k) for s, k, _ in _key_spans()}
    for block in _toml_blocks():  # a key, or its name in a comment, under its section
        section = ""
        for line in block.splitlines():
            head = re.match(r"\s*\[\[?([\w.]+)\]\]?", line)
            section = head.group(1) if head else section
            named |= {(section, word) for word in re.findall(r"(?<![\w.])[a-z_]+", line)}
    stars = {s for s, k in named if k == "*"}
    missing = [
        f"{section}.{key}"
        for section in sorted(CONFIG_SECTIONS)
        for key in _fields(section)
        if section not in stars and (section, key) not in named
    ]
    assert not missing, f"config keys the README never names: {missing}"


def _reference_block() -> str:
    """The Training section's reference config (the first TOML block after its heading)."""
    training = README.split("\n## Training\n", 1)[1]
    return re.search(r"^```toml\n(.*?)^```", training, re.S | re.M).group(1)


def test_every_config_key_is_in_the_reference_block_or_the_paragraph_after_it():
    """A newcomer reads the Training section's block as the config's reference: each key is
    in it, or the paragraph after it names the key (or its ``[section]``) and where it is
    described; a key named there is one the block leaves out."""
    block = _reference_block()
    in_block, section = set(), ""
    for line in block.splitlines():
        head = re.match(r"\s*\[\[?([\w.]+)\]\]?", line)
        section = head.group(1) if head else section
        in_block |= {(section, word) for word in re.findall(r"(?<![\w.])[a-z_]+", line)}
    opening = "The block leaves out keys"
    assert f"{block}```\n\n{opening}" in README, "the paragraph does not follow the block"
    after = " ".join(_between(f"```\n\n{opening}", "\n\n").split())
    listed = after  # what it lists, without its asides ("unset: 4 x `train.max_...`")
    while re.search(r"\([^()]*\)", listed):
        listed = re.sub(r"\([^()]*\)", "", listed)
    left_out = {tuple(k.split(".")) for k in re.findall(r"`([a-z_]+\.[a-z_]+)`", listed)}
    whole = set(re.findall(r"`\[([a-z_]+)\]`", listed))
    assert left_out and whole
    assert not left_out & in_block, f"named as left out, yet in the block: {left_out & in_block}"
    missing = [
        f"{s}.{k}"
        for s in sorted(CONFIG_SECTIONS)
        for k in _fields(s)
        if s not in whole and (s, k) not in in_block | left_out
    ]
    assert not missing, f"config keys neither in the reference block nor after it: {missing}"


def test_every_for_every_loss_type_in_a_toml_comment_holds():
    """``# ld_alpha = 0.5: LD-DPO ..., for every loss type``: the setting loads with each loss
    type, and a type named after ``but`` is refused with it."""
    checked = []
    for comment in _comments(_reference_block()):
        text = " ".join(comment.lines)
        m = re.match(r" ?([a-z_]+) = (\S+):.*?for every loss type(?: but (\w+))?", text)
        if comment.section != "loss" or m is None:
            continue
        key, value, but = m.groups()
        for kind in LOSS_TYPES:
            needs = ["loss.label_smoothing=0.1"] if kind == "exo_pair" else []  # EXO's epsilon
            overrides = [f'loss.loss_type="{kind}"', *needs, f"loss.{key}={value}"]
            if kind == but:
                with pytest.raises(ConfigError):
                    _load_minimal(overrides)
            else:
                _load_minimal(overrides)
        checked.append(key)
    assert {"ld_alpha", "use_weighting"} <= set(checked)


def test_every_sdpo_dotted_name_in_the_text_is_importable():
    names = set()
    for span in _spans():
        m = re.fullmatch(r"(sdpo(?:\.[A-Za-z_]\w*)+)(?:\(.*\))?", span)
        if m and not (m.group(1).count(".") == 1 and m.group(1)[5:] in _fields("sdpo")):
            names.add(m.group(1))
    names |= set(re.findall(r"\b(sdpo\.[a-z_]+(?:\.[A-Za-z_]\w*)+)", "\n".join(_fenced("python"))))
    assert len(names) >= 8
    for name in sorted(names):
        parts = name.split(".")
        for cut in range(len(parts), 0, -1):
            if _is_module(".".join(parts[:cut])):
                break
        obj = importlib.import_module(".".join(parts[:cut]))
        for attr in parts[cut:]:
            assert hasattr(obj, attr), f"README names {name}, which does not exist"
            obj = getattr(obj, attr)


# ---------------------------------------------------------------------------------------------
# the command line

TORCHRUN_FLAGS = {"--nproc_per_node", "--nproc-per-node"}


def _options(parser) -> dict[str, set[str]]:
    """Each command's flags; a command with actions of its own by each (``cache list``)."""
    (sub,) = [a for a in parser._actions if a.choices and isinstance(a.choices, dict)]
    found = {}
    for name, p in sub.choices.items():
        if any(a.choices and isinstance(a.choices, dict) for a in p._actions):
            found.update({f"{name} {action}": v for action, v in _options(p).items()})
        else:
            found[name] = {s for a in p._actions for s in a.option_strings}
    return found


def _bench_options() -> dict[str, set[str]]:
    from tests.test_speed_paths import load_throughput

    found = {
        f"throughput.py {name}": opts
        for name, opts in _options(load_throughput().build_parser()).items()
    }
    for script in ("kernel_resources.py", "tokenizer_fuzz.py"):
        source = (ROOT / "benchmarks" / script).read_text(encoding="utf-8")
        found[script] = set(re.findall(r"add_argument\(\s*(?:\"-\w\", )?\"(--[\w-]+)\"", source))
    return found


def _commands() -> list[str]:
    """Each command line of the bash blocks and each inline code span."""
    lines = [ln for block in _fenced("bash") for ln in block.replace("\\\n", " ").splitlines()]
    return lines + _spans()


def test_every_flag_belongs_to_the_command_it_is_written_with():
    sdpo = {f"sdpo {k}": v for k, v in _options(build_parser()).items()}
    commands = [k.removeprefix("sdpo ") for k in sdpo]
    known = {**sdpo, **_bench_options()}
    top = {s for a in build_parser()._actions for s in a.option_strings}  # sdpo --version
    every = set().union(*known.values()) | TORCHRUN_FLAGS | top
    checked = 0
    for text in _commands():
        text = text.split(" # ")[0]
        m = re.search(
            rf"(?:(?<![\w./-])sdpo|-m sdpo(?:\.cli)?) ({'|'.join(sorted(commands))})\b"
            r"|(throughput\.py) (kernels|step|prep)\b|(kernel_resources\.py|tokenizer_fuzz\.py)",
            text,
        )
        flags = re.findall(r"(?<![\w-])(--[a-z][\w-]*)", text[m.end() if m else 0 :])
        if m is None:
            for flag in flags:
                assert flag in every, f"README: {flag} ({text!r}) is no flag of sdpo or a script"
            continue
        command = (
            f"sdpo {m.group(1)}"
            if m.group(1)
            else f"throughput.py {m.group(3)}"
            if m.group(2)
            else m.group(4)
        )
        for flag in flags:
            assert flag in known[command], f"README: {command} has no flag {flag} ({text!r})"
            checked += 1
    assert checked >= 25


def test_every_command_and_flag_of_sdpo_is_named_in_the_readme():
    for command, flags in _options(build_parser()).items():
        assert f"sdpo {command}" in README, f"sdpo {command} is not in the README"
        for flag in sorted(flags - {"-h", "--help"}):
            assert re.search(rf"(?<![\w-]){flag}(?![\w-])", README), (
                f"sdpo {command} {flag} is not in the README"
            )


def _parser_defaults() -> dict[str, dict[str, object]]:
    """Each sdpo command's flags with their argparse defaults."""
    (sub,) = [a for a in build_parser()._actions if a.choices and isinstance(a.choices, dict)]
    return {
        name: {s: a.default for a in p._actions for s in a.option_strings}
        for name, p in sub.choices.items()
    }


def test_every_flag_default_the_text_states_is_the_parsers():
    """``--seed N`` (default 0), ``--max-length`` defaults to 1024, ``--max-tokens-per-batch``
    ... default 65,536: the value argparse gives; and the relations the text states beside them
    (score's lengths and batch budget are ``sdpo train``'s defaults, the demo writes to
    ``runs/demo/``)."""
    from sdpo.config import DataSection
    from sdpo.engine.trainer import TrainConfig

    defaults = _parser_defaults()
    by_flag: dict[str, set[str]] = {}
    for flags in defaults.values():
        for flag, value in flags.items():
            by_flag.setdefault(flag, set()).add(str(value))
    text = " ".join(README.split())
    claims = re.findall(
        r"`(--[\w-]+)(?: [A-Z]+)?`[^`;]{0,90}?\bdefaults?(?: to)? `?(\d{1,3}(?:,\d{3})+|\d+|[a-z]\w*)`?",
        text,
    )
    checked = 0
    for flag, value in claims:
        if flag not in by_flag:  # a benchmark script's flag ("default 4 per GPU")
            continue
        assert by_flag[flag] == {value.replace(",", "")}, (
            f"README: {flag} defaults to {value}; sdpo's parser gives {sorted(by_flag[flag])}"
        )
        checked += 1
    assert checked >= 4
    score = defaults["score"]
    assert score["--max-length"] == _default("data", "max_length") == DataSection().max_length
    assert score["--max-tokens-per-batch"] == 4 * TrainConfig().max_tokens_per_batch
    assert "Outputs land in `runs/demo/` (`sdpo demo --output-dir DIR`)" in text
    assert str(defaults["demo"]["--output-dir"]) == "runs/demo"


def test_the_quick_start_commands_are_the_makefiles():
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    targets = set(re.findall(r"^([\w-]+):", makefile, re.M))
    named = set(re.findall(r"(?<![\w-])make ([a-z][\w-]*)", README))
    for target in named:
        assert target in targets, f"README: `make {target}`, which the Makefile lacks"
    phony = set(re.search(r"^\.PHONY: (.*)$", makefile, re.M).group(1).split())
    assert phony <= named, f"Makefile targets the README never names: {sorted(phony - named)}"
    recipe = {
        t: re.search(rf"^{t}:.*\n((?:\t.*\n)+)", makefile, re.M).group(1) for t in ("demo", "test")
    }
    assert "sdpo demo $(DEMO_ARGS)" in recipe["demo"] and "pytest" in recipe["test"]
    quick = _fenced("bash")[0]
    assert "make demo" in quick and "make test" in quick


# ---------------------------------------------------------------------------------------------
# the Python blocks, run as written


def _embedding_inputs(tmp_path: Path) -> dict:
    """``hf_model``, a padded batch of two pairs (``ids``, ``mask``, ``labels``) and the
    reference values ``ref_c``/``ref_r``: the model's own, so the DPO loss is log 2."""
    transformers = pytest.importorskip("transformers")
    from sdpo.kernels import sequence_logprobs

    torch.manual_seed(0)
    hf_model = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=131,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    gen = torch.Generator().manual_seed(1)
    lengths, prompts = [9, 6, 11, 4], [3, 3, 5, 5]
    ids = torch.randint(1, 131, (4, 11), generator=gen)
    mask = torch.zeros(4, 11, dtype=torch.long)
    labels = torch.full((4, 11), -100)
    for b, (n, p) in enumerate(zip(lengths, prompts, strict=True)):
        mask[b, :n] = 1
        labels[b, p - 1 : n - 1] = ids[b, p:n]
    with torch.no_grad():
        hidden = hf_model.model(input_ids=ids, attention_mask=mask).last_hidden_state
        ref = sequence_logprobs(
            hidden.reshape(-1, 32),
            hf_model.lm_head.weight,
            labels.reshape(-1),
            torch.arange(4).repeat_interleave(11),
            4,
        )
    return {
        "hf_model": hf_model,
        "ids": ids,
        "mask": mask,
        "labels": labels,
        "ref_c": ref[0::2],
        "ref_r": ref[1::2],
    }


def _check_embedding(ns: dict) -> None:
    assert float(ns["loss"].detach()) == pytest.approx(math.log(2), abs=1e-5)
    torch.testing.assert_close(ns["logps"][0::2], ns["ref_c"], atol=1e-5, rtol=0)
    assert ns["hf_model"].lm_head.weight.grad.abs().sum() > 0


def _stepwise_inputs(tmp_path: Path) -> dict:
    """``hf_model`` (a tiny Llama folder loaded by transformers) and ``pairs`` of two sources."""
    transformers = pytest.importorskip("transformers")
    from sdpo.engine.data import read_preference_file
    from sdpo.engine.tiny import write_tiny_model
    from sdpo.engine.tokenize import PairTokenizer, tokenize_pairs
    from tests.conftest import WORDS, write_pairs

    model_dir = write_tiny_model(tmp_path / "model", words=WORDS, hidden_size=32, seed=1)
    rows = []
    for name, kind, seed in (("far", "far", 1), ("near", "near", 2)):
        path = write_pairs(tmp_path / f"{name}.jsonl", n=6, seed=seed, kind=kind)
        rows += read_preference_file(path, source=name)
    pairs, _ = tokenize_pairs(
        rows, PairTokenizer.from_dir(model_dir), max_length=32, max_prompt_length=16
    )
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    return {"hf_model": hf_model, "pairs": pairs}


def _check_stepwise(ns: dict) -> None:
    assert [r.step for r in ns["reports"]] == [1, 2]
    assert sorted(r.sources[0] for r in ns["reports"]) == ["far", "near"]
    for t in (1, 2):
        assert (Path(f"step-{t}") / "config.json").is_file()


def _vocab_parallel_inputs(tmp_path: Path) -> dict:
    """A one-rank gloo group as ``tp_group`` (its shard is the whole weight), a packed stream of
    2 pairs (4 sequences) and their reference values in a cache file (pair-index order, not the
    batch's); the check compares with the step in one process and ends the group."""
    import torch.distributed as dist

    from sdpo.cache import CacheKey, RefLogprobCache, RefValues
    from sdpo.kernels import sequence_logprobs

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    gen = torch.Generator().manual_seed(3)
    seq_ids = torch.tensor([0] * 5 + [1] * 7 + [2] * 4 + [3] * 6)
    labels = torch.randint(0, 101, (22,), generator=gen)
    labels[[0, 4, 5, 11, 15, 16]] = -100
    hidden = torch.randn(22, 24, generator=gen)
    w_shard = torch.randn(101, 24, generator=gen)
    w_ref = w_shard + 0.1 * torch.randn(101, 24, generator=gen)
    ref = sequence_logprobs(hidden, w_ref, labels, seq_ids, 4)  # (4,)
    tokens = torch.zeros(4, dtype=torch.int64).index_add(0, seq_ids, (labels != -100).long())
    key = CacheKey(
        model_fingerprint="reference",
        data_fingerprint="two pairs",
        tokenizer_fingerprint="ids",
        max_length=16,
        max_prompt_length=None,
        truncation="keep_end",
        dtype_policy="fp32",
        kernels_impl="torch",
    )
    tmp_path.mkdir(parents=True, exist_ok=True)
    cache_path = tmp_path / "ref_logps.safetensors"
    reverse = [1, 0]  # the batch holds pairs 5, 2; the cache 2, 5
    values = RefValues(
        pair_indices=torch.tensor([5, 2])[reverse],
        chosen_logps=ref[0::2][reverse],
        rejected_logps=ref[1::2][reverse],
        chosen_tokens=tokens[0::2][reverse],
        rejected_tokens=tokens[1::2][reverse],
    )
    RefLogprobCache(cache_path).save(values, key)
    return {
        "tp_group": dist.group.WORLD,
        "w_shard": w_shard.requires_grad_(True),
        "hidden": hidden.requires_grad_(True),
        "labels": labels,
        "seq_ids": seq_ids,
        "num_seqs": 4,
        "cache_path": cache_path,
        "key": key,
        "pair_indices": [5, 2],
        "ref_whole": ref,
    }


def _check_vocab_parallel(ns: dict) -> None:
    import torch.distributed as dist

    from sdpo.kernels import sequence_logprobs
    from sdpo.losses import LossConfig, dpo_loss

    dist.destroy_process_group()
    hidden = ns["hidden"].detach().requires_grad_(True)
    weight = ns["w_shard"].detach().requires_grad_(True)
    whole = sequence_logprobs(hidden, weight, ns["labels"], ns["seq_ids"], ns["num_seqs"])
    ref = ns["ref_whole"]
    step = dpo_loss(whole[0::2], whole[1::2], ref[0::2], ref[1::2], config=LossConfig(beta=0.1))
    step.losses.mean().backward()
    torch.testing.assert_close(ns["logps"], whole, atol=1e-5, rtol=0)
    torch.testing.assert_close(ns["out"].losses, step.losses, atol=1e-6, rtol=0)
    torch.testing.assert_close(ns["out"].chosen_rewards, step.chosen_rewards, atol=1e-6, rtol=0)
    torch.testing.assert_close(ns["hidden"].grad, hidden.grad, atol=1e-6, rtol=0)
    torch.testing.assert_close(ns["w_shard"].grad, weight.grad, atol=1e-6, rtol=0)


# a block that takes inputs from the text around it, by the call it shows: (inputs, check)
PYTHON_INPUTS = {
    "linear_pair_loss(": (_embedding_inputs, _check_embedding),
    "vocab_parallel_sequence_logprobs(": (_vocab_parallel_inputs, _check_vocab_parallel),
    "run_sdpo(": (_stepwise_inputs, _check_stepwise),
}


def test_every_python_block_runs_as_written(tmp_path, monkeypatch, one_thread):
    blocks = _fenced("python")
    assert len(blocks) >= 2
    monkeypatch.chdir(tmp_path)  # a block may write files
    for i, block in enumerate(blocks):
        uses = [call for call in PYTHON_INPUTS if call in block]
        assert len(uses) <= 1, f"README Python block {i}: inputs for {uses}?"
        make, check = PYTHON_INPUTS[uses[0]] if uses else (lambda _: {}, lambda _: None)
        ns = make(tmp_path / f"block{i}")
        exec(compile(block, f"README.md python block {i}", "exec"), ns)
        check(ns)


# ---------------------------------------------------------------------------------------------
# facts in lists


def _between(start: str, end: str) -> str:
    assert start in README, f"README: {start!r} not found"
    tail = README.split(start, 1)[1]
    assert end in tail, f"README: {end!r} not found after {start!r}"
    return tail.split(end, 1)[0]


def _expand(keys: list[str]) -> set[str]:
    out = set()
    for key in keys:
        section, _, leaf = key.partition(".")
        out |= {f"{section}.{k}" for k in _fields(section)} if leaf == "*" else {key}
    return out


def test_the_keys_a_resume_may_change_are_the_runners():
    from sdpo.runner import RESUME_ROUNDING_KEYS, RESUME_SAFE_KEYS

    free = _between("`--resume` refuses a config that differs", "may change.")
    assert _expand(re.findall(r"`([\w.*]+)`", free)) == set(RESUME_SAFE_KEYS)
    rounding = _between("Compute settings may change too", "A key that a run's saved config")
    named = {k for k in re.findall(r"`([\w.]+)`", rounding) if "." in k}
    # "... when train.pairs_per_step or ... fixes", "model.compile with lora.dropout > 0"
    conditions = {"train.pairs_per_step", "lora.dropout"}
    assert named - conditions == {
        *RESUME_ROUNDING_KEYS,
        "train.max_tokens_per_batch",
        "sdpo.report_scoring",
    }


def test_the_fault_points_are_the_codes():
    listed = _between("the `count`-th time it reaches a named point (", ")")
    code = set()
    for path in [*ROOT.glob("sdpo/*.py"), *ROOT.glob("engine/*.py")]:
        code |= set(re.findall(r"fault_point\(\"(\w+)\"\)", path.read_text(encoding="utf-8")))
    assert set(re.findall(r"`(\w+)`", listed)) == code


def test_the_exit_codes_are_the_clis():
    from sdpo import cli

    codes = {getattr(cli, n) for n in dir(cli) if n.startswith("EXIT_")}
    written = {int(c) for c in re.findall(r"(?:exit|exits with) code \*\*(\d+)\*\*", README)}
    assert written == codes
    exits = _between("- Exit codes: every rank returns the same code (", ")")
    assert {int(c) for c in re.findall(r"\b(\d+)\b", exits)} <= codes | {0}


def test_the_metric_and_file_names_are_a_runs(tmp_path, tiny_model_dir, one_thread):
    """The names the text lists for ``metrics.jsonl`` (training and held-out records) are
    those a run writes, each name a run writes is in the text, and the files the text names
    under OUTPUT_DIR are there."""
    from sdpo.config import config_from_dict as from_dict
    from sdpo.runner import run_training
    from tests.conftest import two_source_config

    cfg = two_source_config(tmp_path, tiny_model_dir, far=6, near=6, data={"eval_fraction": 0.2})
    out = Path(run_training(from_dict(cfg), progress=False).output_dir)
    written = set()
    for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
        written |= set(json.loads(line))
    text = " ".join(README.split())
    listed = _between_in(text, "`metrics.jsonl` (", "...;")
    listed += _between_in(text, "logged as `eval/loss`", "with rewards measured")
    listed_names = set(re.findall(r"`([\w/]+)`", listed)) | {"eval/loss"}
    assert listed_names <= written, listed_names - written
    # each name is in the text; a held-out one as eval/ + a training name ("eval/loss,
    # eval/rewards/chosen, ...")
    spans = set(_spans())
    unnamed = [
        name
        for name in sorted(written)
        if name not in spans and not (name.startswith("eval/") and name[5:] in written)
    ]
    assert not unnamed, f"metrics.jsonl names the README does not: {unnamed}"
    for name in (
        "config.toml",
        "metrics.jsonl",
        "sdpo_report.json",
        "sdpo_steps.png",
        "cache/tokens-train.safetensors",
        "step-2/",
        "checkpoints/",
    ):
        assert f"`{name}" in README or f"`OUTPUT_DIR/{name}" in README, name
        assert (out / name).exists(), f"the README names OUTPUT_DIR/{name}; a run wrote none"


def test_a_record_is_logged_every_log_every_steps_and_at_each_sdpo_steps_last(
    tmp_path, tiny_model_dir, one_thread
):
    """ "one record every `train.log_every` optimizer steps, and one at the last optimizer step
    of each sDPO step": 10 pairs in steps of 4 are 3 optimizer steps, logged at 2 and 3."""
    from sdpo.config import config_from_dict as from_dict
    from sdpo.runner import run_training
    from tests.conftest import two_source_config

    text = " ".join(README.split())
    assert (
        "one record every `train.log_every` optimizer steps, and one at the last optimizer step "
        "of each sDPO step" in text
    )
    cfg = two_source_config(tmp_path, tiny_model_dir, far=10, near=10, train={"log_every": 2})
    out = Path(run_training(from_dict(cfg), progress=False).output_dir)
    lines = (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines]
    assert [(r["sdpo_step"], r["step"]) for r in records] == [(1, 2), (1, 3), (2, 2), (2, 3)]


def test_the_score_fields_are_what_sdpo_score_writes(tmp_path, tiny_model_dir, one_thread):
    from tests.conftest import write_pairs

    data = write_pairs(tmp_path / "pairs.jsonl", n=3, seed=0)
    out = tmp_path / "scores.jsonl"
    args = ["--data", str(data), "--out", str(out), "--no-progress", "--max-length", "64"]
    assert cli_main(["score", "--model", str(tiny_model_dir), *args]) == 0
    listed = _between_in(" ".join(README.split()), "one JSON line per pair (", ")")
    names = re.findall(r"`(\w+)`", listed)
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 3 and all(list(row) == names for row in rows), (names, rows[0])


def _between_in(text: str, start: str, end: str) -> str:
    assert start in text, f"README: {start!r} not found"
    return text.split(start, 1)[1].split(end, 1)[0]


def test_the_lists_of_loss_types_and_model_types_are_the_codes():
    """ "every loss type both have (sigmoid, ipo, ...)" is every type of ``LOSS_TYPES``, and the
    model types of sdpo's own decoder (Models) are ``SUPPORTED_MODEL_TYPES``."""
    from sdpo.engine.model import SUPPORTED_MODEL_TYPES

    text = " ".join(README.split())
    listed = _between_in(text, "every loss type both have (", ")")
    assert listed.split(", ") == list(LOSS_TYPES)
    decoder = _between_in(text, "runs Llama-family decoders in Hugging Face folders,", "(per-head")
    assert re.findall(r"`(\w+)`", decoder)[1:] == list(SUPPORTED_MODEL_TYPES)  # after `model_type`


def test_the_tokenizer_classes_the_text_lists_are_the_ones_rebuilt():
    """ "... split text their own way: `LlamaTokenizer`, ..." is every class
    ``engine/tokenizer_classes.py`` rebuilds (the refused ones are named apart)."""
    from sdpo.engine import tokenizer_classes as tc

    rebuilt = set(tc.CLASS_SPECIAL_TOKENS) - tc.REFUSED_CLASSES
    text = " ".join(README.split())
    listed = _between_in(text, "split text their own way:", ", as named by")
    assert set(re.findall(r"`(\w+Tokenizer)`", listed)) == rebuilt


def test_the_checkpoint_folder_name_is_the_runners():
    from sdpo.engine.resume import checkpoint_name

    assert f"`{checkpoint_name(4)}/`" in README


def test_the_output_names_the_text_gives_are_the_codes():
    """The files and folders the text names inside a run's outputs, where no tiny run writes
    them (trackers, LoRA, profiling, mid-step checkpoints): the names the code writes."""
    from sdpo import report, runner, tracking
    from sdpo.engine import resume, token_cache

    text = " ".join(README.split())
    for name in (
        f"`OUTPUT_DIR/{runner.CHECKPOINTS_DIR}/ckpt-<run_step>/`",
        f"`{runner.TRAINER_STATE_NAME}`",
        f"`{resume.MANIFEST_NAME}`",
        f"`OUTPUT_DIR/{tracking.TRACKING_STATE}`",
        f"OUTPUT_DIR/{tracking.TENSORBOARD_DIR}",
        f"(its `{tracking.TENSORBOARD_OWNER}` names the output folder",
        f"`OUTPUT_DIR/{runner.PROFILE_DIR}/`",
        f"`step-<t>/{runner.PEFT_ADAPTER_DIR}/`",
        f"`{runner.PEFT_CONFIG_NAME}`",
        f"`{runner.PEFT_WEIGHTS_NAME}`",
        f"`{report.REPORT_FILE}`",
        f"`{token_cache.token_cache_path('cache', 'train').as_posix()}`",
        f"(and `{token_cache.token_cache_path('', 'eval').stem}`)",
    ):
        assert name in text, f"README does not name {name} (the name the code writes)"
    # the step report's fields the text names (the trackers' sdpo/... values, the timings)
    fields = {f.name for f in dataclasses.fields(report.StepReport)}
    named = set(re.findall(r"`sdpo/(\w+)`", text))
    named |= set(re.findall(r"step report's\s+`(\w+)`", text))
    named |= set(re.findall(r"`(\w+_seconds)`", text))
    assert len(named) >= 6 and named <= fields, named - fields


def test_the_report_fields_and_table_columns_the_text_gives_are_the_codes():
    """The paragraph on ``sdpo_report.json`` names every field of a step's report and every
    column of the table a run prints, each column beside the field (or metric) it shows."""
    from sdpo import report

    text = " ".join(README.split())
    said = _between_in(text, "The report holds the partition", "With `data.eval_sources`")
    names = set(re.findall(r"`([^`]+)`", said))
    fields = {f.name for f in dataclasses.fields(report.StepReport)}
    assert fields - {"step", "num_pairs", "sources"} <= names, fields - names
    table = report.format_summary_table(
        [report.StepReport(step=1, num_pairs=1, sources=["a"], beta=0.1, learning_rate=1e-6,
                           gamma_ref_chunk=0.0, reward_accuracy_before=0.0,
                           eval_metrics={"eval/loss": 0.7})]
    )  # fmt: skip
    columns = set(re.split(r"\s{2,}", table.splitlines()[0].strip()))
    assert columns - {"step", "pairs", "sources", "beta", "lr"} <= names, columns - names


def test_every_section_the_text_points_to_exists():
    """``(see Models)``, ``see "Several GPUs on one node"``: a heading or a bold paragraph."""
    headings = set(re.findall(r"^#+ (.+)$", README, re.M))
    headings = {h.replace("`", "") for h in headings}
    bold = {b.rstrip(".") for b in re.findall(r"\*\*([^*]+?)\.?\*\*", README)}
    text = " ".join(README.split())
    pointers = re.findall(r"\b[Ss]ee (?:\"([^\"]+)\"|([A-Z][\w-]*))", text)
    assert len(pointers) >= 8
    for quoted, word in pointers:
        target = quoted or word
        assert target in headings or target in bold, f"README: 'see {target}' points nowhere"


def test_the_extras_the_text_names_are_the_packages():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    extras = set(pyproject["project"]["optional-dependencies"])
    named = set(re.findall(r"sdpo\[(\w+)\]|\.\[(\w+)\]|the `(\w+)` extra", README))
    named = {n for group in named for n in group if n}
    assert {"dev", "tracking", "plot"} <= named
    assert named <= extras, f"README names extras pyproject.toml lacks: {named - extras}"


def test_every_file_the_readme_names_exists():
    paths = set(
        re.findall(
            r"(?<![\w/.-])((?:tests|benchmarks|engine|kernels|sdpo)/[\w./-]*\.(?:py|sh|md))", README
        )
    )
    assert len(paths) > 30
    assert not [p for p in sorted(paths) if not (ROOT / p).is_file()]
    # and every benchmark script is named (the Layout lists them)
    scripts = {p.relative_to(ROOT).as_posix() for p in (ROOT / "benchmarks").glob("*.[ps][yh]")}
    assert scripts <= paths, f"benchmark scripts the README does not name: {scripts - paths}"


def test_module_docstrings_name_what_exists():
    """``sdpo``'s layers, ``sdpo.kernels``' list of ops (every exported name, and nothing
    else), ``sdpo.config``'s list of sections and ``sdpo.cli``'s list of commands."""
    import sdpo
    import sdpo.cli
    import sdpo.config
    import sdpo.kernels

    for name in re.findall(r"``(sdpo(?:\.\w+)*)``", sdpo.__doc__):
        assert importlib.util.find_spec(name) is not None, f"sdpo's docstring: {name}"
    doc = sdpo.kernels.__doc__
    listed = set()
    for line in doc.split("Conventions shared by every op")[0].splitlines():
        if line.startswith("- ``"):
            listed |= set(re.findall(r"``(\w+)``", line.split(":", 1)[0]))
    modules = {m for m in listed if (ROOT / "kernels" / f"{m}.py").is_file()}
    assert listed - modules <= set(sdpo.kernels.__all__), listed - set(sdpo.kernels.__all__)
    for name in sdpo.kernels.__all__:
        assert f"``{name}``" in doc, f"sdpo.kernels' docstring does not name {name}"
    sections = re.findall(r"``\[(\w+)\]``", sdpo.config.__doc__)
    assert set(sections) == CONFIG_SECTIONS
    summary = " ".join(sdpo.cli.__doc__.split(":", 1)[1].split())  # "train (...), score, ..."
    for command in {c.split()[0] for c in _options(build_parser())}:
        assert re.search(rf"(?:^|, ){command}\b", summary), f"sdpo.cli's docstring: {command}"
