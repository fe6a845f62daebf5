"""The tokenized-data cache: a loaded cache equals tokenizing from scratch, any change to what
went into it (a data byte, a length setting) or to the file itself (a flipped byte) makes the
data be tokenized again, and a rerun of ``sdpo train`` tokenizes nothing yet ends the same."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer

import sdpo.runner as runner_mod
from sdpo.config import ColumnMap, DataSource, config_from_dict
from sdpo.engine.token_cache import (
    load_tokenized,
    pack_pairs,
    save_tokenized,
    token_cache_changes,
    token_cache_key,
    token_cache_path,
    unpack_pairs,
)
from sdpo.engine.tokenize import PairTokenizer, tokenize_pairs
from sdpo.runner import OutputDirError, load_pairs, run_training
from tests.conftest import WORDS, write_pairs


def _write_chat(path: Path, *, n: int, seed: int) -> Path:
    """``n`` conversational pairs: a user turn (sometimes after a system turn) and one
    assistant answer each for chosen and rejected."""
    rng = random.Random(seed)

    def text(lo: int, hi: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))

    rows = []
    for _ in range(n):
        prompt = [{"role": "user", "content": text(1, 7)}]
        if rng.random() < 0.4:
            prompt.insert(0, {"role": "system", "content": text(1, 3)})
        rows.append(
            {
                "prompt": prompt,
                "chosen": [{"role": "assistant", "content": text(1, 6)}],
                "rejected": [{"role": "assistant", "content": text(1, 6)}],
            }
        )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cfg(tmp_path: Path, model_dir: Path, *, max_length: int = 24, **data):
    strings = write_pairs(tmp_path / "strings.jsonl", n=13, seed=5)
    chat = _write_chat(tmp_path / "chat.jsonl", n=9, seed=6)
    return config_from_dict(
        {
            "output_dir": str(tmp_path / "run"),
            "model": {"path": str(model_dir)},
            "data": {
                "sources": [
                    {"name": "strings", "path": str(strings)},
                    {"name": "chat", "path": str(chat)},
                ],
                "max_length": max_length,
                "max_prompt_length": 12,
                **data,
            },
            "train": {"pairs_per_step": 4, "max_tokens_per_batch": 128, "log_every": 1},
            "kernels": {"impl": "torch"},
            "sdpo": {"steps": 2, "partition": "given", "report_scoring": False},
        }
    )


def _args(cfg) -> dict:
    d = cfg.data
    return {
        "tokenizer_dir": cfg.model.path,
        "max_length": d.max_length,
        "max_prompt_length": d.max_prompt_length,
        "truncation": d.truncation,
        "identical_pairs": d.identical_pairs,
        "vocab_size": 64,
        "context_length": 128,
        "tokenizer_fingerprint": PairTokenizer.from_dir(cfg.model.path).fingerprint,
    }


def _key(cfg, **change):
    return token_cache_key(cfg.data.sources, **{**_args(cfg), **change})


@pytest.fixture
def tokenize_calls(monkeypatch) -> list[int]:
    """Counts the runner's calls of the real ``tokenize_pairs``."""
    calls: list[int] = []
    real = runner_mod.tokenize_pairs

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(runner_mod, "tokenize_pairs", counting)
    return calls


def _load(cfg, cache: Path, places: dict[int, str] | None = None):
    tok = PairTokenizer.from_dir(cfg.model.path)
    return load_pairs(cfg, tok, vocab_size=64, context_length=128, places=places, cache_file=cache)


