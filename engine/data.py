"""Reading and validating preference data before any training starts.

A preference row has a ``prompt``, a ``chosen`` and a ``rejected`` completion, each either a
non-empty string or a list of chat messages ``{"role": str, "content": str}`` (a message that calls
tools may have ``"content": null`` or none beside a non-empty ``tool_calls`` list, the OpenAI
layout that transformers renders; other keys reach the template, those set to null dropped). JSON
files (``.jsonl``/``.json``) are read here, line by line (a JSON array: element by element; strict
UTF-8, strict JSON), because ``datasets`` reports a malformed line or a non-UTF-8 byte without
saying where it is; each line is parsed and checked once, and the rows are the records as written
(``datasets`` would merge the message objects of all rows into one schema, adding null keys a row
did not have, or refuse a file whose rows differ past the first block it reads). Other data is read
with ``datasets``: ``.parquet`` and ``.csv`` files, ``save_to_disk`` folders and hub names. Every
problem becomes a ``DataError`` naming the file, the row and the field, and saying what to do: bad
data must fail in seconds, not an hour into a run.

Row numbers: for JSON lines files they are 1-based line numbers (what an editor shows); for
JSON arrays, parquet, csv (the header is not a row) and hub data sets they are 0-based row
indices. Messages say which.

Mixed formats are normalised so each returned row is all strings or all messages: a string
prompt with message completions becomes one user turn, a string completion with a message prompt
becomes one assistant turn, and completions that repeat the prompt's messages before the answer
(the "full conversation" layout of many hub data sets) have that prefix removed.

Per-row template inputs (as TRL 1.16 passes them to ``apply_chat_template``): an optional
``tools`` column (a list of tool JSON schemas, or that list as JSON text) and an optional
``chat_template_kwargs`` column (an object of extra template variables such as Qwen3's
``{"enable_thinking": false}``, or that object as JSON text); null (or empty text) means none.
They are kept on conversational rows only. Plain-text rows are not rendered by a template, so
TRL ignores them there, and so does this module, with a warning naming how many rows had them.
Values from a JSON file reach the template exactly as written (``datasets`` would otherwise merge
every row's objects into one schema, adding null keys a row did not have).

Implicit prompts (as TRL reads them): a row with ``chosen`` and ``rejected`` but no ``prompt``
field (or a null one) holds two whole conversations (or texts) that share their beginning, which is the prompt.
Message lists: the prompt is the longest run of equal leading messages. Strings (e.g. the
"\n\nHuman: ...\n\nAssistant: ..." layout): as TRL cuts them, the prompt is the longest common
leading text less one space before the point where the texts part, so that the answers start
with that space ("...Assistant:" and " yes" / " no"); a newline before that point stays in the
prompt. Unlike TRL, a cut never falls inside a word: where the texts part within a word (or one
ends inside the other), the cut moves back to that word's start first ("The cat" / "The car"
give " cat" and " car" here, TRL's "t" and "r"). A row whose two sides share no such beginning
is an error that asks for a ``prompt`` field.
"""

from __future__ import annotations

import codecs
import contextlib
import difflib
import gc
import json
import os
import re
import tempfile
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FIELDS = ("prompt", "chosen", "rejected")
# optional columns a chat template reads: apply_chat_template's tools= and **kwargs
RENDER_FIELDS = ("tools", "chat_template_kwargs")
# names a row's chat_template_kwargs cannot take: apply_chat_template's own parameters and the
# variables it sets itself
RESERVED_TEMPLATE_VARIABLES = frozenset(
    {
        "messages",
        "tools",
        "documents",
        "add_generation_prompt",
        "continue_final_message",
        "conversation",
        "chat_template",
        "tokenize",
        "padding",
        "truncation",
        "max_length",
        "return_tensors",
        "return_dict",
        "return_assistant_tokens_mask",
        "tokenizer_kwargs",
        "sanitize_control_tokens",
    }
)
IDENTICAL_POLICIES = ("warn", "drop", "error")
# A preference pair of a 128k-token conversation is about 1 MB of JSON; a line 16x that is
# almost surely a file without newlines, and reading it whole would only waste memory.
DEFAULT_MAX_LINE_BYTES = 16 * 2**20
_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
# the endings of data files sdpo does not read: a missing path ending so is a file, not a hub
# data set name (which would be looked up on the hub, with its retries, first)
_OTHER_FILE_SUFFIXES = (".gz", ".zst", ".bz2", ".xz", ".zip", ".arrow", ".txt", ".tsv", ".ndjson")

Message = dict[str, str]
Field = str | list[Message]


class DataError(ValueError):
    """Bad input data: the message names the file, the row, the field and the fix.

    ``row`` is a 1-based line number when ``row_label == "line"`` (JSON lines) and a 0-based row
    index when ``row_label == "row"``."""

    def __init__(
        self,
        problem: str,
        *,
        fix: str,
        file: str | None = None,
        row: int | None = None,
        field: str | None = None,
        row_label: str = "line",
    ) -> None:
        self.problem = problem
        self.fix = fix
        self.file = file
        self.row = row
        self.field = field
        self.row_label = row_label
        place = _describe_place(file, row, row_label)
        if field is not None:
            place = f"{place}, field '{field}'" if place else f"field '{field}'"
        super().__init__(f"{place}: {problem}. Fix: {fix}" if place else f"{problem}. Fix: {fix}")

    def __reduce__(self):  # keyword-only fields: pickle (e.g. across processes) needs help
        kwargs = {
            "fix": self.fix,
            "file": self.file,
            "row": self.row,
            "field": self.field,
            "row_label": self.row_label,
        }
        return _rebuild_data_error, (self.problem, kwargs)


def _rebuild_data_error(problem: str, kwargs: dict) -> DataError:
    return DataError(problem, **kwargs)


class DataWarning(UserWarning):
    """Data that is usable but probably not what was meant (e.g. chosen identical to rejected)."""


def row_error(
    row: dict, problem: str, *, fix: str, field: str | None = None, position: int | None = None
) -> DataError:
    """A ``DataError`` located at a row returned by ``read_preference_file``. Rows made by hand
    (no ``file``/``row`` keys) are located by ``position``, their 0-based index in the list."""
    if "row" in row:
        return DataError(
            problem,
            fix=fix,
            file=row.get("file"),
            row=row["row"],
            field=field,
            row_label=row.get("row_label", "row"),
        )
    return DataError(problem, fix=fix, row=position, field=field, row_label="row")


