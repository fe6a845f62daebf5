"""Pair tokenization: completions tokenized in their prompt's context (TRL 1.16's convention),
chat-template rendering, BOS/EOS rules, every truncation policy with exact ids, and the
tokenizer/model mismatch check."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, processors

from sdpo.engine.data import DataError, read_preference_file
from sdpo.engine.packing import pack_pairs
from sdpo.engine.tiny import DEFAULT_CHAT_TEMPLATE, build_tokenizer
from sdpo.engine.tokenize import PairTokenizer, tokenize_pairs

WORDS = [f"w{i}" for i in range(20)] + [
    "the",
    "cat",
    "sat",
    "on",
    "mat",
    "dog",
    "hello",
    "be",
    "kind",
]
BOS, EOS = 1, 2
SYSTEM, USER, ASSISTANT, COLON = 4, 5, 6, 7


def wid(text: str) -> list[int]:
    """Ids of the tiny tokenizer, computed from its documented vocabulary order."""
    return [8 + WORDS.index(w) for w in text.split()]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    return build_tokenizer(tmp_path_factory.mktemp("tok"), words=WORDS)


@pytest.fixture(scope="module")
def tok(tok_dir) -> PairTokenizer:
    return PairTokenizer.from_dir(tok_dir)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_tiny_tokenizer_vocabulary_and_specials(tok):
    assert (tok.bos_id, tok.eos_id, tok.add_bos) == (BOS, EOS, True)
    assert tok.vocab_size == 8 + len(WORDS)
    assert tok.encode_texts(["the cat zebra", ""]) == [wid("the cat") + [3], []]
    assert tok.decode([BOS, *wid("the cat"), EOS]) == "<bos> the cat <eos>"


def test_string_rows_are_bos_prompt_then_completion_then_eos(tok):
    rows = [{"prompt": "the cat sat", "chosen": "on the mat", "rejected": "dog", "source": "s"}]
    (pair,), stats = tokenize_pairs(rows, tok, max_length=64)
    assert pair.prompt_ids == [BOS, *wid("the cat sat")]
    assert pair.chosen_ids == [*wid("on the mat"), EOS]
    assert pair.rejected_ids == [*wid("dog"), EOS]
    assert (pair.index, pair.source, pair.truncated) == (0, "s", False)
    assert (stats.num_pairs, stats.num_truncated, stats.num_identical) == (1, 0, 0)
    assert stats.num_tokens == 2 * 4 + 4 + 2
    assert stats.max_sequence_length == 8


def test_conversational_rows_render_with_the_chat_template(tok, tmp_path):
    rows = [
        {
            "prompt": [
                {"role": "system", "content": "be kind"},
                {"role": "user", "content": "hello cat"},
            ],
            "chosen": [{"role": "assistant", "content": "the cat sat"}],
            "rejected": "dog",
        }
    ]
    data = read_preference_file(write_jsonl(tmp_path / "chat.jsonl", rows))
    (pair,), _ = tokenize_pairs(data, tok, max_length=64)
    # "system : be kind user : hello cat assistant : "
    prompt = [SYSTEM, COLON, *wid("be kind"), USER, COLON, *wid("hello cat"), ASSISTANT, COLON]
    # no BOS: the template writes none (as transformers' apply_chat_template(tokenize=True) and
    # TRL give it); EOS: the template leaves the answer open, so EOS ends it
    assert pair.prompt_ids == prompt
    assert pair.chosen_ids == [*wid("the cat sat"), EOS]
    assert pair.rejected_ids == [*wid("dog"), EOS]
    full = tok.render_chat(data[0]["prompt"] + data[0]["chosen"], add_generation_prompt=False)
    assert [*tok.encode_texts([full])[0], EOS] == pair.prompt_ids + pair.chosen_ids


ZEPHYR_LIKE = (
    "{% for message in messages %}\n"
    "{% if message['role'] == 'user' %}\n"
    "{{ '<|user|>\\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'system' %}\n"
    "{{ '<|system|>\\n' + message['content'] + eos_token }}\n"
    "{% else %}\n"
    "{{ '<|assistant|>\\n'  + message['content'] + eos_token }}\n"
    "{% endif %}\n"
    "{% if loop.last and add_generation_prompt %}\n"
    "{{ '<|assistant|>' }}\n"
    "{% endif %}\n"
    "{% endfor %}"
)


def test_render_chat_matches_transformers_apply_chat_template(tmp_path):
    transformers = pytest.importorskip("transformers")
    folder = build_tokenizer(tmp_path, words=WORDS, chat_template=ZEPHYR_LIKE)
    ours = PairTokenizer.from_dir(folder)
    theirs = transformers.PreTrainedTokenizerFast.from_pretrained(str(folder))
    messages = [
        {"role": "system", "content": "be kind"},
        {"role": "user", "content": "hello\ncat"},
        {"role": "assistant", "content": "the cat"},
    ]
    for gen in (True, False):
        for n in (2, 3):
            expected = theirs.apply_chat_template(
                messages[:n], tokenize=False, add_generation_prompt=gen
            )
            assert ours.render_chat(messages[:n], add_generation_prompt=gen) == expected


# As TRL's training templates write a turn: the answer inside {% generation %} (transformers'
# assistant-token mask), tool calls through tojson with its keyword options.
TRAINING_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] }} : "
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] }}"
    "{% for call in message.get('tool_calls', []) %} {{ call | tojson(ensure_ascii=False, "
    "separators=(',', ':'), sort_keys=True) }}{% endfor %}{% endgeneration %}"
    "{% else %}{{ message['content'] }}{% endif %} "
    "{% endfor %}"
    "{% if add_generation_prompt %}assistant : {% endif %}"
)


def test_a_template_with_generation_blocks_and_tojson_options_renders_as_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    folder = build_tokenizer(tmp_path, words=WORDS, chat_template=TRAINING_TEMPLATE)
    ours = PairTokenizer.from_dir(folder)
    theirs = transformers.PreTrainedTokenizerFast.from_pretrained(str(folder))
    call = {"name": "sat", "arguments": {"b": "é", "a": 1}}
    messages = [
        {"role": "user", "content": "hello cat"},
        {"role": "assistant", "content": "the cat", "tool_calls": [call]},
    ]
    for n, gen in ((1, True), (2, False)):
        expected = theirs.apply_chat_template(
            messages[:n], tokenize=False, add_generation_prompt=gen
        )
        assert ours.render_chat(messages[:n], add_generation_prompt=gen) == expected
    assert '{"arguments":{"a":1,"b":"é"},"name":"sat"}' in expected
    pairs, _ = tokenize_pairs([conv_row()], ours, max_length=64)
    assert pairs[0].prompt_ids == [USER, COLON, *wid("hello"), ASSISTANT, COLON]
    assert (pairs[0].chosen_ids, pairs[0].rejected_ids) == (
        wid("the cat") + [EOS],
        wid("dog") + [EOS],
    )


def conv_row(prompt: str = "hello", chosen: str = "the cat", rejected: str = "dog") -> dict:
    return {
        "prompt": [{"role": "user", "content": prompt}],
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
    }


def test_template_that_writes_bos_and_eos_gets_no_second_bos_or_eos(tmp_path):
    template = (
        "{{ bos_token }}{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} "
        "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}assistant : {% endif %}"
    )
    tok = PairTokenizer.from_dir(build_tokenizer(tmp_path, words=WORDS, chat_template=template))
    (pair,), _ = tokenize_pairs([conv_row()], tok, max_length=64)
    assert pair.prompt_ids == [BOS, USER, COLON, *wid("hello"), ASSISTANT, COLON]
    assert pair.chosen_ids == [*wid("the cat"), EOS]
    assert pair.rejected_ids == [*wid("dog"), EOS]


def test_template_that_does_not_reproduce_the_prompt_prefix_is_an_error(tmp_path):
    template = "{{ messages[-1]['content'] }}"
    tok = PairTokenizer.from_dir(build_tokenizer(tmp_path, words=WORDS, chat_template=template))
    data = read_preference_file(write_jsonl(tmp_path / "c.jsonl", [conv_row(), conv_row()]))
    with pytest.raises(DataError) as info:
        tokenize_pairs(data, tok, max_length=64)
    msg = str(info.value)
    assert "c.jsonl, line 1, field 'prompt'" in msg and "without the rendered prompt" in msg


def test_template_raise_exception_becomes_an_error_naming_the_row(tmp_path):
    template = (
        "{% if messages[0]['role'] != 'system' %}{{ raise_exception('a system turn must come "
        "first') }}{% endif %}" + DEFAULT_CHAT_TEMPLATE
    )
    tok = PairTokenizer.from_dir(build_tokenizer(tmp_path, words=WORDS, chat_template=template))
    good = conv_row()
    good["prompt"] = [{"role": "system", "content": "be kind"}, *good["prompt"]]
    data = read_preference_file(write_jsonl(tmp_path / "c.jsonl", [good, conv_row()]))
    with pytest.raises(DataError) as info:
        tokenize_pairs(data, tok, max_length=64)
    assert (
        "c.jsonl, line 2, field 'prompt': the chat template rejected the messages: a system turn"
        in str(info.value)
    )


@pytest.mark.parametrize(
    "line, error",
    [
        ("{{ m['content'].upper() + m.name.strip() }}", "UndefinedError: 'dict object' has no"),
        ("{{ m['content'] + m['weight'] }}", "TypeError"),
    ],
)
def test_a_template_that_fails_while_rendering_names_the_row_and_field(tmp_path, line, error):
    # the failure comes from row 2's rejected answer only: an extra key the template reads
    template = (
        "{% for m in messages %}{{ m['role'] }} : \n"
        "{% if 'weight' in m %}" + line + "{% else %}{{ m['content'] }}{% endif %} "
        "{% endfor %}{% if add_generation_prompt %}assistant : {% endif %}"
    )
    tok = PairTokenizer.from_dir(build_tokenizer(tmp_path, words=WORDS, chat_template=template))
    bad = conv_row()
    bad["rejected"][0]["weight"] = 2
    data = read_preference_file(write_jsonl(tmp_path / "c.jsonl", [conv_row(), bad]))
    with pytest.raises(DataError) as info:
        tokenize_pairs(data, tok, max_length=64)
    msg = str(info.value)
    assert (
        "c.jsonl, line 2, field 'rejected': the chat template failed to render the rejected " in msg
    )
    assert error in msg and "at line 2 of the chat template" in msg


def test_conversational_rows_without_a_chat_template_are_refused(tmp_path):
    tok = PairTokenizer.from_dir(build_tokenizer(tmp_path, words=WORDS, chat_template=None))
    assert tok.chat_template is None
    data = read_preference_file(write_jsonl(tmp_path / "c.jsonl", [conv_row()]))
    with pytest.raises(DataError) as info:
        tokenize_pairs(data, tok, max_length=64)
    msg = str(info.value)  # where, which model folder, and the fix
    assert "c.jsonl, line 1, field 'prompt': the row is conversational" in msg
    assert f"the tokenizer of {tmp_path} has no chat template" in msg
    assert "chat_template.jinja, or chat_template in tokenizer_config.json" in msg
    (pair,), _ = tokenize_pairs(
        [{"prompt": "hello", "chosen": "a", "rejected": "b"}], tok, max_length=8
    )
    assert pair.prompt_ids == [BOS, *wid("hello")]
    assert "system prompt column" not in msg
    # string rows that a system prompt column makes messages: the message says so
    rows = [{"prompt": "hello", "chosen": "a", "rejected": "b", "sys": "be brief"}]
    data = read_preference_file(write_jsonl(tmp_path / "s.jsonl", rows), columns={"system": "sys"})
    with pytest.raises(DataError) as info:
        tokenize_pairs(data, tok, max_length=64)
    assert "or strings a system prompt column turns into messages" in str(info.value)
    assert "as strings without a system prompt column (columns.system)" in str(info.value)


def test_mixed_string_and_message_fields_are_refused(tok):
    row = {"prompt": "hello", "chosen": [{"role": "assistant", "content": "a"}], "rejected": "b"}
    with pytest.raises(
        DataError, match=r"row 0 \(0-based row index\): prompt, chosen and rejected mix"
    ):
        tokenize_pairs([row], tok, max_length=8)


LONG_PROMPT = " ".join(f"w{i}" for i in range(10))  # 10 words -> 11 ids with BOS


def truncation_rows() -> list[dict]:
    return [
        {"prompt": LONG_PROMPT, "chosen": "the cat sat on mat", "rejected": "dog hello"},
        {"prompt": "w0", "chosen": "cat", "rejected": "dog"},  # fits: untouched
    ]


def test_keep_end_cuts_the_prompt_start_keeping_bos_then_the_completion_end(tok):
    pairs, stats = tokenize_pairs(
        truncation_rows(), tok, max_length=9, max_prompt_length=4, truncation="keep_end"
    )
    assert pairs[0].prompt_ids == [BOS, *wid("w7 w8 w9")]
    assert pairs[0].chosen_ids == wid("the cat sat on mat")  # room 5: EOS cut away
    assert pairs[0].rejected_ids == [*wid("dog hello"), EOS]
    assert pairs[0].truncated and not pairs[1].truncated
    assert pairs[1].prompt_ids == [BOS, *wid("w0")]
    assert (stats.num_truncated, stats.num_prompt_truncated, stats.num_completion_truncated) == (
        1,
        1,
        1,
    )
    assert stats.max_sequence_length == 9


def test_keep_start_keeps_the_prompt_start(tok):
    pairs, stats = tokenize_pairs(
        truncation_rows(), tok, max_length=12, max_prompt_length=4, truncation="keep_start"
    )
    assert pairs[0].prompt_ids == [BOS, *wid("w0 w1 w2")]
    assert pairs[0].chosen_ids == [*wid("the cat sat on mat"), EOS]  # room 8: fits whole
    assert (stats.num_truncated, stats.num_prompt_truncated, stats.num_completion_truncated) == (
        1,
        1,
        0,
    )


def test_prompt_over_max_prompt_length_is_kept_when_the_pair_fits(tok):
    pairs, stats = tokenize_pairs(truncation_rows(), tok, max_length=64, max_prompt_length=4)
    assert pairs[0].prompt_ids == [BOS, *wid(LONG_PROMPT)]
    assert stats.num_truncated == 0


def test_without_max_prompt_length_only_completions_are_cut(tok):
    pairs, stats = tokenize_pairs(truncation_rows(), tok, max_length=13)
    assert pairs[0].prompt_ids == [BOS, *wid(LONG_PROMPT)]
    assert pairs[0].chosen_ids == wid("the cat")
    assert pairs[0].rejected_ids == wid("dog hello")  # EOS cut, words kept
    assert (stats.num_prompt_truncated, stats.num_completion_truncated) == (0, 1)


def test_truncation_error_policy_names_the_row(tok, tmp_path):
    data = read_preference_file(write_jsonl(tmp_path / "long.jsonl", truncation_rows()[::-1]))
    with pytest.raises(DataError) as info:
        tokenize_pairs(data, tok, max_length=9, truncation="error")
    msg = str(info.value)
    assert "long.jsonl, line 2: the pair is 17 tokens" in msg and "raise max_length" in msg
    pairs, stats = tokenize_pairs(data, tok, max_length=64, truncation="error")
    assert stats.num_truncated == 0 and len(pairs) == 2


def test_prompt_that_leaves_no_room_for_the_completion_is_an_error(tok, tmp_path):
    data = read_preference_file(write_jsonl(tmp_path / "p.jsonl", truncation_rows()))
    with pytest.raises(DataError) as info:
        tokenize_pairs(data, tok, max_length=11)
    msg = str(info.value)
    assert "p.jsonl, line 1, field 'prompt': the prompt alone is 11 tokens" in msg
    assert "raise max_length" in msg


def test_token_ids_beyond_the_model_vocabulary_are_an_error(tok):
    rows = [
        {"prompt": "w0", "chosen": "w1", "rejected": "w2"},
        {"prompt": "w0", "chosen": "mat", "rejected": "w2"},
    ]
    tokenize_pairs(rows, tok, max_length=8, vocab_size=tok.vocab_size)
    with pytest.raises(DataError) as info:
        tokenize_pairs(rows, tok, max_length=8, vocab_size=wid("mat")[0])
    msg = str(info.value)
    assert "row 1 (0-based row index)" in msg and f"token id {wid('mat')[0]}" in msg
    assert "does not match the model" in msg


def test_ids_past_a_gap_in_the_vocabulary_are_encoded_and_checked_against_the_model():
    # ids 0-3 and 10: five tokens, the largest id 10. An id at or past the token count still
    # comes back from encoding as it is, and the model's vocab_size is checked against it
    from tokenizers import models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "a": 3, "far": 10}
    inner = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    inner.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    gap = PairTokenizer(inner, eos_token="</s>", bos_token="<s>")
    assert gap.vocab_size == 5 and gap.encode_texts(["a far", "far a a"]) == [[3, 10], [10, 3, 3]]
    rows = [{"prompt": "a", "chosen": " far", "rejected": " a"}]
    (pair,), _ = tokenize_pairs(rows, gap, max_length=8, vocab_size=11)
    assert (pair.prompt_ids, pair.chosen_ids, pair.rejected_ids) == ([3], [10, 2], [3, 2])
    for vocab_size in (5, 10):
        with pytest.raises(DataError, match="token id 10 is outside the model's vocabulary"):
            tokenize_pairs(rows, gap, max_length=8, vocab_size=vocab_size)


def test_bad_truncation_settings_are_refused(tok):
    rows = truncation_rows()
    with pytest.raises(ValueError, match="truncation must be one of"):
        tokenize_pairs(rows, tok, max_length=9, truncation="middle")
    with pytest.raises(ValueError, match="max_prompt_length must be in"):
        tokenize_pairs(rows, tok, max_length=9, max_prompt_length=9)
    with pytest.raises(ValueError, match="max_length must be >= 2"):
        tokenize_pairs(rows, tok, max_length=1)


def test_random_rows_keep_end_invariants(tok):
    rng = np.random.default_rng(7)
    vocab = [w for w in WORDS if w.startswith("w")]
    rows = []
    for _ in range(61):
        lp, lc, lr = rng.integers(1, 15, size=3)
        rows.append(
            {
                k: " ".join(rng.choice(vocab, size=n))
                for k, n in zip(("prompt", "chosen", "rejected"), (lp, lc, lr))
            }
        )
    full, _ = tokenize_pairs(rows, tok, max_length=1000)
    pairs, stats = tokenize_pairs(rows, tok, max_length=17, max_prompt_length=6)
    for f, p in zip(full, pairs):
        too_long = len(f.prompt_ids) + max(len(f.chosen_ids), len(f.rejected_ids)) > 17
        assert p.truncated == too_long
        for got, orig in ((p.chosen_ids, f.chosen_ids), (p.rejected_ids, f.rejected_ids)):
            assert len(got) >= 1 and len(p.prompt_ids) + len(got) <= 17
            assert got == orig[: len(got)]  # completions lose their end only
        if too_long and len(f.prompt_ids) > 6:
            assert p.prompt_ids == [BOS, *f.prompt_ids[-5:]]  # prompt keeps BOS and its end
        else:
            assert p.prompt_ids == f.prompt_ids
    assert stats.num_truncated == sum(p.truncated for p in pairs) > 0
    assert stats.num_truncated < len(pairs)


def test_read_tokenize_pack_scores_exactly_the_completion_tokens(tok, tmp_path):
    rows = [
        conv_row("hello cat", "the cat sat", "dog"),
        {"prompt": "w3 w4", "chosen": "mat", "rejected": "w5 w6"},
    ]
    data = read_preference_file(write_jsonl(tmp_path / "d.jsonl", rows), source="mix")
    pairs, _ = tokenize_pairs(data, tok, max_length=32)
    batch = pack_pairs(pairs)
    completions = [c for p in pairs for c in (p.chosen_ids, p.rejected_ids)]
    scored = batch.labels[batch.labels != -100]
    assert scored.tolist() == [t for c in completions for t in c]
    assert {p.source for p in pairs} == {"mix"}


def test_identical_completions_after_tokenization_are_counted(tok):
    rows = [
        {"prompt": "w0", "chosen": "w1 w2", "rejected": "w1 w3"},  # identical once cut
        {"prompt": "w0", "chosen": "cat", "rejected": "dog"},
    ]
    _, stats = tokenize_pairs(rows, tok, max_length=3)
    assert stats.num_identical == 1


def test_from_dir_reads_eos_from_config_json_and_bos_rule_from_post_processor(tmp_path):
    folder = build_tokenizer(tmp_path, words=WORDS)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    del config["eos_token"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "config.json").write_text(json.dumps({"eos_token_id": [EOS, 3]}))
    inner = Tokenizer.from_file(str(folder / "tokenizer.json"))
    inner.post_processor = None  # add_bos_token stays true: transformers 5 does not read it
    (folder / "tokenizer.json").write_text(inner.to_str())
    tok = PairTokenizer.from_dir(folder)
    assert tok.eos_id == EOS and not tok.add_bos
    (pair,), _ = tokenize_pairs(
        [{"prompt": "w0", "chosen": "w1", "rejected": "w2"}], tok, max_length=8
    )
    assert pair.prompt_ids == wid("w0") and pair.chosen_ids == [*wid("w1"), EOS]

    config["add_bos_token"] = False  # ignored the other way too
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    inner.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", BOS)]
    )
    (folder / "tokenizer.json").write_text(inner.to_str())
    assert PairTokenizer.from_dir(folder).add_bos

    (folder / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="no EOS token"):
        PairTokenizer.from_dir(folder)


def test_from_dir_errors_and_template_sources(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"tokenizer.json not found"):
        PairTokenizer.from_dir(tmp_path)
    folder = build_tokenizer(tmp_path / "t", words=WORDS, chat_template=None)
    (folder / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    assert PairTokenizer.from_dir(folder).chat_template == "{{ messages[0]['content'] }}"
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = [
        {"name": "tool_use", "template": "x"},
        {"name": "default", "template": "y"},
    ]
    config["eos_token"] = {"content": "<eos>", "special": True, "__type": "AddedToken"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "chat_template.jinja").unlink()
    tok = PairTokenizer.from_dir(folder)
    assert tok.chat_template == "y" and tok.eos_id == EOS
    config["eos_token"] = "<nope>"
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="eos_token '<nope>' is not in the tokenizer's vocabulary"):
        PairTokenizer.from_dir(folder)


def test_template_files_take_priority_over_tokenizer_config_as_in_transformers(tmp_path):
    folder = build_tokenizer(tmp_path, words=WORDS, chat_template="config {{ bos_token }}")
    (folder / "chat_template.jinja").write_text("file {{ bos_token }}")
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": "json"}))
    assert PairTokenizer.from_dir(folder).chat_template == "file {{ bos_token }}"
    (folder / "chat_template.jinja").unlink()
    assert PairTokenizer.from_dir(folder).chat_template == "config {{ bos_token }}"
    transformers = pytest.importorskip("transformers")
    (folder / "chat_template.jinja").write_text("file {{ bos_token }}")
    theirs = transformers.AutoTokenizer.from_pretrained(str(folder))
    assert theirs.chat_template == PairTokenizer.from_dir(folder).chat_template


def test_fingerprint_changes_with_the_template(tmp_path):
    a = PairTokenizer.from_dir(build_tokenizer(tmp_path / "a", words=WORDS))
    b = PairTokenizer.from_dir(build_tokenizer(tmp_path / "b", words=WORDS))
    c = PairTokenizer.from_dir(build_tokenizer(tmp_path / "c", words=WORDS, chat_template="x"))
    assert a.fingerprint == b.fingerprint != c.fingerprint


def test_build_tokenizer_refuses_words_the_pre_tokenizer_would_split(tmp_path):
    with pytest.raises(ValueError, match='"don\'t" would be split'):
        build_tokenizer(tmp_path, words=["don't"])


SP_CORPUS = ["[INST] hi there [/INST] Sure thing", "[INST] say no [/INST] No way"] * 20
SP_CORPUS += ["Sure Sure thing no way hi there"] * 20


def sentencepiece_like(folder: Path, *, chat_template: str | None = None) -> Path:
    """A BPE tokenizer that normalises text the way Llama 2's (and Mistral's, SOLAR's) does:
    a word-boundary mark "▁" put in front of the text and in place of every space, pieces split
    before each mark. A text that starts with a space so gets a lone "▁" piece first. BOS is
    added by the post-processor, as Llama's is."""
    from tokenizers import models, normalizers, pre_tokenizers, trainers

    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    specials = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=specials, show_progress=False)
    tok.train_from_iterator(SP_CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)]
    )
    tok.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<unk>",
    }
    if chat_template is not None:
        config["chat_template"] = chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + ' ' + m['content'] + '<|im_end|>' }}"
    "{{ ' ' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant' }}{% endif %}"
)


