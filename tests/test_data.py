"""Reading preference data: every format loads the same rows, and every kind of bad row gives a
DataError naming the file, the row and the field."""

from __future__ import annotations

import json
import os
import pickle
import tempfile
import warnings
from pathlib import Path

import datasets
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from sdpo.engine.data import DataError, DataWarning, read_preference_file

ROWS = [
    {"prompt": "what is two plus two", "chosen": "four", "rejected": "five", "id": 1},
    {"prompt": "name a colour", "chosen": "blue", "rejected": "seven", "id": 2},
    {"prompt": "say hi", "chosen": "hi there", "rejected": "no", "id": 3},
]


def write_jsonl(path: Path, rows: list, *, blank_after: int | None = None) -> Path:
    lines = [json.dumps(r) for r in rows]
    if blank_after is not None:
        lines.insert(blank_after, "")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_rows(tmp_path: Path, stem: str, rows: list, fmt: str) -> Path:
    """``rows`` as ``stem.<fmt>`` (jsonl, parquet or csv) under ``tmp_path``."""
    if fmt == "jsonl":
        return write_jsonl(tmp_path / f"{stem}.jsonl", rows)
    path = tmp_path / f"{stem}.{fmt}"
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(path)) if fmt == "parquet" else ds.to_csv(str(path), index=False)
    return path


def triple(row: dict) -> tuple:
    return row["prompt"], row["chosen"], row["rejected"]


@pytest.mark.parametrize("fmt", ["jsonl", "json_array", "json_lines", "parquet", "csv"])
def test_every_format_loads_the_same_rows(tmp_path, fmt):
    if fmt == "jsonl":
        path = write_jsonl(tmp_path / "pairs.jsonl", ROWS)
    elif fmt == "json_array":
        path = tmp_path / "pairs.json"
        path.write_text(json.dumps(ROWS, indent=1), encoding="utf-8")
    elif fmt == "json_lines":
        path = write_jsonl(tmp_path / "pairs.json", ROWS)
    elif fmt == "parquet":
        path = tmp_path / "pairs.parquet"
        datasets.Dataset.from_list(ROWS).to_parquet(str(path))
    else:
        path = tmp_path / "pairs.csv"
        datasets.Dataset.from_list(ROWS).to_csv(str(path), index=False)
    before = sorted(os.listdir(tmp_path))
    rows = read_preference_file(path)
    assert [triple(r) for r in rows] == [triple(r) for r in ROWS]
    assert {r["source"] for r in rows} == {"pairs"}
    assert all(r["file"] == str(path) for r in rows)
    line_based = fmt in ("jsonl", "json_lines")
    assert [r["row"] for r in rows] == ([1, 2, 3] if line_based else [0, 1, 2])
    assert {r["row_label"] for r in rows} == {"line" if line_based else "row"}
    assert sorted(os.listdir(tmp_path)) == before  # no cache files next to the data


def test_a_data_set_folder_loads_by_split_like_a_hub_download(tmp_path):
    """The layout a hub download leaves: data files named by split, read offline."""
    folder = tmp_path / "ufb_local"
    (folder / "data").mkdir(parents=True)
    datasets.Dataset.from_list(ROWS).to_parquet(
        str(folder / "data" / "train-00000-of-00001.parquet")
    )
    held = [dict(ROWS[0], chosen="4")]
    datasets.Dataset.from_list(held).to_parquet(
        str(folder / "data" / "test-00000-of-00001.parquet")
    )
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    rows = read_preference_file(folder)
    assert [triple(r) for r in rows] == [triple(r) for r in ROWS]
    assert {r["source"] for r in rows} == {"ufb_local"} and [r["row"] for r in rows] == [0, 1, 2]
    assert [triple(r) for r in read_preference_file(folder, split="test")] == [triple(held[0])]
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # no cache
    with pytest.raises(DataError, match=r"ufb_local.*split 'validation'.*named by split"):
        read_preference_file(folder, split="validation")


def _two_subsets(folder: Path, *, readme: bool) -> dict[str, list[dict]]:
    """A data set folder with subsets "easy" and "hard" (a sub-folder each, with train and test
    files), named in a README.md ``configs`` header when ``readme``."""
    made = {}
    for sub in ("easy", "hard"):
        (folder / sub).mkdir(parents=True)
        for split in ("train", "test"):
            rows = [dict(ROWS[0], prompt=f"{sub} {split} {i}") for i in range(2)]
            (folder / sub / f"{split}.jsonl").write_text(
                "".join(json.dumps(r) + "\n" for r in rows)
            )
            made[f"{sub}/{split}"] = rows
    if readme:
        header = "".join(
            f"- config_name: {sub}\n  data_files:\n"
            + "".join(f"  - split: {sp}\n    path: {sub}/{sp}.jsonl\n" for sp in ("train", "test"))
            for sub in ("easy", "hard")
        )
        (folder / "README.md").write_text(f"---\nconfigs:\n{header}---\n# pairs\n")
    return made


@pytest.mark.parametrize("readme", [True, False], ids=["readme_configs", "sub_folders"])
def test_a_data_set_folder_with_two_subsets_is_read_at_the_source_s_subset(tmp_path, readme):
    folder = tmp_path / "two"
    made = _two_subsets(folder, readme=readme)
    for sub in ("easy", "hard"):
        for split in ("train", "test"):
            rows = read_preference_file(folder, subset=sub, split=split)
            assert [r["prompt"] for r in rows] == [r["prompt"] for r in made[f"{sub}/{split}"]]
    listed = (
        "the subsets its README.md names: easy, hard" if readme else "its sub-folders: easy, hard"
    )
    with pytest.raises(DataError, match=rf"two: has no subset 'medium' \({listed}\).*--subset"):
        read_preference_file(folder, subset="medium")
    jsonl = folder / "easy" / "train.jsonl"
    with pytest.raises(DataError, match=r"train.jsonl: subset 'easy' was asked of a data file"):
        read_preference_file(jsonl, subset="easy")


def test_a_split_other_than_train_of_one_file_or_saved_data_set_is_an_error(tmp_path):
    """A file (or a saved ``Dataset``) is one split, "train" as datasets names it: another split
    was ignored, the whole file read; now it is an error naming the file and the split."""
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    parquet = tmp_path / "pairs.parquet"
    datasets.Dataset.from_list(ROWS).to_parquet(str(parquet))
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "saved"))
    for path in (jsonl, parquet, tmp_path / "saved"):
        assert len(read_preference_file(path, split="train")) == 3
        with pytest.raises(DataError, match=rf"{path.name}.*split 'test'.*one split.*--split"):
            read_preference_file(path, split="test")


