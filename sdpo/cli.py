"""The `sdpo` command: train (plain or stepwise DPO from a TOML config), score, config (the
resolved config as TOML, or a TRL config file converted), cache (list or prune a cache
folder), demo."""

from __future__ import annotations

import argparse
import json
import os
import select
import shlex
import signal
import sys
import tempfile
import threading
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn, TextIO

if TYPE_CHECKING:
    from sdpo.engine.checkpoint import ModelInfo
    from sdpo.engine.packing import TokenizedPair
    from sdpo.engine.tokenize import TokenizeStats

TRAIN_HELP = """\
Run DPO or stepwise DPO (sDPO) from a TOML config. With [sdpo] steps = T the data is split into
T chunks (sdpo.partition) and step t trains on chunk t with M_{t-1} as policy start and
reference; steps = 1 is plain DPO over all data. Outputs: OUTPUT_DIR/step-<t>/ (Hugging Face
checkpoints), metrics.jsonl, config.toml (resolved), cache/ (reference log-probs),
sdpo_report.json and a plot; with [profile] steps = N, profile/ holds torch.profiler traces
of N optimizer steps.

Reliability: every input is checked before the output folder is touched. Training checkpoints
go to OUTPUT_DIR/checkpoints/ (every train.save_every optimizer steps, at the end of each sDPO
step, and on SIGTERM/SIGINT, which finish the current optimizer step first, or under torchrun
the step the log line names); --resume continues from the newest complete one and ends with
the same weights as an uninterrupted run.

Several GPUs of one node: torchrun --nproc_per_node=N -m sdpo.cli train --config run.toml
(data parallel; every rank checks the inputs, rank 0 alone writes and prints).

Exit codes: 0 done; 2 bad config, input data, model folder or output folder (nothing written);
3 non-finite loss or gradient; 4 out of GPU memory (the message says which settings to
change; they may change on --resume); 74 a checkpoint or output could not be written (older
checkpoints are intact); 75 stopped on request (SIGTERM/SIGINT), resume with --resume; 130
Ctrl-C while the inputs are read (nothing written yet), or a second Ctrl-C during a stop
(temporary files removed, earlier checkpoints intact; the message says how to resume)."""

EXIT_INPUT = 2
EXIT_NONFINITE = 3
EXIT_OUT_OF_MEMORY = 4
EXIT_WRITE = 74  # EX_IOERR
EXIT_STOPPED = 75  # EX_TEMPFAIL: try again later
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a program Ctrl-C ended
EXIT_READER_LEFT = 141  # 128 + SIGPIPE: the output's reader stopped reading (| head)

SCORE_HELP = """\
Score a preference data set with one model (no training): per-pair summed completion log-probs,
γ = logp(chosen) - logp(rejected), reward accuracy (share of γ > 0) and mean γ."""

DEMO_HELP = """\
An end-to-end run with nothing to download: a tiny Llama-style model is fine-tuned on a
built-in synthetic task, then SFT vs DPO (all data at once) vs sDPO easy-to-hard vs sDPO random
are trained and compared on held-out task accuracy and preference accuracy. Runs on an idle
2-core CPU in one to two minutes. Writes OUTPUT_DIR/demo_summary.json (the table), sft/ (the
SFT model), data/ (the three preference sources) and one folder per run (dpo/,
sdpo_easy_to_hard/, sdpo_random/) with the config.toml that `sdpo train --config` runs again."""

CACHE_EXIT_CODES = (
    "Exit codes: 0 done; 2 a bad PATH or option (nothing removed); 74 a file could not be "
    "removed (the others were); 130 Ctrl-C (each file removed whole or kept); 141 the "
    "output's reader stopped reading (| head), the work done."
)

CACHE_HELP = f"""\
See and clean a cache folder: a run's own OUTPUT_DIR/cache, or a folder runs share
(sdpo.cache_dir), which gains a file for every new key (model, data, data settings) and never
loses one. `sdpo cache list PATH` describes each file; `sdpo cache prune PATH --older-than 30d`
removes the files no run used for 30 days. PATH is a cache folder, a run's output folder or a
run's TOML config (the folder its run uses: sdpo.cache_dir, else OUTPUT_DIR/cache).

{CACHE_EXIT_CODES}"""

CACHE_LIST_HELP = """\
One line per entry of the cache folder: the file, what it holds (initial: the initial model's
reference values; step T: the reference values of sDPO step T, under M_{T-1}; eval-initial:
the initial model's on the held-out pairs; sdpo.reference: those of sdpo.reference; tokens
train / tokens eval: tokenized data), the key's model and data fingerprints (a token cache's
tokenizer fingerprint and source names), pair count, size, last modified, last used and the
key's settings; then a total. Read from each file's header alone (the tensors are not read,
and where the system allows it the read leaves the file's access time, its last use, as it
was). Damaged files, files of an older format version or of a later one (a later sdpo's),
temporary files of a write in progress and files that are not sdpo's are listed as such."""

CACHE_PRUNE_HELP = f"""\
Remove the sdpo cache files that every given selector picks: --older-than AGE (last used more
than AGE ago: the later of the last write and the last read the file system records; with
noatime, the write), --keep-last N (all but the N most recently used readable files of each
name: initial, step-2, tokens-train, ...), --unusable (damaged, or of an older format version:
no run of this sdpo reads them). Only sdpo's cache files are removed: the temporary files of a
write in progress, a later sdpo's files (of a later format version), files of other names or
content, links and folders stay. Removing is safe while runs use the folder: a run reads a
cache file whole when it needs it, and a run that then finds its file gone scores (or
tokenizes) those pairs again and writes it anew; a file written again after it was read here
is not removed. --dry-run shows what would go and the bytes it would free.

{CACHE_EXIT_CODES}"""