@contextlib.contextmanager
def cyclic_gc_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off while rows, messages and token lists are built in
    bulk, as it was after (a ``with`` block, or a decorator of the function that builds them).
    None of them form reference cycles (reference counting frees them as before), but every
    collection their number triggers walks all the containers made so far: on 73,688 pairs
    (79M tokens) these walks made reading the token cache 2-3x slower (benchmarks/RESULTS.md)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _describe_place(file: str | None, row: int | None, row_label: str) -> str:
    parts = []
    if file is not None:
        parts.append(str(file))
    if row is not None:
        parts.append(f"line {row}" if row_label == "line" else f"row {row} (0-based row index)")
    return ", ".join(parts)


@dataclass(kw_only=True, frozen=True)
class _Place:
    file: str
    row: int
    row_label: str  # "line" (1-based) or "row" (0-based)

    def error(self, problem: str, *, fix: str, field: str | None = None) -> DataError:
        return DataError(
            problem, fix=fix, file=self.file, row=self.row, field=field, row_label=self.row_label
        )

    def __str__(self) -> str:
        return _describe_place(self.file, self.row, self.row_label)


@cyclic_gc_paused()
def read_preference_file(
    path_or_name: str | os.PathLike,
    *,
    source: str | None = None,
    split: str = "train",
    subset: str | None = None,
    identical: str = "warn",
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
    columns: Mapping[str, str] | None = None,
) -> list[dict]:
    """Read and validate a preference data set.

    ``path_or_name``: a ``.jsonl``/``.json``/``.parquet``/``.csv`` file, a data set folder (the
    layout a hub download leaves: data files named by split; or one written by ``datasets``'
    ``save_to_disk``), or a hub data set name (``split`` applies to hub names and to folders
    holding several splits; a local file, or a saved ``Dataset``, is one split, "train", and
    another ``split`` is a ``DataError``). ``subset``: the subset (datasets' config name) of a
    hub data set or of a data set folder holding several (its README.md's ``configs``, or one
    sub-folder per subset); an unknown one is a ``DataError`` listing those there are. ``source`` names the data
    source (default: the file's stem or the hub name). ``identical``: what to do with pairs whose
    chosen equals rejected: "warn" (keep, warn with the count), "drop" (remove, warn with the
    count) or "error". ``columns``: the data set's column for a field when its name differs
    (``{"prompt": "question"}``, also ``tools`` and ``chat_template_kwargs``), and ``"system"``:
    a column of system prompts, which makes every prompt a conversation (a system message when
    the row's is not empty, then the user's).

    Returns one dict per kept row: ``prompt``, ``chosen``, ``rejected`` (all strings, or all
    message lists), ``source``, ``file``, ``row`` and ``row_label`` ("line": ``row`` is a 1-based
    line number, JSON lines; "row": a 0-based row index, other formats); a conversational row
    with tools or chat_template_kwargs (module docstring) also has ``tools`` (a list of dicts)
    and ``chat_template_kwargs`` (a dict). ``row_error`` turns these into a ``DataError`` for
    problems found later (e.g. while tokenizing)."""
    if identical not in IDENTICAL_POLICIES:
        raise ValueError(f"identical must be one of {IDENTICAL_POLICIES}, got {identical!r}")
    columns = _check_columns(columns)
    name = os.fspath(path_or_name)
    path = Path(name).expanduser()
    suffix = path.suffix.lower()

    # the rows checked while reading (JSON files), else the records read by datasets
    checked: Iterable[_Checked] | None = None
    records: list[dict] = []
    if subset is not None and (path.is_file() or (path.is_dir() and _saved_to_disk(path))):
        what = "data file" if path.is_file() else "folder saved with save_to_disk"
        raise DataError(
            f"subset {subset!r} was asked of a {what}, which has no subsets",
            fix="leave the source's subset out (sdpo score: --subset), or point to a data set "
            "folder or hub data set holding subsets",
            file=name,
        )
    if path.is_file():
        _check_one_split(split, name=name, what="a data file")
        builder = _BUILDERS.get(suffix)
        if builder is None:
            raise DataError(
                f"unsupported file extension {suffix or '(none)'!r}",
                fix=f"convert the data to one of {', '.join(_BUILDERS)}",
                file=name,
            )
        if builder == "json":
            # read here, each line parsed and checked once (strict UTF-8, strict JSON), so that
            # errors carry line numbers; the rows are the records as written
            checked = _read_json(path, name=name, max_line_bytes=max_line_bytes, columns=columns)
            if not checked:
                raise _empty_error(name)
        else:
            with tempfile.TemporaryDirectory(prefix="sdpo-data-") as scratch:
                records = _load_local(
                    builder,
                    path,
                    name=name,
                    cache=Path(scratch) / "cache",
                    text_columns=_raw_columns(columns),
                )
            places = [_Place(file=name, row=i, row_label="row") for i in range(len(records))]
        default_source = path.stem
    elif path.is_dir() and _saved_to_disk(path):
        records = _load_saved(path, name=name, split=split)
        places = [_Place(file=name, row=i, row_label="row") for i in range(len(records))]
        default_source = path.name
    elif path.is_dir():
        # a data set folder as a hub download leaves it (data files named by split, e.g.
        # data/train-00000-of-00001.parquet): read by datasets like a hub name, offline
        with tempfile.TemporaryDirectory(prefix="sdpo-data-") as scratch:
            records = _load_hub(
                str(path), split=split, subset=_folder_subset(path, subset), cache=Path(scratch)
            )
        places = [_Place(file=name, row=i, row_label="row") for i in range(len(records))]
        default_source = path.name
    elif suffix in _BUILDERS or name.startswith((".", "/", "~")):
        raise DataError(
            "file not found",
            fix=(
                "check the path (a relative path in a config file starts at that file's folder; "
                "one given on the command line, at the working folder)"
            ),
            file=name,
        )
    elif suffix in _OTHER_FILE_SUFFIXES:
        raise DataError(
            f"file not found (and a {suffix} file is not read here)",
            fix=f"give an existing {', '.join(_BUILDERS)} file, or a data set folder",
            file=name,
        )
    else:
        records = _load_hub(name, split=split, subset=(subset, None) if subset else None)
        places = [_Place(file=name, row=i, row_label="row") for i in range(len(records))]
        default_source = name

    if checked is None:
        if not records:
            raise _empty_error(name)
        checked = _checked_records(records, places, columns)
    source = default_source if source is None else source
    rows: list[dict] = []
    identical_places: list[_Place] = []
    unrendered: list[_Place] = []  # plain-text rows carrying template inputs
    for place, (prompt, chosen, rejected, options), has_inputs in checked:
        if isinstance(prompt, str) and has_inputs:
            unrendered.append(place)
        if chosen == rejected:
            if identical == "error":
                raise place.error(
                    "chosen is identical to rejected, so the pair prefers nothing",
                    fix="remove the row or make the completions differ, or set "
                    "data.identical_pairs (argument `identical`) to 'drop' or 'warn'",
                    field="chosen",
                )
            identical_places.append(place)
            if identical == "drop":
                continue
        rows.append(
            {
                "prompt": prompt,
                "chosen": chosen,
                "rejected": rejected,
                "source": source,
                "file": place.file,
                "row": place.row,
                "row_label": place.row_label,
                **options,
            }
        )
    if unrendered:
        first = ", ".join(str(p.row) for p in unrendered[:5])
        warnings.warn(
            f"{name}: {len(unrendered)} plain-text row(s) have tools or chat_template_kwargs, "
            "which only apply to chat-message rows (rendered by the chat template) and were "
            f"ignored, as TRL does; first {unrendered[0].row_label}s: {first}",
            DataWarning,
            stacklevel=3,  # the caller of read_preference_file, past the decorator's frame
        )
    if identical_places:
        first = ", ".join(str(p.row) for p in identical_places[:5])
        action = "dropped" if identical == "drop" else "kept (they add no training signal)"
        warnings.warn(
            f"{name}: {len(identical_places)} pair(s) have chosen identical to rejected and were "
            f"{action}; first {identical_places[0].row_label}s: {first}",
            DataWarning,
            stacklevel=3,  # the caller of read_preference_file, past the decorator's frame
        )
    if not rows:
        raise DataError(
            "no rows left after dropping pairs whose chosen equals rejected",
            fix="check the data: every pair was identical",
            file=name,
        )
    return rows