def test_a_folder_written_by_save_to_disk_loads_as_a_data_set_or_a_dict_by_split(tmp_path):
    """TRL users keep preprocessed data with ``save_to_disk``, which ``load_dataset`` refuses."""
    conversational = [
        {
            "chosen": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"},
            ],
            "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "go"}],
        }
    ]
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "pairs_saved"))
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(conversational),
            "test": datasets.Dataset.from_list(ROWS[:1]),
        }
    ).save_to_disk(str(tmp_path / "dict_saved"))
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    rows = read_preference_file(tmp_path / "pairs_saved")
    assert [triple(r) for r in rows] == [triple(r) for r in ROWS]
    assert {r["source"] for r in rows} == {"pairs_saved"} and [r["row"] for r in rows] == [0, 1, 2]
    (row,) = read_preference_file(tmp_path / "dict_saved")  # the train split, implicit prompt
    assert triple(row) == (
        [{"role": "user", "content": "hi"}],
        [{"role": "assistant", "content": "hello"}],
        [{"role": "assistant", "content": "go"}],
    )
    test = read_preference_file(tmp_path / "dict_saved", split="test")
    assert [triple(r) for r in test] == [triple(ROWS[0])]
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # no cache
    with pytest.raises(DataError, match=r"dict_saved.*no split 'validation' \(splits: train, test"):
        read_preference_file(tmp_path / "dict_saved", split="validation")


# Tricky text as a JSON lines file spells it (CRLF line ends, escapes, a duplicate key, raw
# U+2028 and U+0085, which are line breaks to str.splitlines but not to JSON lines, a blank CRLF
# line and a last line of spaces), and the rows it holds.
TRICKY_PLAIN = (
    '{"prompt": "caf\\u00e9 \\ud83d\\ude00 a\\nb", "chosen": " tab\\tand \\"quote\\"", '
    '"rejected": "東京\u2028\u0085x"}\r\n'
    '{"prompt": "first", "chosen": "c", "rejected": "r", "prompt": "last wins"}\r\n'
    "\r\n"
    '  {"prompt": "back\\\\nslash", "chosen": "c\\\\u00e9", "rejected": "ok\\r\\n"}  \r\n'
    "   "
)
TRICKY_PLAIN_ROWS = [
    {"prompt": "café 😀 a\nb", "chosen": ' tab\tand "quote"', "rejected": "東京\u2028\u0085x"},
    {"prompt": "last wins", "chosen": "c", "rejected": "r"},
    {"prompt": "back\\nslash", "chosen": "c\\u00e9", "rejected": "ok\r\n"},
]
TRICKY_CHAT = (
    '{"prompt": [{"role": "system", "content": ""}, {"role": "user", "content": "hi\\r\\nthere", '
    '"name": ""}], "chosen": [{"role": "assistant", "content": "\\ud83d\\ude00"}], '
    '"rejected": [{"role": "assistant", "content": "no", "content": "\u2028no"}]}\r\n'
    "\r\n"
)
TRICKY_CHAT_ROWS = [
    {
        "prompt": [
            {"role": "system", "content": ""},
            {"role": "user", "content": "hi\r\nthere", "name": ""},
        ],
        "chosen": [{"role": "assistant", "content": "😀"}],
        "rejected": [{"role": "assistant", "content": "\u2028no"}],
    }
]


@pytest.mark.parametrize(
    ("text", "expected"), [(TRICKY_PLAIN, TRICKY_PLAIN_ROWS), (TRICKY_CHAT, TRICKY_CHAT_ROWS)]
)
def test_tricky_text_loads_the_same_rows_from_every_format(tmp_path, text, expected):
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_bytes(text.encode("utf-8"))
    array = tmp_path / "t.json"
    array.write_text(json.dumps(expected, ensure_ascii=False, indent=1), encoding="utf-8")
    datasets.Dataset.from_list(expected).to_parquet(str(tmp_path / "t.parquet"))
    datasets.Dataset.from_list(expected).save_to_disk(str(tmp_path / "saved"))
    lines = [i + 1 for i, line in enumerate(text.split("\n")) if line.strip()]
    for path in (jsonl, array, tmp_path / "t.parquet", tmp_path / "saved"):
        rows = read_preference_file(path)
        assert [triple(r) for r in rows] == [triple(r) for r in expected], path
        rows_of = lines if path == jsonl else list(range(len(expected)))
        assert [r["row"] for r in rows] == rows_of, path


def test_message_keys_that_differ_late_in_a_big_file_load_as_written(tmp_path):
    """Rows far into a file (past the blocks a columnar reader infers one schema from) keep
    their messages' keys as written: none added as null, none refused for its type."""
    user = {"role": "user", "content": "q"}

    def row(**answer) -> dict:
        return {
            "prompt": [user],
            "chosen": [{"role": "assistant", "content": "yes " * 1000, **answer}],
            "rejected": [{"role": "assistant", "content": "no"}],
        }

    call = {"type": "function", "function": {"name": "f", "arguments": {"city": "Paris"}}}
    late = [
        row(tool_calls=[{"function": {"name": "g", "arguments": {"city": "Rome"}}}]),
        row(tool_calls=[call], weight=1.5),
        row(tool_calls=[call], weight="heavy", name="bob"),
    ]
    rows = [row(tool_calls=[call], weight=1)] * 3000 + late
    path = tmp_path / "big.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    got = read_preference_file(path)
    assert [r["chosen"] for r in got[-4:]] == [r["chosen"] for r in rows[-4:]]


def test_jsonl_rows_keep_their_line_numbers_across_blank_lines_and_source_override(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS, blank_after=1)
    rows = read_preference_file(path, source="openorca")
    assert [r["row"] for r in rows] == [1, 3, 4]
    assert {r["source"] for r in rows} == {"openorca"}


