"""The tokenizer classes transformers 5 builds around a folder's tokenizer.json (Llama, CodeLlama,
Gemma, GPT-2, CodeGen, Qwen2, Qwen3.5, GPT-NeoX, Cohere, XGLM, OpenAI GPT) and their default
special tokens: hand-made folders read by sdpo give the ids ``AutoTokenizer.from_pretrained``
gives on the same folder, and TRL's DPOTrainer ids; the class sdpo cannot reproduce
(GPT-NeoX Japanese's) is refused; a BOS or another special token outside the vocabulary is
refused only where used."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

from sdpo.engine.data import DataError
from sdpo.engine.tokenize import PairTokenizer, SpecialTokenOutsideVocabError
from sdpo.engine.tokenizer_classes import backend_class
from tests.test_tokenize import (
    CHATML_NL,
    LLAMA2_LIKE,
    _ours,
    _trl_prepared,
    byte_level_like,
    sentencepiece_like,
)

transformers = pytest.importorskip("transformers")

TEXTS = [
    "hello world", " hello world", "  two  spaces ", "line\nbreak\n\n", "\n\nHi", "12345 don't",
    "café cafe\u0301", "Hi</s>there", "<s>[INST] hi [/INST]", "[INST]hi[/INST] ok",
    "<|im_start|>user\nhi<|im_end|>\n", "x<|endoftext|> y", "<bos>a<eos> b", "<pad><mask>",
    "नमस्ते दुनिया", "x 2024", "ｆｕｌｌ width", "a<madeupword0>b",
]  # fmt: skip
NO_SPECIALS = {"add_special_tokens": False}
PLAIN = [
    {"prompt": "[INST] hi there [/INST]", "chosen": " Sure thing", "rejected": "\nNo way 12"},
    {"prompt": " the weather in Paris", "chosen": " is sunny", "rejected": " café"},
]


# every default special token a template may read, each turn closed with EOS
DEFAULTS_TEMPLATE = (
    "{% if bos_token is defined and bos_token %}{{ bos_token }}{% endif %}"
    "[{{ unk_token }}|{{ pad_token }}]"
    "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + eos_token + ' ' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant:' }}{% endif %}"
)


def _config(folder: Path, **changes) -> Path:
    """Update tokenizer_config.json: a value of None removes the key."""
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps({k: v for k, v in config.items() if v is not None}))
    return folder


def _model_type(folder: Path, model_type: str) -> Path:
    (folder / "config.json").write_text(json.dumps({"model_type": model_type}))
    return folder


def _assert_same_ids_as_transformers(folder: Path, tmp_path: Path, *, rows=PLAIN) -> None:
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    tok = PairTokenizer.from_dir(folder)
    assert tok.eos_token == hf_tok.eos_token and tok.bos_token == hf_tok.bos_token
    for text in TEXTS:
        ids = hf_tok.encode(text, add_special_tokens=False)
        assert tok.encode_texts([text])[0] == ids, (folder.name, text)
        if not text.startswith(str(hf_tok.bos_token)):  # no second BOS here (README)
            assert tok.prompt_ids(ids) == hf_tok.encode(text), (folder.name, text)
    assert _ours(folder, rows, tmp_path) == _trl_prepared(folder, rows), folder.name


def gemma_like(folder: Path, *, prepend: bool) -> Path:
    """A BPE tokenizer over "▁"-joined words as Gemma's (pad, eos, bos, unk, mask first; BOS put
    in front by the post-processor); ``prepend``: a normaliser that also puts "▁" in front of
    every text, as a Llama-style conversion would write it."""
    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    replace = normalizers.Replace(" ", "▁")
    tok.normalizer = (
        normalizers.Sequence([normalizers.Prepend("▁"), replace]) if prepend else replace
    )
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=specials, show_progress=False)
    corpus = ["hello world, the weather in Paris is sunny", "two spaces line break Hi"] * 10
    # pieces split before each "▁" while training only, so no merge spans two words
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")
    tok.train_from_iterator([t.replace(" ", "▁") for t in corpus], trainer)
    tok.pre_tokenizer = None
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", 2)]
    )
    tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "GemmaTokenizer", "eos_token": "<eos>", "bos_token": "<bos>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def byte_level_wide(folder: Path, **config) -> Path:
    """A byte-level BPE tokenizer whose merges span digits, Devanagari letters and their
    combining marks, and spaces (trained without a split, then saved with GPT-2's), with the
    special tokens of GPT-NeoX's, Cohere's and Qwen's classes; ``config``: its
    tokenizer_config.json, besides a ChatML template."""
    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    specials = ["<|endoftext|>", "<|padding|>", "<|im_start|>", "<|im_end|>", "<BOS_TOKEN>"]
    specials.append("<|END_OF_TURN_TOKEN|>")
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=specials,
        show_progress=False,
    )
    corpus = ["the weather in Paris is sunny 12345", "नमस्ते दुनिया 2024", "hello world"]
    tok.train_from_iterator(corpus * 10, trainer)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.save(str(folder / "tokenizer.json"))
    config = {"chat_template": CHATML_NL, **config}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def unigram_like(folder: Path, **config) -> Path:
    """A SentencePiece-style Unigram tokenizer as XGLM's (<s>, <pad>, </s>, <unk> first, then
    "<madeupword0>"), whose normaliser is a SentencePiece character map (NFKC), which XGLM's
    class keeps, saved with the rest of a pipeline that class replaces: no merging of space
    runs, "▁" in front of the first piece only, no unknown id (a character outside the
    vocabulary fails), BOS put in front; ``config``: its tokenizer_config.json, besides a
    ChatML template."""
    spm = pytest.importorskip("sentencepiece")
    model_pb2 = pytest.importorskip("sentencepiece.sentencepiece_model_pb2")
    import base64
    import io

    folder.mkdir(parents=True, exist_ok=True)
    written = io.BytesIO()  # a SentencePiece model, for its NFKC character map only
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(["hello world"] * 20),
        model_writer=written,
        vocab_size=12,
        normalization_rule_name="nmt_nfkc",
        minloglevel=2,
    )
    proto = model_pb2.ModelProto()
    proto.ParseFromString(written.getvalue())
    charsmap = proto.normalizer_spec.precompiled_charsmap
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<madeupword0>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.UnigramTrainer(
        vocab_size=150, special_tokens=specials, unk_token="<unk>", show_progress=False
    )
    corpus = ["hello world, the weather in Paris is sunny", "two spaces line break Hi 12345"]
    tok.train_from_iterator(corpus * 10, trainer)
    tok.normalizer = normalizers.Precompiled(charsmap)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first", split=False)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    pipeline = json.loads(tok.to_str())
    assert base64.b64decode(pipeline["normalizer"]["precompiled_charsmap"]) == charsmap
    pipeline["model"]["unk_id"] = None
    (folder / "tokenizer.json").write_text(json.dumps(pipeline))
    config = {"chat_template": CHATML_NL, **config}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def openai_gpt_like(folder: Path, **config) -> Path:
    """A BPE tokenizer over words ending with "</w>", as OpenAI GPT's, saved with a pipeline
    its class replaces (NFC without lower-casing, a split on whitespace and punctuation)."""
    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token="<unk>", end_of_word_suffix="</w>"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["<unk>", "<|im_start|>", "<|im_end|>", "</s>"]
    trainer = trainers.BpeTrainer(
        vocab_size=200, special_tokens=specials, end_of_word_suffix="</w>", show_progress=False
    )
    corpus = ["hello world, the weather in paris is sunny", "two spaces line break hi 12345"]
    tok.train_from_iterator(corpus * 10, trainer)
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))
    config = {"chat_template": CHATML_NL, "eos_token": "</s>", **config}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


# ---------------------------------------------------------------------------------------------
# 1. default special tokens where tokenizer_config.json names none
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "eos"),
    [
        ("LlamaTokenizerFast", "</s>"),
        ("GemmaTokenizerFast", "<eos>"),
        ("GPT2Tokenizer", "<|endoftext|>"),
        ("Qwen2TokenizerFast", "<|endoftext|>"),
    ],
)
def test_a_folder_naming_no_eos_gets_its_class_default_as_in_transformers(tmp_path, cls, eos):
    """transformers' Llama, Gemma, GPT-2 and Qwen2 classes default EOS (and BOS, UNK, ...) where
    tokenizer_config.json names none; TRL appends that EOS to plain completions, and a chat
    template sees the defaults as its variables."""
    if cls.startswith(("Llama", "Gemma")):
        folder = (
            sentencepiece_like(tmp_path / "f")
            if cls.startswith("Llama")
            else gemma_like(tmp_path / "f", prepend=False)
        )
        _config(folder, tokenizer_class=cls, eos_token=None, bos_token=None, unk_token=None)
    else:
        folder = byte_level_like(tmp_path / "f", chat_template=CHATML_NL)
        _config(folder, tokenizer_class=cls, eos_token=None, pad_token=None)
    _config(folder, chat_template=DEFAULTS_TEMPLATE)
    tok = PairTokenizer.from_dir(folder)
    assert tok.eos_token == eos
    _assert_same_ids_as_transformers(folder, tmp_path)
    chat = [
        {
            "prompt": [{"role": "user", "content": "hello world"}],
            "chosen": [{"role": "assistant", "content": "Hi there"}],
            "rejected": [{"role": "assistant", "content": "no"}],
        }
    ]
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    messages = chat[0]["prompt"] + chat[0]["chosen"]
    rendered = hf_tok.apply_chat_template(messages, tokenize=False)
    assert tok.render_chat(messages, add_generation_prompt=False) == rendered
    assert _ours(folder, chat, tmp_path) == _trl_prepared(folder, chat)


def test_no_eos_anywhere_is_an_error_that_says_what_to_add_where(tmp_path):
    folder = _config(byte_level_like(tmp_path / "f", chat_template=CHATML_NL), eos_token=None)
    # transformers' plain backend has no default: TRL could not append one either
    assert transformers.AutoTokenizer.from_pretrained(str(folder)).eos_token is None
    with pytest.raises(ValueError, match="no EOS token") as info:
        PairTokenizer.from_dir(folder)
    message = str(info.value)
    assert '"eos_token"' in message and str(folder / "tokenizer_config.json") in message
    assert "'<|im_end|>'" in message  # the special tokens to choose from
    # a class default that is not in the vocabulary is not taken (transformers would give it a
    # new id, outside the model's embeddings) ...
    folder = gemma_like(tmp_path / "g", prepend=False)
    _config(folder, tokenizer_class="LlamaTokenizerFast", eos_token=None)
    with pytest.raises(ValueError, match="LlamaTokenizer would use '</s>', which is not in"):
        PairTokenizer.from_dir(folder)
    # ... and config.json's eos_token_id names one where nothing else does
    (folder / "config.json").write_text(json.dumps({"eos_token_id": 1}))
    assert PairTokenizer.from_dir(folder).eos_token == "<eos>"


# ---------------------------------------------------------------------------------------------
# 2. CodeLlama
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"add_prefix_space": False},
        {"legacy": True, "add_bos_token": False},
        {"post_processor": None},
    ],
    ids=["defaults", "no_prefix_space", "legacy_no_bos_flag", "file_without_post_processor"],
)
def test_a_code_llama_folder_gives_transformers_and_trl_s_ids(tmp_path, changes):
    """transformers' CodeLlamaTokenizer puts "▁" in front of the first piece of text whatever
    `legacy` says (none with add_prefix_space false) and BOS in front of every text whatever the
    file's post-processor and tokenizer_config.json's add_bos_token say."""
    folder = sentencepiece_like(tmp_path / "code", chat_template=LLAMA2_LIKE)
    changes = dict(changes)
    if "post_processor" in changes:
        inner = Tokenizer.from_file(str(folder / "tokenizer.json"))
        inner.post_processor = changes.pop("post_processor")
        (folder / "tokenizer.json").write_text(inner.to_str())
    _config(folder, tokenizer_class="CodeLlamaTokenizer", **changes)
    chat = [
        {
            "prompt": [{"role": "user", "content": "say no"}],
            "chosen": [{"role": "assistant", "content": "No way"}],
            "rejected": [{"role": "assistant", "content": "Sure"}],
        }
    ]
    _assert_same_ids_as_transformers(folder, tmp_path)
    assert _ours(folder, chat, tmp_path) == _trl_prepared(folder, chat)
    assert PairTokenizer.from_dir(folder).add_bos


# ---------------------------------------------------------------------------------------------
# 3. Gemma, GPT-2 and Qwen2 pipelines, and which class a folder gets
# ---------------------------------------------------------------------------------------------


def _gpt2_prefix_in_config(tmp_path: Path) -> Path:
    folder = byte_level_like(tmp_path / "f", chat_template=CHATML_NL)
    return _config(folder, tokenizer_class="GPT2TokenizerFast", add_prefix_space=True)


def _qwen2_prefix_in_config(tmp_path: Path) -> Path:
    folder = byte_level_like(tmp_path / "f", chat_template=CHATML_NL)
    return _config(folder, tokenizer_class="Qwen2TokenizerFast", add_prefix_space=True)


def _gpt2_prefix_in_file_only(tmp_path: Path) -> Path:
    folder = byte_level_like(tmp_path / "f", chat_template=CHATML_NL)
    inner = Tokenizer.from_file(str(folder / "tokenizer.json"))
    inner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    (folder / "tokenizer.json").write_text(inner.to_str())
    return _config(folder, tokenizer_class="GPT2Tokenizer")


def _qwen2_model_naming_llama(tmp_path: Path) -> Path:
    # DeepSeek-R1-Distill-Qwen's mix: a qwen2 model whose byte-level tokenizer names Llama's
    # class; transformers builds Qwen2's pipeline (NFC, Qwen2's split) over the file's vocabulary
    folder = byte_level_like(tmp_path / "f", chat_template=CHATML_NL)
    return _model_type(_config(folder, tokenizer_class="LlamaTokenizerFast"), "qwen2")


def _starcoder2_digit_split(tmp_path: Path) -> Path:
    # a file that splits numbers into single digits before the byte-level step; the GPT2 class's
    # pipeline has no such split, and TRL's ids are that pipeline's (README)
    folder = byte_level_like(tmp_path / "f", chat_template=CHATML_NL)
    inner = Tokenizer.from_file(str(folder / "tokenizer.json"))
    digits = inner.token_to_id("1") + 1000  # a merge of digits, past the vocabulary's ids
    pipeline = json.loads(inner.to_str())
    pipeline["model"]["vocab"]["12"] = digits
    pipeline["model"]["merges"].append(["1", "2"])
    pipeline["pre_tokenizer"] = {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            pipeline["pre_tokenizer"],
        ],
    }
    (folder / "tokenizer.json").write_text(json.dumps(pipeline))
    assert digits not in transformers.AutoTokenizer.from_pretrained(str(folder)).encode("x 123")
    _model_type(_config(folder, tokenizer_class="GPT2Tokenizer"), "starcoder2")
    assert digits in transformers.AutoTokenizer.from_pretrained(str(folder)).encode("x 123")
    return folder


def _gemma_with_prepend_and_flags(tmp_path: Path) -> Path:
    folder = gemma_like(tmp_path / "f", prepend=True)
    return _config(folder, add_bos_token=False, add_eos_token=True)  # both unread


def _gemma_model_naming_no_class(tmp_path: Path) -> Path:
    folder = gemma_like(tmp_path / "f", prepend=True)
    return _model_type(_config(folder, tokenizer_class=None), "gemma2")


def _plain_model_type_naming_gemma(tmp_path: Path) -> Path:
    return _model_type(gemma_like(tmp_path / "f", prepend=True), "mistral")


def _qwen3_model_naming_the_plain_class(tmp_path: Path) -> Path:
    folder = byte_level_like(tmp_path / "f", chat_template=CHATML_NL)
    inner = Tokenizer.from_file(str(folder / "tokenizer.json"))
    inner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    (folder / "tokenizer.json").write_text(inner.to_str())
    return _model_type(folder, "qwen3")


def _code_llama_model_type(tmp_path: Path) -> Path:
    # "code_llama" names CodeLlama's class in transformers' table but no model configuration
    # (CodeLlama checkpoints are of type "llama"): AutoTokenizer goes by no model type
    folder = sentencepiece_like(tmp_path / "f")
    return _model_type(_config(folder, tokenizer_class=None), "code_llama")


def _gpt2_model_naming_the_empty_class(tmp_path: Path) -> Path:
    # a class named "" is one transformers has none by: its plain backend, not the model type's
    folder = byte_level_like(tmp_path / "f", chat_template=CHATML_NL)
    return _model_type(_config(folder, tokenizer_class=""), "gpt2")


def _olmo_bos_eos_post_processor(tmp_path: Path) -> Path:
    # GPTNeoXTokenizer (Pythia, OLMo 1, OLMoE, MPT) rebuilds the post-processor from
    # add_bos_token and add_eos_token, which transformers drops beside a tokenizer.json: the
    # file's BOS and EOS around a text are gone, and EOS is the class's default
    folder = byte_level_wide(tmp_path / "f", add_bos_token=True, add_eos_token=True)
    inner = Tokenizer.from_file(str(folder / "tokenizer.json"))
    inner.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A <|endoftext|>", special_tokens=[("<|endoftext|>", 0)]
    )
    (folder / "tokenizer.json").write_text(inner.to_str())
    return _model_type(folder, "olmo")


def _gpt_neox_prefix_space_and_nfc(tmp_path: Path) -> Path:
    # NFC (the file has no normaliser) and tokenizer_config.json's add_prefix_space
    folder = byte_level_wide(
        tmp_path / "f", tokenizer_class="GPTNeoXTokenizerFast", add_prefix_space=True
    )
    return _config(folder, eos_token="<|endoftext|>")


def _qwen3_5_model_naming_qwen2(tmp_path: Path) -> Path:
    # Qwen3.5's folders name Qwen2's class; transformers builds Qwen3.5's, whose split keeps a
    # word's combining marks (Devanagari's vowel signs) in the word
    folder = byte_level_wide(tmp_path / "f", tokenizer_class="Qwen2TokenizerFast")
    return _model_type(_config(folder, eos_token="<|im_end|>"), "qwen3_5")


def _cohere_model_naming_no_class(tmp_path: Path) -> Path:
    # Cohere's class splits numbers into single digits and defaults EOS to its end of turn
    return _model_type(byte_level_wide(tmp_path / "f"), "cohere2")


def _codegen_prefix_space(tmp_path: Path) -> Path:
    folder = byte_level_wide(tmp_path / "f", tokenizer_class="CodeGenTokenizer")
    return _model_type(_config(folder, add_prefix_space=True), "codegen")


def _xglm_named(tmp_path: Path) -> Path:
    # XGLM's class: its own normaliser after the file's character map, "▁" in front of every
    # text, unknown token at id 3, EOS (not BOS) in front, "<madeupword0>" one special token
    return unigram_like(tmp_path / "f", tokenizer_class="XGLMTokenizer")


def _xglm_model_type_no_prefix_space(tmp_path: Path) -> Path:
    folder = unigram_like(tmp_path / "f", add_prefix_space=False, eos_token="<|im_end|>")
    return _model_type(folder, "xglm")


def _openai_gpt_named(tmp_path: Path) -> Path:
    # lower-cased, accents stripped, split as BERT's; the file's own normaliser is not read
    return openai_gpt_like(tmp_path / "f", tokenizer_class="OpenAIGPTTokenizerFast")


def _openai_gpt_model_type(tmp_path: Path) -> Path:
    return _model_type(openai_gpt_like(tmp_path / "f"), "openai-gpt")


def _llama_over_unigram(tmp_path: Path) -> Path:
    # a BPE class over a Unigram file: transformers takes its vocabulary, in order, as a BPE
    # vocabulary without merges
    folder = unigram_like(tmp_path / "f", tokenizer_class="LlamaTokenizer", eos_token="</s>")
    return _config(folder, bos_token="<s>")


FOLDERS = {  # name: (builder, the class transformers builds)
    "gpt2_prefix_in_config": (_gpt2_prefix_in_config, "GPT2Tokenizer"),
    "qwen2_prefix_in_config": (_qwen2_prefix_in_config, "Qwen2Tokenizer"),
    "gpt2_prefix_in_file_only": (_gpt2_prefix_in_file_only, "GPT2Tokenizer"),
    "qwen2_model_naming_llama": (_qwen2_model_naming_llama, "Qwen2Tokenizer"),
    "starcoder2_digit_split": (_starcoder2_digit_split, "GPT2Tokenizer"),
    "gemma_prepend_and_flags": (_gemma_with_prepend_and_flags, "GemmaTokenizer"),
    "gemma_model_naming_no_class": (_gemma_model_naming_no_class, "GemmaTokenizer"),
    "mistral_model_naming_gemma": (_plain_model_type_naming_gemma, "TokenizersBackend"),
    "qwen3_model_naming_plain": (_qwen3_model_naming_the_plain_class, "TokenizersBackend"),
    "code_llama_model_type": (_code_llama_model_type, "TokenizersBackend"),
    "gpt2_model_naming_empty_class": (_gpt2_model_naming_the_empty_class, "TokenizersBackend"),
    "olmo_bos_eos_post_processor": (_olmo_bos_eos_post_processor, "GPTNeoXTokenizer"),
    "gpt_neox_prefix_space_nfc": (_gpt_neox_prefix_space_and_nfc, "GPTNeoXTokenizer"),
    "qwen3_5_model_naming_qwen2": (_qwen3_5_model_naming_qwen2, "Qwen3_5Tokenizer"),
    "cohere_model_naming_no_class": (_cohere_model_naming_no_class, "CohereTokenizer"),
    "codegen_prefix_space": (_codegen_prefix_space, "CodeGenTokenizer"),
    "xglm_named": (_xglm_named, "XGLMTokenizer"),
    "xglm_model_type_no_prefix_space": (_xglm_model_type_no_prefix_space, "XGLMTokenizer"),
    "openai_gpt_named": (_openai_gpt_named, "OpenAIGPTTokenizer"),
    "openai_gpt_model_type": (_openai_gpt_model_type, "OpenAIGPTTokenizer"),
    "llama_over_unigram": (_llama_over_unigram, "LlamaTokenizer"),
}


@pytest.mark.parametrize("name", list(FOLDERS))
def test_the_class_transformers_builds_and_its_pipeline_give_the_same_ids(tmp_path, name):
    builder, expected = FOLDERS[name]
    folder = builder(tmp_path)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    assert type(hf_tok).__name__ == expected
    inner = Tokenizer.from_file(str(folder / "tokenizer.json"))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    model_path = folder / "config.json"
    model_config = json.loads(model_path.read_text()) if model_path.is_file() else {}
    chosen = backend_class(inner, config, model_config)
    assert (chosen or "TokenizersBackend") == expected
    _assert_same_ids_as_transformers(folder, tmp_path)


def test_class_names_and_model_types_of_the_wrong_type_are_ignored():
    # a hand-edited config.json or tokenizer_config.json: no TypeError, the class as if unnamed
    inner = Tokenizer(models.BPE(vocab={"a": 0}, merges=[]))
    assert backend_class(inner, {"tokenizer_class": ["x"]}, {"model_type": ["qwen2"]}) is None
    assert backend_class(inner, {"tokenizer_class": 7}, {"model_type": "gemma"}) == "GemmaTokenizer"


@pytest.mark.parametrize(
    ("cls", "unk"),
    [("CodeLlamaTokenizer", "<nope>"), ("GemmaTokenizer", None)],
    ids=["code_llama_unknown_unk", "gemma_null_unk"],
)
def test_an_unknown_token_outside_the_vocabulary_fails_the_texts_it_fails_in_transformers(
    tmp_path, cls, unk
):
    """CodeLlama's and Gemma's classes give their BPE tokenizer_config.json's unk_token as text
    (a null one as "None"); outside the vocabulary it fails a text with a character neither the
    vocabulary nor its byte tokens cover. Such a row is an error naming it, as TRL fails on it;
    other rows get transformers' ids."""
    folder = _config(sentencepiece_like(tmp_path / "code"), tokenizer_class=cls, pad_token=None)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "unk_token": unk}))
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    with pytest.raises(Exception, match="not found in the vocabulary"):
        hf_tok.encode("hi 日本")
    tok = PairTokenizer.from_dir(folder)
    assert tok.encode_texts(["hi there"])[0] == hf_tok.encode("hi there", **NO_SPECIALS)
    rows = [
        {"prompt": "[INST] hi there [/INST]", "chosen": " Sure thing", "rejected": " No way"},
        {"prompt": "[INST] say no [/INST]", "chosen": " No 日本", "rejected": " Sure"},
    ]
    assert _ours(folder, rows[:1], tmp_path) == _trl_prepared(folder, rows[:1])
    with pytest.raises(DataError, match=r"line 2, field 'chosen': the tokenizer cannot encode"):
        _ours(folder, rows, tmp_path)