def test_loaded_cache_equals_tokenizing_from_scratch(tiny_model_dir, tmp_path, tokenize_calls):
    cfg = _cfg(tmp_path, tiny_model_dir, max_length=14)  # short: some pairs get truncated
    truth_places: dict[int, str] = {}
    truth = load_pairs(
        cfg, PairTokenizer.from_dir(tiny_model_dir), vocab_size=64, places=truth_places
    )
    assert any(p.truncated for p in truth) and not all(p.truncated for p in truth)
    assert {p.source for p in truth} == {"strings", "chat"}
    cache = token_cache_path(tmp_path / "cache", "train")

    first_places: dict[int, str] = {}
    first = _load(cfg, cache, first_places)  # tokenizes and writes the cache
    assert cache.is_file() and len(tokenize_calls) == 2
    places: dict[int, str] = {}
    again = _load(cfg, cache, places)
    assert len(tokenize_calls) == 2  # served from the cache
    assert again == first == truth  # ids, index, source, truncated: dataclass equality
    assert places == first_places == truth_places
    assert places[0].endswith("strings.jsonl line 1") and places[13].endswith("chat.jsonl line 1")

    # the stored stats are the ones tokenizing gives (the runner's log line depends on them)
    tok = PairTokenizer.from_dir(tiny_model_dir)
    key = _key(cfg)
    (pairs, _, stats), reason = load_tokenized(cache, key)
    assert reason == "ok"
    _, truth_stats = runner_mod.tokenize_pairs(
        [
            r
            for s in cfg.data.sources
            for r in runner_mod.read_preference_file(s.path, source=s.name)
        ],
        tok,
        max_length=14,
        max_prompt_length=12,
    )
    assert stats == truth_stats and stats.num_truncated > 0


def test_save_then_load_round_trips_arbitrary_pairs(tiny_model_dir, tmp_path):
    rng = random.Random(11)
    cfg = _cfg(tmp_path, tiny_model_dir)
    pairs = [
        runner_mod.TokenizedPair(
            index=i * 3 + 1,
            prompt_ids=[rng.randrange(2**31 - 1) for _ in range(rng.randint(1, 9))],
            chosen_ids=[rng.randrange(50_000) for _ in range(rng.randint(1, 7))],
            rejected_ids=[rng.randrange(50_000) for _ in range(rng.randint(0, 5))],
            source=rng.choice(["a", "b", "ü c"]),
            truncated=rng.random() < 0.5,
        )
        for i in range(17)
    ]
    places = {p.index: f"dir/ü {p.index}.jsonl line {p.index + 1}" for p in pairs}
    stats = runner_mod.TokenizeStats(num_pairs=17, num_truncated=5, max_sequence_length=31)
    key = _key(cfg)
    path = tmp_path / "t.safetensors"
    save_tokenized(path, pairs, places, stats, key)
    (got, got_places, got_stats), reason = load_tokenized(path, key)
    assert reason == "ok"
    assert got == pairs and got_places == places and got_stats == stats


def test_loaded_token_ids_equal_the_saved_ones_and_share_one_int_per_id(tmp_path):
    # vocabulary-sized ids (the path real data takes), odd lengths, an empty completion
    rng = random.Random(12)
    pairs = [
        runner_mod.TokenizedPair(
            index=i,
            prompt_ids=[rng.randrange(1000, 1200) for _ in range(rng.randint(1, 9))],
            chosen_ids=[rng.randrange(1000, 1200) for _ in range(rng.randint(1, 7))],
            rejected_ids=[rng.randrange(1000, 1200) for _ in range(rng.randint(0, 5))] + [0],
        )
        for i in range(301)
    ]
    stats = runner_mod.TokenizeStats(num_pairs=len(pairs))
    path = tmp_path / "t.safetensors"
    save_tokenized(path, pairs, {}, stats, {"k": 1})
    (got, _, _), reason = load_tokenized(path, {"k": 1})
    assert reason == "ok" and got == pairs
    assert all(type(t) is int for p in got for t in p.prompt_ids + p.chosen_ids)
    # a large data set's ids are kept as one int object per id value, not one per token
    objects = {id(t) for p in got for t in p.prompt_ids + p.chosen_ids + p.rejected_ids}
    values = {t for p in got for t in p.prompt_ids + p.chosen_ids + p.rejected_ids}
    assert len(objects) == len(values)