def test_csv_keeps_cells_as_text(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('prompt,chosen,rejected\n"2 + 2 = ?",4,NA\n', encoding="utf-8")
    rows = read_preference_file(path)
    assert triple(rows[0]) == ("2 + 2 = ?", "4", "NA")


def test_conversational_rows_are_normalised_to_messages(tmp_path):
    user = {"role": "user", "content": "hello"}
    rows = [
        # full-conversation completions repeating a string prompt
        {
            "prompt": "hello",
            "chosen": [user, {"role": "assistant", "content": "hi"}],
            "rejected": [user, {"role": "assistant", "content": "go away"}],
        },
        # message prompt, string completions
        {
            "prompt": [{"role": "system", "content": "be kind"}, user],
            "chosen": "hi",
            "rejected": "no",
        },
    ]
    got = read_preference_file(write_jsonl(tmp_path / "c.jsonl", rows))
    assert got[0]["prompt"] == [user]
    assert got[0]["chosen"] == [{"role": "assistant", "content": "hi"}]
    assert got[0]["rejected"] == [{"role": "assistant", "content": "go away"}]
    assert got[1]["prompt"] == rows[1]["prompt"]
    assert got[1]["chosen"] == [{"role": "assistant", "content": "hi"}]
    assert got[1]["rejected"] == [{"role": "assistant", "content": "no"}]


def assert_error(info, *, file: Path, row: int, field: str | None, label: str, words: list[str]):
    err = info.value
    msg = str(err)
    assert err.file == str(file) and err.row == row and err.field == field, msg
    assert str(file) in msg and "Fix:" in msg, msg
    assert (f"line {row}" if label == "line" else f"row {row} (0-based") in msg, msg
    if field is not None:
        assert f"field '{field}'" in msg, msg
    for word in words:
        assert word in msg, msg


BAD_ROWS = [
    ({"prompt": "p", "chosen": "c"}, "rejected", ["missing", "fields present: chosen, prompt"]),
    ({"prompt": "p", "chosen": 42, "rejected": "r"}, "chosen", ["int", "42"]),
    ({"prompt": "p", "chosen": "c", "rejected": None}, "rejected", ["null"]),
    ({"prompt": "p", "chosen": {"a": 1}, "rejected": "r"}, "chosen", ["dict"]),
    ({"prompt": "p", "chosen": "", "rejected": "r"}, "chosen", ["completion is empty"]),
    ({"prompt": "p", "chosen": "c", "rejected": "  \n"}, "rejected", ["completion is empty"]),
    ({"prompt": "", "chosen": "c", "rejected": "r"}, "prompt", ["prompt is empty"]),
    ({"prompt": "p", "chosen": [], "rejected": "r"}, "chosen", ["message list is empty"]),
    ({"prompt": "p", "chosen": ["x"], "rejected": "r"}, "chosen", ["message 0", "str"]),
    (
        {"prompt": "p", "chosen": [{"role": "assistant"}], "rejected": "r"},
        "chosen",
        ["'content' missing"],
    ),
    (
        {"prompt": "p", "chosen": "c", "rejected": [{"role": "assistant", "content": 3}]},
        "rejected",
        ["'content' of type int"],
    ),
    (
        {
            "prompt": [{"role": "user", "content": "p"}],
            "chosen": [{"role": "user", "content": "p"}],
            "rejected": "r",
        },
        "chosen",
        ["completion is empty"],
    ),
    (
        {"prompt": "p", "chosen": [{"role": "assistant", "content": " "}], "rejected": "r"},
        "chosen",
        ["completion is empty"],
    ),
    (
        {"prompt": "p", "chosen": [{"role": "user", "content": "q"}], "rejected": "r"},
        "chosen",
        ["role 'user'", "assistant"],
    ),
    (
        {"prompt": [{"role": "", "content": "p"}], "chosen": "c", "rejected": "r"},
        "prompt",
        ["empty role"],
    ),
]


@pytest.mark.parametrize(("bad", "field", "words"), BAD_ROWS)
def test_bad_row_in_jsonl_names_file_line_and_field(tmp_path, bad, field, words):
    path = write_jsonl(tmp_path / "bad.jsonl", [ROWS[0], bad, ROWS[1]], blank_after=1)
    with pytest.raises(DataError) as info:
        read_preference_file(path)
    assert_error(info, file=path, row=3, field=field, label="line", words=words)


def test_data_error_survives_pickling():
    err = DataError("bad", fix="do x", file="f.jsonl", row=3, field="chosen")
    back = pickle.loads(pickle.dumps(err))
    assert str(back) == str(err) == "f.jsonl, line 3, field 'chosen': bad. Fix: do x"
    assert (back.file, back.row, back.field, back.row_label) == ("f.jsonl", 3, "chosen", "line")


def test_bad_row_in_json_array_names_the_0_based_row(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([ROWS[0], ROWS[1], {"prompt": "p", "chosen": 1.5, "rejected": "r"}]))
    with pytest.raises(DataError) as info:
        read_preference_file(path)
    assert_error(info, file=path, row=2, field="chosen", label="row", words=["float"])


ARRAY_ROWS = [
    {"prompt": "caf\u00e9 \u6771\u4eac?", "chosen": " 12345", "rejected": " no \U0001f600"},
    {
        "prompt": [{"role": "user", "content": "hi", "weight": 12345.5e-1}],
        "chosen": [{"role": "assistant", "content": "yo", "n": -7}],
        "rejected": [{"role": "assistant", "content": "go away", "n": 1e3}],
        "chat_template_kwargs": {"budget": 4096, "on": True, "ratio": -0.125},
    },
    {"prompt": "p", "chosen": "c", "rejected": "r", "id": 98765432109876543210},
]


@pytest.mark.parametrize("read_bytes", [1, 3, 64])
def test_json_array_read_a_piece_at_a_time_gives_the_rows_of_its_json_lines_twin(
    tmp_path, monkeypatch, read_bytes
):
    """A JSON array is parsed an element at a time from text decoded a few bytes at a time here:
    characters of several bytes, numbers and values cut at any point give the rows (and
    template inputs) that the same records as JSON lines give."""
    import sdpo.engine.data as data_module

    monkeypatch.setattr(data_module, "_ARRAY_READ_BYTES", read_bytes, raising=False)
    array = tmp_path / "rows.json"
    array.write_text(
        "\n \t[ " + json.dumps(ARRAY_ROWS, ensure_ascii=False, indent=2)[1:] + " \r\n",
        encoding="utf-8",
    )
    lines = write_jsonl(tmp_path / "rows.jsonl", ARRAY_ROWS)
    keys = ("prompt", "chosen", "rejected", "chat_template_kwargs")
    got = [{k: r.get(k) for k in keys} for r in read_preference_file(array)]
    assert got == [{k: r.get(k) for k in keys} for r in read_preference_file(lines)]
    assert [r["row"] for r in read_preference_file(array)] == [0, 1, 2]


BAD_ROW = {"prompt": "p", "chosen": 1.5, "rejected": "r"}


@pytest.mark.parametrize(
    ("tail", "line", "words"),
    [
        (b',\n{"prompt": }\n]\n', 4, ["not valid JSON", "Expecting value"]),
        (b",\n1,\n]\n", 5, ["not valid JSON", "Expecting value"]),
        (b"\n]\n]\n", 5, ["not valid JSON", "Extra data"]),
        (b"\n", 4, ["not valid JSON", "Expecting ',' delimiter"]),
        (b',\n"caf\xe9"\n]\n', 4, ["byte 0xe9 on line 4 is not valid UTF-8"]),
        (b"\n]\n\xff", 5, ["byte 0xff on line 5 is not valid UTF-8"]),
    ],
    ids=["bad_value", "trailing_comma", "extra_data", "unclosed", "not_utf8", "not_utf8_after"],
)
def test_a_json_array_that_does_not_parse_reports_that_before_any_bad_row(
    tmp_path, monkeypatch, tail, line, words
):
    """As when the whole file was parsed before any row was checked: a syntax error or a byte
    that is not UTF-8 anywhere in the file is the error, not a bad row before it."""
    import sdpo.engine.data as data_module

    monkeypatch.setattr(data_module, "_ARRAY_READ_BYTES", 5, raising=False)
    path = tmp_path / "bad.json"
    head = "[\n" + ",\n".join(json.dumps(r) for r in (ROWS[0], BAD_ROW)) + "\n,"
    path.write_bytes(head[:-2].encode() + tail)
    with pytest.raises(DataError) as info:
        read_preference_file(path)
    assert_error(info, file=path, row=line, field=None, label="line", words=words)


def test_the_first_of_several_bad_rows_of_a_json_array_is_reported(tmp_path, monkeypatch):
    import sdpo.engine.data as data_module

    monkeypatch.setattr(data_module, "_ARRAY_READ_BYTES", 5, raising=False)
    path = tmp_path / "bad.json"
    rows = [ROWS[0], ROWS[1], [1, 2], BAD_ROW, ROWS[2]]
    path.write_text(json.dumps(rows, indent=1), encoding="utf-8")
    with pytest.raises(DataError) as info:
        read_preference_file(path)
    assert_error(info, file=path, row=2, field=None, label="row", words=["JSON array, not an"])


def test_non_string_field_in_parquet_names_the_0_based_row(tmp_path):
    path = tmp_path / "bad.parquet"
    datasets.Dataset.from_list(
        [
            {"prompt": "p", "chosen": "c", "rejected": "r"},
            {"prompt": "p", "chosen": "c", "rejected": None},
        ]
    ).to_parquet(str(path))
    with pytest.raises(DataError) as info:
        read_preference_file(path)
    assert_error(info, file=path, row=1, field="rejected", label="row", words=["null"])


def test_parquet_with_a_missing_column_names_the_field(tmp_path):
    path = tmp_path / "nocol.parquet"
    datasets.Dataset.from_list([{"prompt": "p", "chosen": "c"}]).to_parquet(str(path))
    with pytest.raises(DataError) as info:
        read_preference_file(path)
    assert_error(info, file=path, row=0, field="rejected", label="row", words=["missing"])


def test_empty_csv_cell_is_an_empty_completion(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("prompt,chosen,rejected\nhi,there,you\nhi,,you\n", encoding="utf-8")
    with pytest.raises(DataError) as info:
        read_preference_file(path)
    assert_error(info, file=path, row=1, field="chosen", label="row", words=["empty"])


def test_malformed_json_line_names_the_line_and_the_fix(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(ROWS[0]) + '\n{"prompt": "p", "chosen": "c",, }\n', encoding="utf-8")
    with pytest.raises(DataError) as info:
        read_preference_file(path)
    assert_error(
        info, file=path, row=2, field=None, label="line", words=["not valid JSON", "column"]
    )
    assert "fix or delete line 2" in str(info.value)


def test_malformed_json_array_names_the_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n{"prompt": "p", "chosen": "c", "rejected": "r"},\n{"prompt": }\n]')
    with pytest.raises(DataError) as info:
        read_preference_file(path)
    assert_error(info, file=path, row=3, field=None, label="line", words=["not valid JSON"])


def test_non_object_line_is_an_error(tmp_path):
    path = tmp_path / "list.jsonl"
    path.write_text(json.dumps(ROWS[0]) + '\n["p", "c", "r"]\n', encoding="utf-8")
    with pytest.raises(DataError) as info:
        read_preference_file(path)
    assert_error(
        info, file=path, row=2, field=None, label="line", words=["JSON array, not an object"]
    )
    assert "rename" not in str(info.value)  # not a file that is one array of rows


def test_a_jsonl_file_holding_one_json_array_of_rows_is_told_to_be_named_json(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(ROWS), encoding="utf-8")
    with pytest.raises(DataError) as info:
        read_preference_file(path)
    words = ["JSON array, not an object", "one JSON array of rows", "rename it to rows.json"]
    assert_error(info, file=path, row=1, field=None, label="line", words=words)
    path.rename(tmp_path / "rows.json")  # as the error says
    assert len(read_preference_file(tmp_path / "rows.json")) == len(ROWS)


@pytest.mark.parametrize(
    ("suffix", "layout", "read_bytes"),
    [
        (".json", "one_line", None),
        (".jsonl", "one_line", None),
        (".json", "indented", None),
        (".json", "indented", 7),  # its members read a few bytes at a time
        (".json", "too_long", None),  # one line past max_line_bytes
    ],
)
def test_rows_held_under_a_key_of_one_json_object_are_named_by_the_key(
    tmp_path, monkeypatch, suffix, layout, read_bytes
):
    """{"train": [...]} (a dict of splits dumped as is) is not read as one row lacking a
    prompt: the error names the file, the key holding the rows and what to write instead."""
    import sdpo.engine.data as data_module

    if read_bytes is not None:
        monkeypatch.setattr(data_module, "_ARRAY_READ_BYTES", read_bytes, raising=False)
    held = {"version": "1.0", "splits": {"n": 2}, "train": ARRAY_ROWS, "test": ROWS[:2]}
    path = tmp_path / f"pairs{suffix}"
    path.write_text(json.dumps(held, indent=2 if layout == "indented" else None) + "\n")
    with pytest.raises(DataError) as info:
        read_preference_file(path, max_line_bytes=64 if layout == "too_long" else 2**20)
    msg = str(info.value)
    assert info.value.file == str(path) and info.value.field == "train", msg
    assert f"{path}, field 'train': the file is one JSON object whose key 'train'" in msg
    assert f"holds a list of {len(ARRAY_ROWS)} rows ('test' holds 2)" in msg
    assert "json.dump(data['train'], f)" in msg and "one per line to a .jsonl file" in msg
    assert "missing" not in msg
    # as the error says: the list itself is read
    fixed = path.with_suffix(".json")
    fixed.write_text(json.dumps(held["train"]))
    assert len(read_preference_file(fixed)) == len(ARRAY_ROWS)


def test_a_row_with_a_list_of_objects_is_not_taken_for_rows_under_a_key(tmp_path):
    """A first row whose problem is its own (here a missing prompt; its tools a list of
    objects) keeps its error, one line or indented."""
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    row = {"chosen": "c", "rejected": "d", "tools": tools, "meta": [{"id": 1}]}
    for indent in (None, 2):
        path = tmp_path / "row.json"
        path.write_text(json.dumps({**row, "prompt": 3}, indent=indent))
        with pytest.raises(DataError) as info:
            read_preference_file(path)
        assert "one JSON object whose key" not in str(info.value), str(info.value)


def test_non_utf8_bytes_name_the_line_and_byte(tmp_path):
    path = tmp_path / "latin1.jsonl"
    bad = json.dumps({"prompt": "caf\u00e9", "chosen": "c", "rejected": "r"}, ensure_ascii=False)
    path.write_bytes((json.dumps(ROWS[0]) + "\n").encode() + bad.encode("latin-1") + b"\n")
    with pytest.raises(DataError) as info:
        read_preference_file(path)
    assert_error(info, file=path, row=2, field=None, label="line", words=["0xe9", "UTF-8"])


def test_lone_surrogate_escape_is_refused(tmp_path):
    path = tmp_path / "sur.jsonl"
    path.write_text(
        json.dumps(ROWS[0]) + '\n{"prompt": "a\\ud800b", "chosen": "c", "rejected": "r"}\n'
    )
    with pytest.raises(DataError) as info:
        read_preference_file(path)
    assert_error(info, file=path, row=2, field="prompt", label="line", words=["surrogate"])


def test_mixed_types_extra_columns_and_trailing_blank_lines_still_load(tmp_path):
    rows = [
        {"prompt": "p", "chosen": "c", "rejected": "r", "meta": 1},
        {"prompt": [{"role": "user", "content": "q"}], "chosen": "c", "rejected": "r", "meta": "x"},
        {"prompt": "p2", "chosen": "c", "rejected": "r", "meta": 2**70},
    ]
    path = write_jsonl(tmp_path / "mixed.jsonl", rows, blank_after=1)
    path.write_text(path.read_text() + "\n\n")
    got = read_preference_file(path)
    assert [r["row"] for r in got] == [1, 3, 4]
    assert got[1]["prompt"] == [{"role": "user", "content": "q"}]
    assert got[2]["prompt"] == "p2"  # each row is normalised on its own


def test_utf8_byte_order_mark_is_refused_with_a_fix(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(ROWS[0]).encode() + b"\n")
    with pytest.raises(DataError, match="byte-order mark"):
        read_preference_file(path)


def test_enormous_line_is_refused_without_reading_it_whole(tmp_path):
    path = tmp_path / "huge.jsonl"
    huge = {"prompt": "p" * 5000, "chosen": "c", "rejected": "r"}
    write_jsonl(path, [ROWS[0], huge])
    with pytest.raises(DataError) as info:
        read_preference_file(path, max_line_bytes=1000)
    assert_error(info, file=path, row=2, field=None, label="line", words=["longer than 1000 bytes"])
    assert len(read_preference_file(path)) == 2  # the default limit accepts it


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_data_set_is_an_error(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError) as info:
        read_preference_file(path)
    assert str(info.value).startswith(f"{path}: the data set is empty")


@pytest.mark.parametrize("suffix", ["parquet", "csv"])
def test_empty_table_is_an_error(tmp_path, suffix):
    path = tmp_path / f"empty.{suffix}"
    if suffix == "parquet":
        datasets.Dataset.from_list(ROWS).select([]).to_parquet(str(path))
    else:
        path.write_text("prompt,chosen,rejected\n", encoding="utf-8")
    with pytest.raises(DataError) as info:
        read_preference_file(path)
    assert str(info.value).startswith(f"{path}: the data set is empty")


def test_identical_pairs_warn_drop_or_error(tmp_path):
    same = {"prompt": "p", "chosen": "same", "rejected": "same"}
    path = write_jsonl(tmp_path / "id.jsonl", [ROWS[0], same, ROWS[1], same])
    with pytest.warns(DataWarning, match=r"2 pair\(s\) have chosen identical.*kept.*lines: 2, 4"):
        kept = read_preference_file(path)
    assert len(kept) == 4
    with pytest.warns(DataWarning, match=r"2 pair\(s\).*dropped") as caught:
        dropped = read_preference_file(path, identical="drop")
    assert [r["row"] for r in dropped] == [1, 3]
    assert caught[0].filename == __file__  # the warning points at the caller's line
    with pytest.raises(DataError) as info:
        read_preference_file(path, identical="error")
    assert_error(info, file=path, row=2, field="chosen", label="line", words=["identical", "drop"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning when nothing is identical
        read_preference_file(write_jsonl(tmp_path / "ok.jsonl", ROWS))


def test_a_json_file_s_malformed_rows_are_reported_before_its_identical_pairs(tmp_path):
    """Every line is checked before the identical-pair policy applies: a bad row late in the
    file is the error, though an earlier pair is identical under identical="error"."""
    same = {"prompt": "p", "chosen": "same", "rejected": "same"}
    bad = {"prompt": "p", "chosen": "c", "rejected": 7}
    path = write_jsonl(tmp_path / "order.jsonl", [same, *ROWS, bad])
    with pytest.raises(DataError) as info:
        read_preference_file(path, identical="error")
    assert_error(info, file=path, row=5, field="rejected", label="line", words=["int", "7"])


def test_unsupported_extension_and_missing_file(tmp_path):
    path = tmp_path / "pairs.txt"
    path.write_text("x")
    with pytest.raises(DataError, match=r"pairs.txt: unsupported file extension '.txt'"):
        read_preference_file(path)
    with pytest.raises(DataError, match="nope.jsonl: file not found") as e:
        read_preference_file(tmp_path / "nope.jsonl")
    assert "in a config file starts at that file's folder" in str(e.value)


def test_unknown_policy_is_refused(tmp_path):
    with pytest.raises(ValueError, match="identical must be one of"):
        read_preference_file(tmp_path / "x.jsonl", identical="ignore")


# Random rows: the reader returns a valid data set or raises DataError, never anything else.
_text = st.one_of(st.text(max_size=8), st.sampled_from(["", " ", "ok", "caf\u00e9"]))
_good_message = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "assistant", "system"]), "content": _text}
)
_message = st.one_of(
    _good_message,
    st.dictionaries(
        st.sampled_from(["role", "content", "name"]),
        st.one_of(_text, st.integers(), st.none()),
        max_size=3,
    ),
    st.integers(),
)
_value = st.one_of(
    _text,
    st.lists(_good_message, max_size=3),
    st.integers(),
    st.floats(allow_nan=False),
    st.none(),
    st.booleans(),
    st.lists(_message, max_size=3),
)
_row = st.one_of(
    st.fixed_dictionaries({"prompt": _value, "chosen": _value, "rejected": _value}),
    st.fixed_dictionaries(
        {"prompt": _text, "chosen": _text, "rejected": _text}, optional={"extra": _value}
    ),
    st.dictionaries(st.sampled_from(["prompt", "chosen", "rejected", "extra"]), _value, max_size=4),
    st.integers(),
)
_line = st.one_of(
    _row.map(lambda r: json.dumps(r).encode()),
    _row.map(lambda r: json.dumps(r, ensure_ascii=False).encode("utf-8", "surrogatepass")),
    st.sampled_from([b"", b"{bad", b"[1]"]),
    st.binary(max_size=6),
)
_good_value = st.one_of(
    st.text(min_size=1, max_size=8).filter(str.strip),
    st.lists(_good_message, min_size=1, max_size=2).map(
        lambda m: [*m, {"role": "assistant", "content": "x"}]
    ),
)
_good_line = st.fixed_dictionaries(
    {"prompt": _good_value, "chosen": _good_value, "rejected": _good_value},
    optional={"extra": _value},
).map(lambda r: json.dumps(r).encode())
_lines = st.one_of(
    st.lists(st.one_of(_good_line, st.just(b"")), max_size=5),
    st.lists(_line, max_size=5),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lines=_lines)