def test_completions_are_tokenized_in_the_prompt_s_context(tmp_path):
    tok = PairTokenizer.from_dir(sentencepiece_like(tmp_path / "sp"))
    pieces = tok.tokenizer.token_to_id
    rows = [{"prompt": "[INST] hi there [/INST]", "chosen": " Sure thing", "rejected": " No way"}]
    (pair,), stats = tokenize_pairs(rows, tok, max_length=64)
    ids = [pieces(p) for p in ("▁[INST]", "▁hi", "▁there", "▁[/INST]", "▁Sure", "▁thing")]
    assert None not in ids
    assert pair.prompt_ids == [tok.bos_id, *ids[:4]]
    assert pair.chosen_ids == [*ids[4:], tok.eos_id]
    assert pair.rejected_ids[-1] == tok.eos_id and pieces("▁") not in pair.rejected_ids
    assert stats.num_prompt_boundary == 0
    # the completion text encoded on its own starts with a lone word-boundary piece
    assert tok.encode_texts([" Sure thing"])[0] == [pieces("▁"), *ids[4:]]


def test_tokens_merged_across_the_boundary_keep_the_prompt_whole(tmp_path):
    tok = PairTokenizer.from_dir(sentencepiece_like(tmp_path / "sp"))
    # "hi the" + "re no": prompt + completion reads "hi there no", where "▁there" is one piece
    rows = [{"prompt": "hi the", "chosen": "re no", "rejected": " no way"}]
    (pair,), stats = tokenize_pairs(rows, tok, max_length=64)
    assert stats.num_prompt_boundary == 1
    assert pair.prompt_ids == [tok.bos_id, *tok.encode_texts(["hi the"])[0]]
    assert pair.chosen_ids == [*tok.encode_texts(["re no"])[0], tok.eos_id]
    assert pair.rejected_ids == [*tok.encode_texts([" no way"])[0], tok.eos_id]