def _empty_error(name: str) -> DataError:
    return DataError(
        "the data set is empty (no rows)",
        fix="point to a file with at least one prompt/chosen/rejected row",
        file=name,
    )


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """No progress bars and no info logging from ``datasets`` while reading; restored after."""
    import datasets
    from datasets.utils import logging as ds_logging

    bars = datasets.is_progress_bar_enabled()
    verbosity = ds_logging.get_verbosity()
    datasets.disable_progress_bars()
    ds_logging.set_verbosity_error()
    try:
        yield
    finally:
        ds_logging.set_verbosity(verbosity)
        if bars:
            datasets.enable_progress_bars()


def _load_local(
    builder: str, path: Path, *, name: str, cache: Path, text_columns: Sequence[str] = FIELDS
) -> list[dict]:
    """Load a local file with ``datasets``. ``cache`` is a temporary folder deleted afterwards:
    nothing is written next to the data, and a local read needs no network."""
    import datasets

    kwargs: dict[str, Any] = {}
    if builder == "csv":
        # keep cells as text: "" stays "" (not NaN), "NA"/"null" stay words, "42" stays "42"
        kwargs = {"keep_default_na": False, "converters": dict.fromkeys(text_columns, str)}
    with _quiet_datasets():
        try:
            ds = datasets.load_dataset(
                builder,
                data_files={"train": str(path)},
                split="train",
                cache_dir=str(cache),
                **kwargs,
            )
            return ds.to_list()
        except Exception as exc:  # datasets/pyarrow/pandas raise many types; all mean "unreadable"
            if "corresponds to no data" in str(exc):  # how datasets reports a split of 0 rows
                raise _empty_error(name) from None
            raise DataError(
                f"could not be read as {builder} ({type(exc).__name__}: {exc})",
                fix=f"check that the file is valid {builder}",
                file=name,
            ) from exc


def _saved_to_disk(folder: Path) -> bool:
    """A folder written by ``Dataset.save_to_disk`` (``state.json``) or
    ``DatasetDict.save_to_disk`` (``dataset_dict.json``), which ``load_dataset`` refuses."""
    return (folder / "state.json").is_file() or (folder / "dataset_dict.json").is_file()


def _load_saved(folder: Path, *, name: str, split: str) -> list[dict]:
    """A ``save_to_disk`` folder: a data set is read whole, a data set dict at ``split``."""
    import datasets

    with _quiet_datasets():
        try:
            ds = datasets.load_from_disk(str(folder))
        except Exception as exc:  # datasets/pyarrow raise many types; all mean "unreadable"
            raise DataError(
                f"could not be read as a data set saved with save_to_disk "
                f"({type(exc).__name__}: {exc})",
                fix="save the data set again with save_to_disk, or pass one "
                ".jsonl/.json/.parquet/.csv file",
                file=name,
            ) from exc
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DataError(
                    f"the saved data set dict has no split {split!r} (splits: "
                    f"{', '.join(ds) or 'none'})",
                    fix="set the source's split to one of these (sdpo score: --split)",
                    file=name,
                )
            ds = ds[split]
        elif ds.split is None or split != str(ds.split):
            _check_one_split(split, name=name, what="a saved data set (not a data set dict)")
        return ds.to_list()


def _check_one_split(split: str, *, name: str, what: str) -> None:
    """A data file (or a saved ``Dataset``) is one split, which datasets calls "train" (the
    default): another split asked of it is an error, not silently the whole file."""
    if split != "train":
        raise DataError(
            f"split {split!r} was asked of {what}, which is one split (read whole as 'train')",
            fix="leave the source's split out (sdpo score: --split), or point to a data set "
            f"folder or hub data set that holds a {split!r} split, or to that split's own file",
            file=name,
        )


def _folder_subset(folder: Path, subset: str | None) -> tuple[str | None, str | None] | None:
    """``subset`` of a data set folder as ``(config name, data_dir)`` for ``load_dataset``: a
    config its README.md names, else a sub-folder; one the folder does not hold is a
    ``DataError`` listing those it does."""
    if subset is None:
        return None
    import datasets

    with _quiet_datasets():
        try:
            configs = [c for c in datasets.get_dataset_config_names(str(folder)) if c != "default"]
        except Exception:  # an unreadable README.md: load_dataset reports it
            configs = []
    if subset in configs:
        return subset, None
    folders = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not configs and subset in folders:
        return None, subset
    there = (
        f"the subsets its README.md names: {', '.join(configs)}"
        if configs
        else f"its sub-folders: {', '.join(folders) or 'none'}"
    )
    raise DataError(
        f"has no subset {subset!r} ({there})",
        fix="set the source's subset to one of these (sdpo score: --subset)",
        file=os.fspath(folder),
    )