def test_a_post_processor_s_front_token_starts_plain_prompts_whatever_bos_is_named(tmp_path):
    # the file puts <s> in front of text, tokenizer_config.json names another BOS (which a
    # template would write): transformers' plain prompts, and so TRL's, start with <s>
    folder = _config(sentencepiece_like(tmp_path / "f"), bos_token="<|im_start|>")
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    tok = PairTokenizer.from_dir(folder)
    assert tok.bos_token == hf_tok.bos_token == "<|im_start|>"
    for text in ["hi there", " Sure thing", "<|im_start|>hi"]:
        assert tok.prompt_ids(tok.encode_texts([text])[0]) == hf_tok.encode(text)
    assert _ours(folder, PLAIN, tmp_path) == _trl_prepared(folder, PLAIN)


def test_config_json_s_bos_token_id_is_not_a_bos_the_template_sees(tmp_path):
    # transformers reads no BOS from config.json: a template's bos_token is undefined there
    folder = byte_level_like(tmp_path / "f", chat_template=DEFAULTS_TEMPLATE)
    (folder / "config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": 2}))
    chat = [
        {
            "prompt": [{"role": "user", "content": "the weather"}],
            "chosen": [{"role": "assistant", "content": "sunny"}],
            "rejected": [{"role": "assistant", "content": "in Paris"}],
        }
    ]
    _assert_same_ids_as_transformers(folder, tmp_path)
    assert _ours(folder, chat, tmp_path) == _trl_prepared(folder, chat)