def test_a_template_that_renders_the_prompt_alone_differently_splits_where_they_part(tmp_path):
    template = (
        "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}assistant : w0 {% endif %}"
    )
    tok = PairTokenizer.from_dir(build_tokenizer(tmp_path, words=WORDS, chat_template=template))
    data = read_preference_file(write_jsonl(tmp_path / "c.jsonl", [conv_row()]))
    (pair,), stats = tokenize_pairs(data, tok, max_length=64)
    # prompt alone: "user : hello assistant : w0"; with the answer: "... assistant : the cat"
    assert pair.prompt_ids == [USER, COLON, *wid("hello"), ASSISTANT, COLON]
    assert pair.chosen_ids == [*wid("the cat"), EOS] and pair.rejected_ids == [*wid("dog"), EOS]
    assert stats.num_prompt_boundary == 1


def _trl_ids(folder: Path, rows: list[dict], tmp_path: Path) -> list[tuple[list[int], ...]]:
    """The (prompt, chosen, rejected) ids TRL's DPOTrainer makes of ``rows``."""
    datasets = pytest.importorskip("datasets")
    transformers = pytest.importorskip("transformers")
    trl = pytest.importorskip("trl")
    import torch

    hf_tok = transformers.PreTrainedTokenizerFast.from_pretrained(str(folder))
    config = transformers.LlamaConfig(
        vocab_size=len(hf_tok),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    model = transformers.LlamaForCausalLM(config).to(torch.float32)
    args = trl.DPOConfig(
        output_dir=str(tmp_path / "trl"),
        report_to="none",
        use_cpu=True,
        max_length=None,
        disable_tqdm=True,
        precompute_ref_log_probs=True,  # no reference model to load
    )
    trainer = trl.DPOTrainer(
        model=model,
        args=args,
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=hf_tok,
    )
    ds = trainer.train_dataset
    return [(r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]) for r in ds]


def test_pair_ids_are_trl_s_for_plain_and_conversational_rows(tmp_path):
    plain = [
        {"prompt": "[INST] hi there [/INST]", "chosen": " Sure thing", "rejected": " No way"},
        {"prompt": "[INST] say no [/INST]", "chosen": "\nNo way", "rejected": " Sure"},
    ]
    folder = sentencepiece_like(tmp_path / "sp", chat_template=CHATML)
    tok = PairTokenizer.from_dir(folder)
    pairs, stats = tokenize_pairs(plain, tok, max_length=64)
    assert stats.num_prompt_boundary == 0
    assert [(p.prompt_ids, p.chosen_ids, p.rejected_ids) for p in pairs] == _trl_ids(
        folder, plain, tmp_path
    )
    chat = [
        {
            "prompt": [
                {"role": "system", "content": "hi there"},
                {"role": "user", "content": "say no"},
            ],
            "chosen": [{"role": "assistant", "content": "No way"}],
            "rejected": [{"role": "assistant", "content": "Sure thing"}],
        }
    ]
    path = write_jsonl(tmp_path / "chat.jsonl", chat)
    pairs, stats = tokenize_pairs(read_preference_file(path), tok, max_length=64)
    assert stats.num_prompt_boundary == 0
    ours = [(p.prompt_ids, p.chosen_ids, p.rejected_ids) for p in pairs]
    assert ours == _trl_ids(folder, chat, tmp_path)
    # the template's own end of turn (and its separator after it) closes each completion; no
    # EOS is added, and no BOS: the template writes none
    chosen, piece = ours[0][1], tok.tokenizer.token_to_id
    end = chosen.index(piece("<|im_end|>"))
    assert set(chosen[end + 1 :]) == {piece("▁")}
    assert tok.eos_id not in chosen and ours[0][0][0] != tok.bos_id


def test_a_turn_the_template_closes_gets_no_eos_and_an_open_one_gets_eos(tmp_path):
    closing = (
        "{% for m in messages %}{{ m['role'] + ' ' + m['content'] + eos_token + ' ' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant' }}{% endif %}"
    )
    open_ = "{% for m in messages %}{{ m['content'] + ' ' }}{% endfor %}"
    rows = [
        {
            "prompt": [{"role": "user", "content": "say no"}],
            "chosen": [{"role": "assistant", "content": "No way"}],
            "rejected": [{"role": "assistant", "content": "Sure"}],
        }
    ]
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    for template, closed in ((closing, True), (open_, False)):
        folder = sentencepiece_like(tmp_path / f"sp-{closed}", chat_template=template)
        tok = PairTokenizer.from_dir(folder)
        (pair,), _ = tokenize_pairs(read_preference_file(path), tok, max_length=64)
        for ids in (pair.chosen_ids, pair.rejected_ids):
            if closed:  # "... No way</s> ": the template's </s>, then its space; nothing added
                assert ids.count(tok.eos_id) == 1 and ids[-1] != tok.eos_id
                assert tok.decode(ids[ids.index(tok.eos_id) + 1 :]).strip("▁ ") == ""
            else:  # "... No way ": EOS added after the template's text
                assert ids[-1] == tok.eos_id and ids.count(tok.eos_id) == 1


def test_an_answer_ending_in_an_unknown_word_is_not_a_closed_turn(tok, tmp_path):
    # "zebra" is not in the tiny vocabulary: <unk> is special, but no template closes a turn
    # with it, so the open template's answer still gets EOS
    row = conv_row(chosen="the zebra", rejected="dog")
    data = read_preference_file(write_jsonl(tmp_path / "c.jsonl", [row]))
    (pair,), _ = tokenize_pairs(data, tok, max_length=64)
    unk = tok.tokenizer.token_to_id("<unk>")
    assert pair.chosen_ids == [*wid("the"), unk, EOS]
    assert not tok.closes_turn([*wid("the"), unk]) and tok.closes_turn([*wid("the"), EOS])