def _load_hub(
    name: str,
    *,
    split: str,
    subset: tuple[str | None, str | None] | None = None,
    cache: Path | None = None,
) -> list[dict]:
    """A hub data set name, or a local data set folder (``cache``: a scratch datasets cache);
    ``subset``: ``(config name, data_dir)``."""
    import datasets

    local = Path(name).is_dir()
    config, data_dir = subset or (None, None)
    unreachable = None
    if not local and not datasets.config.HF_HUB_OFFLINE:
        # one plain request first: without a network, datasets' own lookup retries with
        # back-off for half a minute before it falls back to a copy in its cache; found
        # unreachable, the copy is read at once, in offline mode, as datasets would read it
        unreachable = _hub_connection_error(name)
    with _quiet_datasets(), _offline(unreachable is not None):
        try:
            kwargs: dict[str, str] = {"cache_dir": str(cache)} if cache is not None else {}
            if data_dir is not None:
                kwargs["data_dir"] = data_dir
            return datasets.load_dataset(name, config, split=split, **kwargs).to_list()
        except Exception as exc:
            if unreachable is not None:  # and no copy in the cache
                raise _hub_unreachable(name, unreachable, offline=False) from exc
            if local:
                raise DataError(
                    f"could not be read as a data set folder with split {split!r} "
                    f"({type(exc).__name__}: {exc})",
                    fix="point to a folder whose data files are named by split (e.g. "
                    "data/train-00000-of-00001.parquet) and set the source's split (and its "
                    "subset, for a folder of several), or pass one .jsonl/.json/.parquet/.csv "
                    "file",
                    file=name,
                ) from exc
            if isinstance(exc, ConnectionError):  # datasets' "Couldn't reach ... on the Hub"
                raise _hub_unreachable(name, exc) from exc
            raise DataError(
                f"is not a local file and could not be loaded as a hub data set "
                f"({type(exc).__name__}: {exc})",
                fix="check the path or the data set name, split and subset, and the network; or "
                "pass a "
                "local .jsonl/.json/.parquet/.csv file",
                file=name,
            ) from exc


@contextlib.contextmanager
def _offline(on: bool) -> Iterator[None]:
    """Offline mode for datasets and the hub client in the block (``on``), as HF_HUB_OFFLINE=1
    sets it: a hub data set is read from the datasets cache without asking the hub."""
    if not on:
        yield
        return
    import datasets
    import huggingface_hub

    saved = datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE = saved


_CONNECTION_ERRORS = {"ConnectError", "ConnectTimeout", "TimeoutException", "NetworkError"}


def _hub_connection_error(name: str) -> BaseException | None:
    """The error of asking the hub about data set ``name`` where it is a failure to reach the
    hub (no network, no name resolution, a timeout, offline mode); None where the hub answered,
    whatever it said (a missing or gated data set is for datasets to report)."""
    try:
        from huggingface_hub import HfApi

        HfApi().dataset_info(name, timeout=10)
    except Exception as exc:
        seen: BaseException | None = exc
        while seen is not None:
            names = {k.__name__ for k in type(seen).__mro__}
            if isinstance(seen, (ConnectionError, TimeoutError)) or names & _CONNECTION_ERRORS:
                return exc
            seen = seen.__cause__ or seen.__context__
    return None


def _hub_unreachable(name: str, exc: BaseException, *, offline: bool | None = None) -> DataError:
    """The error for a hub data set name when the hub cannot be asked and the datasets cache
    has no copy: offline mode set (``offline``; None: as datasets has it), or no network."""
    import datasets

    download = (
        "or, on a machine that reaches the hub, save it with datasets "
        f"(load_dataset({name!r}).save_to_disk(DIR)) or download its files, and give that "
        "folder as the source's path"
    )
    if datasets.config.HF_HUB_OFFLINE if offline is None else offline:
        return DataError(
            "is not a local file, and as a hub data set it is not in the datasets cache "
            f"(offline mode is set: HF_HUB_OFFLINE or HF_DATASETS_OFFLINE) ({exc})",
            fix=f"unset offline mode to fetch it; {download}",
            file=name,
        )
    return DataError(
        "is not a local file, and the hub cannot be reached to load it as a hub data set, "
        f"nor does the datasets cache hold a copy of it ({exc})",
        fix=f"check the network (a proxy: HTTPS_PROXY) and the name; {download}",
        file=name,
    )


# a checked row: its place, its fields and template inputs (``_normalize_row``), and whether the
# record held template inputs (which plain-text rows ignore, with a warning)
_Checked = tuple[_Place, tuple[Field, Field, Field, dict[str, Any]], bool]


def _checked_records(
    records: Sequence[dict], places: Sequence[_Place], columns: dict[str, str]
) -> Iterator[_Checked]:
    """Each record checked as it is reached (so a problem of an early row, such as an identical
    pair the policy refuses, is reported before a later row's)."""
    for record, place in zip(records, places):
        yield _check(record, place, columns)


def _check(record: dict, place: _Place, columns: dict[str, str]) -> _Checked:
    """``record`` (at ``place``) checked: its fields and template inputs, and whether it held
    template inputs."""
    return place, _normalize_row(record, place, columns), _has_render_inputs(record, columns)


def _read_json(
    path: Path, *, name: str, max_line_bytes: int, columns: dict[str, str]
) -> list[_Checked]:
    """Parse a JSON file ourselves (strict UTF-8, strict JSON) and check every record, so that
    errors carry line numbers. Returns the checked rows in file order; each line is parsed once
    and its record kept only as its checked fields."""
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    if head.startswith(b"\xef\xbb\xbf"):
        raise DataError(
            "the file starts with a UTF-8 byte-order mark",
            fix="save the file as UTF-8 without BOM",
            file=name,
            row=1,
        )
    if path.suffix.lower() == ".json" and head.startswith(b"["):
        return _read_json_array(path, name=name, columns=columns)
    return _read_json_lines(path, name=name, max_line_bytes=max_line_bytes, columns=columns)