def _set_mistake(words: list[str]) -> str | None:
    """What is wrong with a ``--set`` among a command's ``words``, with the form to write:
    ``--set KEY VALUE`` (a space for the ``=``), ``--set KEY= VALUE``, ``--set KEY =VALUE``,
    a value with spaces left unquoted; None when every ``--set`` is one ``KEY=VALUE`` word.
    Argparse would take the ``KEY`` alone and refuse the ``VALUE`` as an unrecognized argument,
    under the top-level usage."""
    for i, word in enumerate(words):
        if word == "--":
            return None
        if word != "--set" or i + 1 >= len(words):
            continue
        item = words[i + 1]
        rest = []  # the words after it up to the next option: none belongs to --set
        for extra in words[i + 2 :]:
            if extra.startswith("-") and not _is_number(extra):
                break
            rest.append(extra)
        key, equals, value = item.partition("=")
        if not equals and not rest:
            return f"--set takes key=value, e.g. --set {item}=VALUE (no space around the =)"
        if not rest:
            continue
        if not equals or not value or rest[0].startswith("="):
            joined = item + ("" if equals or rest[0].startswith("=") else "=") + rest[0]
            return f"--set takes key=value, with no space around the =: --set {joined}"
        quoted = shlex.quote(" ".join([item, *rest]))
        return (
            f"--set takes one key=value; quote a value that holds spaces: --set {quoted} "
            "(and repeat --set for each key)"
        )
    return None


def _is_number(word: str) -> bool:
    try:
        float(word)
    except ValueError:
        return False
    return True


class _CommandParser(argparse.ArgumentParser):
    """A command's parser: a ``--set`` written other than as one ``KEY=VALUE`` word is refused
    with the form to write, under this command's usage (``_set_mistake``)."""

    def parse_known_args(
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        if args is not None and self.get_default("overrides") is not None:
            mistake = _set_mistake(list(args))
            if mistake is not None:
                self.error(mistake)
        return super().parse_known_args(args, namespace)


def _version() -> str:
    """The installed package's version (a checkout run without installing has none)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sdpo")
    except PackageNotFoundError:
        return "(not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sdpo",
        description="sdpo: a performance-first training engine for stepwise DPO.",
    )
    parser.add_argument("--version", action="version", version=f"sdpo {_version()}")
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_CommandParser
    )

    train = sub.add_parser(
        "train", help="run DPO / sDPO from a TOML config", description=TRAIN_HELP
    )
    train.add_argument("--config", required=True, type=Path, help="the run's TOML file")
    train.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config value (TOML literal), e.g. --set train.learning_rate=1e-6; "
        "repeatable",
    )
    train.add_argument(
        "--overwrite",
        action="store_true",
        help="allow starting in an output folder that holds another run's outputs (they are "
        "replaced)",
    )
    train.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in output_dir from its newest complete checkpoint (from the "
        "beginning if it has none); refused if the config changed in a key that alters the "
        "result",
    )
    train.add_argument("--no-progress", action="store_true", help="no progress bars")

    score = sub.add_parser("score", help="score a data set with one model", description=SCORE_HELP)
    score.add_argument(
        "--model", required=True, help="Hugging Face model folder, or a hub model id (org/name)"
    )
    score.add_argument("--revision", help="a hub model's branch, tag or commit (default: main)")
    score.add_argument(
        "--implementation",
        default="auto",
        choices=["auto", "sdpo", "transformers"],
        help="the code that runs the model, as model.implementation: sdpo's own decoder "
        "(llama, mistral, qwen2, qwen3), transformers (any causal LM), or auto (sdpo's for its "
        "model types, transformers for the others; default: auto)",
    )
    score.add_argument(
        "--data",
        required=True,
        help="preference file (jsonl/json/parquet/csv), data set folder or hub data set name",
    )
    score.add_argument(
        "--split",
        default="train",
        help="the split of a hub data set or of a data set folder that holds several "
        "(default: train), as a source's split",
    )
    score.add_argument(
        "--subset",
        default=None,
        help="the subset (datasets' config name) of a hub data set or of a data set folder that "
        "holds several, as a source's subset",
    )
    score.add_argument("--out", type=Path, default=None, help="write per-pair results as JSONL")
    score.add_argument(
        "--overwrite", action="store_true", help="with --out: replace an existing file"
    )
    score.add_argument(
        "--max-length", type=int, default=1024, help="max tokens per sequence (default: 1024)"
    )
    score.add_argument(
        "--max-prompt-length",
        type=int,
        default=None,
        help="max prompt tokens (default: half of --max-length)",
    )
    score.add_argument(
        "--truncation",
        choices=("keep_end", "keep_start"),
        default="keep_end",
        help="which end of an over-long prompt is kept, as data.truncation (default: keep_end)",
    )
    score.add_argument(
        "--max-tokens-per-batch",
        type=int,
        default=65536,
        help="token budget of a scoring batch (default: 65536)",
    )
    score.add_argument("--no-progress", action="store_true", help="no progress bar")
    score.add_argument(
        "--impl",
        default="auto",
        choices=["auto", "triton", "torch"],
        help="log-prob kernels, as kernels.impl (default: auto, triton on CUDA, torch elsewhere)",
    )
    score.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "fp32", "bf16", "bf16-mixed"],
        help="weights and compute as train.precision: bf16 (bf16 weights: half the memory of "
        "the others), bf16-mixed (fp32 weights, bf16 autocast) or fp32; each gives the values "
        'a run with that precision caches; or auto, resolved as train.precision = "auto" is: '
        "bf16-mixed on a GPU that computes in bf16 (compute capability 8.0 or later), else fp32 "
        "(default: auto)",
    )
    score.add_argument(
        "--fsdp",
        action="store_true",
        help="under torchrun, shard the model over the ranks as train.fsdp does (each rank "
        "reads only its own shards, so a model larger than one GPU loads); no effect in one "
        "process",
    )
    score.add_argument(
        "--share-prompt",
        action="store_true",
        help="compute each pair's prompt once for both completions (same values, less work)",
    )
    score.add_argument(
        "--ld-alpha",
        type=float,
        default=None,
        metavar="A",
        help="LD-DPO sums, as loss.ld_alpha in training: a completion's tokens past its pair's "
        "shorter length count A times (A in [0, 1]); unset: plain sums",
    )
    score.add_argument(
        "--columns",
        default=None,
        metavar="FIELD=COLUMN,...",
        help="the data's column for a field named otherwise, and a system-prompt column, as "
        "in a source's columns map: e.g. prompt=question,system=system",
    )

    config = sub.add_parser(
        "config",
        help="print a resolved config (every key, with defaults) as TOML",
        description="Print the config that `sdpo train` would run, every key included, as TOML: "
        "from --config FILE with --set overrides, or, without --config, the defaults around "
        "placeholder paths (a starting point for a new run's file).",
    )
    config.add_argument("--config", type=Path, default=None, help="the run's TOML file")
    config.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config value (TOML literal); repeatable",
    )
    config.add_argument(
        "--from-trl",
        type=Path,
        default=None,
        metavar="FILE",
        help="convert a TRL DPO config file (YAML or JSON, as `trl dpo --config` reads) to "
        "sdpo's TOML; options with no equivalent are listed in comments at the top",
    )
    config.add_argument(
        "--world-size",
        type=int,
        default=1,
        metavar="N",
        help="with --from-trl: the processes TRL would run on (pairs per step = batch size x "
        "gradient accumulation x N; default 1)",
    )
    config.add_argument(
        "--out", type=Path, default=None, help="with --from-trl: write the TOML to this file"
    )
    config.add_argument(
        "--overwrite", action="store_true", help="with --out: replace an existing file"
    )

    cache = sub.add_parser(
        "cache", help="list or prune the files of a cache folder", description=CACHE_HELP
    )
    actions = cache.add_subparsers(dest="cache_command", required=True, metavar="ACTION")
    path_help = (
        "a cache folder, a run's output folder or its TOML config (the cache folder its run "
        "uses: sdpo.cache_dir, else OUTPUT_DIR/cache)"
    )
    listing = actions.add_parser(
        "list", help="describe each file of a cache folder", description=CACHE_LIST_HELP
    )
    listing.add_argument("path", type=_cache_path, metavar="PATH", help=path_help)
    listing.add_argument("--json", action="store_true", help="print the listing as JSON")
    prune = actions.add_parser(
        "prune", help="remove files of a cache folder", description=CACHE_PRUNE_HELP
    )
    prune.add_argument("path", type=_cache_path, metavar="PATH", help=path_help)
    prune.add_argument(
        "--older-than",
        type=_age,
        metavar="AGE",
        help="files last used more than AGE ago: a number and a unit, s, m (minutes), h, d or "
        "w, e.g. 30d (M is refused: give months in days)",
    )
    prune.add_argument(
        "--keep-last",
        type=_whole_number,
        metavar="N",
        help="all but the N most recently used readable files of each name (initial, step-2, "
        "tokens-train, ...); 0: every sdpo cache file",
    )
    prune.add_argument(
        "--unusable",
        action="store_true",
        help="damaged files and files of an older format version",
    )
    prune.add_argument(
        "--dry-run", action="store_true", help="show what would be removed; remove nothing"
    )
    prune.add_argument("--json", action="store_true", help="print the result as JSON")

    demo = sub.add_parser("demo", help="the embedded end-to-end demo", description=DEMO_HELP)
    demo.add_argument(
        "--quick", action="store_true", help="a shortened run (smaller data, fewer steps)"
    )
    demo.add_argument(
        "--output-dir",
        type=Path,
        default=Path("runs/demo"),
        help="where the demo writes (default: runs/demo)",
    )
    demo.add_argument(
        "--seed",
        type=_whole_number,
        default=0,
        help="seed of data, model and training, an integer >= 0 (default: 0)",
    )
    return parser


def _whole_number(text: str) -> int:
    """A whole number >= 0 (``--seed`` as ``train.seed`` takes it, ``--keep-last``); anything
    else is refused under the usage."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {value}")
    return value