# Qwen3's chat template in brief: tools in a system block, an empty thought block before the
# last answer, and after the generation prompt only with enable_thinking=false
QWEN3_LIKE = """{%- if tools %}
{{- '<|im_start|>system\\n' }}
{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}
{{- '# Tools\\n\\n<tools>' }}
{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}
{{- '\\n</tools><|im_end|>\\n' }}
{%- elif messages[0].role == 'system' %}
{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
{%- if message.role == 'user' %}
{{- '<|im_start|>user\\n' + message.content + '<|im_end|>\\n' }}
{%- elif message.role == 'assistant' and loop.last %}
{{- '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' + message.content + '<|im_end|>\\n' }}
{%- elif message.role == 'assistant' %}
{{- '<|im_start|>assistant\\n' + message.content + '<|im_end|>\\n' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<|im_start|>assistant\\n' }}
{%- if enable_thinking is defined and enable_thinking is false %}
{{- '<think>\\n\\n</think>\\n\\n' }}
{%- endif %}
{%- endif %}"""


def byte_level_like(folder: Path, *, chat_template: str) -> Path:
    """A byte-level BPE tokenizer as Qwen's: every byte encodable, ChatML specials, <think> and
    </think> as added (not special) tokens, no BOS."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers

    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        show_progress=False,
    )
    tok.train_from_iterator(["the weather in Paris is sunny", "lookup city string"] * 10, trainer)
    tok.add_tokens([AddedToken(t, normalized=False) for t in ("<think>", "</think>")])
    tok.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "chat_template": chat_template,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "lookup",
        "description": "the weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


def test_tools_and_chat_template_kwargs_give_trl_s_ids(tmp_path):
    def row(user: str, chosen: str, rejected: str, **inputs) -> dict:
        return {
            "prompt": [{"role": "user", "content": user}],
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}],
            **inputs,
        }

    rows = [
        row("weather in Paris?", "sunny", "rain", tools=[WEATHER_TOOL]),
        row("is it sunny?", "yes", "no", tools=None),
        row("weather?", "sunny", "no", tools=json.dumps([WEATHER_TOOL])),
    ]
    for r, thinking in zip(rows, (False, False, True)):
        r["chat_template_kwargs"] = {"enable_thinking": thinking}
    folder = byte_level_like(tmp_path / "qwen", chat_template=QWEN3_LIKE)
    tok = PairTokenizer.from_dir(folder)
    data = read_preference_file(write_jsonl(tmp_path / "c.jsonl", rows))
    pairs, stats = tokenize_pairs(data, tok, max_length=4096)
    ours = [(p.prompt_ids, p.chosen_ids, p.rejected_ids) for p in pairs]
    # the inputs change the ids: the tool schema is in the prompt, and with enable_thinking
    # false the empty thought block too, so the completion is the answer alone
    assert '"name": "lookup"' in tok.decode(ours[0][0])
    assert tok.decode(ours[1][0]).endswith("</think>\n\n")
    assert tok.decode(ours[1][1]) == "yes<|im_end|>\n"
    assert tok.decode(ours[2][1]).startswith("<think>")
    assert stats.num_prompt_boundary == 0
    # one type per column for datasets: the tools as JSON text, which TRL parses
    trl_rows = [
        {**r, "tools": json.dumps(r["tools"]) if isinstance(r["tools"], list) else r["tools"]}
        for r in rows
    ]
    assert ours == _trl_ids(folder, trl_rows, tmp_path)


def test_templates_see_tools_and_documents_and_pick_tool_use_as_transformers(tmp_path):
    # Mistral-style tests of "tools is not none": an undefined tools is not none, a None one is
    default = (
        "{% if tools is not none %}[T]{% endif %}{% if documents is not none %}[D]{% endif %}"
        "{{ thinking_mode }}" + DEFAULT_CHAT_TEMPLATE
    )
    folder = build_tokenizer(tmp_path, words=WORDS, chat_template=None)
    (folder / "chat_template.jinja").write_text(default)
    (folder / "additional_chat_templates").mkdir()
    (folder / "additional_chat_templates" / "tool_use.jinja").write_text(
        "{% for t in tools %}{{ t | tojson }} {% endfor %}" + DEFAULT_CHAT_TEMPLATE
    )
    ours = PairTokenizer.from_dir(folder)
    messages = [{"role": "user", "content": "hello"}]
    cases = [(None, None), ([WEATHER_TOOL], None), ([], {"thinking_mode": "w1 "})]
    rendered = [
        ours.render_chat(messages, add_generation_prompt=True, tools=t, template_kwargs=k)
        for t, k in cases
    ]
    assert rendered[0] == "user : hello assistant : "
    assert rendered[1].startswith('{"type": "function"')
    assert rendered[2] == "user : hello assistant : "  # [] picks tool_use; it writes no tool
    transformers = pytest.importorskip("transformers")
    theirs = transformers.AutoTokenizer.from_pretrained(str(folder))
    for (tools, kwargs), text in zip(cases, rendered):
        expected = theirs.apply_chat_template(
            messages, tools=tools, tokenize=False, add_generation_prompt=True, **(kwargs or {})
        )
        assert text == expected


def test_token_ids_equal_the_tokenizers_and_share_one_int_per_id(tmp_path):
    # a vocabulary past the small ints Python caches itself (-5..256)
    words = [f"v{i}" for i in range(700)]
    big = PairTokenizer.from_dir(build_tokenizer(tmp_path / "big", words=words))
    rng = np.random.default_rng(5)

    def text(n: int) -> str:
        return " ".join(words[int(i)] for i in rng.integers(0, len(words), size=n))

    rows = [
        {
            "prompt": text(int(rng.integers(1, 9))),
            "chosen": " " + text(int(rng.integers(1, 7))),
            "rejected": " " + text(int(rng.integers(1, 7))),
        }
        for _ in range(41)
    ]
    pairs, _ = tokenize_pairs(rows, big, max_length=64)
    for row, pair in zip(rows, pairs, strict=True):
        plain = big.tokenizer.encode(row["prompt"], add_special_tokens=False).ids
        assert pair.prompt_ids == [big.bos_id, *plain]
        for name in ("chosen", "rejected"):
            full = big.tokenizer.encode(row["prompt"] + row[name], add_special_tokens=False).ids
            assert getattr(pair, f"{name}_ids") == [*full[len(plain) :], big.eos_id]
    ids = [t for p in pairs for t in (*p.prompt_ids, *p.chosen_ids, *p.rejected_ids)]
    assert max(ids) > 256
    assert len({id(t) for t in ids}) == len(set(ids))  # one object per id value


def _trl_prepared(folder: Path, rows: list[dict], *, max_length: int | None = None) -> list:
    """TRL 1.16's own preprocessing of ``rows`` (``DPOTrainer._prepare_dataset``: the implicit
    prompt, EOS text, tokenization, the drop of prompts that fill ``max_length``), run without a
    model: (prompt, chosen, rejected) ids per kept row."""
    datasets = pytest.importorskip("datasets")
    transformers = pytest.importorskip("transformers")
    dpo = pytest.importorskip("trl.trainer.dpo_trainer")
    from types import SimpleNamespace

    hf_tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    args = SimpleNamespace(
        dataset_num_proc=None, max_length=max_length, truncation_mode="keep_start"
    )
    ds = dpo.DPOTrainer._prepare_dataset(
        SimpleNamespace(_tokenizer=hf_tok), datasets.Dataset.from_list(rows), hf_tok, args, "t"
    )
    return [(r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]) for r in ds]


def _ours(folder: Path, rows: list[dict], tmp_path: Path, **kwargs) -> list:
    data = read_preference_file(write_jsonl(tmp_path / "rows.jsonl", rows))
    pairs, _ = tokenize_pairs(data, PairTokenizer.from_dir(folder), **{"max_length": 512, **kwargs})
    return [(p.prompt_ids, p.chosen_ids, p.rejected_ids) for p in pairs]


LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
LLAMA3_SPECIALS += ["<|start_header_id|>", "<|end_header_id|>"]
LLAMA3_LIKE = (
    "{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + "
    "'<|end_header_id|>\\n\\n' + m['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}"
)


def llama3_like(folder: Path, *, chat_template: str = LLAMA3_LIKE) -> Path:
    """A byte-level BPE tokenizer as Llama 3's: its post-processor puts <|begin_of_text|> in
    front of text, <|eot_id|> ends a turn, and tokenizer_config.json has no add_bos_token."""
    from tokenizers import decoders, models, pre_tokenizers, trainers

    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=LLAMA3_SPECIALS,
        show_progress=False,
    )
    tok.train_from_iterator(["Human: is the sky blue? Assistant: yes it is"] * 10, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", 0)]
    )
    tok.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|eot_id|>",
        "chat_template": chat_template,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


CHATML_NL = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
    "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def test_plain_and_implicit_rows_give_trl_s_ids_for_llama3_and_qwen2_style_tokenizers(tmp_path):
    plain = [
        {"prompt": "Human: is the sky blue?", "chosen": " yes it is", "rejected": " no"},
        {"prompt": "Human: blue?\nAssistant:", "chosen": "\nyes", "rejected": " no<|eot_id|>"},
    ]
    implicit = [
        {
            "chosen": "\n\nHuman: sky?\n\nAssistant: yes it is",
            "rejected": "\n\nHuman: sky?\n\nAssistant: no",
        },
    ]
    chat = [
        {
            "prompt": [{"role": "user", "content": "is the sky blue?"}],
            "chosen": [{"role": "assistant", "content": "yes it is"}],
            "rejected": [{"role": "assistant", "content": "no"}],
        },
        {  # implicit: two whole conversations
            "chosen": [
                {"role": "user", "content": "sky?"},
                {"role": "assistant", "content": "yes"},
            ],
            "rejected": [
                {"role": "user", "content": "sky?"},
                {"role": "assistant", "content": "no"},
            ],
        },
    ]
    llama = llama3_like(tmp_path / "llama3")
    qwen = byte_level_like(tmp_path / "qwen2", chat_template=CHATML_NL)
    for folder, bos in ((llama, 0), (qwen, None)):
        for rows in (plain, implicit, chat[:1], chat[1:]):
            ours = _ours(folder, rows, tmp_path)
            assert ours == _trl_prepared(folder, rows), (folder.name, rows)
        # BOS from the post-processor on plain prompts (Llama 3), none without one (Qwen2)
        assert (_ours(folder, plain, tmp_path)[0][0][0] == bos) == (bos is not None)
    # a plain prompt that starts with BOS text keeps one BOS here; TRL's tokenizer adds another
    row = [{"prompt": "<|begin_of_text|>Human: blue?", "chosen": " yes", "rejected": " no"}]
    (ours,), (theirs,) = _ours(llama, row, tmp_path), _trl_prepared(llama, row)
    assert theirs[0][:2] == [0, 0] and ours[0] == theirs[0][1:] and ours[1:] == theirs[1:]


def test_tiny_tokenizer_bos_follows_the_post_processor_as_transformers_5(tmp_path):
    # add_bos_token is true in tokenizer_config.json, but transformers 5 (and so TRL) reads
    # only tokenizer.json's post-processor: without one, plain prompts get no BOS
    folder = build_tokenizer(tmp_path, words=WORDS)
    rows = [{"prompt": "hello cat", "chosen": " the cat", "rejected": " dog"}]
    assert _ours(folder, rows, tmp_path) == _trl_prepared(folder, rows)
    assert _ours(folder, rows, tmp_path)[0][0][0] == BOS
    inner = Tokenizer.from_file(str(folder / "tokenizer.json"))
    inner.post_processor = None
    (folder / "tokenizer.json").write_text(inner.to_str())
    assert _ours(folder, rows, tmp_path) == _trl_prepared(folder, rows)
    assert _ours(folder, rows, tmp_path)[0][0] == wid("hello cat")


SPECIALS_TEMPLATE = (
    "{% if bos_token is defined %}[bos {{ bos_token }}]{% endif %}"
    "[{{ pad_token }}|{{ unk_token }}|{{ sep_token }}|{{ image_token }}|{{ boi_token }}]"
    "{% if mask_token is defined %}[mask]{% endif %}"
    "{% for m in messages %}{{ m['role'] + ' ' + m['content'] + eos_token + ' ' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant' }}{% endif %}"
)


def test_the_template_sees_every_special_token_as_transformers_passes_them(tmp_path):
    folder = byte_level_like(tmp_path / "qwen", chat_template=SPECIALS_TEMPLATE)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.update(
        unk_token={"content": "<|endoftext|>", "__type": "AddedToken"},
        sep_token="<|im_start|>",
        boi_token="<think>",  # a model-specific *_token key, as Gemma 3's
        extra_special_tokens={"image_token": "</think>"},
    )
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    transformers = pytest.importorskip("transformers")
    theirs = transformers.AutoTokenizer.from_pretrained(str(folder))
    ours = PairTokenizer.from_dir(folder)
    messages = [{"role": "user", "content": "sunny?"}, {"role": "assistant", "content": "yes"}]
    for n, gen in ((1, True), (2, False)):
        expected = theirs.apply_chat_template(
            messages[:n], tokenize=False, add_generation_prompt=gen
        )
        assert ours.render_chat(messages[:n], add_generation_prompt=gen) == expected
    assert expected.startswith("[<|endoftext|>|<|endoftext|>|<|im_start|>|</think>|<think>]us")
    rows = [
        {
            "prompt": messages[:1],
            "chosen": messages[1:],
            "rejected": [messages[1] | {"content": "no"}],
        }
    ]
    assert _ours(folder, rows, tmp_path) == _trl_prepared(folder, rows)


REASONING_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m.role + '\\n' }}"
    "{% if m.reasoning_content is defined %}{{ '<think>' + m.reasoning_content + '</think>' }}"
    "{% endif %}{% if m.thinking is defined %}{{ '[' + m.thinking + ']' }}{% endif %}"
    "{{ m.content + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def test_message_reasoning_reaches_the_template_under_each_name_as_in_transformers(tmp_path):
    # Qwen3 and DeepSeek-R1 templates read reasoning_content, gpt-oss's reads thinking;
    # transformers gives a message's reasoning under both, whichever name the data uses
    folder = byte_level_like(tmp_path / "qwen", chat_template=REASONING_TEMPLATE)
    user = [{"role": "user", "content": "sunny?"}]
    rows = [
        {
            "prompt": user,
            "chosen": [{"role": "assistant", "content": "yes", "reasoning": "it is"}],
            "rejected": [{"role": "assistant", "content": "no", "reasoning_content": "rain"}],
        },
        {
            "prompt": user,
            "chosen": [{"role": "assistant", "content": "yes", "thinking": "the sun"}],
            "rejected": [{"role": "assistant", "content": "no"}],
        },
    ]
    ours = _ours(folder, rows, tmp_path)
    assert ours == _trl_prepared(folder, rows)
    tok = PairTokenizer.from_dir(folder)
    assert tok.decode(ours[0][1]) == "<think>it is</think>[it is]yes<|im_end|>\n"
    assert tok.decode(ours[1][1]) == "<think>the sun</think>[the sun]yes<|im_end|>\n"
    # keys set to None are dropped, as transformers drops them
    none = [{"role": "user", "content": "sunny?", "thinking": None, "reasoning": None}]
    assert (
        tok.render_chat(none, add_generation_prompt=False) == "<|im_start|>user\nsunny?<|im_end|>\n"
    )


def test_keep_start_below_max_length_cuts_as_trl_1_16_and_trl_drops_full_prompts(tmp_path):
    dpo = pytest.importorskip("trl.trainer.dpo_trainer")
    folder = sentencepiece_like(tmp_path / "sp")
    rows = [
        {"prompt": "hi", "chosen": " Sure thing", "rejected": " No"},  # fits
        {"prompt": "[INST] hi there [/INST]", "chosen": " Sure thing no way", "rejected": " No"},
        {"prompt": "hi there hi there hi there hi", "chosen": " Sure", "rejected": " No"},
    ]
    max_length = 7
    ours = _ours(
        folder,
        rows,
        tmp_path,
        max_length=max_length,
        max_prompt_length=max_length - 1,
        truncation="keep_start",
    )
    theirs = _trl_prepared(folder, rows, max_length=max_length)
    assert len(theirs) == 2 and len(ours[2][0]) == max_length - 1  # TRL drops the last row
    collate = dpo.DataCollatorForPreference(pad_token_id=0, max_length=max_length)
    batch = collate([dict(zip(("prompt_ids", "chosen_ids", "rejected_ids"), t)) for t in theirs])
    for i, (prompt, chosen, rejected) in enumerate(ours[:2]):
        for j, completion in ((i, chosen), (i + 2, rejected)):
            seq = prompt + completion
            ids = batch["input_ids"][j][: len(seq)].tolist()
            mask = batch["completion_mask"][j][: len(seq)].tolist()
            assert ids == seq and mask == [0] * len(prompt) + [1] * len(completion)
            assert batch["attention_mask"][j].sum().item() == len(seq)


# A ChatML template that writes an assistant turn's tool calls, as Qwen's and Hermes' do
TOOL_CALLS_TEMPLATE = (
    "{%- for m in messages %}<|im_start|>{{ m.role }}\n"
    "{%- if m.content %}{{ m.content }}{% endif %}"
    "{%- for c in m.tool_calls or [] %}<tool_call>{{ c.function | tojson }}</tool_call>"
    "{%- endfor %}<|im_end|>\n{% endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_a_tool_call_with_null_content_tokenizes_as_trl(tmp_path):
    # the OpenAI layout: an assistant turn that calls a tool has content null (or none at all)
    call = {"type": "function", "function": {"name": "lookup", "arguments": '{"city": "Paris"}'}}
    rows = [
        {
            "prompt": [{"role": "user", "content": "weather in Paris?"}],
            "chosen": [{"role": "assistant", "content": None, "tool_calls": [call]}],
            "rejected": [{"role": "assistant", "content": "it is sunny", "tool_calls": None}],
        },
        {
            "prompt": [{"role": "user", "content": "and in Rome?"}],
            "chosen": [{"role": "assistant", "content": "", "tool_calls": [call]}],
            "rejected": [{"role": "assistant", "content": "rain", "tool_calls": None}],
        },
    ]
    folder = byte_level_like(tmp_path / "chatml", chat_template=TOOL_CALLS_TEMPLATE)
    tok = PairTokenizer.from_dir(folder)
    data = read_preference_file(write_jsonl(tmp_path / "calls.jsonl", rows))
    pairs, _ = tokenize_pairs(data, tok, max_length=4096)
    ours = [(p.prompt_ids, p.chosen_ids, p.rejected_ids) for p in pairs]
    assert tok.decode(ours[0][1]).startswith('<tool_call>{"name": "lookup"')
    assert ours == _trl_ids(folder, rows, tmp_path)

    # without tool calls a null content is still refused, naming the message and the fix
    rows[0]["chosen"] = [{"role": "assistant", "content": None}]
    bad = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError, match=r"line 1.*chosen.*message 0 has 'content' of type") as e:
        read_preference_file(bad)
    assert "tool_calls" in str(e.value)


def test_special_tokens_map_is_read_where_transformers_reads_it(tmp_path):
    """A folder whose tokenizer_config.json names no BOS or EOS (and has no
    added_tokens_decoder, as older uploads) but whose special_tokens_map.json does: the ids and
    the template's variables are transformers' (its tokens win over tokenizer_config.json's);
    once tokenizer_config.json has an added_tokens_decoder, transformers 5 ignores the file, and
    so does sdpo."""
    template = (
        "[{{ pad_token }}]{% for m in messages %}{{ m['role'] + ' ' + m['content'] + eos_token"
        " + ' ' }}{% endfor %}{% if add_generation_prompt %}{{ 'assistant' }}{% endif %}"
    )
    folder = build_tokenizer(tmp_path / "tok", words=WORDS, chat_template=template)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    del config["bos_token"], config["eos_token"]
    assert "added_tokens_decoder" not in config and config["pad_token"] == "<pad>"
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    bos = {"content": "<bos>", "lstrip": False, "rstrip": False, "normalized": False}
    specials = {"bos_token": bos, "eos_token": "<eos>", "pad_token": "w5", "unk_token": "<unk>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(specials))
    transformers = pytest.importorskip("transformers")
    messages = [{"role": "user", "content": "w1 w2"}, {"role": "assistant", "content": "w3"}]
    rows = [
        {"prompt": "w0 w1", "chosen": " w2", "rejected": " w3 w4"},
        {"prompt": messages[:1], "chosen": messages[1:], "rejected": [{**messages[1], "content": "w9"}]},
    ]  # fmt: skip

    def same_as_transformers(pad: str) -> None:
        theirs = transformers.AutoTokenizer.from_pretrained(str(folder))
        ours = PairTokenizer.from_dir(folder)
        assert (ours.eos_id, ours.bos_id) == (theirs.eos_token_id, theirs.bos_token_id)
        rendered = theirs.apply_chat_template(messages, tokenize=False)
        assert ours.render_chat(messages, add_generation_prompt=False) == rendered
        assert rendered.startswith(f"[{pad}]")
        for row in rows:  # one kind of row a data set
            assert _ours(folder, [row], tmp_path) == _trl_prepared(folder, [row])

    same_as_transformers("w5")  # the map's pad token, over tokenizer_config.json's
    assert _ours(folder, rows, tmp_path)[0][0][0] == BOS  # BOS named by the map alone
    config.update(bos_token="<bos>", eos_token="<eos>", added_tokens_decoder={})
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    same_as_transformers("<pad>")  # the map ignored: tokenizer_config.json's pad token


def test_a_bos_named_nowhere_but_added_by_the_post_processor_starts_plain_prompts(tmp_path):
    # tokenizer_config.json names no BOS, but tokenizer.json's post-processor puts
    # <|begin_of_text|> in front of text: transformers adds it to TRL's plain prompts all the same
    folder = llama3_like(
        tmp_path / "llama3", chat_template=LLAMA3_LIKE.replace("{{ bos_token }}", "")
    )
    config = json.loads((folder / "tokenizer_config.json").read_text())
    del config["bos_token"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    tok = PairTokenizer.from_dir(folder)
    assert (tok.bos_token, tok.bos_id, tok.add_bos) == (None, 0, True)
    rows = [
        {"prompt": "Human: is the sky blue?", "chosen": " yes it is", "rejected": " no"},
        {"prompt": "\nHuman: blue?", "chosen": " yes", "rejected": " no"},
    ]
    chat = [
        {
            "prompt": [{"role": "user", "content": "is the sky blue?"}],
            "chosen": [{"role": "assistant", "content": "yes it is"}],
            "rejected": [{"role": "assistant", "content": "no"}],
        }
    ]
    ours = _ours(folder, rows, tmp_path)
    assert ours == _trl_prepared(folder, rows)
    assert [prompt[0] for prompt, _, _ in ours] == [0, 0]
    # a conversation starts with what the template writes: here no BOS, and no bos_token variable
    assert _ours(folder, chat, tmp_path) == _trl_prepared(folder, chat)
    assert _ours(folder, chat, tmp_path)[0][0][0] != 0


LLAMA2_LIKE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}{{ bos_token + '[INST] ' + m['content'] + "
    "' [/INST]' }}{% else %}{{ ' ' + m['content'] + ' ' + eos_token }}{% endif %}{% endfor %}"
)


@pytest.mark.parametrize("legacy", [None, True])
def test_a_llama_tokenizer_class_gets_transformers_5_s_pipeline_not_the_file_s(tmp_path, legacy):
    """Llama 2's tokenizer.json puts "▁" in front of every piece of text with its normaliser, but
    where tokenizer_config.json names LlamaTokenizer, transformers 5 builds its own pipeline from
    the file's vocabulary: no "▁" after a special token unless legacy is true, and none added in
    front of a text that starts with a space. TRL's ids, and now sdpo's, come from that one."""
    folder = sentencepiece_like(tmp_path / "llama2", chat_template=LLAMA2_LIKE)
    inner = Tokenizer.from_file(str(folder / "tokenizer.json"))
    inner.pre_tokenizer = None  # Llama 2's layout: the normaliser alone, no pre-tokenizer
    inner.model.byte_fallback = True
    (folder / "tokenizer.json").write_text(inner.to_str())
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.update(tokenizer_class="LlamaTokenizerFast", add_bos_token=True, add_eos_token=False)
    if legacy is not None:
        config["legacy"] = legacy
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    rows = [
        {"prompt": "  hi there", "chosen": " Sure thing", "rejected": " No way"},
        {"prompt": "[INST] say no [/INST]", "chosen": " No way</s> ", "rejected": " Sure"},
    ]
    say = [{"role": "user", "content": "say no"}]
    chat = [
        {
            "prompt": [*say, {"role": "assistant", "content": "No way"}, *say],
            "chosen": [{"role": "assistant", "content": "No way"}],
            "rejected": [{"role": "assistant", "content": "Sure"}],
        }
    ]
    ours = _ours(folder, rows, tmp_path)
    assert ours == _trl_prepared(folder, rows)
    assert _ours(folder, chat, tmp_path) == _trl_prepared(folder, chat)
    tok = PairTokenizer.from_dir(folder)
    boundary = tok.tokenizer.token_to_id("▁")
    after_bos = tok.tokenizer.id_to_token(tok.encode_texts(["<s>[INST]"])[0][1])
    assert after_bos.startswith("▁") == bool(legacy)  # "<s>▁[INST]" by the file, "<s>[INST]" not
    assert ours[0][0][:2] == [tok.bos_id, boundary]  # "▁▁hi" by the file: one "▁" less
    # a Mistral model folder names LlamaTokenizer too, but transformers 5 takes the file as it is
    (folder / "config.json").write_text(json.dumps({"model_type": "mistral"}))
    file_ids = _ours(folder, rows, tmp_path)
    assert file_ids == _trl_prepared(folder, rows) and file_ids[0][0][:3] == [1, boundary, boundary]


def test_a_named_special_token_missing_from_the_added_tokens_is_added_as_transformers_does(
    tmp_path,
):
    # tokenizer.json has <|im_end|> only as a vocabulary entry; tokenizer_config.json names it
    # the EOS: transformers makes it an added special token, so the template's <|im_end|> is one
    # id, not the pieces BPE would split it into
    folder = byte_level_like(tmp_path / "qwen", chat_template=CHATML_NL)
    pipeline = json.loads((folder / "tokenizer.json").read_text())
    pipeline["added_tokens"] = [t for t in pipeline["added_tokens"] if t["content"] != "<|im_end|>"]
    (folder / "tokenizer.json").write_text(json.dumps(pipeline))
    rows = [
        {
            "prompt": [{"role": "user", "content": "is it sunny?"}],
            "chosen": [{"role": "assistant", "content": "yes"}],
            "rejected": [{"role": "assistant", "content": "no"}],
        }
    ]
    ours = _ours(folder, rows, tmp_path)
    assert ours == _trl_prepared(folder, rows)
    tok = PairTokenizer.from_dir(folder)
    assert ours[0][1] == [*tok.encode_texts(["yes"])[0], tok.eos_id, *tok.encode_texts(["\n"])[0]]


def test_a_post_processor_eos_after_every_text_is_not_a_second_eos_as_in_trl(tmp_path):
    folder = llama3_like(tmp_path / "llama3")
    inner = Tokenizer.from_file(str(folder / "tokenizer.json"))
    inner.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A <|eot_id|>",
        special_tokens=[("<|begin_of_text|>", 0), ("<|eot_id|>", 2)],
    )
    (folder / "tokenizer.json").write_text(inner.to_str())
    rows = [{"prompt": "Human: is the sky blue?", "chosen": " yes it is", "rejected": " no"}]
    ((prompt, chosen, rejected),) = _ours(folder, rows, tmp_path)
    ((trl_prompt, trl_chosen, trl_rejected),) = _trl_prepared(folder, rows)
    assert prompt == trl_prompt and prompt[0] == 0
    # TRL: the EOS text it appends, then the post-processor's; here one EOS ends each completion
    assert trl_chosen == [*chosen, 2] and trl_rejected == [*rejected, 2]
    assert chosen[-1] == 2 and chosen[-2] != 2


SOLAR_LIKE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ '### System:\\n' + m['content'] + "
    "'\\n\\n' }}{% elif m['role'] == 'user' %}{{ '### User:\\n' + m['content'] + '\\n\\n' }}"
    "{% else %}{{ '### Assistant:\\n' + m['content'] }}{% endif %}"
    "{% if loop.last and add_generation_prompt %}{{ '### Assistant:\\n' }}{% endif %}{% endfor %}"
)
MISTRAL_LIKE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + "
    "m['content'] + ' [/INST]' }}{% else %}{{ m['content'] + eos_token + ' ' }}{% endif %}"
    "{% endfor %}"
)
# name: (tokenizer_config.json's legacy and add_prefix_space, config.json's model_type, chat
# template, tokenizer.json's layout: transformers 4's LlamaConverter with legacy, whose
# normaliser puts "▁" in front of every text, or transformers 5's own conversion)
SPM_FOLDERS = {
    "llama2": (True, None, "llama", LLAMA2_LIKE, "converter_4"),
    "llama2_hf": (False, None, "llama", LLAMA2_LIKE, "converter_4"),  # Llama-2-7b-hf's mix
    "no_prefix_space": (False, False, "llama", LLAMA2_LIKE, "converter_5"),
    "solar": (True, None, "llama", SOLAR_LIKE, "converter_5"),
    "mistral": (True, None, "mistral", MISTRAL_LIKE, "converter_4"),
}


@pytest.fixture(scope="module")
def sentencepiece_folders(tmp_path_factory) -> dict[str, Path]:
    """Llama 2, SOLAR and Mistral style folders around a SentencePiece BPE model trained here
    with Llama's settings (byte fallback, digits split, "▁" in front of a text), whose
    tokenizer.json transformers converts from the model (``tokenizer.model`` only, as older
    uploads ship it; the message sdpo gives for such a folder says how)."""
    spm = pytest.importorskip("sentencepiece")
    transformers = pytest.importorskip("transformers")
    import io
    import random

    rng = random.Random(0)
    words = "the cat sat on mat hello world there say no yes sky blue Paris 12 3.5 café über"
    corpus = [" ".join(rng.choices(words.split(), k=8)) for _ in range(400)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([*corpus, "[INST] hi [/INST]", "### User:"] * 2),
        model_writer=model,
        model_type="bpe",
        vocab_size=384,
        hard_vocab_limit=False,
        byte_fallback=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    root = tmp_path_factory.mktemp("spm")
    folders = {}
    for name, (legacy, prefix, model_type, template, layout) in SPM_FOLDERS.items():
        folder = folders[name] = root / name
        folder.mkdir()
        (folder / "tokenizer.model").write_bytes(model.getvalue())
        config = {"tokenizer_class": "LlamaTokenizer", "legacy": legacy, "chat_template": template}
        config.update(bos_token="<s>", eos_token="</s>", unk_token="<unk>", add_bos_token=True)
        if prefix is not None:
            config["add_prefix_space"] = prefix
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
        (folder / "config.json").write_text(json.dumps({"model_type": model_type}))
        hf_tok = transformers.AutoTokenizer.from_pretrained(str(folder))
        pipeline = json.loads(hf_tok.backend_tokenizer.to_str())
        if layout == "converter_4":
            pipeline["pre_tokenizer"] = None
            pipeline["normalizer"] = {
                "type": "Sequence",
                "normalizers": [
                    {"type": "Prepend", "prepend": "▁"},
                    {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
                ],
            }
        (folder / "tokenizer.json").write_text(json.dumps(pipeline))
        if name == "llama2_hf":  # converted with legacy, then marked legacy false
            config["legacy"] = False
            (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folders


SPM_TEXTS = [
    "hello world", " hello world", "  two  spaces ", "line\nbreak\n", "\n\nHi", "\tx\t", " ",
    "café über naïve", "日本語 🙂", "<s>[INST] hi [/INST]", "[INST]hi[/INST] ok", "hi</s> x",
    "12345 3.14", "### User:\nhi\n\n### Assistant:\n", "a▁b", "<unk>", "Paris" * 5, "x <s> y",
]  # fmt: skip


def test_sentencepiece_converted_llama_folders_give_transformers_and_trl_s_ids(
    sentencepiece_folders, tmp_path
):
    """Folders whose tokenizer.json transformers converted from a SentencePiece model, as real
    Llama 2, SOLAR and Mistral checkpoints' were (a legacy normaliser, legacy true and false,
    add_prefix_space false, Mistral's model type), read as transformers 5 reads them: the same
    ids for texts and BOS, and TRL's DPOTrainer ids for plain and conversational rows."""
    transformers = pytest.importorskip("transformers")
    plain = [
        {"prompt": "[INST] hi there [/INST]", "chosen": " Sure 12", "rejected": "  No 🙂"},
        {"prompt": " ### User:\nsay no\n\n### Assistant:\n", "chosen": "No.", "rejected": "Yes."},
    ]
    say = [{"role": "user", "content": "say  no 🙂"}]
    chat = [
        {
            "prompt": [*say, {"role": "assistant", "content": "No way"}, *say],
            "chosen": [{"role": "assistant", "content": "No, café"}],
            "rejected": [{"role": "assistant", "content": "Sure </s>"}],
        }
    ]
    for name, folder in sentencepiece_folders.items():
        hf_tok = transformers.AutoTokenizer.from_pretrained(str(folder))
        tok = PairTokenizer.from_dir(folder)
        for text in SPM_TEXTS:
            ids = hf_tok.encode(text, add_special_tokens=False)
            assert tok.encode_texts([text])[0] == ids, (name, text)
            if not text.startswith("<s>"):
                assert tok.prompt_ids(ids) == hf_tok.encode(text), (name, text)
        assert _ours(folder, plain, tmp_path) == _trl_prepared(folder, plain), name
        ours, trl = _ours(folder, chat, tmp_path), _trl_prepared(folder, chat)
        if name == "solar":  # a template that leaves the answer open: EOS after it here
            trl = [
                (p, *(c if c[-1] == tok.eos_id else [*c, tok.eos_id] for c in cs)) for p, *cs in trl
            ]
        assert ours == trl, name
    # a folder with tokenizer.model alone is refused with the command that writes its
    # tokenizer.json; that file then gives transformers' ids of the folder without it
    folder = sentencepiece_folders["solar"]
    (folder / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="only a SentencePiece tokenizer.model") as info:
        PairTokenizer.from_dir(folder)
    assert "backend_tokenizer.save(" in str(info.value)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    hf_tok.backend_tokenizer.save(str(folder / "tokenizer.json"))
    tok = PairTokenizer.from_dir(folder)
    assert [tok.encode_texts([t])[0] for t in SPM_TEXTS] == [
        hf_tok.encode(t, add_special_tokens=False) for t in SPM_TEXTS
    ]


def test_a_vocabulary_without_the_probe_text_has_no_post_processor_bos():
    """The post-processor's front token is read off the encoding of "a"; a vocabulary with no
    "a", no unknown token and no byte fallback encodes it as nothing, which means no BOS (it
    raised an IndexError)."""
    from tokenizers import Tokenizer, models

    tok = PairTokenizer(
        Tokenizer(models.BPE(vocab={"b": 0, "c": 1, "</s>": 2}, merges=[])), eos_token="</s>"
    )
    assert tok.bos_id is None and not tok.add_bos


def _strict_word_tokenizer() -> PairTokenizer:
    """Word-level, with no unknown token (a word outside the vocabulary fails to encode) and a
    named special token outside the vocabulary, "<gone>": rows can fail at every stage."""
    words = ["<bos>", "<eos>", "the", "cat", "sat", "dog", "w0", "w1", "w2", "w3"]
    inner = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="?"))
    inner.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    inner.add_special_tokens([AddedToken("<bos>", special=True), AddedToken("<eos>", special=True)])
    return PairTokenizer(
        inner,
        eos_token="<eos>",
        bos_token="<bos>",
        add_bos=True,
        outside_vocab={"<gone>": ("pad_token in tokenizer_config.json", None)},
    )