def test_an_added_token_unlisted_in_added_tokens_decoder_is_text_for_a_rebuilt_class(tmp_path):
    # a class transformers builds itself registers the added tokens tokenizer_config.json lists
    # (and the special tokens it names), not the rest of tokenizer.json's: "<think>" is split
    folder = byte_level_like(tmp_path / "f", chat_template=CHATML_NL)
    inner = Tokenizer.from_file(str(folder / "tokenizer.json"))
    listed = {
        str(i): {"content": t.content, "special": True}
        for i, t in inner.get_added_tokens_decoder().items()
        if t.special
    }
    _config(folder, tokenizer_class="Qwen2TokenizerFast", added_tokens_decoder=listed)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    text = "<|im_start|>user\n<think>hi</think><|im_end|>"
    ids = hf_tok.encode(text, **NO_SPECIALS)
    assert len(ids) > 6 and PairTokenizer.from_dir(folder).encode_texts([text])[0] == ids


@pytest.mark.parametrize(
    ("file", "changes", "match"),
    [
        ("config.json", {"model_type": ["llama"]}, "model_type is"),
        ("tokenizer_config.json", {"add_prefix_space": None}, "add_prefix_space is null"),
        (
            "tokenizer_config.json",
            {"add_prefix_space": None, "tokenizer_class": "GPTNeoXTokenizerFast"},
            "GPTNeoXTokenizer cannot build",
        ),
    ],
    ids=["model_type_list", "gpt2_null_add_prefix_space", "gpt_neox_null_add_prefix_space"],
)
def test_a_folder_transformers_cannot_load_is_an_error_naming_the_file(
    tmp_path, file, changes, match
):
    folder = byte_level_like(tmp_path / "f", chat_template=CHATML_NL)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["tokenizer_class"] = "GPT2Tokenizer"
    if file == "config.json":
        (folder / file).write_text(json.dumps(changes))
    else:
        config.update(changes)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(TypeError):
        transformers.AutoTokenizer.from_pretrained(str(folder))
    with pytest.raises(ValueError, match=match) as info:
        PairTokenizer.from_dir(folder)
    assert str(folder / file) in str(info.value)