def _read_json_lines(
    path: Path, *, name: str, max_line_bytes: int, columns: dict[str, str]
) -> list[_Checked]:
    shape_fix = "each line must hold one JSON object with prompt, chosen and rejected"
    if path.suffix.lower() == ".json":
        shape_fix += " (or make the whole .json file one JSON array of such objects)"
    checked: list[_Checked] = []
    with open(path, "rb") as f:
        lineno = 0
        while True:
            raw = f.readline(max_line_bytes + 1)
            if not raw:
                break
            lineno += 1
            place = _Place(file=name, row=lineno, row_label="line")
            if len(raw) > max_line_bytes and not raw.endswith(b"\n"):
                _raise_if_rows_under_keys(path, name=name, columns=columns, first=not checked)
                raise place.error(
                    f"the line is longer than {max_line_bytes} bytes",
                    fix="check that the file has one record per line; for genuinely huge "
                    "records raise max_line_bytes",
                )
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise place.error(
                    f"byte {raw[exc.start]:#04x} at byte {exc.start + 1} of the line is not "
                    "valid UTF-8",
                    fix="re-save the file as UTF-8 (e.g. iconv -f <encoding> -t UTF-8), or "
                    "delete the line",
                ) from None
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as exc:
                _raise_if_rows_under_keys(path, name=name, columns=columns, first=not checked)
                raise place.error(
                    f"not valid JSON ({exc.msg} at column {exc.colno})",
                    fix=f"fix or delete line {lineno}; {shape_fix}",
                ) from None
            if not isinstance(record, dict):
                fix = shape_fix
                rows = isinstance(record, list) and record and lineno == 1
                if rows and path.suffix.lower() == ".jsonl" and isinstance(record[0], dict):
                    # one JSON array of rows, named .jsonl: the .json reader takes it
                    fix += (
                        "; a file that is one JSON array of rows is read from a .json file: "
                        f"rename it to {path.stem}.json"
                    )
                raise place.error(f"holds a JSON {_json_type(record)}, not an object", fix=fix)
            try:
                checked.append(_check(record, place, columns))
            except DataError:
                if not checked:  # the first record: the whole file as one object of row lists?
                    _raise_if_rows_under_keys(
                        path, name=name, columns=columns, members=record.items()
                    )
                raise
    return checked


def _raise_if_rows_under_keys(
    path: Path,
    *,
    name: str,
    columns: dict[str, str],
    first: bool = True,
    members: Iterable[tuple[str, Any]] | None = None,
) -> None:
    """Raise a ``DataError`` naming the keys when the file is one JSON object whose values are
    lists of row objects (``{"train": [...], "test": [...]}``, as a script that dumps a dict of
    splits writes it), not rows: read as JSON lines, it would be one row without a prompt.
    Called on the way to another error of the file's first line (``first``): ``members``, that
    line's object; else the file's top-level members, read one at a time (``_object_members``:
    the peak is one member, the rows a read keeps anyway). Returns when the file is anything
    else, for the caller's own error."""
    if not first:
        return
    if members is None:
        if not _starts_with(path, b"{"):
            return
        members = _object_members(path)
    fields = {*FIELDS, *(columns.get(f, f) for f in FIELDS)}  # a row's own, under any name
    keys: set[str] = set()
    found: list[tuple[str, int]] = []
    try:
        for key, value in members:
            keys.add(key)
            if _holds_rows(value):
                found.append((key, len(value)))
    except _NotOneJsonContainer:
        return  # not one JSON object: the caller's error says what is wrong
    if not found or keys & fields:  # a row (a list in it: its tools, say), not rows under keys
        return
    key, count = found[0]
    others = ", ".join(f"{k!r} holds {n}" for k, n in found[1:])
    raise DataError(
        f"the file is one JSON object whose key {key!r} holds a list of {count} rows"
        + (f" ({others})" if others else "")
        + "; sdpo reads a data file's rows from a JSON array or from JSON lines, not from under "
        "a key, and a source has no key to pick one",
        fix=f"save the list itself as the file (e.g. json.dump(data[{key!r}], f) to a .json "
        "file), or its rows one per line to a .jsonl file; for several splits, one file each "
        "(train.jsonl, test.jsonl) in a folder, which a source's path and split read",
        file=name,
        field=key,
    )


def _holds_rows(value: Any) -> bool:
    """A non-empty list of objects that are not chat messages (a row's own field may be a list
    of messages)."""
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(v, dict) for v in value)
        and not any("role" in v for v in value)
    )


def _starts_with(path: Path, prefix: bytes) -> bool:
    """Whether the file's bytes, past leading JSON whitespace, start with ``prefix``."""
    with open(path, "rb") as f:
        return f.read(4096).lstrip(b" \t\r\n").startswith(prefix)


def _read_json_array(path: Path, *, name: str, columns: dict[str, str]) -> list[_Checked]:
    """A JSON array file's records checked, in file order. The elements are parsed one at a time
    from text decoded a few MiB at a time (``_array_elements``), so the file's text is never held
    whole beside its records: the peak is the rows kept, not those plus the file as text (two
    bytes a character for all of it once one character is outside Latin-1).

    Errors come out as when the whole file was parsed before any record was checked: a byte that
    is not UTF-8 or a JSON syntax error anywhere in the file wins over every row's problem, so a
    row's problem is kept (the first) until the array has been read to its end. A file that does
    not parse is read again whole (``_read_json_array_whole``), for the message and line json
    gives."""
    checked: list[_Checked] = []
    first_problem: DataError | None = None
    try:
        for i, record in enumerate(_array_elements(path)):
            if first_problem is not None:
                continue  # only the rest of the file's syntax is still in question
            try:
                checked.append(_check_element(record, i, name=name, columns=columns))
            except DataError as exc:
                first_problem, checked = exc, []
    except _NotOneJsonContainer:
        checked = []  # freed before the whole file is read
        return _read_json_array_whole(path, name=name, columns=columns)
    if first_problem is not None:
        raise first_problem
    return checked


class _NotOneJsonContainer(Exception):
    """The file's bytes are not UTF-8, or its text is not one JSON array (one object, for
    ``_object_members``)."""


# bytes decoded at a time; an element longer than what is left of them doubles the read
_ARRAY_READ_BYTES = 4 * 2**20
_JSON_SPACE = re.compile(r"[ \t\n\r]*")  # JSON's whitespace (not str.isspace's)


def _array_elements(path: Path) -> Iterator[Any]:
    """The elements of the JSON array in ``path``, each parsed as ``json.loads`` of the whole
    file parses it (strict UTF-8, the same scanner). Raises ``_NotOneJsonContainer`` when the
    file is anything else; its bytes are decoded to the end before the last element is given,
    so a caller that has seen every element knows the file is valid."""
    for _, value in _container_items(path, members=False):
        yield value