# each row fails at one stage of tokenize_pairs, the later rows at the earlier stages:
# (row, the place the first error names once the rows up to it are given)
STAGED_ROWS = [
    ({"prompt": "the", "chosen": " cat", "rejected": " dog"}, None),
    ({"prompt": "the", "chosen": " w0 w1 w2 w3 w0 w1", "rejected": " dog"}, "row 1 (0-based"),
    (
        {"prompt": "the", "chosen": " cat", "rejected": " zebra"},
        "row 2 (0-based row index), field 'rejected': the tokenizer cannot encode",
    ),
    (
        {"prompt": "the", "chosen": " zebra", "rejected": " dog"},
        "row 3 (0-based row index), field 'chosen': the tokenizer cannot encode",
    ),
    (
        {"prompt": "the <gone>", "chosen": " cat", "rejected": " dog"},
        "row 4 (0-based row index), field 'prompt': the tokenizer's special token '<gone>'",
    ),
    (
        {"prompt": "the", "chosen": [{"role": "assistant", "content": "cat"}], "rejected": " dog"},
        "row 5 (0-based row index): prompt, chosen and rejected mix",
    ),
    ({"prompt": "sat", "chosen": " cat", "rejected": " dog"}, None),
]


@pytest.mark.parametrize("block", [1, 2, 3, 4096])
def test_rows_tokenized_in_blocks_report_the_error_of_the_earliest_stage_first(monkeypatch, block):
    """tokenize_pairs takes the rows through its stages (render, encode prompts, chosen,
    rejected, each encode also finding special tokens outside the vocabulary, make the pairs) a
    block at a time; the error
    reported is still the first of the earliest stage that has one over all rows, as when every
    row went through each stage before the next began, wherever the blocks split the rows."""
    import sdpo.engine.tokenize as tokenize_module

    monkeypatch.setattr(tokenize_module, "_TOKENIZE_BLOCK", block, raising=False)
    tok = _strict_word_tokenizer()
    rows = [row for row, _ in STAGED_ROWS]
    for n in range(len(rows), 1, -1):
        expected = next((e for _, e in STAGED_ROWS[n - 1 :: -1] if e is not None), None)
        with pytest.raises(DataError) as info:
            tokenize_pairs(rows[:n], tok, max_length=6, truncation="error")
        assert str(info.value).startswith(expected), (n, str(info.value))
    fine = [STAGED_ROWS[0][0], STAGED_ROWS[-1][0]]
    pairs, stats = tokenize_pairs(fine * 3, tok, max_length=6, truncation="error")
    assert [p.index for p in pairs] == list(range(6)) and stats.num_pairs == 6
    assert pairs[5].prompt_ids == [0, 4] and pairs[5].chosen_ids == [3, 1]