def _cache_path(text: str) -> Path:
    """``sdpo cache``'s PATH; an empty one (a variable that was not set) is refused, where a
    ``Path`` would read it as the working folder, which prune would then clean."""
    if not text:
        raise argparse.ArgumentTypeError(
            "is empty: name a cache folder, a run's output folder or its TOML config "
            "(. for the working folder)"
        )
    return Path(text)


_AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def _age(text: str) -> float:
    """``--older-than``: a number and a unit (``30d``, ``12h``, ``1.5w``) as seconds. A capital
    M is refused: many read it as months, and as minutes it would pick nearly every file."""
    number, unit = text.strip()[:-1], text.strip()[-1:]
    if unit == "M":
        raise argparse.ArgumentTypeError(
            f"M is not a unit here: m is minutes; give months in days, e.g. 180d; got {text!r}"
        )
    unit = unit.lower()
    try:
        value = float(number) if unit in _AGE_UNITS else None
    except ValueError:
        value = None
    if value is None or not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(
            f"must be a number >= 0 and a unit, s, m (minutes), h, d or w, e.g. 30d; got {text!r}"
        )
    return value * _AGE_UNITS[unit]


def resume_command(args: argparse.Namespace) -> str:
    """The exact command that continues this run, from any folder: the config's path is made
    absolute, and with ``--set`` overrides, whose relative paths (``output_dir=runs/a``) start
    at the working folder, the command first changes to this run's (from another, ``--resume``
    would find no run in the folder it names and start a new one)."""
    from sdpo.engine import distributed

    launcher = ["sdpo"]
    if distributed.active():  # the same number of ranks continues it bitwise
        launcher = ["torchrun", f"--nproc_per_node={distributed.world()}", "-m", "sdpo.cli"]
    words = [*launcher, "train", "--config", str(Path(args.config).resolve())]
    for text in args.overrides:
        words += ["--set", text]
    if args.no_progress:
        words.append("--no-progress")
    command = shlex.join([*words, "--resume"])
    if args.overrides:
        command = f"cd {shlex.quote(os.getcwd())} && {command}"
    return command