def test_packed_pairs_round_trip_exactly_through_tensors():
    # what a data parallel run sends from rank 0: odd lengths, empty prompts and completions,
    # ids across a 200k vocabulary, indices with gaps, sources in first-seen order
    rng = random.Random(13)
    vocab = 200_000
    pairs = [
        runner_mod.TokenizedPair(
            index=5 * i + rng.randrange(5),
            prompt_ids=[rng.randrange(vocab) for _ in range(rng.choice([0, 1, 3, 17]))],
            chosen_ids=[rng.randrange(vocab) for _ in range(rng.randint(0, 9))] + [vocab - 1],
            rejected_ids=[rng.randrange(vocab) for _ in range(rng.randint(0, 11))],
            source=rng.choice(["b", "a", "ü c"]),
            truncated=rng.random() < 0.3,
        )
        for i in range(257)
    ]
    places = {p.index: f"dir/ü {p.index}.jsonl line {p.index + 1}" for p in pairs}
    places[-1] = "a row that is no pair"
    arrays, names = pack_pairs(pairs, places)
    assert names == list(dict.fromkeys(p.source for p in pairs))
    assert arrays["prompt_ids"].dtype == np.int32 and arrays["prompt_offsets"].dtype == np.int64
    # received: a tensor of each array's dtype and shape, copied back to numpy
    received = {k: torch.from_numpy(a.copy()).numpy() for k, a in arrays.items()}
    got, got_places = unpack_pairs(received, names)
    assert got == pairs  # ids, order, index, source, truncated
    assert got_places == {p.index: places[p.index] for p in pairs}
    assert list(got_places) == [p.index for p in pairs]
    assert all(type(t) is int for p in got for t in p.prompt_ids + p.chosen_ids + p.rejected_ids)
    assert all(type(p.index) is int and type(p.truncated) is bool for p in got)
    assert unpack_pairs(*pack_pairs([], {})) == ([], {})


def test_editing_one_byte_of_a_data_file_invalidates_the_cache(
    tiny_model_dir, tmp_path, tokenize_calls, capsys
):
    cfg = _cfg(tmp_path, tiny_model_dir)
    cache = token_cache_path(tmp_path / "cache", "train")
    before = _load(cfg, cache)
    chat = Path(cfg.data.sources[1].path)
    data = chat.read_bytes()
    at = data.index(b'"content": "w') + len('"content": "w')
    digit = b"1" if data[at : at + 1] != b"1" else b"2"  # w<k> -> w1 or w2: same length, valid
    chat.write_bytes(data[:at] + digit + data[at + 1 :])

    assert load_tokenized(cache, _key(cfg))[0] is None
    after = _load(cfg, cache)
    assert len(tokenize_calls) == 2
    assert "tokenizing again (key mismatch: data source chat" in capsys.readouterr().out
    assert after != before  # the edit reached the ids, so the check above can fail
    assert _load(cfg, cache) == after and len(tokenize_calls) == 2  # the cache was overwritten


def test_a_different_max_length_invalidates_the_cache(tiny_model_dir, tmp_path, tokenize_calls):
    cfg = _cfg(tmp_path, tiny_model_dir, max_length=24)
    cache = token_cache_path(tmp_path / "cache", "train")
    long = _load(cfg, cache)
    cfg.data.max_length = 14
    reason = load_tokenized(cache, _key(cfg))[1]
    assert reason.startswith("key mismatch: max_length differs (cached 24, now 14)")
    short = _load(cfg, cache)
    assert len(tokenize_calls) == 2 and short != long
    # every other key field also changes the key
    base = _key(cfg)
    for change in (
        {"max_prompt_length": 11},
        {"truncation": "keep_start"},
        {"identical_pairs": "drop"},
        {"vocab_size": 65},
        {"context_length": None},
    ):
        assert _key(cfg, **change) != base