def test_the_token_cache_fingerprint_follows_the_class_config_json_picks(tmp_path):
    # the token cache hashes tokenizer_config.json but not config.json: the fingerprint carries
    # what config.json's model type changes (here Qwen2's pipeline over a plain byte-level file)
    folder = byte_level_like(tmp_path / "f", chat_template=CHATML_NL)
    plain = PairTokenizer.from_dir(folder).fingerprint
    assert PairTokenizer.from_dir(_model_type(folder, "llama")).fingerprint == plain
    assert PairTokenizer.from_dir(_model_type(folder, "qwen2")).fingerprint != plain


# ---------------------------------------------------------------------------------------------
# 4. classes sdpo refuses, and special tokens outside the vocabulary
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "model_type", "where"),
    [
        (
            {"tokenizer_class": "GPTNeoXJapaneseTokenizer"},
            None,
            "tokenizer_config.json's tokenizer_class 'GPTNeoXJapaneseTokenizer'",
        ),
        (
            {"tokenizer_class": None},
            "gpt_neox_japanese",
            "config.json's model_type 'gpt_neox_japanese'",
        ),
        (
            {"tokenizer_class": "XGLMTokenizerFast"},
            "gpt2",
            "tokenizer_config.json's tokenizer_class 'XGLMTokenizerFast'",
        ),
    ],
    ids=["gpt_neox_japanese_named", "gpt_neox_japanese_model_type", "xglm_over_bpe"],
)
def test_a_class_sdpo_cannot_build_is_refused_naming_where_it_comes_from(
    tmp_path, config, model_type, where
):
    """GPT-NeoX Japanese's class is a Python tokenizer that reads vocab.txt and emoji.json, and
    XGLM's builds a Unigram model, which a BPE tokenizer.json cannot give: transformers fails on
    both folders (TRL could not run); sdpo says which setting picks the class and what to do."""
    folder = _config(byte_level_like(tmp_path / "f", chat_template=CHATML_NL), **config)
    if model_type is not None:
        _model_type(folder, model_type)
    with pytest.raises((TypeError, ValueError, OSError)):
        transformers.AutoTokenizer.from_pretrained(str(folder))
    with pytest.raises(ValueError, match="makes transformers build") as info:
        PairTokenizer.from_dir(folder)
    message = str(info.value)
    assert where in message and str(folder / "tokenizer_config.json") in message
    assert '"tokenizer_class": "PreTrainedTokenizerFast"' in message


def test_an_xglm_folder_with_a_null_bos_fails_as_in_transformers(tmp_path):
    folder = unigram_like(tmp_path / "f", tokenizer_class="XGLMTokenizer", bos_token=None)
    with pytest.raises(TypeError):
        transformers.AutoTokenizer.from_pretrained(str(folder))
    with pytest.raises(ValueError, match="bos_token is null, which transformers' XGLMTokenizer"):
        PairTokenizer.from_dir(folder)


CHAT = [
    {
        "prompt": [{"role": "user", "content": "the weather"}],
        "chosen": [{"role": "assistant", "content": "sunny"}],
        "rejected": [{"role": "assistant", "content": "in Paris"}],
    }
]


def test_a_bos_outside_the_vocabulary_is_refused_only_by_the_rows_that_use_it(tmp_path):
    """transformers gives a named BOS the vocabulary lacks a new id, past the model's
    embeddings. Rows that never get it (no post-processor adds it, the chat template does not
    write it) tokenize as TRL's; a row whose template output or text holds it is an error naming
    the row and field."""
    folder = _config(byte_level_like(tmp_path / "f", chat_template=CHATML_NL), bos_token="<nope>")
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    inner = Tokenizer.from_file(str(folder / "tokenizer.json"))
    assert hf_tok.bos_token_id >= inner.get_vocab_size()
    tok = PairTokenizer.from_dir(folder)
    assert tok.bos_token == "<nope>" and not tok.add_bos
    assert _ours(folder, PLAIN, tmp_path) == _trl_prepared(folder, PLAIN)
    assert _ours(folder, CHAT, tmp_path) == _trl_prepared(folder, CHAT)
    _config(folder, chat_template=LLAMA2_LIKE)  # writes bos_token in front of each user turn
    assert hf_tok.bos_token_id in _trl_prepared(folder, CHAT)[0][0]
    match = r"line 1, field 'prompt': the tokenizer's BOS token '<nope>' is not in its vocabulary"
    with pytest.raises(DataError, match=match + ", and the chat template writes it"):
        _ours(folder, CHAT, tmp_path)
    rows = [dict(PLAIN[1]), {**PLAIN[0], "rejected": " no <nope>"}]
    with pytest.raises(DataError, match=r"line 2, field 'rejected': .* the text contains it"):
        _ours(folder, rows, tmp_path)