def _say(*args: object, this_rank: bool = False, **kwargs: object) -> None:
    """``print`` on rank 0 only. Data parallel: every rank meets the same error and exits with
    the same code; rank 0 alone prints it (the others would repeat it word for word).
    ``this_rank``: a failure that may be this rank's alone (see ``_leave_group_alone``), printed
    by any rank that meets it, named by its rank. Before ``sdpo.engine.distributed`` is
    imported (or after its import was cut short, by a Ctrl-C during ``import torch``) no process
    group exists, so the line is printed as it is: importing it here would start that import
    again from a half-imported torch, and fail with a traceback instead of the line."""
    distributed = sys.modules.get("sdpo.engine.distributed")
    if distributed is None or (distributed.is_main() and not (this_rank and distributed.active())):
        print(*args, **kwargs)
    elif this_rank:
        print(f"[rank {distributed.rank()}]", *args, **kwargs)


def _leave_group_alone(code: int) -> int:
    """Leave the process group now, without the closing barrier, and return ``code``: for a
    failure that may be this rank's alone (out of memory on one GPU; an output that rank 0
    alone writes). The other ranks may then be waiting in a collective this rank will never
    join, where that barrier would hold every rank until the group's timeout (30 minutes).
    Left without it, their collective fails at once (gloo: the peer closed the connection), or
    torchrun ends them once this rank has exited (NCCL)."""
    from sdpo.engine import distributed

    distributed.shutdown()
    return code


def _in_process_group(command: Callable[[argparse.Namespace], int]):
    """``command`` run inside the torchrun process group when launched by torchrun (a plain run
    touches nothing of torch.distributed).

    Every rank returns the same code (2, 3, 74, 75 alike), except after a failure that may be
    one rank's alone (``_leave_group_alone``). torchrun takes the first rank that
    exits nonzero as failed and sends SIGTERM to the others, which are then only leaving the
    group or the interpreter: that SIGTERM would replace their code with -15 (a graceful stop
    reported as a kill on some ranks, at random). So a rank that returns a nonzero code ignores
    SIGTERM for the little that is left of the process: the closing barrier, leaving the group
    and the interpreter's exit (torchrun still ends it with SIGKILL if that ever hung)."""

    def run(args: argparse.Namespace) -> int:
        from sdpo.engine import distributed

        distributed.init_from_env()
        try:
            code = command(args)
        except BaseException:
            distributed.shutdown()
            raise
        if (
            code != 0
            and distributed.active()
            and threading.current_thread() is threading.main_thread()
        ):
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # all that is left is the exit
        distributed.shutdown(wait=True)  # every rank returns the same code
        return code

    return run


def _train(args: argparse.Namespace) -> int:
    from sdpo.config import ConfigError, load_config
    from sdpo.engine.trainer import NonFiniteError, TrainingStopped
    from sdpo.runner import (
        CheckpointWriteError,
        OutOfMemoryStop,
        OutputDirError,
        RunInputError,
        RunInterrupted,
        run_training,
    )

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        _say(f"sdpo: config error: {e}", file=sys.stderr)
        return EXIT_INPUT
    try:
        run_training(
            cfg, progress=not args.no_progress, overwrite=args.overwrite, resume=args.resume
        )
    except OutputDirError as e:
        _say(f"sdpo: {e}", file=sys.stderr)
        return EXIT_INPUT
    except RunInputError as e:
        _say(f"sdpo: input error (nothing was written): {e}", file=sys.stderr)
        return EXIT_INPUT
    except NonFiniteError as e:
        _say(f"sdpo: training stopped: {e}", file=sys.stderr)
        return EXIT_NONFINITE
    except OutOfMemoryStop as e:
        change = " --set KEY=VALUE" if e.settings_may_change else ""
        _say(
            f"sdpo: {e}. Continue with: {resume_command(args)}{change}",
            file=sys.stderr,
            this_rank=True,
        )
        return _leave_group_alone(EXIT_OUT_OF_MEMORY)
    except CheckpointWriteError as e:
        _say(f"sdpo: {e}: {resume_command(args)}", file=sys.stderr)
        return EXIT_WRITE
    except OSError as e:  # also rank 0's own writes (caches, metrics.jsonl): printed there
        _say(
            f"sdpo: could not write an output ({e}); training checkpoints written so far are "
            f"intact. Fix the cause, then continue with: {resume_command(args)}",
            file=sys.stderr,
        )
        return _leave_group_alone(EXIT_WRITE)
    except RunInterrupted as e:
        if not e.wrote:
            _say(
                f"sdpo: interrupted (Ctrl-C) before the run wrote anything in {cfg.output_dir}",
                file=sys.stderr,
            )
        else:
            saved = (
                f"checkpoint {e.checkpoint} is the newest saved"
                if e.checkpoint
                else "no training checkpoint yet (the caches written are reused)"
            )
            _say(
                f"sdpo: interrupted (Ctrl-C); {saved}. Continue with: {resume_command(args)}",
                file=sys.stderr,
            )
        return EXIT_INTERRUPTED
    except TrainingStopped as e:
        ckpt = getattr(e, "checkpoint", None)
        saved = f"checkpoint {ckpt} is saved" if ckpt else "no training checkpoint yet"
        when = (
            f"after optimizer step {e.global_step}"
            if e.global_step
            else "before any optimizer step"
        )
        _say(
            f"sdpo: stopped on request {when}; {saved}. Continue with: {resume_command(args)}",
            file=sys.stderr,
        )
        return EXIT_STOPPED
    return 0


def _check_out_file(out: Path, *, data: str, overwrite: bool) -> None:
    """``--out`` names a file that can be written (made, with its missing folders), is not
    the ``--data`` file and, without ``--overwrite``, does not exist: checked before the model
    is loaded and the pairs are scored, so a bad path costs no work and nothing already
    written is replaced unasked (the pairs never)."""
    if out.is_dir():
        raise ValueError(
            f"--out {out} is a folder; give the path of a file, e.g. {out}/scores.jsonl"
        )
    if out.is_file() and Path(data).is_file() and out.samefile(data):
        raise ValueError(
            f"--out {out} is the --data file: the scores would replace the pairs; give another "
            f"path, e.g. --out {out.with_name(out.stem + '.scores.jsonl')}"
        )
    if out.exists() and not overwrite:
        raise ValueError(f"--out {out} exists; pass --overwrite to replace it, or another path")
    existing = out.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"--out {out} cannot be written: {existing} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=existing, prefix=".sdpo-write-check-"):
            pass
    except OSError as e:
        raise ValueError(
            f"--out {out} cannot be written in {existing}: {e.strerror or e}; choose another "
            "path or fix the folder's permissions"
        ) from None