def _object_members(path: Path) -> Iterator[tuple[str, Any]]:
    """The (key, value) members of the JSON object in ``path``, in file order, read as
    ``_array_elements`` reads an array's elements."""
    return _container_items(path, members=True)


def _container_items(path: Path, *, members: bool) -> Iterator[tuple[str | None, Any]]:
    """The items of the one JSON array (``members``: object) that ``path`` holds: (None, value)
    per element, (key, value) per member; see ``_array_elements``."""
    opener, closer = ("{", "}") if members else ("[", "]")
    decode = codecs.getincrementaldecoder("utf-8")(errors="strict").decode
    parse = json.JSONDecoder().raw_decode
    with open(path, "rb") as f:
        text, pos, at_end = "", 0, False

        def read_more() -> None:
            """More of the file onto ``text`` (what was parsed dropped); past the end: raise."""
            nonlocal text, pos, at_end
            if at_end:
                raise _NotOneJsonContainer
            data = f.read(max(_ARRAY_READ_BYTES, 2 * (len(text) - pos)))
            try:
                text = text[pos:] + decode(data, final=not data)
            except UnicodeDecodeError:
                raise _NotOneJsonContainer from None
            pos, at_end = 0, not data

        def next_char() -> str:
            """The character after ``pos``'s whitespace (``pos`` moved to it), read as needed."""
            nonlocal pos
            while True:
                pos = _JSON_SPACE.match(text, pos).end()
                if pos < len(text):
                    return text[pos]
                read_more()

        if next_char() != opener:
            raise _NotOneJsonContainer
        pos += 1
        last = next_char() == closer
        if last:
            pos += 1
        while not last:
            next_char()  # pos at the item's start
            # an item (a member's key, colon and value), or the whitespace and delimiter after
            # it, may run past the text decoded so far (a number cut short even parses):
            # retried from the item's start with more text until all are there; at the file's
            # end read_more raises instead
            key, start = None, pos
            try:
                if members:
                    key, end = parse(text, pos)
                    if not isinstance(key, str):
                        raise _NotOneJsonContainer
                    colon = _JSON_SPACE.match(text, end).end()
                    start = _JSON_SPACE.match(text, colon + 1).end()
                    if start >= len(text):
                        read_more()
                        continue
                    if text[colon] != ":":
                        raise _NotOneJsonContainer
                value, end = parse(text, start)
            except json.JSONDecodeError:
                read_more()
                continue
            delimiter = _JSON_SPACE.match(text, end).end()
            if delimiter == len(text) or text[delimiter] not in "," + closer:
                read_more()
                continue
            last = text[delimiter] == closer
            pos = delimiter + 1
            yield key, value
        while True:  # only whitespace may follow the container, to the file's end
            if _JSON_SPACE.match(text, pos).end() < len(text):
                raise _NotOneJsonContainer
            if at_end:
                return
            pos = len(text)
            read_more()


def _read_json_array_whole(path: Path, *, name: str, columns: dict[str, str]) -> list[_Checked]:
    """A JSON array file parsed whole: its text and records together (``_read_json_array``'s
    way for a file that does not parse, whose error json places)."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise DataError(
            f"byte {raw[exc.start]:#04x} on line {line} is not valid UTF-8",
            fix="re-save the file as UTF-8",
            file=name,
            row=line,
        ) from None
    del raw
    try:
        records = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"not valid JSON ({exc.msg} at column {exc.colno})",
            fix="fix the JSON array at that place",
            file=name,
            row=exc.lineno,
        ) from None
    del text
    if not isinstance(records, list):
        raise DataError(
            f"the file holds a JSON {_json_type(records)}, not an array of rows",
            fix="make the file a JSON array of objects, or JSON lines",
            file=name,
        )
    checked: list[_Checked] = []
    for i, record in enumerate(records):
        checked.append(_check_element(record, i, name=name, columns=columns))
        records[i] = None  # each record's memory goes as it is checked
    return checked


def _check_element(record: Any, i: int, *, name: str, columns: dict[str, str]) -> _Checked:
    """Element ``i`` of a JSON array file, checked."""
    place = _Place(file=name, row=i, row_label="row")
    if not isinstance(record, dict):
        raise place.error(
            f"is a JSON {_json_type(record)}, not an object",
            fix="make every array element an object with prompt, chosen and rejected",
        )
    return _check(record, place, columns)


COLUMN_KEYS = (*FIELDS, "system", *RENDER_FIELDS)


def _check_columns(columns: Mapping[str, str] | None) -> dict[str, str]:
    """The column map without identity entries (but for ``system``, which has no default);
    unknown keys are a programming error."""
    out = {}
    for key, column in (columns or {}).items():
        if key not in COLUMN_KEYS:
            raise ValueError(f"columns: unknown field {key!r}; fields: {', '.join(COLUMN_KEYS)}")
        if column and (column != key or key == "system"):
            out[key] = column
    return out


def _raw_columns(columns: dict[str, str]) -> list[str]:
    """The data set's columns that hold the fields (and the system prompt)."""
    keep = [columns.get(f, f) for f in FIELDS]
    if "system" in columns:
        keep.append(columns["system"])
    return keep


def _apply_columns(record: dict, place: _Place, columns: dict[str, str]) -> dict:
    """The record with the fields under their own names and the system prompt folded into the
    prompt (see ``read_preference_file``)."""
    out = dict(record)
    for key in COLUMN_KEYS:
        column = columns.get(key)
        if column is None:
            continue
        if column not in record:
            present = ", ".join(sorted(map(str, record))) or "none"
            raise place.error(
                f"the column {column!r} (the source's columns.{key}) is missing (fields "
                f"present: {present})",
                fix=f"point columns.{key} at the column that holds the {key}",
                field=column,
            )
        out[key] = record[column]
    if "system" not in columns:
        return out
    system = out.pop("system")
    if system is not None and not isinstance(system, str):
        raise place.error(
            f"the system prompt has type {type(system).__name__}, expected a string",
            fix="store the system prompt as text (or leave it empty)",
            field=columns["system"],
        )
    prompt = out.get("prompt")
    if prompt is None and system and system.strip():
        raise place.error(
            "columns.system gives a system prompt but the row has no prompt to put it before",
            fix="give the rows a prompt column (columns.prompt), or drop columns.system",
            field=columns["system"],
        )
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    if isinstance(prompt, list) and system and system.strip():
        if prompt and isinstance(prompt[0], dict) and prompt[0].get("role") == "system":
            raise place.error(
                "the prompt has a system message of its own and columns.system gives another",
                fix="drop columns.system for this source, or the prompt's system message",
                field=columns["system"],
            )
        prompt = [{"role": "system", "content": system}, *prompt]
    out["prompt"] = prompt
    return out