def test_a_code_llama_bos_outside_the_vocabulary_is_refused_by_plain_rows_only(tmp_path):
    # CodeLlama's class puts BOS in front of every text: TRL's plain prompts start with the new
    # id; conversational ones are the template's (this one writes no BOS, and no newline, which
    # the vocabulary lacks, after a turn)
    template = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + ' ' + m['content'] + "
        "'<|im_end|>' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant ' }}"
        "{% endif %}"
    )
    folder = sentencepiece_like(tmp_path / "f", chat_template=template)
    _config(folder, tokenizer_class="CodeLlamaTokenizer", bos_token="<nope>")
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    assert _trl_prepared(folder, PLAIN)[0][0][0] == hf_tok.bos_token_id
    with pytest.raises(DataError, match=r"line 1, field 'prompt': .* in front of every plain"):
        _ours(folder, PLAIN, tmp_path)
    assert _ours(folder, CHAT, tmp_path) == _trl_prepared(folder, CHAT)


def test_a_class_default_bos_outside_the_vocabulary_is_the_template_s_bos_as_in_transformers(
    tmp_path,
):
    # Gemma's class defaults BOS to "<bos>", which this vocabulary lacks: transformers still
    # names it (a new id), and a template that writes it gets that id in TRL's prompts
    folder = sentencepiece_like(tmp_path / "f", chat_template=LLAMA2_LIKE)
    _config(folder, tokenizer_class="GemmaTokenizer", bos_token=None)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    assert hf_tok.bos_token == "<bos>" and PairTokenizer.from_dir(folder).bos_token == "<bos>"
    with pytest.raises(DataError, match="BOS token '<bos>' is not in its vocabulary"):
        _ours(folder, CHAT, tmp_path)
    assert _ours(folder, PLAIN, tmp_path) == _trl_prepared(folder, PLAIN)


def _outside_vocab_row(folder: Path, tmp_path: Path, text: str, field: str):
    """The error of a plain row whose ``field`` holds ``text`` after a row without it, which
    tokenizes as TRL's."""
    rows = [dict(PLAIN[1]), {**PLAIN[0], field: PLAIN[0][field] + text}]
    assert _ours(folder, rows[:1], tmp_path) == _trl_prepared(folder, rows[:1])
    with pytest.raises(DataError) as info:
        _ours(folder, rows, tmp_path)
    return str(info.value)


@pytest.mark.parametrize(
    ("config", "token", "where"),
    [
        ({"pad_token": "<mypad>"}, "<mypad>", "pad_token in tokenizer_config.json"),
        ({"unk_token": "<myunk>"}, "<myunk>", "unk_token in tokenizer_config.json"),
        ({"sep_token": "<mysep>"}, "<mysep>", "sep_token in tokenizer_config.json"),
        ({"cls_token": "<mycls>"}, "<mycls>", "cls_token in tokenizer_config.json"),
        ({"mask_token": "<mymask>"}, "<mymask>", "mask_token in tokenizer_config.json"),
        (
            {"additional_special_tokens": ["<extra>"]},
            "<extra>",
            "listed in tokenizer_config.json's additional_special_tokens",
        ),
        (
            {"extra_special_tokens": {"image_token": "<img>"}},
            "<img>",
            "image_token of extra_special_tokens in tokenizer_config.json",
        ),
    ],
    ids=["pad", "unk", "sep", "cls", "mask", "additional", "extra"],
)
def test_a_named_special_token_outside_the_vocabulary_is_refused_by_the_rows_that_use_it(
    tmp_path, config, token, where
):
    """transformers registers every special token tokenizer_config.json names, giving one the
    vocabulary lacks a new id past the model's embeddings. A row whose text (or the chat
    template's output) holds it is an error naming the row, field and token; rows without it
    tokenize as TRL's."""
    folder = _config(byte_level_like(tmp_path / "f", chat_template=CHATML_NL), **config)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    size = Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab_size()
    assert hf_tok.encode(f"a{token}b", **NO_SPECIALS)[1] >= size
    message = _outside_vocab_row(folder, tmp_path, f" {token} x", "rejected")
    assert f"line 2, field 'rejected': the tokenizer's special token {token!r} ({where}" in message
    assert "the text contains it" in message and "resize the model's embeddings" in message
    # encode_texts, the low-level call, refuses it too, naming the text
    with pytest.raises(SpecialTokenOutsideVocabError, match=f"text 1: .*{token!r}") as info:
        PairTokenizer.from_dir(folder).encode_texts(["the weather", f"a{token}b"])
    assert (info.value.index, info.value.token) == (1, token)


def test_special_tokens_outside_the_vocabulary_written_by_a_template_or_a_class_s_default(
    tmp_path,
):
    # a template that writes pad_token; Gemma's default <pad> and <mask>, CodeLlama's infilling
    # tokens and XGLM's <madeupwordN>, which these vocabularies lack, get new ids there too
    template = "{{ pad_token }}" + CHATML_NL
    folder = _config(byte_level_like(tmp_path / "f", chat_template=template), pad_token="<mypad>")
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    assert hf_tok.pad_token_id in _trl_prepared(folder, CHAT)[0][0]
    with pytest.raises(DataError, match=r"field 'prompt': .*'<mypad>' .* the chat template"):
        _ours(folder, CHAT, tmp_path)

    gemma = _config(sentencepiece_like(tmp_path / "g"), tokenizer_class="GemmaTokenizer")
    _config(gemma, pad_token=None, mask_token=None)
    message = _outside_vocab_row(gemma, tmp_path, " <mask>", "chosen")
    assert "'<mask>' (transformers' GemmaTokenizer's default mask_token)" in message
    assert 'set "mask_token": null in tokenizer_config.json' in message

    code = _config(sentencepiece_like(tmp_path / "c"), tokenizer_class="CodeLlamaTokenizer")
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(code))
    assert hf_tok.encode("x ▁<EOT>", **NO_SPECIALS)[-1] >= hf_tok.backend_tokenizer.get_vocab_size(
        False
    )
    message = _outside_vocab_row(code, tmp_path, " ▁<EOT>", "prompt")
    assert "'▁<EOT>' (transformers' CodeLlamaTokenizer's default eot_token)" in message
    config = json.loads((code / "tokenizer_config.json").read_text())
    config["eot_token"] = None  # not registered: "▁<EOT>" is text, as in transformers
    (code / "tokenizer_config.json").write_text(json.dumps(config))
    rows = [{**PLAIN[0], "prompt": PLAIN[0]["prompt"] + " ▁<EOT>"}]
    assert _ours(code, rows, tmp_path) == _trl_prepared(code, rows)

    xglm = unigram_like(tmp_path / "x", tokenizer_class="XGLMTokenizer")
    message = _outside_vocab_row(xglm, tmp_path, " <madeupword3>", "chosen")
    assert "'<madeupword3>' (one of transformers' XGLMTokenizer's own special tokens)" in message


# ---------------------------------------------------------------------------------------------
# 7. Added-token options, added_tokens_decoder entries and CodeLlama's infilling token
# ---------------------------------------------------------------------------------------------

OPTION_TEXTS = [
    "a <|im_end|> b", "a<|im_end|>b", "x <|im_end|>\n y", "<|im_end|>hi", "hi <|im_end|>",
    "[INST] hi <|im_start|>  there",
]  # fmt: skip