def test_a_hub_name_has_no_key_and_a_changed_tokenizer_changes_it(tiny_model_dir, tmp_path):
    cfg = _cfg(tmp_path, tiny_model_dir)
    key = _key(cfg)
    hub = [*cfg.data.sources, DataSource(name="hub", path="someone/prefs")]
    assert token_cache_key(hub, **_args(cfg)) is None
    config = tiny_model_dir / "tokenizer_config.json"
    config.write_text(config.read_text() + " ")
    assert _key(cfg) != key


def test_every_chat_template_file_the_tokenizer_reads_is_part_of_the_key(tiny_model_dir, tmp_path):
    cfg = _cfg(tmp_path, tiny_model_dir)
    keys = [_key(cfg)]
    # a template file replaces tokenizer_config.json's template: the ids change
    rows = [
        {
            "prompt": [{"role": "user", "content": "w1"}],
            "chosen": [{"role": "assistant", "content": "w2"}],
            "rejected": [{"role": "assistant", "content": "w3"}],
        }
    ]
    before = tokenize_pairs(rows, PairTokenizer.from_dir(tiny_model_dir), max_length=32)[0]
    (tiny_model_dir / "chat_template.jinja").write_text(
        "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    )
    after = tokenize_pairs(rows, PairTokenizer.from_dir(tiny_model_dir), max_length=32)[0]
    assert before[0].prompt_ids != after[0].prompt_ids
    keys.append(_key(cfg))
    named = tiny_model_dir / "additional_chat_templates"
    named.mkdir()
    (named / "tool_use.jinja").write_text("{{ messages[0]['content'] }}")
    keys.append(_key(cfg))
    (named / "tool_use.jinja").write_text("{{ messages[-1]['content'] }}")
    keys.append(_key(cfg))
    (tiny_model_dir / "chat_template.json").write_text('{"chat_template": "x"}')
    keys.append(_key(cfg))
    assert len({json.dumps(k, sort_keys=True) for k in keys}) == len(keys)


def test_added_tokens_json_is_part_of_the_key(tiny_model_dir, tmp_path):
    """An older folder's added_tokens.json adds tokens (its tokenizer_config.json has no
    added_tokens_decoder): its content is in the key, whatever the fingerprint says, so a cache
    made before it was read (or before it changed) is not reused."""
    cfg = _cfg(tmp_path, tiny_model_dir)
    fingerprints = [PairTokenizer.from_dir(tiny_model_dir).fingerprint]
    keys = [_key(cfg, tokenizer_fingerprint=fingerprints[0])]
    size = PairTokenizer.from_dir(tiny_model_dir).vocab_size
    path = tiny_model_dir / "added_tokens.json"
    for tokens in ({"<tool>": size}, {"<tool>": size, "<call>": size + 1}):
        path.write_text(json.dumps(tokens))
        fingerprints.append(PairTokenizer.from_dir(tiny_model_dir).fingerprint)
        keys.append(_key(cfg, tokenizer_fingerprint=fingerprints[0]))
    assert len({json.dumps(k, sort_keys=True) for k in keys}) == len(keys)
    assert len(set(fingerprints)) == len(fingerprints)  # the tokens are read too


def test_a_data_set_folder_is_keyed_by_every_file_in_it(tiny_model_dir, tmp_path):
    cfg = _cfg(tmp_path, tiny_model_dir)
    folder = tmp_path / "local_set" / "data"
    folder.mkdir(parents=True)
    (folder / "train-00000-of-00001.parquet").write_bytes(b"first shard")
    sources = [DataSource(name="local", path=str(folder.parent))]
    key = token_cache_key(sources, **_args(cfg))
    assert key is not None and key == token_cache_key(sources, **_args(cfg))
    (folder / "train-00000-of-00001.parquet").write_bytes(b"first shard!")
    edited = token_cache_key(sources, **_args(cfg))
    assert edited != key
    (folder / "train-00001-of-00002.parquet").write_bytes(b"second shard")
    assert token_cache_key(sources, **_args(cfg)) not in (key, edited)
    # each subset of the folder is keyed apart
    subsets = [
        DataSource(name="local", path=str(folder.parent), subset=s) for s in (None, "a", "b")
    ]
    assert len({json.dumps(token_cache_key([s], **_args(cfg))) for s in subsets}) == 3


def test_a_source_s_subset_picks_the_folder_s_subset(tiny_model_dir, tmp_path):
    folder = tmp_path / "two"
    for i, sub in enumerate(("easy", "hard")):
        (folder / sub).mkdir(parents=True)
        write_pairs(folder / sub / "train.jsonl", n=4 + i, seed=7 + i)
    sources = [{"name": sub, "path": str(folder), "subset": sub} for sub in ("easy", "hard")]
    cfg = _cfg(tmp_path, tiny_model_dir, sources=sources)
    cache = token_cache_path(tmp_path / "cache", "train")
    pairs = _load(cfg, cache)
    assert [p.source for p in pairs] == ["easy"] * 4 + ["hard"] * 5
    assert _load(cfg, cache) == pairs  # the cache, keyed by subset


def test_a_flipped_byte_in_the_cache_is_detected_and_the_data_tokenized_again(
    tiny_model_dir, tmp_path, tokenize_calls, capsys
):
    cfg = _cfg(tmp_path, tiny_model_dir)
    cache = token_cache_path(tmp_path / "cache", "train")
    truth = _load(cfg, cache)
    good = cache.read_bytes()
    rng = random.Random(3)
    header = 8 + int.from_bytes(good[:8], "little")
    for _ in range(3):  # bytes in the tensor payload, anywhere
        data = bytearray(good)
        data[rng.randrange(header, len(data))] ^= 1 << rng.randrange(8)
        cache.write_bytes(bytes(data))
        assert load_tokenized(cache, _key(cfg)) == (None, "checksum mismatch (file damaged)")
    calls = len(tokenize_calls)
    assert _load(cfg, cache) == truth and len(tokenize_calls) == calls + 1
    assert "tokenizing again (checksum mismatch" in capsys.readouterr().out
    (pairs, _, _), reason = load_tokenized(cache, _key(cfg))  # rewritten whole
    assert reason == "ok" and pairs == truth

    for damaged in (good[: len(good) // 2], b"", b"\x00" * 40, good[:8] + b"[" + good[9:]):
        cache.write_bytes(damaged)
        value, reason = load_tokenized(cache, _key(cfg))
        assert value is None and reason.startswith("unreadable"), reason
    assert load_tokenized(tmp_path / "absent.safetensors", _key(cfg)) == (None, "missing")


def test_second_run_tokenizes_nothing_and_ends_the_same(tiny_model_dir, tmp_path, tokenize_calls):
    cfg = _cfg(tmp_path, tiny_model_dir)
    cfg.data.eval_sources = [
        DataSource(name="held", path=str(write_pairs(tmp_path / "held.jsonl", n=5, seed=9)))
    ]
    out = Path(cfg.output_dir)
    run_training(cfg, progress=False)
    assert len(tokenize_calls) == 2  # train and eval data
    assert (out / "cache" / "tokens-train.safetensors").is_file()
    assert (out / "cache" / "tokens-eval.safetensors").is_file()
    weights = load_file(out / "step-2" / "model.safetensors")
    metrics = (out / "metrics.jsonl").read_text()

    run_training(cfg, progress=False, overwrite=True)
    assert len(tokenize_calls) == 2
    # a resume with a changed data key is refused before the data is tokenized again
    changed = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, max_length=23))
    with pytest.raises(OutputDirError, match=r"data.max_length \(24 -> 23\)"):
        run_training(changed, progress=False, resume=True)
    assert len(tokenize_calls) == 2
    again = load_file(out / "step-2" / "model.safetensors")
    assert weights.keys() == again.keys()
    for name, tensor in weights.items():
        assert torch.equal(tensor, again[name]), name

    def numbers(text: str) -> list[dict]:
        drop = {"tokens_per_s"}  # a rate, not a result
        return [
            {k: v for k, v in json.loads(line).items() if k not in drop and "seconds" not in k}
            for line in text.splitlines()
        ]

    assert numbers((out / "metrics.jsonl").read_text()) == numbers(metrics)


def test_bad_eval_data_writes_no_token_cache(tiny_model_dir, tmp_path):
    cfg = _cfg(tmp_path, tiny_model_dir)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "w1", "chosen": "w2"}) + "\n")
    cfg.data.eval_sources = [DataSource(name="bad", path=str(bad))]
    with pytest.raises(runner_mod.RunInputError, match="rejected"):
        runner_mod.StepwiseRunner(cfg, progress=False).load_inputs()
    assert not Path(cfg.output_dir).exists()  # the good train data's cache is not written either