def test_random_jsonl_gives_valid_rows_or_data_error(lines):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "random.jsonl"
        path.write_bytes(b"\n".join(lines))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DataWarning)
                rows = read_preference_file(path)
        except DataError as err:
            assert str(path) in str(err)
            event(f"DataError: {err.problem[:30]}")
            return
    event("valid")
    assert rows
    for row in rows:
        values = triple(row)
        if all(isinstance(v, str) for v in values):
            assert all(v.strip() for v in values)
        else:
            for v in values:
                assert isinstance(v, list) and v
                assert all(isinstance(m["role"], str) and isinstance(m["content"], str) for m in v)
            assert row["chosen"][-1]["role"] == "assistant"


# -- implicit prompts: rows with chosen and rejected only ---------------------------------------
HH = [  # the "\n\nHuman: ...\n\nAssistant: ..." text layout
    {
        "chosen": "\n\nHuman: name a pet\n\nAssistant: The cat, mostly",
        "rejected": "\n\nHuman: name a pet\n\nAssistant: The car",
    },
    {  # one answer starts with the other: the cut still falls on whitespace
        "chosen": "\n\nHuman: yes?\n\nAssistant: yes",
        "rejected": "\n\nHuman: yes?\n\nAssistant: yes indeed",
    },
    {"chosen": "Q: two?\n\nfour", "rejected": "Q: two?\n\nfive"},  # parting inside a word
    {"chosen": "Q: one?\n\nyes", "rejected": "Q: one?\n\nno"},  # newlines stay in the prompt
    {"chosen": "Q:  a", "rejected": "Q:  b"},  # two spaces: one goes to the answers
]
CHAT = [
    {  # shared system + user + assistant + user turns; the last answers differ
        "chosen": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "a colour?"},
            {"role": "assistant", "content": "blue"},
        ],
        "rejected": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "a colour?"},
            {"role": "assistant", "content": "seven"},
        ],
    }
]