def _score(args: argparse.Namespace) -> int:
    """Under torchrun rank 0 alone reads, checks and tokenizes the data and sends the pairs to
    every rank (``tokenized_once``; its error is raised on every rank); the ranks share the
    scoring (score_pairs shards the pairs); rank 0 writes."""
    import torch

    from sdpo.config import default_max_prompt_length
    from sdpo.engine import distributed, sharding
    from sdpo.engine.checkpoint import check_model, load_model, load_pretrained
    from sdpo.engine.data import read_preference_file
    from sdpo.engine.files import atomic_open
    from sdpo.engine.packing import check_ld_alpha
    from sdpo.engine.precision import emulated_bf16_warning, parameter_dtype, resolve_precision
    from sdpo.engine.scoring import score_pairs
    from sdpo.engine.tokenize import PairTokenizer, tokenize_pairs
    from sdpo.kernels import resolve_impl
    from sdpo.runner import model_folder, select_device, tokenized_once

    device = select_device()
    # as a run resolves train.precision: the default scores the values a default run caches
    precision = resolve_precision(args.precision, device)
    emulated = emulated_bf16_warning(precision, device, key="--precision")
    if emulated is not None:
        _say(f"sdpo: warning: {emulated}", file=sys.stderr)
    shardable = False  # whether --fsdp can shard the model (sdpo's own decoder runs it)

    def out_of_memory(error: BaseException) -> int:
        advice = _score_memory_advice(error, args, precision, shardable=shardable)
        _say(f"sdpo: {advice}", file=sys.stderr, this_rank=True)
        return _leave_group_alone(EXIT_OUT_OF_MEMORY)

    try:  # bad input (the model folder, the data, the column map) exits 2 with one message
        try:
            check_ld_alpha(args.ld_alpha)
        except ValueError as e:
            raise ValueError(f"--ld-alpha: {e}") from None
        columns = _column_map(args.columns)
        if args.overwrite and args.out is None:
            raise ValueError(
                "--overwrite only applies with --out (it lets score replace an existing --out "
                "file); leave it out, or add --out FILE"
            )
        if args.out is not None:  # every rank: one node's files, the same error everywhere
            _check_out_file(args.out, data=args.data, overwrite=args.overwrite)
        model_dir = model_folder(args.model, revision=args.revision, key="--model")
        # a missing folder or weights, named before the tokenizer
        info = check_model(model_dir, args.implementation)
        shardable = info.implementation != "transformers"
        if info.implementation == "transformers":
            flags = [
                f for f, on in (("--fsdp", args.fsdp), ("--share-prompt", args.share_prompt)) if on
            ]
            if flags:
                raise ValueError(
                    f"{model_dir}: transformers runs this model (model_type "
                    f"{info.model_type!r}, --implementation {args.implementation}), and "
                    f"{' and '.join(flags)} need sdpo's own decoder; leave them out"
                )
        tokenizer = PairTokenizer.from_dir(model_dir)
        max_prompt_length = (
            args.max_prompt_length
            if args.max_prompt_length is not None
            else default_max_prompt_length(args.max_length)
        )

        def read() -> tuple[list[TokenizedPair], dict[int, str], TokenizeStats]:
            rows = read_preference_file(
                args.data, split=args.split, subset=args.subset, columns=columns
            )
            pairs, stats = tokenize_pairs(
                rows,
                tokenizer,
                max_length=args.max_length,
                max_prompt_length=max_prompt_length,
                truncation=args.truncation,
                vocab_size=info.vocab_size,
            )
            _check_lengths(pairs, rows, info)
            return pairs, {}, stats  # the output names each pair by its index alone

        # before the model is loaded: bad data costs no load
        pairs, _, stats = tokenized_once(read)

        def shard(model: torch.nn.Module) -> None:
            sharding.shard_model(model, precision=precision, device=device)

        if info.implementation == "transformers":
            model = load_model(
                model_dir,
                implementation="transformers",
                dtype=parameter_dtype(precision),
                device=device,
            )
        else:
            model = load_pretrained(
                model_dir,
                dtype=parameter_dtype(precision),
                device=device,
                shard=shard if sharding.wanted(args.fsdp) else None,
            )
    except (ValueError, OSError) as e:  # DataError and the model errors are ValueErrors
        _say(f"sdpo: input error: {e}", file=sys.stderr)
        return EXIT_INPUT
    except torch.OutOfMemoryError as e:  # loading the model: nothing was written
        return out_of_memory(e)
    try:
        scores = score_pairs(
            model,
            pairs,
            max_tokens_per_batch=args.max_tokens_per_batch,
            impl=resolve_impl(args.impl, device),
            share_prompt=args.share_prompt,
            progress=not args.no_progress,
            ld_alpha=args.ld_alpha,
            precision=precision,
        )
    except torch.OutOfMemoryError as e:
        return out_of_memory(e)
    gamma = scores.gamma
    if not distributed.is_main():
        return 0
    if args.out is not None:
        with atomic_open(args.out, "w") as f:
            for i in range(len(pairs)):
                f.write(
                    json.dumps(
                        {
                            "index": int(scores.pair_indices[i]),
                            "logp_chosen": float(scores.chosen_logps[i]),
                            "logp_rejected": float(scores.rejected_logps[i]),
                            "chosen_tokens": int(scores.chosen_tokens[i]),
                            "rejected_tokens": int(scores.rejected_tokens[i]),
                            "gamma": float(gamma[i]),
                        }
                    )
                    + "\n"
                )
    if stats.num_prompt_boundary:
        print(
            f"{stats.num_prompt_boundary} pair(s) with tokens merged across the prompt/completion "
            "boundary or a chat template that renders the prompt alone differently (see README, "
            "Training)"
        )
    if stats.num_identical:
        print(
            f"{stats.num_identical} pair(s) with identical chosen and rejected token ids (γ = 0: "
            "the same text, or cut to the same tokens by --max-length / --max-prompt-length)"
        )
    print(
        f"pairs: {len(pairs)}  truncated: {stats.num_truncated}  "
        f"reward accuracy: {float((gamma > 0).float().mean()):.4f}  "
        f"mean γ: {float(gamma.mean()):.4f}"
    )
    if args.out is not None:
        print(f"wrote {args.out}")
    return 0