@pytest.mark.parametrize("cls", [None, "LlamaTokenizer"], ids=["file", "llama_class"])
def test_added_tokens_decoder_options_replace_tokenizer_json_s_as_in_transformers(tmp_path, cls):
    """An added_tokens_decoder entry whose lstrip, rstrip, single_word or normalized differs
    from tokenizer.json's token is the one transformers applies (it re-adds the token with the
    entry's options), either way round: the ids are AutoTokenizer's."""
    base = sentencepiece_like(tmp_path / "base")
    pipeline = json.loads((base / "tokenizer.json").read_text())
    for option in ("lstrip", "rstrip", "single_word", "normalized"):
        for in_file in (False, True):
            folder = tmp_path / f"{option}{in_file}"
            folder.mkdir()
            file_tokens = [{**t} for t in pipeline["added_tokens"]]
            decoder = {}
            for token in file_tokens:
                entry = {k: v for k, v in token.items() if k != "id"}
                if token["content"] in ("<|im_end|>", "<|im_start|>"):
                    token[option], entry[option] = in_file, not in_file
                decoder[str(token["id"])] = entry
            (folder / "tokenizer.json").write_text(
                json.dumps({**pipeline, "added_tokens": file_tokens})
            )
            config = json.loads((base / "tokenizer_config.json").read_text())
            config.update(added_tokens_decoder=decoder, tokenizer_class=cls)
            (folder / "tokenizer_config.json").write_text(json.dumps(config))
            hf_tok = transformers.AutoTokenizer.from_pretrained(str(folder))
            tok = PairTokenizer.from_dir(folder)
            for text in OPTION_TEXTS:
                ids = hf_tok.encode(text, **NO_SPECIALS)
                assert tok.encode_texts([text])[0] == ids, (option, in_file, text)


@pytest.mark.parametrize(
    "cls", [None, "LlamaTokenizer", "Qwen2Tokenizer"], ids=["file", "llama_class", "qwen2_class"]
)
def test_a_named_special_token_s_added_token_options_apply_where_transformers_adds_it(
    tmp_path, cls
):
    """A special token named as an AddedToken object (lstrip, rstrip, single_word,
    normalized) that tokenizer.json has only in its vocabulary is added with those options, as
    transformers adds it; Qwen2's class adds every special token again without them."""
    base = sentencepiece_like(tmp_path / "base")
    pipeline = json.loads((base / "tokenizer.json").read_text())
    pipeline["added_tokens"] = [t for t in pipeline["added_tokens"] if t["content"] != "<|im_end|>"]
    for option in ("lstrip", "rstrip", "single_word", "normalized"):
        folder = tmp_path / option
        folder.mkdir()
        (folder / "tokenizer.json").write_text(json.dumps(pipeline))
        (folder / "tokenizer_config.json").write_text((base / "tokenizer_config.json").read_text())
        eos = {"__type": "AddedToken", "content": "<|im_end|>", "special": True, option: True}
        _config(folder, eos_token=eos, tokenizer_class=cls)
        hf_tok = transformers.AutoTokenizer.from_pretrained(str(folder))
        tok = PairTokenizer.from_dir(folder)
        for text in OPTION_TEXTS[:5]:
            assert tok.encode_texts([text])[0] == hf_tok.encode(text, **NO_SPECIALS), (option, text)


def test_an_added_tokens_decoder_entry_the_vocabulary_lacks_is_refused_where_used(tmp_path):
    """transformers adds every added_tokens_decoder entry, one missing from tokenizer.json with
    the next free id (not the entry's key), past the model's embeddings, and matches a
    normalized one in the normalised text ("<SHOUT>" lower-cased to "<shout>"). sdpo gives the
    same ids and refuses the rows, and encode_texts the texts, that hold one."""
    folder = byte_level_like(tmp_path / "f", chat_template=CHATML_NL)
    pipeline = json.loads((folder / "tokenizer.json").read_text())
    pipeline["normalizer"] = {"type": "Lowercase"}
    (folder / "tokenizer.json").write_text(json.dumps(pipeline))
    decoder = {str(t.pop("id")): t for t in pipeline["added_tokens"]}
    decoder["900"] = {"content": "<new>", "special": True}
    decoder["901"] = {"content": "<Shout>", "normalized": True, "special": False}
    _config(folder, added_tokens_decoder=decoder)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    tok = PairTokenizer.from_dir(folder)
    size = Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab_size()
    assert tok.vocab_size == size and tok.max_id == size - 1
    for text in ("a <new> b", "a <SHOUT> b", "x<shout>"):
        ids = hf_tok.encode(text, **NO_SPECIALS)
        assert max(ids) >= size
        assert tok.tokenizer.encode(text, add_special_tokens=False).ids == ids
    message = _outside_vocab_row(folder, tmp_path, " <SHOUT> x", "chosen")
    assert (
        "added token '<Shout>' (entry 901 of tokenizer_config.json's added_tokens_decoder)"
        in message
    )
    assert "remove that entry from tokenizer_config.json's added_tokens_decoder" in message
    with pytest.raises(SpecialTokenOutsideVocabError, match="text 1: .*'<new>'") as info:
        tok.encode_texts(["the weather", "in <new> Paris"])
    assert (info.value.index, info.value.token) == (1, "<new>")


def test_a_token_named_in_special_tokens_map_json_is_said_to_be_named_there(tmp_path):
    folder = byte_level_like(tmp_path / "f", chat_template=CHATML_NL)
    (folder / "special_tokens_map.json").write_text(json.dumps({"pad_token": "<mypad>"}))
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    assert hf_tok.pad_token == "<mypad>"  # read from the map: no added_tokens_decoder
    message = _outside_vocab_row(folder, tmp_path, " <mypad>", "prompt")
    assert "'<mypad>' (pad_token in special_tokens_map.json)" in message
    assert "remove pad_token from special_tokens_map.json" in message


def test_code_llama_s_infilling_tokens_are_one_token_and_its_fill_token_is_refused(tmp_path):
    """transformers' CodeLlamaTokenizer registers "▁<PRE>", "▁<SUF>", "▁<MID>", "▁<EOT>" and
    "<FILL_ME>" also where tokenizer.json has them only in its vocabulary. A text holding
    "<FILL_ME>" it encodes as an infilling request (and leaves its pipeline changed for the
    texts after): sdpo refuses it, naming the row and field; with "fill_token": null it is a
    token like any other, as in transformers."""
    folder = sentencepiece_like(tmp_path / "code")
    pipeline = json.loads((folder / "tokenizer.json").read_text())
    vocab = pipeline["model"]["vocab"]
    for token in ("▁<PRE>", "▁<SUF>", "▁<MID>", "▁<EOT>", "<FILL_ME>"):
        vocab[token] = len(vocab)
    (folder / "tokenizer.json").write_text(json.dumps(pipeline))
    _config(folder, tokenizer_class="CodeLlamaTokenizer")
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    tok = PairTokenizer.from_dir(folder)
    for text in ("x ▁<PRE> y", "Sure▁<EOT>"):
        assert tok.encode_texts([text])[0] == hf_tok.encode(text, **NO_SPECIALS)
    # infilling: "▁<PRE>" first, "<FILL_ME>" not in the ids
    assert hf_tok.encode("a <FILL_ME> b", **NO_SPECIALS)[0] == vocab["▁<PRE>"]
    message = _outside_vocab_row(folder, tmp_path, " <FILL_ME> x", "chosen")
    assert "'<FILL_ME>', which transformers' CodeLlamaTokenizer" in message
    assert '"fill_token": null' in message
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "fill_token": None}))
    rows = [{**PLAIN[0], "chosen": " <FILL_ME> x"}]
    assert _ours(folder, rows, tmp_path) == _trl_prepared(folder, rows)


def test_a_plain_row_whose_eos_text_trl_would_not_read_as_eos_is_refused(tmp_path):
    """TRL appends the EOS token's text to a plain completion; with single_word true,
    transformers does not read it as EOS right after a letter, so TRL's completion would end
    with its pieces. Such a row is refused; one ending with a full stop gives TRL's ids."""
    folder = byte_level_like(tmp_path / "f", chat_template=CHATML_NL)
    pipeline = json.loads((folder / "tokenizer.json").read_text())
    for token in pipeline["added_tokens"]:
        token["single_word"] = token["content"] == "<|im_end|>"
    (folder / "tokenizer.json").write_text(json.dumps(pipeline))
    ended = [{"prompt": "the weather", "chosen": " is sunny.", "rejected": " in Paris!"}]
    assert _ours(folder, ended, tmp_path) == _trl_prepared(folder, ended)
    rows = [*ended, {**ended[0], "rejected": " in Paris"}]
    assert _trl_prepared(folder, rows)[1][2][-1] != PairTokenizer.from_dir(folder).eos_id
    with pytest.raises(DataError, match=r"line 2, field 'rejected': TRL ends .* single_word"):
        _ours(folder, rows, tmp_path)