def test_a_source_column_map_is_part_of_the_key(tiny_model_dir, tmp_path):
    cfg = _cfg(tmp_path, tiny_model_dir)
    key = _key(cfg)
    cfg.data.sources[1].columns = ColumnMap(system="sys")
    mapped = _key(cfg)
    assert mapped is not None and mapped != key
    cfg.data.sources[1].columns = ColumnMap(prompt="question")
    assert _key(cfg) not in (key, mapped)


def test_the_runner_reads_a_source_through_its_column_map(tiny_model_dir, tmp_path):
    rows = [
        {
            "sys": "w1 w2" if i % 2 else "",
            "question": f"w{i + 3} w4",
            "chosen": "w5",
            "rejected": "w6",
        }
        for i in range(6)
    ]
    path = tmp_path / "orca.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = _cfg(tmp_path, tiny_model_dir, max_length=64)
    cfg.data.sources = [
        DataSource(name="orca", path=str(path), columns=ColumnMap(prompt="question", system="sys"))
    ]
    pairs = _load(cfg, tmp_path / "tokens.safetensors")
    tok = PairTokenizer.from_dir(cfg.model.path)
    for pair, row in zip(pairs, rows):
        prompt = [{"role": "user", "content": row["question"]}]
        if row["sys"]:
            prompt.insert(0, {"role": "system", "content": row["sys"]})
        want, _ = tokenize_pairs(
            [{"prompt": prompt, "chosen": [{"role": "assistant", "content": "w5"}],
              "rejected": [{"role": "assistant", "content": "w6"}]}],
            tok, max_length=64, max_prompt_length=12,
        )  # fmt: skip
        assert pair.prompt_ids == want[0].prompt_ids
    assert len(pairs[1].prompt_ids) > len(pairs[0].prompt_ids)  # the system message is in