@settings(max_examples=300, deadline=None)
@given(
    shared=st.text(alphabet="ab \n", max_size=40),
    a=st.text(alphabet="ab \n", max_size=9),
    b=st.text(alphabet="ab \n", max_size=9),
)
def test_shared_beginning_length_equals_an_item_by_item_count(shared, a, b):
    from sdpo.engine.data import _shared_length

    def plain(x, y):  # the count, one item at a time
        n = 0
        while n < min(len(x), len(y)) and x[n] == y[n]:
            n += 1
        return n

    x, y = shared + a, shared + b
    assert _shared_length(x, y) == plain(x, y)
    # message lists: the same count over dicts
    xs = [{"role": "user", "content": c} for c in x]
    ys = [{"role": "user", "content": c} for c in y]
    assert _shared_length(xs, ys) == plain(xs, ys)


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "csv"])
def test_implicit_prompts_are_split_at_the_shared_beginning(tmp_path, fmt):
    path = write_rows(tmp_path, "hh", HH, fmt)
    rows = read_preference_file(path)
    assert [triple(r) for r in rows] == [
        ("\n\nHuman: name a pet\n\nAssistant: The", " cat, mostly", " car"),
        ("\n\nHuman: yes?\n\nAssistant:", " yes", " yes indeed"),
        ("Q: two?\n\n", "four", "five"),
        ("Q: one?\n\n", "yes", "no"),
        ("Q: ", " a", " b"),
    ]
    for row, raw in zip(rows, HH):  # nothing lost or added
        assert row["prompt"] + row["chosen"] == raw["chosen"]
        assert row["prompt"] + row["rejected"] == raw["rejected"]