def test_token_ids_and_stats_do_not_depend_on_the_tokenize_block(tok, monkeypatch):
    """The same pairs (ids, indices, truncation) and counts whatever the block of rows taken
    through the stages together: conversational rows, and plain ones with and without tokens
    merged across the prompt's end (encoded alone)."""
    import sdpo.engine.tokenize as tokenize_module

    rng = np.random.default_rng(11)
    vocab = [w for w in WORDS if w.startswith("w")] + ["the", "cat", "dog"]
    rows = []
    for k in range(23):
        lp, lc, lr = rng.integers(1, 12, size=3)
        text = {
            f: " ".join(rng.choice(vocab, size=n))
            for f, n in zip(("prompt", "chosen", "rejected"), (lp, lc, lr))
        }
        if k % 2:  # a completion that starts with its space: no merge across the prompt's end
            text["chosen"] = " " + text["chosen"]
        rows.append(conv_row(**text) if k % 3 == 0 else text)
    whole, whole_stats = tokenize_pairs(rows, tok, max_length=14, max_prompt_length=5)
    for block in (1, 4, 7):
        monkeypatch.setattr(tokenize_module, "_TOKENIZE_BLOCK", block, raising=False)
        pairs, stats = tokenize_pairs(rows, tok, max_length=14, max_prompt_length=5)
        assert pairs == whole and stats == whole_stats
    assert whole_stats.num_truncated > 0