def _json_type(value: Any) -> str:
    if isinstance(value, dict):
        return "object"
    if isinstance(value, list):
        return "array"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    return "null" if value is None else type(value).__name__


# ---------------------------------------------------------------------------------------------
# Row validation
# ---------------------------------------------------------------------------------------------

_SHAPE_HINT = 'a non-empty string or a list of {"role": str, "content": str} messages'


def _normalize_row(
    record: dict, place: _Place, columns: dict[str, str] | None = None
) -> tuple[Field, Field, Field, dict[str, Any]]:
    """Validate one row and return (prompt, chosen, rejected, template inputs): the fields all
    strings or all messages; the inputs (``tools``, ``chat_template_kwargs``, those not null)
    of a conversational row, else empty."""
    columns = columns or {}
    if columns:
        record = _apply_columns(record, place, columns)
    inputs = record  # the template inputs, before an implicit prompt makes a new record
    if record.get("prompt") is None and "chosen" in record and "rejected" in record:
        # no prompt field (or a null one: a columnar read gives None to a row without the
        # field when other rows have it)
        record = _split_implicit_prompt(record, place)
    values = {field: _check_field(record, field, place) for field in FIELDS}
    prompt, chosen, rejected = values["prompt"], values["chosen"], values["rejected"]
    if isinstance(prompt, str) and isinstance(chosen, str) and isinstance(rejected, str):
        return prompt, chosen, rejected, {}

    prompt_msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    if not any(_says_something(m) for m in prompt_msgs):
        raise place.error(
            "every prompt message has empty content",
            fix="give the prompt at least one non-empty message",
            field="prompt",
        )
    completions = []
    for field, value in (("chosen", chosen), ("rejected", rejected)):
        if isinstance(value, str):
            completions.append([{"role": "assistant", "content": value}])
            continue
        n = len(prompt_msgs)
        if len(value) >= n and value[:n] == prompt_msgs:
            value = value[n:]  # full conversation: the prompt turns are repeated first
        if not value or not any(_says_something(m) for m in value):
            raise place.error(
                "the completion is empty (no message with content beyond the prompt)",
                fix=f"give {field} a non-empty assistant message, or remove the row",
                field=field,
            )
        if value[-1]["role"] != "assistant":
            raise place.error(
                f"the last completion message has role {value[-1]['role']!r}, not 'assistant'",
                fix=f"end {field} with the assistant's answer",
                field=field,
            )
        completions.append(value)
    return prompt_msgs, completions[0], completions[1], _render_inputs(inputs, place, columns)


def _json_text(value: Any, column: str, place: _Place) -> Any:
    """A template input given as JSON text, parsed (empty text: None); other values as they are."""
    if not isinstance(value, str):
        return value
    if not value.strip():
        return None
    try:
        return json.loads(value)
    except json.JSONDecodeError as exc:
        raise place.error(
            f"the text is not valid JSON ({exc.msg} at column {exc.colno})",
            fix=f"store {column} as JSON (or as a JSON value, not text), or leave it null",
            field=column,
        ) from None


def _has_render_inputs(record: dict, columns: dict[str, str]) -> bool:
    """Whether the raw record holds a tools or chat_template_kwargs value (not null/empty)."""
    for key in RENDER_FIELDS:
        value = record.get(columns.get(key, key))
        if value is not None and not (isinstance(value, str) and not value.strip()):
            return True
    return False


def _render_inputs(record: dict, place: _Place, columns: dict[str, str]) -> dict[str, Any]:
    """The row's ``tools`` and ``chat_template_kwargs``, validated (module docstring); a null
    one is left out. Errors name the data set's column."""
    out: dict[str, Any] = {}
    column = columns.get("tools", "tools")
    tools = _json_text(record.get("tools"), column, place)
    if tools is not None:
        schema_fix = (
            f'give {column} a list of tool JSON schemas, e.g. [{{"type": "function", '
            '"function": {"name": ..., "description": ..., "parameters": {...}}}], or null'
        )
        if not isinstance(tools, list | tuple):
            raise place.error(
                f"has type {_json_type(tools)}, expected a list of tool JSON schemas",
                fix=schema_fix,
                field=column,
            )
        for i, tool in enumerate(tools):
            if not isinstance(tool, dict):
                raise place.error(
                    f"tool {i} has type {_json_type(tool)}, expected a JSON schema object",
                    fix=schema_fix,
                    field=column,
                )
        out["tools"] = list(tools)
    column = columns.get("chat_template_kwargs", "chat_template_kwargs")
    kwargs = _json_text(record.get("chat_template_kwargs"), column, place)
    if kwargs is not None:
        if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
            kind = "object with non-text keys" if isinstance(kwargs, dict) else _json_type(kwargs)
            raise place.error(
                f"has type {kind}, expected an object of template variables",
                fix=f'give {column} an object such as {{"enable_thinking": false}}, or null',
                field=column,
            )
        reserved = sorted(RESERVED_TEMPLATE_VARIABLES.intersection(kwargs))
        if reserved:
            raise place.error(
                f"sets {', '.join(repr(k) for k in reserved)}, which the chat template rendering "
                "sets itself",
                fix="remove those keys (tools go in the tools column; messages and "
                "add_generation_prompt come from prompt, chosen and rejected)",
                field=column,
            )
        out["chat_template_kwargs"] = dict(kwargs)
    return out


def _columns_fix(field: str, column: str) -> str:
    """How to read ``field`` from a row's ``column`` (the source's columns map)."""
    return (
        f'name it in the source\'s table, columns = {{ {field} = "{column}" }} '
        f"(sdpo score: --columns {field}={column})"
    )