def test_implicit_prompts_are_cut_where_trl_cuts_them_unless_inside_a_word(tmp_path):
    trl_data = pytest.importorskip("trl.data_utils")
    rows = read_preference_file(write_rows(tmp_path, "hh", HH, "jsonl"))
    kinds = []
    for row, raw in zip(rows, HH):
        theirs = trl_data.extract_prompt(dict(raw))
        inside_a_word = not theirs["prompt"][-1:].isspace() and not theirs["chosen"][:1].isspace()
        kinds.append(inside_a_word)
        if inside_a_word:  # TRL's cut splits a word ("...Assistant: The ca" + "t, mostly")
            assert triple(row) != (theirs["prompt"], theirs["chosen"], theirs["rejected"])
        else:
            assert triple(row) == (theirs["prompt"], theirs["chosen"], theirs["rejected"])
    assert sorted(set(kinds)) == [False, True]  # both kinds of row are here


def test_implicit_prompts_of_conversations_take_the_shared_turns(tmp_path):
    rows = read_preference_file(write_jsonl(tmp_path / "chat.jsonl", CHAT))
    assert rows[0]["prompt"] == CHAT[0]["chosen"][:4]
    assert rows[0]["chosen"] == [{"role": "assistant", "content": "blue"}]
    assert rows[0]["rejected"] == [{"role": "assistant", "content": "seven"}]
    # a row with a prompt next to implicit ones reads as before
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [ROWS[0], HH[0]])
    assert [triple(r) for r in read_preference_file(mixed)] == [
        triple(ROWS[0]),
        ("\n\nHuman: name a pet\n\nAssistant: The", " cat, mostly", " car"),
    ]