def _score_memory_advice(
    error: BaseException, args: argparse.Namespace, precision: str, *, shardable: bool
) -> str:
    """What ``sdpo score`` says when the device ran out of memory: the settings that hold its
    memory, and how to lower each (nothing was written)."""
    weights = (
        "--precision bf16 (bf16 weights: half the memory of fp32 ones; its values are those a "
        'run with train.precision = "bf16" caches)'
        if precision != "bf16"
        else None
    )
    ways = [
        w
        for w in (
            weights,
            f"a smaller --max-tokens-per-batch (now {args.max_tokens_per_batch})",
            None
            if args.fsdp or not shardable
            else "--fsdp under torchrun (the model sharded over the GPUs)",
        )
        if w is not None
    ]
    first = str(error).splitlines()[0] if str(error) else "out of memory"
    return (
        f"out of memory scoring with precision {precision} ({first}); nothing was written. "
        f"Try {'; or '.join(ways)}"
    )


def _check_lengths(pairs: list[TokenizedPair], rows: list[dict], info: ModelInfo) -> None:
    """A ``ValueError`` naming the row of the first pair longer than the model's context
    (``max_position_embeddings``), as ``sdpo train`` refuses them before any work."""
    for pair in pairs:
        length = len(pair.prompt_ids) + max(len(pair.chosen_ids), len(pair.rejected_ids))
        row = rows[pair.index]
        where = f"{row.get('file')} {row.get('row_label') or 'row'} {row.get('row')}"
        context = info.max_position_embeddings
        if context is not None and length > context:
            raise ValueError(
                f"{where}: the pair is {length} tokens long, longer than the model's context "
                f"(max_position_embeddings {context}); pass --max-length <= {context}"
            )


def _column_map(text: str | None) -> dict[str, str]:
    """``prompt=question,system=system`` as a dict (``--columns``)."""
    columns: dict[str, str] = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        field, sep, column = item.partition("=")
        if not sep or not field.strip() or not column.strip():
            raise ValueError(f"--columns: {item!r} is not FIELD=COLUMN (e.g. prompt=question)")
        columns[field.strip()] = column.strip()
    return columns


def _cmd_config(args: argparse.Namespace) -> int:
    from sdpo.config import ConfigError, config_from_dict, config_to_dict, load_config, toml_dumps

    if args.from_trl is not None:
        return _config_from_trl(args)
    if args.out is not None or args.world_size != 1:
        print("sdpo: --out and --world-size go with --from-trl", file=sys.stderr)
        return EXIT_INPUT
    if args.overwrite:
        print(_OVERWRITE_WITHOUT_OUT, file=sys.stderr)
        return EXIT_INPUT
    try:
        if args.config is not None:
            cfg = load_config(args.config, args.overrides)
        else:
            placeholders = {
                "output_dir": "runs/my-run",
                "model": {"path": "models/my-sft-model"},
                "data": {"path": "data/pairs.jsonl"},
            }
            cfg = config_from_dict(placeholders, base_dir=Path.cwd(), overrides=args.overrides)
    except ConfigError as e:
        print(f"sdpo: config error: {e}", file=sys.stderr)
        return 2
    d = config_to_dict(cfg)
    print(toml_dumps(d), end="")
    unset = list(dict.fromkeys(_unset_keys(d)))  # once each: a source's keys name every source's
    if unset:  # TOML has no null: name the optional keys that are not set
        print("\n# optional, not set: " + ", ".join(unset))
    return 0


def _unset_keys(d: dict, prefix: str = "") -> list[str]:
    """The dotted keys of ``d`` whose value is None, in tables at any depth; a list of tables
    (``data.sources``) as ``data.sources[].subset``."""
    found = []
    for key, value in d.items():
        if value is None:
            found.append(f"{prefix}{key}")
        elif isinstance(value, dict):
            found += _unset_keys(value, f"{prefix}{key}.")
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for item in value:
                found += _unset_keys(item, f"{prefix}{key}[].")
    return found


# printed TOML replaces nothing: an --overwrite there would be a no-op the user thinks mattered
_OVERWRITE_WITHOUT_OUT = (
    "sdpo: --overwrite only applies with --out (it lets --from-trl replace an existing --out "
    "file); leave it out, or add --out FILE"
)