def _split_implicit_prompt(record: dict, place: _Place) -> dict:
    """A row without a ``prompt``: the shared beginning of ``chosen`` and ``rejected`` becomes
    the prompt (see the module docstring). Returns a new record; the fields are checked after."""
    chosen = _check_field(record, "chosen", place)
    rejected = _check_field(record, "rejected", place)
    fix = (
        "add a 'prompt' field, or give chosen and rejected the same beginning (the prompt) "
        "followed by the two answers"
    )
    others = [k for k in record if k not in FIELDS and isinstance(record[k], (str, list))]
    if others:  # the prompt under another name ("question", "instruction", ...)
        fix += (
            f"; this row also has {', '.join(repr(k) for k in others[:5])}: if one of them is "
            f"the prompt, {_columns_fix('prompt', others[0])}"
        )
    if isinstance(chosen, str) and isinstance(rejected, str):
        n = _shared_length(chosen, rejected)
        # TRL's cut: where the texts part, one space back, so the answers start with it. But
        # never inside a word: a difference within a word (or one text ending inside the
        # other's) moves the cut back to that word's start first (identical texts too: the
        # identical-pair policy then decides)
        cut = n
        word_start = n < min(len(chosen), len(rejected)) and n > 0 and chosen[n - 1].isspace()
        if not word_start:
            while cut > 0 and not chosen[cut - 1].isspace():
                cut -= 1
        if cut > 0 and chosen[cut - 1] == " ":
            cut -= 1
        if cut <= 0 or not chosen[:cut].strip():
            raise place.error(
                "there is no prompt (the field is missing or null) and chosen and rejected "
                "share no leading text to take as the prompt",
                fix=fix,
                field="prompt",
            )
        return {"prompt": chosen[:cut], "chosen": chosen[cut:], "rejected": rejected[cut:]}
    if isinstance(chosen, list) and isinstance(rejected, list):
        n = _shared_length(chosen, rejected)
        if n == len(chosen) == len(rejected):
            n -= 1  # identical conversations: the last message is the (same) answer
        if n <= 0:
            raise place.error(
                "there is no prompt (the field is missing or null) and chosen and rejected "
                "share no leading message to take as the prompt",
                fix=fix,
                field="prompt",
            )
        return {"prompt": chosen[:n], "chosen": chosen[n:], "rejected": rejected[n:]}
    raise place.error(
        "there is no prompt (the field is missing or null), and chosen and rejected are not "
        "both texts or both message lists, so no shared prompt can be taken from them",
        fix=fix,
        field="prompt",
    )


def _shared_length(a: Sequence, b: Sequence) -> int:
    """How many leading items ``a`` and ``b`` have in common.

    A binary search over prefix comparisons, each done in C (not a Python loop over the
    characters of long conversations)."""
    lo, hi = 0, min(len(a), len(b))  # a[:lo] == b[:lo]; they part at or before hi
    if a[:hi] == b[:hi]:
        return hi
    while hi - lo > 1:  # a[:hi] != b[:hi]
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


def _check_field(record: dict, field: str, place: _Place) -> Field:
    if field not in record:
        present = ", ".join(sorted(map(str, record))) or "none"
        fix = f"give every row a {field!r} field: {_SHAPE_HINT}"
        # the field under another name ("rejected_response", a misspelling): the columns map
        others = [
            str(k)
            for k, v in record.items()
            if k not in (*FIELDS, *RENDER_FIELDS) and isinstance(v, str | list)
        ]
        close = [k for k in others if field in k.lower()] or difflib.get_close_matches(
            field, others, n=1, cutoff=0.6
        )
        if close:
            what = "prompt" if field == "prompt" else f"{field} completion"
            fix += f"; if {close[0]!r} holds the {what}, {_columns_fix(field, close[0])}"
        raise place.error(f"the field is missing (fields present: {present})", fix=fix, field=field)
    value = record[field]
    if isinstance(value, str):
        if not value.strip():
            what = "prompt" if field == "prompt" else "completion"
            raise place.error(
                f"the {what} is empty (or only whitespace)",
                fix=f"give {field} non-empty text, or remove the row",
                field=field,
            )
        _check_unicode(value, field, place, what="the text")
        return value
    if isinstance(value, list | tuple):
        return _check_messages(value, field, place)
    shown = repr(value)
    shown = shown if len(shown) <= 40 else shown[:37] + "..."
    kind = "null" if value is None else type(value).__name__
    raise place.error(
        f"has type {kind} ({shown}), expected {_SHAPE_HINT}",
        fix=f"store {field} as text (quote numbers) or as chat messages",
        field=field,
    )


def _check_unicode(text: str, field: str, place: _Place, *, what: str) -> None:
    # JSON can spell a lone UTF-16 surrogate ("\\ud800"); Python keeps it, but it is not Unicode
    # and tokenizers cannot take it. An ASCII text (a flag CPython keeps: no scan) has none
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise place.error(
            f"{what} holds a lone UTF-16 surrogate {text[exc.start]!r} at character {exc.start}, "
            "which is not valid Unicode",
            fix="fix the \\uXXXX escape in the file (surrogates must come in pairs)",
            field=field,
        ) from None


def _says_something(message: dict) -> bool:
    """The message has text or calls a tool (an assistant turn of tool calls alone)."""
    return bool(message.get("content", "").strip() or message.get("tool_calls"))


def _check_messages(value: list | tuple, field: str, place: _Place) -> list[Message]:
    if not value:
        raise place.error(
            "the message list is empty",
            fix=f"give {field} at least one message, or remove the row",
            field=field,
        )
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise place.error(
                f"message {i} has type {type(message).__name__}, expected an object with "
                "'role' and 'content'",
                fix=f'write each message of {field} as {{"role": ..., "content": ...}}',
                field=field,
            )
        calls = message.get("tool_calls")
        for key in ("role", "content"):
            item = message.get(key)
            if key == "content" and item is None and isinstance(calls, list) and calls:
                continue  # a tool call without text: transformers drops the null
            if not isinstance(item, str):
                kind = "missing" if key not in message else f"of type {type(item).__name__}"
                raise place.error(
                    f"message {i} has '{key}' {kind}, expected a string",
                    fix=f"give every message of {field} a string '{key}'"
                    + (
                        " (an assistant turn that calls tools may have a null 'content' beside "
                        "a non-empty 'tool_calls' list)"
                        if key == "content"
                        else ""
                    ),
                    field=field,
                )
            _check_unicode(item, field, place, what=f"message {i} '{key}'")
        if not message["role"].strip():
            raise place.error(
                f"message {i} has an empty role",
                fix="use roles such as 'system', 'user' and 'assistant'",
                field=field,
            )
        # keep extra keys a chat template may use; drop the None that datasets fills in for keys
        # absent from some rows
        messages.append({k: v for k, v in message.items() if v is not None})
    return messages