def test_identical_implicit_pairs_follow_the_identical_pair_policy(tmp_path):
    same_text = {"chosen": "Q: x?\n\nA: y", "rejected": "Q: x?\n\nA: y"}
    same_chat = {"chosen": CHAT[0]["chosen"], "rejected": CHAT[0]["chosen"]}
    path = write_jsonl(tmp_path / "same.jsonl", [same_text, same_chat, HH[0]])
    with pytest.warns(DataWarning, match="2 pair"):
        rows = read_preference_file(path, identical="drop")
    assert [r["row"] for r in rows] == [3]
    with pytest.raises(DataError) as info:
        read_preference_file(path, identical="error")
    assert_error(info, file=path, row=1, field="chosen", label="line", words=["identical"])


@pytest.mark.parametrize(
    "row, words",
    [
        ({"chosen": "cat", "rejected": "car"}, ["no prompt (the field is missing", "no leading"]),
        ({"chosen": " cat", "rejected": " car"}, ["no leading text"]),  # only whitespace shared
        (
            {"chosen": [{"role": "assistant", "content": "a"}], "rejected": CHAT[0]["rejected"]},
            ["no leading message"],
        ),
        ({"chosen": "text", "rejected": CHAT[0]["rejected"]}, ["not both texts"]),
        ({"prompt": None, "chosen": "cat", "rejected": "car"}, ["or null", "no leading text"]),
        (  # the prompt under another name: the column map is suggested
            {"question": "a pet?", "chosen": "cat", "rejected": "car"},
            ["this row also has 'question'", 'columns = { prompt = "question" }'],
        ),
    ],
)
def test_rows_without_a_shared_prompt_name_the_row_and_the_fix(tmp_path, row, words):
    path = write_jsonl(tmp_path / "bad.jsonl", [HH[0], row])
    with pytest.raises(DataError) as info:
        read_preference_file(path)
    assert_error(info, file=path, row=2, field="prompt", label="line", words=words)
    assert "add a 'prompt' field" in str(info.value)


@pytest.mark.parametrize(
    "row, field, suggested",
    [
        ({"prompt": "p", "chosen": "a", "rejectd": "b"}, "rejected", "rejectd"),  # a misspelling
        ({"prompt": "p", "chosen_response": "a", "rejected": "b"}, "chosen", "chosen_response"),
        ({"prompt": "p", "chosen": "a", "response_k": "b"}, "rejected", None),  # nothing close
    ],
)
def test_a_missing_field_suggests_the_column_map_for_a_column_named_like_it(
    tmp_path, row, field, suggested
):
    path = write_jsonl(tmp_path / "bad.jsonl", [ROWS[0], row])
    with pytest.raises(DataError) as info:
        read_preference_file(path)
    assert_error(info, file=path, row=2, field=field, label="line", words=["the field is missing"])
    hint = f'columns = {{ {field} = "{suggested}" }} (sdpo score: --columns {field}={suggested})'
    assert (hint in str(info.value)) == (suggested is not None), str(info.value)
    assert ("columns =" in str(info.value)) == (suggested is not None)


# -- column maps: data sets whose columns are named otherwise ------------------------------------
ORCA = [  # the layout of the OpenOrca DPO pairs the sDPO paper trains on first
    {"system": "You are helpful.", "question": "2 + 2?", "chosen": "4", "rejected": "5"},
    {"system": "", "question": "a colour?", "chosen": "blue", "rejected": "seven"},
]
ORCA_COLUMNS = {"prompt": "question", "system": "system"}


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "csv"])
def test_columns_rename_fields_and_fold_a_system_column_into_the_prompt(tmp_path, fmt):
    path = write_rows(tmp_path, "orca", ORCA, fmt)
    rows = read_preference_file(path, columns=ORCA_COLUMNS)
    assert rows[0]["prompt"] == [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "2 + 2?"},
    ]
    assert rows[0]["chosen"] == [{"role": "assistant", "content": "4"}]
    # an empty system prompt: no system message, the prompt is still a conversation
    assert rows[1]["prompt"] == [{"role": "user", "content": "a colour?"}]
    # renamed completions too, without a system column
    renamed = [{"q": r["question"], "good": r["chosen"], "bad": r["rejected"]} for r in ORCA]
    path2 = write_jsonl(tmp_path / "renamed.jsonl", renamed)
    rows2 = read_preference_file(
        path2, columns={"prompt": "q", "chosen": "good", "rejected": "bad"}
    )
    assert [triple(r) for r in rows2] == [("2 + 2?", "4", "5"), ("a colour?", "blue", "seven")]