def _config_from_trl(args: argparse.Namespace) -> int:
    """``sdpo config --from-trl FILE``: the TOML printed, or written atomically to --out."""
    from sdpo.config import ConfigError
    from sdpo.engine.files import atomic_write_text
    from sdpo.from_trl import convert_trl_config, read_trl_file

    if args.config is not None or args.overrides:
        print("sdpo: --from-trl goes without --config and --set", file=sys.stderr)
        return EXIT_INPUT
    if args.world_size < 1:
        print(f"sdpo: --world-size must be >= 1, got {args.world_size}", file=sys.stderr)
        return EXIT_INPUT
    if args.overwrite and args.out is None:
        print(_OVERWRITE_WITHOUT_OUT, file=sys.stderr)
        return EXIT_INPUT
    if args.out is not None and args.out.is_dir():
        print(
            f"sdpo: --out {args.out} is a folder; give the path of a file, e.g. "
            f"{args.out / 'run.toml'}",
            file=sys.stderr,
        )
        return EXIT_INPUT
    out, src = args.out, args.from_trl
    if out is not None and out.is_file() and src.is_file() and out.samefile(src):
        print(
            f"sdpo: --out {out} is the --from-trl file: the TOML would replace the TRL config; "
            f"give another path, e.g. --out {out.with_name(out.stem + '.sdpo.toml')}",
            file=sys.stderr,
        )
        return EXIT_INPUT
    if args.out is not None and args.out.exists() and not args.overwrite:
        print(f"sdpo: {args.out} exists; pass --overwrite to replace it", file=sys.stderr)
        return EXIT_INPUT
    try:
        text = convert_trl_config(
            read_trl_file(args.from_trl), source=str(args.from_trl), world_size=args.world_size
        )
    except ConfigError as e:
        print(f"sdpo: config error: {e}", file=sys.stderr)
        return EXIT_INPUT
    if args.out is None:
        print(text, end="")
        return 0
    try:
        atomic_write_text(args.out, text)
    except OSError as e:
        print(f"sdpo: could not write {args.out}: {e}", file=sys.stderr)
        return EXIT_WRITE
    print(f"wrote {args.out}")
    return 0


def _cmd_cache(args: argparse.Namespace) -> int:
    """``sdpo cache list|prune PATH``: the folder PATH stands for, read, then listed or pruned."""
    from sdpo.cache_folder import CacheFolderError, find_cache_folder, scan_cache_folder

    prune = args.cache_command == "prune"
    if prune and args.older_than is None and args.keep_last is None and not args.unusable:
        print(
            "sdpo: cache prune: say which files to remove: --older-than AGE (e.g. 30d), "
            "--keep-last N or --unusable; add --dry-run to see what would go",
            file=sys.stderr,
        )
        return EXIT_INPUT
    try:
        folder, how = find_cache_folder(args.path)
    except CacheFolderError as e:
        print(f"sdpo: {e}", file=sys.stderr)
        return EXIT_INPUT
    if folder.exists() and not folder.is_dir():
        print(f"sdpo: the cache folder {folder} ({how}) is a file, not a folder", file=sys.stderr)
        return EXIT_INPUT
    try:
        entries = scan_cache_folder(folder) if folder.is_dir() else []
    except OSError as e:
        print(f"sdpo: cannot read the cache folder {folder}: {e.strerror or e}", file=sys.stderr)
        return EXIT_INPUT
    head = {"cache_folder": str(folder), "found_as": how, "exists": folder.is_dir()}
    return (_cache_prune if prune else _cache_list)(args, head, entries)


def _cache_list(args: argparse.Namespace, head: dict, entries: Sequence) -> int:
    """One line per entry (or JSON), then the total."""
    from sdpo.cache_folder import OK

    size = sum(e.size for e in entries)
    if args.json:
        files = [e.as_json() for e in entries]
        total = {"files": len(files), "bytes": size}
        print(json.dumps({**head, "files": files, "total": total}, indent=2))
        return 0
    print(f"cache folder: {head['cache_folder']} ({head['found_as']})")
    if not entries:
        print("no files" + ("" if head["exists"] else " (the folder does not exist yet)"))
        return 0
    rows = [("FILE", "KIND", "MODEL", "DATA", "PAIRS", "SIZE", "MODIFIED", "LAST USED", "SETTINGS")]
    for e in entries:
        model, data, settings = e.summary()
        note = settings if e.status == OK else f"{e.status}: {e.problem}"
        pairs = "-" if e.pairs is None else str(e.pairs)
        when = (_when(e.modified), _when(e.last_used))
        rows.append((e.path.name, e.kind, model, data, pairs, _size(e.size), *when, note))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    numbers = (4, 5)  # PAIRS and SIZE, right-aligned
    for row in rows:
        cells = [
            c.rjust(w) if i in numbers else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))
        ]
        print("  ".join([*cells, row[-1]]).rstrip())
    entries_text = _count_of(len(entries), "entry", "entries")
    print(f"total: {entries_text}, {_size(size)}{_by_status(entries)}")
    return 0


# how the total line and prune name the entries of each status
_STATUS_WORDS = {
    "ok": "readable",
    "outdated": "of an older format version",
    "damaged": "damaged",
    "later": "of a later format version",
    "unreadable": "unreadable here",
    "writing": "temporary (writes in progress)",
    "foreign": "not sdpo cache files",
}


def _by_status(entries: Sequence) -> str:
    counts = {s: sum(e.status == s for e in entries) for s in _STATUS_WORDS}
    parts = [f"{n} {_STATUS_WORDS[s]}" for s, n in counts.items() if n]
    return f" ({', '.join(parts)})" if parts else ""


def _cache_prune(args: argparse.Namespace, head: dict, entries: Sequence) -> int:
    """Remove (or with --dry-run, name) the files the selectors pick; 74 when one could not be
    removed (the others are)."""
    import time

    from sdpo.cache_folder import remove_entry, select_for_pruning

    chosen = select_for_pruning(
        entries,
        now=time.time(),
        older_than=args.older_than,
        keep_last=args.keep_last,
        unusable=args.unusable,
    )
    removed, skipped, failed = [], [], []
    for e in chosen:
        if args.dry_run:
            removed.append(e)
            continue
        try:
            why = remove_entry(e)
        except OSError as error:
            failed.append((e, error.strerror or str(error)))
            continue
        if why is None:
            removed.append(e)
        else:
            skipped.append((e, why))
    freed = sum(e.size for e in removed)
    left_alone = [e for e in entries if not e.removable]
    if args.json:
        result = {
            **head,
            "dry_run": args.dry_run,
            "removed": [e.as_json() for e in removed],
            "freed_bytes": freed,
            "not_removed": [{**e.as_json(), "why": why} for e, why in skipped],
            "failed": [{"path": str(e.path), "error": why} for e, why in failed],
            "left_alone": [e.as_json() for e in left_alone],
        }
        print(json.dumps(result, indent=2))
    else:
        print(f"cache folder: {head['cache_folder']} ({head['found_as']})")
        _say_pruned(removed, skipped, left_alone, dry_run=args.dry_run)
        stay = len([e for e in entries if e.removable]) - len(removed)
        freed_text = f"{_size(freed)} in {_count_of(len(removed), 'file', 'files')}"
        stay_text = _count_of(stay, "cache file", "cache files")
        if args.dry_run:
            print(f"would free {freed_text}; {stay_text} would stay (dry run: nothing removed)")
        else:
            print(f"freed {freed_text}; {stay_text} {'stays' if stay == 1 else 'stay'}")
    for e, why in failed:
        print(f"sdpo: could not remove {e.path}: {why}", file=sys.stderr)
    return EXIT_WRITE if failed else 0