def test_added_tokens_json_is_read_as_transformers_reads_it(tmp_path):
    """A folder saved before tokenizer_config.json had an added_tokens_decoder, whose
    added_tokens.json names tokens tokenizer.json lacks: transformers adds them in the order of
    their ids there (giving each the next free id, the file's not kept), a named special one as
    a special token read on the raw text, another as normalised text; one at an id
    tokenizer.json's added tokens use is dropped. sdpo's ids and vocabulary size are
    AutoTokenizer's, and TRL's pairs too; with an added_tokens_decoder the file is not read."""
    transformers = pytest.importorskip("transformers")
    folder = sentencepiece_like(tmp_path / "sp", chat_template=CHATML)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["pad_token"] = "<pad>"  # named, outside tokenizer.json: the file's id is its own
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    size = PairTokenizer.from_dir(folder).vocab_size
    added = {"<tool>": size + 7, "<pad>": size + 3, "<lost>": 3, "▁hi": 41}
    (folder / "added_tokens.json").write_text(json.dumps(added))
    texts = ["hi <tool> there", "Sure<tool>thing <pad>", "[INST]<pad>hi<|im_end|>", "hi there"]
    rows = [{"prompt": "[INST] hi <tool> [/INST]", "chosen": " Sure<pad>", "rejected": " No"}]

    def same_as_transformers() -> PairTokenizer:
        theirs = transformers.AutoTokenizer.from_pretrained(str(folder))
        ours = PairTokenizer.from_dir(folder)
        assert ours.encode_texts(texts) == [
            theirs.encode(t, add_special_tokens=False) for t in texts
        ]
        assert ours.vocab_size == len(theirs)
        assert _ours(folder, rows, tmp_path) == _trl_prepared(folder, rows)
        return ours

    ours = same_as_transformers()
    ids = ours.tokenizer.token_to_id
    assert (ids("<pad>"), ids("<tool>"), ours.vocab_size) == (size, size + 1, size + 2)
    assert ids("<lost>") is None and ours.encode_texts(["hi"])[0] == [ids("▁hi")]
    assert ours.encode_texts(texts[:2]) == [
        [ids("▁hi"), size + 1, ids("▁there")],  # normalised: read after "▁" only
        [*ours.encode_texts(["Sure<tool>thing"])[0], ids("▁"), size],
    ]
    # a model not resized for them: a row that holds one is refused, naming the file
    with pytest.raises(DataError, match=r"'<tool>', a token of added_tokens.json .* id \d+, outs"):
        tokenize_pairs(rows, ours, max_length=64, vocab_size=size + 1)
    config["added_tokens_decoder"] = {}  # the file is no longer read: <pad> is outside again
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    assert PairTokenizer.from_dir(folder).vocab_size == size
    (folder / "added_tokens.json").write_text(json.dumps({"<tool>": str(size)}))
    del config["added_tokens_decoder"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"added_tokens.json: the id of '<tool>' is \"\d+\""):
        PairTokenizer.from_dir(folder)