def test_an_eos_taken_from_config_json_is_part_of_the_key(tiny_model_dir, tmp_path):
    """With no eos_token in tokenizer_config.json, EOS comes from config.json's eos_token_id:
    another id there tokenizes differently, so the cache made with the first is not reused."""
    cfg = _cfg(tmp_path, tiny_model_dir)
    tok_config = tiny_model_dir / "tokenizer_config.json"
    settings = json.loads(tok_config.read_text())
    eos = settings.pop("eos_token")
    tok_config.write_text(json.dumps(settings))
    model_config = tiny_model_dir / "config.json"
    config = json.loads(model_config.read_text())
    cache = tmp_path / "tokens.safetensors"
    vocab = Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json"))
    last_ids = []
    for token in (eos, "w3"):
        config["eos_token_id"] = vocab.token_to_id(token)
        model_config.write_text(json.dumps(config))
        tokenizer = PairTokenizer.from_dir(tiny_model_dir)
        pairs = load_pairs(cfg, tokenizer, vocab_size=tokenizer.vocab_size, cache_file=cache)
        last_ids.append({p.chosen_ids[-1] for p in pairs if not p.truncated})
    assert last_ids[0] != last_ids[1]
    assert last_ids[1] == {PairTokenizer.from_dir(tiny_model_dir).eos_id}