def _say_pruned(
    removed: Sequence, skipped: Sequence, left_alone: Sequence, *, dry_run: bool
) -> None:
    """A line per file prune removed (or would), per file it found changed, and per kind of
    entry it leaves alone."""
    from sdpo.cache_folder import OK, WRITING

    verb = "would remove" if dry_run else "removed"
    for e in removed:
        status = "" if e.status == OK else f", {e.status}"
        print(f"{verb} {e.path.name} ({_size(e.size)}, last used {_when(e.last_used)}{status})")
    for e, why in skipped:
        print(f"not removed: {e.path.name} ({why})")
    writing = [e for e in left_alone if e.status == WRITING]
    others = [e for e in left_alone if e.status != WRITING]
    if writing:
        print(
            f"left alone: {_count_of(len(writing), 'temporary file', 'temporary files')} "
            "(a write in progress, or one a killed run left; remove by hand when no run "
            "uses the folder): " + ", ".join(e.path.name for e in writing)
        )
    if others:
        print(
            f"left alone: {_count_of(len(others), 'entry', 'entries')} that sdpo does not "
            "remove (not sdpo cache files, unreadable here, or a later sdpo's): "
            + ", ".join(e.path.name for e in others)
        )


def _count_of(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def _size(n: int) -> str:
    """Bytes in decimal units, as file managers and pip show them."""
    value = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1000:
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} TB"


def _when(seconds: float) -> str:
    import time

    return time.strftime("%Y-%m-%d %H:%M", time.localtime(seconds))


def _cmd_demo(args: argparse.Namespace) -> int:
    import os

    import torch

    from sdpo.demo import run_demo

    if os.environ.get("WORLD_SIZE", "1") != "1":  # each rank would run it into the same folder
        if os.environ.get("RANK", "0") == "0":  # said once
            print(
                "sdpo: sdpo demo runs in one process (its models are tiny and train on the "
                "CPU): start it without torchrun, as `sdpo demo`",
                file=sys.stderr,
            )
        return EXIT_INPUT
    if "OMP_NUM_THREADS" not in os.environ:
        # the demo's models are tiny: one thread is as fast on an idle machine, and several
        # spin against each other on a busy one (many times slower)
        torch.set_num_threads(1)
    out = args.output_dir
    if out.exists() and not out.is_dir():
        print(f"sdpo: --output-dir {out} is a file, not a folder: name a folder", file=sys.stderr)
        return EXIT_INPUT
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        print(f"sdpo: could not create --output-dir {out}: {e}", file=sys.stderr)
        return EXIT_WRITE
    run_demo(output_dir=out, quick=args.quick, seed=args.seed)
    return 0


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    """Warnings about the user's data as one line of the program's own, without the source
    file and line of sdpo that raised them; other warnings as Python shows them."""
    from sdpo.engine.data import DataWarning

    if issubclass(category, DataWarning):
        _say(f"sdpo: warning: {message}", file=sys.stderr if file is None else file)
    else:
        _SHOW_WARNING(message, category, filename, lineno, file, line)


_SHOW_WARNING = warnings.showwarning


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = {
        "train": _in_process_group(_train),
        "score": _in_process_group(_score),
        "config": _cmd_config,
        "cache": _cmd_cache,
        "demo": _cmd_demo,
    }[args.command]
    with warnings.catch_warnings():  # restored on return (main is called in process by tests)
        warnings.showwarning = _show_warning
        try:
            return handler(args)
        except KeyboardInterrupt:  # Ctrl-C outside a training run's own handling (_train)
            # every file is written under a temporary name, removed when a write is cut short
            _say(f"sdpo: interrupted (Ctrl-C); {_NOTHING_WRITTEN[args.command]}", file=sys.stderr)
            return EXIT_INTERRUPTED


_NOTHING_WRITTEN = {
    "train": "nothing was written",  # before the run began: reading the config
    "score": "nothing was written",  # --out is written whole at the end, or not at all
    "config": "nothing was written",
    "cache": "each file is removed whole or kept",
    "demo": "run it again to start over",
}


def entry() -> NoReturn:
    """The ``sdpo`` program (also ``python -m sdpo`` and ``python -m sdpo.cli``): :func:`main`,
    then the process's exit with its code. A torchrun rank that has left its process group
    exits without the interpreter's finalization (``sdpo.engine.distributed.exit_process``):
    the communication backend's threads can outlive the group (after an FSDP2 run torch keeps
    it), and racing the interpreter's teardown they can abort a rank whose work is complete, so
    that torchrun would report a finished run as failed. Every file a command writes is closed
    (and renamed into place) before it returns."""
    code = None
    try:
        code = main()
        sys.stdout.flush()  # a reader that left is met here, not in the interpreter's exit
    except BrokenPipeError:
        if not _stdout_reader_left():
            raise
        # `sdpo cache list DIR | head`: the rest of the output goes nowhere, with no traceback;
        # an exit code the command gave stands
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        code = code or EXIT_READER_LEFT
    distributed = sys.modules.get("sdpo.engine.distributed")  # never imported: never in a group
    if distributed is None:
        sys.exit(code)
    distributed.exit_process(code)


def _stdout_reader_left() -> bool:
    """Whether standard output is a pipe whose reader has closed it (poll reports an error
    on such a pipe's end, on Linux); False where that cannot be told."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):
        return False


if __name__ == "__main__":
    entry()