def test_added_tokens_json_ids_order_its_tokens_as_numbers_do_in_transformers(tmp_path):
    """transformers reads added_tokens.json's ids only to order the file's tokens: any number
    does (7.5 between 7 and 8, Infinity last, a negative one first; 1.0 is 1, the id of
    tokenizer.json's "<s>", so its token is dropped), and sdpo adds them in that order too.
    An id that is NaN (no place in that order) or not a number is refused, naming the file, the
    token and what to write instead."""
    transformers = pytest.importorskip("transformers")
    folder = sentencepiece_like(tmp_path / "sp")
    size = PairTokenizer.from_dir(folder).vocab_size
    added = {"<last>": float("inf"), "<mid>": size + 0.5, "<first>": -2, "<b>": size + 1.0}
    (folder / "added_tokens.json").write_text(json.dumps({**added, "<lost>": 1.0}))
    texts = ["hi <mid> there<last>", "<b><first> <lost>"]
    theirs = transformers.AutoTokenizer.from_pretrained(str(folder))
    ours = PairTokenizer.from_dir(folder)
    ids = ours.tokenizer.token_to_id
    assert [ids(t) for t in ("<first>", "<mid>", "<b>", "<last>")] == list(range(size, size + 4))
    assert ids("<lost>") is None and ours.vocab_size == len(theirs) == size + 4
    assert ours.encode_texts(texts) == [theirs.encode(t, add_special_tokens=False) for t in texts]
    for value, shown in ((float("nan"), "NaN, which has no place"), ("7", '"7", not a number')):
        (folder / "added_tokens.json").write_text(json.dumps({**added, "<mid>": value}))
        with pytest.raises(ValueError) as info:
            PairTokenizer.from_dir(folder)
        message = str(info.value)
        assert message.startswith(f"{folder / 'added_tokens.json'}: the id of '<mid>' is {shown}")
        assert message.endswith(
            "Write the token's id as an integer (the id the model's "
            "embeddings hold it at), or remove the entry"
        )


def test_added_tokens_one_text_after_the_normaliser_are_refused_naming_them(tmp_path):
    """Two normalised added tokens that the tokenizer's normaliser makes one text ("<extra>" and
    "<EXTRA>" of added_tokens.json under a lower-casing one, as OpenAI GPT's class has): the
    tokenizers library reads that text as either, which one changing from one process to the
    next, and so do transformers' ids. The folder is refused, naming both tokens and where
    they are added; with one of them named as a special token (read on the raw text, before
    the normaliser) it is read as transformers reads it."""
    from tokenizers import normalizers

    transformers = pytest.importorskip("transformers")
    folder = sentencepiece_like(tmp_path / "sp")
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.normalizer = normalizers.Sequence([normalizers.Lowercase(), tok.normalizer])
    tok.save(str(folder / "tokenizer.json"))
    size = PairTokenizer.from_dir(folder).vocab_size
    added = {"<extra>": size, "<tool>": size + 1, "<EXTRA>": size + 2}
    (folder / "added_tokens.json").write_text(json.dumps(added))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "pad_token": "<EXTRA>"}))
    texts = ["hi <extra> there<EXTRA> <tool>", "<Extra><EXTRA>"]
    theirs = transformers.AutoTokenizer.from_pretrained(str(folder))
    ours = PairTokenizer.from_dir(folder)
    assert ours.encode_texts(texts) == [theirs.encode(t, add_special_tokens=False) for t in texts]
    assert ours.encode_texts(texts[1:]) == [[size, size + 2]]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError) as info:
        PairTokenizer.from_dir(folder)
    assert str(info.value).startswith(
        f"{folder}: the added tokens '<extra>' (id {size}) and '<EXTRA>' (id {size + 2}), of "
        "added_tokens.json, are one text, '▁<extra>', once the tokenizer's normaliser has read "
        "them"
    )
    assert str(info.value).endswith(
        "Rename one of them in added_tokens.json, keeping its id, so that the two differ after "
        "normalising"
    )
    tok.add_tokens([AddedToken("<Extra>", normalized=True)])  # one of tokenizer.json's own
    tok.save(str(folder / "tokenizer.json"))
    (folder / "added_tokens.json").write_text(json.dumps({"<EXTRA>": size + 1}))
    with pytest.raises(
        ValueError,
        match=r"'<Extra>' \(id \d+\) and '<EXTRA>' \(id \d+\), of "
        "added_tokens.json and tokenizer.json's added tokens, are one text",
    ):
        PairTokenizer.from_dir(folder)


def test_added_tokens_decoder_is_read_or_refused_as_transformers_reads_it(tmp_path):
    """transformers makes each entry of added_tokens_decoder an AddedToken under int(key): keys
    Python's int reads (" 70", "+70", "7_0") are ids, so their entries are added tokens here too;
    where it fails (a key such as "5.0", an entry or a whole decoder that is not an object, a
    content that is not a string, an option that is not true or false) sdpo refuses the folder,
    naming the file and the entry, where it used to pass over the entry."""
    transformers = pytest.importorskip("transformers")
    folder = sentencepiece_like(tmp_path / "sp")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    text = "hi there <s>here"

    def with_decoder(decoder) -> None:
        (folder / "tokenizer_config.json").write_text(
            json.dumps({**config, "added_tokens_decoder": decoder})
        )

    for key in (" 70", "+70", "7_0"):
        with_decoder({key: {"content": "here", "special": True}})
        theirs = transformers.AutoTokenizer.from_pretrained(str(folder))
        ours = PairTokenizer.from_dir(folder)
        assert ours.encode_texts([text]) == [theirs.encode(text, add_special_tokens=False)]
        assert ours.encode_texts(["here"])[0] == [ours.tokenizer.token_to_id("here")]
    for decoder, problem in (
        ({"5.0": {"content": "here"}}, "the key '5.0' is not an integer id"),
        ({"70": "here"}, 'entry 70 is "here", not an object'),
        ({"70": {"content": 5}}, 'entry 70 is {"content": 5}, its content is not a string'),
        ({"70": {"content": "here", "lstrip": 1}}, "its lstrip is neither true nor false"),
        (["here"], 'added_tokens_decoder is ["here"], not an object of id -> token'),
    ):
        with_decoder(decoder)
        with pytest.raises(Exception):  # noqa: B017 (transformers' own error types vary)
            transformers.AutoTokenizer.from_pretrained(str(folder))
        with pytest.raises(ValueError) as info:
            PairTokenizer.from_dir(folder)
        assert str(info.value).startswith(f"{folder / 'tokenizer_config.json'}: added_tokens_")
        assert problem in str(info.value)
        assert "(transformers fails to load a tokenizer from this folder too)" in str(info.value)


def test_special_tokens_written_as_objects_transformers_fails_on_are_refused(tmp_path):
    """transformers makes an AddedToken of each object marked "__type": "AddedToken" in
    tokenizer_config.json (at any depth), and of each object special_tokens_map.json holds by a
    key or lists under extra_special_tokens: a content that is not a string, or an option that
    is neither true nor false, fails there (the map's "special" aside, which it replaces), so
    sdpo refuses the folder, naming the file and the token's place, where it used to load."""
    transformers = pytest.importorskip("transformers")
    folder = sentencepiece_like(tmp_path / "sp")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    typed = {"__type": "AddedToken", "content": "here"}
    cases = [
        ({"eos_token": {**typed, "content": "</s>", "lstrip": "yes"}}, None, "eos_token"),
        (
            {"extra_special_tokens": {"image_token": {**typed, "special": 1}}},
            None,
            "extra_special_tokens.image_token",
        ),
        ({}, {"pad_token": {"content": 5}}, "pad_token"),
        (
            {},
            {"extra_special_tokens": [{"content": "here", "rstrip": None}]},
            "extra_special_tokens[0]",
        ),
    ]
    for own, token_map, where in cases:
        (folder / "tokenizer_config.json").write_text(json.dumps({**config, **own}))
        (folder / "special_tokens_map.json").write_text(json.dumps(token_map or {}))
        with pytest.raises(TypeError):
            transformers.AutoTokenizer.from_pretrained(str(folder))
        with pytest.raises(ValueError) as info:
            PairTokenizer.from_dir(folder)
        file = "special_tokens_map.json" if token_map else "tokenizer_config.json"
        assert str(info.value).startswith(f"{folder / file}: {where}")
        assert "(transformers fails to load a tokenizer from this folder too)" in str(info.value)
    # the map's "special" is replaced: any value loads
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "special_tokens_map.json").write_text(
        json.dumps({"pad_token": {"content": "here", "special": 1}})
    )
    theirs = transformers.AutoTokenizer.from_pretrained(str(folder))
    text = "hi there here"
    assert PairTokenizer.from_dir(folder).encode_texts([text]) == [
        theirs.encode(text, add_special_tokens=False)
    ]


def test_added_tokens_json_tokens_go_among_tokenizer_json_s_where_transformers_rebuilds(tmp_path):
    """A class transformers builds itself (LlamaTokenizer) adds tokenizer.json's added tokens and
    added_tokens.json's together in the order of their ids: "<x>" at 0.5 below "<a>"'s id takes
    that id and moves "<a>" on, where a folder read as its file is (PreTrainedTokenizerFast)
    keeps tokenizer.json's ids and adds "<x>" after. sdpo's ids are AutoTokenizer's in both."""
    transformers = pytest.importorskip("transformers")
    folder = sentencepiece_like(tmp_path / "sp")
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    size = tok.get_vocab_size()
    tok.add_tokens([AddedToken("<a>", normalized=False), AddedToken("<b>", special=True)])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "added_tokens.json").write_text(json.dumps({"<x>": size + 0.5, "<y>": size + 9}))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    texts = ["hi <a> there<x><b> <y>"]
    for cls, order in (
        ("LlamaTokenizerFast", "<a> <x> <b> <y>"),
        ("PreTrainedTokenizerFast", "<a> <b> <x> <y>"),
    ):
        (folder / "tokenizer_config.json").write_text(
            json.dumps({**config, "tokenizer_class": cls})
        )
        theirs = transformers.AutoTokenizer.from_pretrained(str(folder))
        ours = PairTokenizer.from_dir(folder)
        assert ours.encode_texts(texts) == [
            theirs.encode(t, add_special_tokens=False) for t in texts
        ]
        ids = [ours.tokenizer.token_to_id(t) for t in order.split()]
        assert ids == list(range(size, size + 4)) and ours.vocab_size == len(theirs)