def test_a_missing_mapped_column_names_the_column_and_the_setting(tmp_path):
    path = write_jsonl(tmp_path / "orca.jsonl", ORCA)
    with pytest.raises(DataError) as info:
        read_preference_file(path, columns={"prompt": "instruction"})
    assert_error(
        info, file=path, row=1, field="instruction", label="line",
        words=["'instruction' (the source's columns.prompt) is missing", "question"],
    )  # fmt: skip
    bad = write_jsonl(tmp_path / "sys.jsonl", [{**ORCA[0], "system": 3}])
    with pytest.raises(DataError) as info:
        read_preference_file(bad, columns=ORCA_COLUMNS)
    assert_error(info, file=bad, row=1, field="system", label="line", words=["type int"])
    with pytest.raises(ValueError, match="unknown field 'answer'"):
        read_preference_file(path, columns={"answer": "chosen"})


TOOL = {
    "type": "function",
    "function": {"name": "lookup", "parameters": {"type": "object", "required": ["q"]}},
}


def chat_row(**inputs) -> dict:
    return {
        "prompt": [{"role": "user", "content": "hi"}],
        "chosen": [{"role": "assistant", "content": "yes"}],
        "rejected": [{"role": "assistant", "content": "no"}],
        **inputs,
    }


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_tools_and_chat_template_kwargs_reach_conversational_rows(tmp_path, fmt):
    other = {"type": "function", "function": {"name": "add", "description": "sum"}}
    rows = [
        chat_row(tools=[TOOL], chat_template_kwargs={"enable_thinking": False}),
        chat_row(tools=json.dumps([other]), chat_template_kwargs=None),
        chat_row(tools=None, chat_template_kwargs='{"enable_thinking": true}'),
    ]
    if fmt == "parquet":  # one type per column: the template inputs as JSON text, as TRL reads
        rows = [
            {**r, "tools": json.dumps(r["tools"]) if isinstance(r["tools"], list) else r["tools"]}
            for r in rows
        ]
        rows[0]["chat_template_kwargs"] = json.dumps(rows[0]["chat_template_kwargs"])
    out = read_preference_file(write_rows(tmp_path, "c", rows, fmt))
    assert out[0]["tools"] == [TOOL] and out[0]["chat_template_kwargs"] == {
        "enable_thinking": False
    }
    # JSON values are read as written: no keys merged in from the other rows' objects
    assert out[1]["tools"] == [other] and "chat_template_kwargs" not in out[1]
    assert "tools" not in out[2] and out[2]["chat_template_kwargs"] == {"enable_thinking": True}


def test_template_inputs_are_read_through_the_column_map(tmp_path):
    row = chat_row(functions=[TOOL], options={"enable_thinking": False}, tools="not used")
    path = write_jsonl(tmp_path / "c.jsonl", [row])
    columns = {"tools": "functions", "chat_template_kwargs": "options"}
    (out,) = read_preference_file(path, columns=columns)
    assert out["tools"] == [TOOL] and out["chat_template_kwargs"] == {"enable_thinking": False}


@pytest.mark.parametrize(
    "inputs, field, words",
    [
        ({"tools": TOOL}, "tools", "has type object, expected a list of tool JSON schemas"),
        ({"tools": [TOOL, "lookup"]}, "tools", "tool 1 has type string"),
        ({"tools": "[{"}, "tools", "the text is not valid JSON"),
        (
            {"chat_template_kwargs": [1]},
            "chat_template_kwargs",
            "has type array, expected an object",
        ),
        (
            {"chat_template_kwargs": {"add_generation_prompt": True, "tools": []}},
            "chat_template_kwargs",
            "sets 'add_generation_prompt', 'tools', which the chat template rendering sets",
        ),
    ],
)
def test_bad_template_inputs_name_the_file_line_and_column(tmp_path, inputs, field, words):
    path = write_jsonl(tmp_path / "c.jsonl", [chat_row(), chat_row(**inputs)])
    with pytest.raises(DataError) as info:
        read_preference_file(path)
    assert f"c.jsonl, line 2, field '{field}': {words}" in str(info.value)


def test_template_inputs_of_plain_text_rows_are_ignored_with_a_warning(tmp_path):
    rows = [
        {"prompt": "a", "chosen": "b", "rejected": "c", "chat_template_kwargs": {"x": 1}},
        {"prompt": "a", "chosen": "b", "rejected": "d", "tools": None},
    ]
    with pytest.warns(DataWarning, match=r"1 plain-text row\(s\) have tools or chat_template_kw"):
        out = read_preference_file(write_jsonl(tmp_path / "p.jsonl", rows))
    assert all("tools" not in r and "chat_template_kwargs" not in r for r in out)


def test_a_hub_data_set_the_hub_cannot_serve_says_so_and_what_to_do(monkeypatch):
    import huggingface_hub

    # the hub client refuses every request, as without a network; datasets' own offline flag
    # decides which of the two messages applies
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError) as offline:
        read_preference_file("someorg/pairs", source="s")
    text = str(offline.value)
    assert "someorg/pairs: is not a local file" in text and "not in the datasets cache" in text
    assert "unset offline mode" in text and "save_to_disk(DIR)" in text
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)

    cached: list[dict] = []

    def load_dataset(*args, **kwargs):
        # found unreachable by one request, the hub is not asked again (datasets' lookup
        # retries for half a minute without a network): the cache is read in offline mode
        assert datasets.config.HF_HUB_OFFLINE and huggingface_hub.constants.HF_HUB_OFFLINE
        if not cached:
            raise FileNotFoundError("Dataset someorg/pairs is not cached")
        return datasets.Dataset.from_list(cached)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    with pytest.raises(DataError) as unreachable:
        read_preference_file("someorg/pairs", source="s")
    text = str(unreachable.value)
    assert "the hub cannot be reached" in text and "nor does the datasets cache hold" in text
    assert "offline mode is set" not in text and "save_to_disk(DIR)" in text
    assert not datasets.config.HF_HUB_OFFLINE  # the caller's setting back
    # a copy in the cache is read without a network, as datasets reads it after its retries
    cached.append({"prompt": "p", "chosen": "a", "rejected": "b"})
    rows = read_preference_file("someorg/pairs", source="s")
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in rows] == [("p", "a", "b")]


def test_a_missing_file_of_another_data_format_is_not_looked_up_on_the_hub(monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no hub, if asked
    for name in ("data/pairs.jsonl.gz", "pairs.txt"):
        with pytest.raises(DataError, match=r"file not found \(and a \.(gz|txt) file is not read"):
            read_preference_file(name, source="s")