def test_the_held_out_pairs_log_line_says_held_out(tiny_model_dir, tmp_path, capsys):
    held_out = write_pairs(tmp_path / "held.jsonl", n=3, seed=7)
    cfg = _cfg(tmp_path, tiny_model_dir, eval_sources=[{"name": "held", "path": str(held_out)}])
    tok = PairTokenizer.from_dir(tiny_model_dir)
    load_pairs(cfg, tok, vocab_size=64)
    load_pairs(cfg, tok, vocab_size=64, sources=cfg.data.eval_sources)
    lines = [line for line in capsys.readouterr().out.splitlines() if "pairs from" in line]
    assert lines == [
        "[sdpo] data: 22 pairs from 2 source(s); 0 truncated to max_length=24",
        "[sdpo] held-out data: 3 pairs from 1 source(s); 0 truncated to max_length=24",
    ]


def test_token_cache_changes_read_an_earlier_release_s_key_by_its_parts(tiny_model_dir, tmp_path):
    """What changed since a cache was written, every part where load_tokenized names the first:
    a key as releases before sources had a subset wrote it ([name, path, split, digest,
    columns]), listing only the tokenizer files the folder has, differs from the same inputs'
    key now in nothing but what did change."""
    from sdpo.engine.tokenize import TokenizeStats

    cfg = _cfg(tmp_path, tiny_model_dir)
    now = _key(cfg)
    earlier = json.loads(json.dumps(now))
    earlier["sources"] = [
        [n, p, split, digest, cols] for n, p, split, _, digest, cols in now["sources"]
    ]
    earlier["tokenizer"] = {k: v for k, v in now["tokenizer"].items() if v is not None}
    path = tmp_path / "tokens-train.safetensors"

    def changes(key: dict) -> list[str]:
        save_tokenized(path, [], {}, TokenizeStats(), key)
        return token_cache_changes(path, now)

    assert changes(earlier) == []
    assert changes({**earlier, "code": "0" * 64}) == ["the tokenizing code changed"]
    earlier["sources"][1][3] = "0" * 64
    assert changes(earlier) == [f"data source chat ({cfg.data.sources[1].path}) changed"]
    assert token_cache_changes(tmp_path / "missing.safetensors", now) == []


def test_token_cache_changes_leave_out_what_the_earlier_key_did_not_record(
    tiny_model_dir, tmp_path
):
    """A key written before the key hashed special_tokens_map.json, added_tokens.json and the
    chat template files (it lists tokenizer.json and tokenizer_config.json alone) and before it
    held the tokenizer's fingerprint: a file of the folder that key did not hash, or the part it
    lacks, is not a change (the same files and the same code change nothing); a file it hashed
    that differs is."""
    from sdpo.engine.tokenize import TokenizeStats

    (tiny_model_dir / "special_tokens_map.json").write_text("{}")
    cfg = _cfg(tmp_path, tiny_model_dir)
    now = _key(cfg)
    assert now["tokenizer"]["special_tokens_map.json"] is not None
    earlier = {k: v for k, v in json.loads(json.dumps(now)).items() if k != "tokenizer_fingerprint"}
    earlier["tokenizer"] = {
        k: now["tokenizer"][k] for k in ("tokenizer.json", "tokenizer_config.json")
    }
    path = tmp_path / "tokens-train.safetensors"

    def changes(key: dict) -> list[str]:
        save_tokenized(path, [], {}, TokenizeStats(), key)
        return token_cache_changes(path, now)

    assert changes(earlier) == []
    earlier["tokenizer"]["tokenizer.json"] = "0" * 64
    assert changes(earlier) == ["the tokenizer files changed"]