def test_a_special_token_object_without_its_type_is_refused_where_transformers_fails(tmp_path):
    """tokenizer_config.json's special tokens are strings or objects with "__type":
    "AddedToken": transformers fails to load a folder naming one as another object (a named or
    model-specific token, or one listed), and sdpo refuses it, naming the file, the key and
    what to write. special_tokens_map.json's named tokens need no "__type" (transformers reads
    any object there as an AddedToken), and a model-specific key's other object is passed over
    by transformers (no template variable)."""
    base = byte_level_like(tmp_path / "base", chat_template="{{ image_token | default('-') }}")
    untyped = {"content": "<|im_end|>", "special": True}
    refused = [
        ({"eos_token": untyped}, None, r"eos_token in .*tokenizer_config\.json is \{"),
        ({"pad_token": {**untyped, "__type": "Other"}}, None, "pad_token in"),
        ({"extra_special_tokens": {"image_token": untyped}}, None, "image_token of extra_spe"),
        ({"additional_special_tokens": [untyped]}, None, "item 0 of additional_special_tokens"),
        ({}, {"extra_special_tokens": {"image_token": untyped}}, "special_tokens_map.json is"),
    ]
    loaded = [
        ({"eos_token": {**untyped, "__type": "AddedToken"}}, None),
        ({"image_token": untyped}, None),
        ({"eos_token": untyped}, {"eos_token": "<|im_end|>"}),  # the map's wins
        ({}, {"eos_token": untyped, "image_token": untyped}),
    ]
    cases = [(*c, None) for c in loaded] + refused
    for i, (changes, token_map, error) in enumerate(cases):
        folder = tmp_path / str(i)
        folder.mkdir()
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (folder / name).write_text((base / name).read_text())
        _config(folder, **changes)
        if token_map is not None:
            (folder / "special_tokens_map.json").write_text(json.dumps(token_map))
        if error is None:
            hf_tok = transformers.AutoTokenizer.from_pretrained(str(folder))
            tok = PairTokenizer.from_dir(folder)
            assert tok.eos_token == hf_tok.eos_token, changes
            rendered = hf_tok.apply_chat_template(
                [{"role": "user", "content": "x"}], tokenize=False
            )
            chat = tok.render_chat([{"role": "user", "content": "x"}], add_generation_prompt=False)
            assert chat == rendered, changes
            continue
        with pytest.raises(TypeError, match="has to be either str or AddedToken|Input must be"):
            transformers.AutoTokenizer.from_pretrained(str(folder))
        with pytest.raises(ValueError, match=error) as info:
            PairTokenizer.from_dir(folder)
        assert "write the token as a string" in str(info.value), changes
        assert '"__type": "AddedToken"' in str(info.value), changes


EOS_AFTER_TEXT = (
    "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + eos_token + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)


def test_a_turn_end_transformers_reads_as_text_after_the_message_is_refused(tmp_path):
    """A chat template that ends each turn with an added token with single_word true, written
    right after the message: after a letter transformers reads it as text, so TRL's completion
    ends with its pieces, an open turn where sdpo would append EOS. Such a row is refused,
    naming its line, field and the option; one ending with a full stop gives TRL's ids."""
    folder = byte_level_like(tmp_path / "f", chat_template=EOS_AFTER_TEXT)
    pipeline = json.loads((folder / "tokenizer.json").read_text())
    for token in pipeline["added_tokens"]:
        token["single_word"] = token["content"] == "<|im_end|>"
    (folder / "tokenizer.json").write_text(json.dumps(pipeline))

    def row(chosen: str, rejected: str) -> dict:
        return {
            "prompt": [{"role": "user", "content": "the weather?"}],
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}],
        }

    ended = [row("is sunny.", "in Paris!")]
    assert _ours(folder, ended, tmp_path) == _trl_prepared(folder, ended)
    rows = [*ended, row("is sunny.", "in Paris")]
    eos_id = PairTokenizer.from_dir(folder).eos_id
    trl = _trl_prepared(folder, rows)
    assert trl[0][2][-2:] == [eos_id, trl[0][2][-1]]  # closed by "<|im_end|>" then "\n"
    assert eos_id not in trl[1][2]  # its text's pieces instead
    with pytest.raises(DataError, match=r"line 2, field 'rejected': the chat .*single_word"):
        _ours(folder, rows, tmp_path)


def test_a_plain_completion_ending_in_an_unknown_token_that_shares_eos_s_id_gets_eos(tmp_path):
    """TRL appends the EOS text to a plain completion unless its text ends with it: one that
    ends with an unknown word, whose unknown token is EOS (one id), gets EOS after it too."""
    folder = tmp_path / "f"
    folder.mkdir()
    vocab = {"<|endoftext|>": 0, "hello": 1, "world": 2, "the": 3}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens(["<|endoftext|>"])
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    rows = [
        {"prompt": "hello", "chosen": " the world", "rejected": " the zzz"},
        {"prompt": "hello", "chosen": " world<|endoftext|>", "rejected": " zzz<|endoftext|>"},
    ]
    trl = _trl_prepared(folder, rows)
    assert trl[0][2] == [3, 0, 0] and trl[1][2] == [0, 0]
    assert _ours(folder, rows, tmp_path) == trl


def test_a_named_token_an_added_tokens_decoder_leaves_out_gets_its_named_options(tmp_path):
    """A class transformers builds itself registers only the added_tokens_decoder's entries
    of tokenizer.json's added tokens; a named special token that list leaves out is added
    again as named, with its AddedToken options (not tokenizer.json's): the ids are
    AutoTokenizer's."""
    base = sentencepiece_like(tmp_path / "base")
    pipeline = json.loads((base / "tokenizer.json").read_text())
    decoder = {
        str(t["id"]): {k: v for k, v in t.items() if k != "id"}
        for t in pipeline["added_tokens"]
        if t["content"] != "<|im_end|>"
    }
    for option in ("lstrip", "rstrip", "single_word"):
        folder = tmp_path / option
        folder.mkdir()
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (folder / name).write_text((base / name).read_text())
        eos = {"__type": "AddedToken", "content": "<|im_end|>", "special": True, option: True}
        _config(
            folder, eos_token=eos, tokenizer_class="LlamaTokenizer", added_tokens_decoder=decoder
        )
        hf_tok = transformers.AutoTokenizer.from_pretrained(str(folder))
        tok = PairTokenizer.from_dir(folder)
        for text in OPTION_TEXTS[:5]:
            assert tok.encode_texts([text])[0] == hf_tok.encode(text, **NO_SPECIALS), (option, text)


def word_level_like(folder: Path, config: dict, token_map: dict | None = None) -> Path:
    """A whitespace-split word-level tokenizer whose vocabulary has "<foo>", "<bar>", "<baz>" and
    "<img>" as plain words (one token only where registered as special), EOS "</s>" added;
    ``config`` over {"eos_token": "</s>"} in tokenizer_config.json, and ``token_map`` (when
    given) as special_tokens_map.json."""
    folder.mkdir(parents=True)
    vocab = {"<unk>": 0, "</s>": 1, "<foo>": 2, "<bar>": 3, "a": 4, "<baz>": 5, "<img>": 6}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens(["</s>"])
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", **config}))
    if token_map is not None:
        (folder / "special_tokens_map.json").write_text(json.dumps(token_map))
    return folder


def test_special_tokens_map_s_extra_special_tokens_list_joins_the_config_s(tmp_path):
    """transformers adds the tokens listed under special_tokens_map.json's
    extra_special_tokens (an object as an AddedToken, typed or not) to tokenizer_config.json's
    list: each is one token, not split, as there."""
    listed = {"extra_special_tokens": ["<foo>", {"content": "<bar>", "lstrip": True}]}
    folder = word_level_like(tmp_path / "f", {"extra_special_tokens": ["<foo>"]}, listed)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    tok = PairTokenizer.from_dir(folder)
    for text in ("a<foo>a", "a <bar>a", "<bar><foo>"):
        assert tok.encode_texts([text])[0] == hf_tok.encode(text, **NO_SPECIALS), text


MODEL_TOKENS_TEMPLATE = "{{ img_token | default('-') }}|{{ image_token | default('-') }}"


@pytest.mark.parametrize(
    ("config", "token_map"),
    [
        ({"extra_special_tokens": {"img_token": "<img>"}}, {"extra_special_tokens": ["<foo>"]}),
        ({"extra_special_tokens": ["<foo>"]}, {"extra_special_tokens": {"image_token": "<img>"}}),
        ({"additional_special_tokens": ["<baz>"]}, {"extra_special_tokens": ["<foo>"]}),
        ({"additional_special_tokens": ["<baz>"]}, {"additional_special_tokens": ["<foo>"]}),
        (
            {"extra_special_tokens": {"img_token": "<img>"}},
            {"additional_special_tokens": ["<foo>"]},
        ),
        ({"extra_special_tokens": {"img_token": "<img>"}, "additional_special_tokens": ["<foo>"]}, None),
    ],
    ids=["object_then_list", "list_then_object", "additional_then_list", "both_additional",
         "object_then_additional", "object_and_additional"],
)  # fmt: skip
def test_listed_and_model_specific_tokens_of_both_files_are_transformers_s(
    tmp_path, config, token_map
):
    """The extra special tokens and the model-specific ones of tokenizer_config.json and
    special_tokens_map.json, as transformers reads them together: a list in the map joins the
    config's list even beside an object of model-specific tokens there, an object in the map
    replaces the config's list, additional_special_tokens is the list only where
    extra_special_tokens is unset or empty (or, in the map, unset). The ids and the template's
    variables are AutoTokenizer's."""
    config = {**config, "chat_template": MODEL_TOKENS_TEMPLATE}
    folder = word_level_like(tmp_path / "f", config, token_map)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    tok = PairTokenizer.from_dir(folder)
    text = "a<foo>a <bar>a<baz><img>a"
    assert tok.encode_texts([text])[0] == hf_tok.encode(text, **NO_SPECIALS)
    messages = [{"role": "user", "content": "x"}]
    rendered = hf_tok.apply_chat_template(messages, tokenize=False)
    assert tok.render_chat(messages, add_generation_prompt=False) == rendered


def test_special_tokens_map_s_listed_tokens_are_named_in_that_file_in_errors(tmp_path):
    """A token listed under special_tokens_map.json's extra_special_tokens is said to be
    listed there when a row holding it is refused (the vocabulary lacks it), and a value
    transformers fails on in that list (null, a number, an object with "special") is refused
    naming that file and the item's position in its list."""
    token_map = {"extra_special_tokens": ["<foo>", "<new>"]}
    folder = word_level_like(tmp_path / "f", {"extra_special_tokens": ["<bar>"]}, token_map)
    with pytest.raises(SpecialTokenOutsideVocabError) as info:
        PairTokenizer.from_dir(folder).encode_texts(["a <new> a"])
    assert "'<new>' (listed in special_tokens_map.json's extra_special_tokens)" in str(info.value)
    assert "remove it from special_tokens_map.json's extra_special_tokens" in str(info.value)
    for i, bad in enumerate([None, 7, {"content": "<foo>", "special": True}]):
        token_map = {"extra_special_tokens": ["<baz>", bad]}
        folder = word_level_like(tmp_path / str(i), {"extra_special_tokens": ["<bar>"]}, token_map)
        with pytest.raises(TypeError):
            transformers.AutoTokenizer.from_pretrained(str(folder))
        with pytest.raises(ValueError, match="item 1 of extra_special_tokens in") as info:
            PairTokenizer.from_dir(folder)
        assert f"{folder / 'special_tokens_map.json'} is" in str(info.value)


@pytest.mark.parametrize(
    ("config", "token_map", "written"),
    [
        ({"eos_token": {"__type": "AddedToken"}}, None, 'tokenizer_config.json is an AddedToken'),
        ({"eos_token": ""}, None, "tokenizer_config.json is an empty string"),
        ({"eos_token": None}, {"eos_token": {}}, "special_tokens_map.json is an AddedToken"),
    ],
    ids=["typed_object", "empty_string", "map_object"],
)  # fmt: skip
def test_an_eos_without_content_is_refused_naming_its_file_and_key(
    tmp_path, config, token_map, written
):
    """An EOS written as an AddedToken without "content" (or as ""): transformers reads it as
    the token "", which TRL appends to a plain completion as nothing. sdpo refuses it, also
    beside config.json's eos_token_id, naming the file and key and what to write there."""
    folder = word_level_like(tmp_path / "f", config, token_map)
    (folder / "config.json").write_text(json.dumps({"eos_token_id": 1}))
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    assert hf_tok.eos_token == "" and hf_tok.eos_token_id is None
    with pytest.raises(ValueError, match=f"eos_token in .*{written}") as info:
        PairTokenizer.from_dir(folder)
    assert '"eos_token": "<the token that ends a text>" (its special tokens: \'</s>\')' in str(
        info.value
    )


def test_xglm_s_own_tokens_are_dropped_where_extra_special_tokens_is_given(tmp_path):
    """XGLM's class adds its "<madeupwordN>" to additional_special_tokens, which transformers
    drops where extra_special_tokens is given (in tokenizer_config.json, or as its
    additional_special_tokens read under that name): "<madeupword3>", outside the vocabulary,
    is then text, with the ids AutoTokenizer gives. Where only special_tokens_map.json lists
    additional_special_tokens they are registered, and a text holding one is refused."""
    base = unigram_like(tmp_path / "base")
    xglm = {"tokenizer_class": "XGLMTokenizer", "chat_template": CHATML_NL}
    for i, (config, token_map) in enumerate(
        [
            ({"extra_special_tokens": ["<|im_start|>"]}, None),
            ({"additional_special_tokens": ["<|im_start|>"]}, None),
            ({}, {"additional_special_tokens": ["<|im_start|>"]}),
        ]
    ):
        folder = tmp_path / str(i)
        folder.mkdir()
        (folder / "tokenizer.json").write_text((base / "tokenizer.json").read_text())
        (folder / "tokenizer_config.json").write_text(json.dumps({**xglm, **config}))
        if token_map is not None:
            (folder / "special_tokens_map.json").write_text(json.dumps(token_map))
        hf_tok = transformers.AutoTokenizer.from_pretrained(str(folder))
        tok = PairTokenizer.from_dir(folder)
        ids = hf_tok.encode("a<madeupword3> <|im_start|>b", **NO_SPECIALS)
        if token_map is None:
            assert tok.encode_texts(["a<madeupword3> <|im_start|>b"])[0] == ids, config
            continue
        assert max(ids) >= tok.vocab_size  # a new id, past the vocabulary
        with pytest.raises(SpecialTokenOutsideVocabError, match="'<madeupword3>'"):
            tok.encode_texts(["a<madeupword3> <|im_start|>b"])


def test_a_special_token_without_content_is_an_empty_template_variable(tmp_path):
    """A named or model-specific special token written as "" or as an AddedToken without
    content (BOS, PAD, a model-specific one): transformers gives the chat template "" for it
    and adds no token; so does sdpo, and the rendered text and ids are AutoTokenizer's."""
    template = (
        "{{ bos_token + '[' + pad_token + '|' + image_token + ']' }}"
        "{% if mask_token is defined %}M{% endif %}"
        "{% for m in messages %}{{ m['content'] + eos_token }}{% endfor %}"
    )
    folder = _config(
        byte_level_like(tmp_path / "f", chat_template=template),
        bos_token="",
        pad_token={"__type": "AddedToken"},
        image_token={"__type": "AddedToken", "special": True},
    )
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    tok = PairTokenizer.from_dir(folder)
    messages = [{"role": "user", "content": "the weather"}]
    rendered = hf_tok.apply_chat_template(messages, tokenize=False)
    assert rendered == "[|]the weather<|im_end|>"
    assert tok.render_chat(messages, add_generation_prompt=False) == rendered
    assert tok.encode_texts([rendered])[0] == hf_tok.encode(rendered, **NO_SPECIALS)
