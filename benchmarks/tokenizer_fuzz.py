"""Randomised differential check of sdpo's tokenization against transformers and TRL.

Why it exists: ``engine/tokenizer_classes.py`` mirrors which tokenizer class transformers 5's
``AutoTokenizer`` builds for a model folder and how that class rebuilds ``tokenizer.json``'s
pipeline, and ``engine/tokenize.py`` mirrors TRL 1.16's ``DPOTrainer`` preprocessing. The unit
tests pin the cases someone thought of; this tool makes random folders (byte-level and
SentencePiece-style BPE vocabularies, SentencePiece Unigram ones as XGLM's, lower-cased ones
with "</w>" word ends as OpenAI GPT's, with and without normalisers and BOS/EOS
post-processors; tokenizer_config.json with random subsets of tokenizer_class,
add_prefix_space, legacy, add_bos_token, add_eos_token, special tokens as strings, AddedToken
objects, null or outside the vocabulary, added_tokens_decoder complete, partial or missing,
its entries' options other than tokenizer.json's and entries the vocabulary lacks, chat
templates; special_tokens_map.json with named tokens as strings and as AddedToken objects,
typed or not, null, outside the vocabulary or without content, and extra_special_tokens or
additional_special_tokens as a list or an object of named tokens, beside a list or an object
of tokenizer_config.json's own; added_tokens.json, as older releases wrote it, with tokens
tokenizer.json lacks, named ones, vocabulary pieces and ids its added tokens use, ids written as
floats; config.json
with random model types and EOS ids) and compares, per folder,
sdpo's ids with ``AutoTokenizer.from_pretrained``'s on varied texts and with TRL's
preprocessing of plain and conversational rows. A folder transformers refuses must be refused
here too.

    python benchmarks/tokenizer_fuzz.py --count 2000              # seeds 0..1999
    python benchmarks/tokenizer_fuzz.py --start 26 --count 1 -v   # one case, described
    python benchmarks/tokenizer_fuzz.py --root ../other-checkout  # another checkout's engine

Each case is labelled: "ok" (with the README's deliberate differences it hit, e.g.
``deliberate:boundary_merge``, ``deliberate:eos_from_config_json``, ``outside_vocab_special``:
a special token outside the vocabulary, which transformers gives a new id), ``both_error``,
``deliberate:refused_*`` (sdpo refuses a folder whose EOS is missing or outside the
vocabulary, where transformers would give it a new id past the model's embeddings, or empty:
``refused_empty_eos``, an EOS written without content, which TRL appends as nothing, and a row
that would get a BOS outside the vocabulary: ``refused_row_bos_outside_vocab``, or another
special token outside it: ``refused_row_special_outside_vocab``, or whose chat template's end of
turn, an added token with ``single_word`` true, say, transformers reads as text after the
completion: ``refused_row_turn_end_text_not_read``, or two of whose normalised added tokens
are one text after its normaliser: ``refused_normalized_added_tokens_alike``), or
``MISMATCH*`` with what differs; exit code 1 when a case mismatches. Needs
transformers and trl; about two cases a second on one core. Folders live under ``--work-dir``
(by default in the system's temp folder), whose path must not contain a model type's name:
transformers matches it against a config.json that names no model type.

Mismatches known and left alone (folders no saved model has):
- an ``added_tokens_decoder`` that lists only some of tokenizer.json's added tokens, in a folder
  transformers rebuilds with a class of its own, beside a special token outside the vocabulary
  or among the dropped ones (a named token, or the class's default): transformers gives such
  tokens the next free ids, which may be the dropped added tokens' in another order; sdpo adds
  no token outside the vocabulary (and where such a token is the unknown token, its text fails
  here where transformers gives it that new id);
- a plain prompt whose first id is the post-processor's front token without its text starting
  with it (an unknown token that shares BOS's id, as in a CodeLlama-class folder over a
  byte-level vocabulary): sdpo gives it no second one, as for a text that starts with BOS;
- a Gemma-class folder over a vocabulary without "▁" (byte-level, or OpenAI GPT's style) whose
  unknown token (every space) is also the EOS its post-processor appends: TRL's prompts and
  completions part elsewhere.

Two normalised added tokens that the normaliser makes one text (``<extra>`` and ``<EXTRA>`` of
added_tokens.json under OpenAI GPT's lower-casing) are refused
(``deliberate:refused_normalized_added_tokens_alike``, where transformers' tokenizer has two
such tokens too): the tokenizers library reads that text as either, which one changing from one
process to the next, and transformers' ids with it. With that refusal seeds 0-2999 mismatch in
20 cases, the known ones above; 10 are refused, of which one (629) had mismatched before and the
others had been labelled by the draw of that process (6 ok, 4 refused for their EOS).

With added_tokens.json's ids drawn as floats too (in 262 of seeds 0-2999; 5.5 orders its token
between 5's and 6's), seeds 0-2999 mismatch in the same 20 cases. Before sdpo read such ids as
transformers does, 104 did (those, 629, and 83 that refused an id that is not an integer); once
it read them, 22 did until it also added the two files' tokens together in the order of their
ids where transformers builds a class of its own (777 and 1294 gave another id to a token whose
id there is below one of tokenizer.json's added tokens).

With special_tokens_map.json drawn (``write_special_tokens_map``; transformers reads it in 411
of seeds 0-1999, 244 of them with a list or an object of extra special tokens there, 131 beside
tokenizer_config.json's own), seeds 0-2999 mismatch in 20 cases, all of the known kinds: 18 of
the first (one, 2964, a token of tokenizer_config.json's list outside the vocabulary) and 2 of
the third. Before the special tokens of both files were read together as transformers reads
them, seeds 0-1999 mismatched in 36: the 11 of the first kind, 19 folders transformers fails
on that were loaded ("special" in an object the map lists, null in an object of model-specific
tokens), 5 whose lists were read otherwise (the map's list beside an object of
tokenizer_config.json's, additional_special_tokens in both files; one refusing an object of
the map's additional_special_tokens that transformers drops) and an XGLM-class folder whose
"<madeupwordN>" transformers drops beside a list of extra special tokens (1462).

With added_tokens.json drawn (``write_added_tokens_json``: in 901 of seeds 0-2999, read by
transformers in 456), seeds 0-2999 mismatch in 21 cases: the 20 below and one of two
normalised added tokens made one text (629, refused since). Before sdpo read the file as
transformers does, 211 did (a token it names was text, or, named as a special token, outside
the vocabulary); the labels of the other seeds are unchanged.

Seeds 0-2999, the plain row holding special tokens drawn, mismatch in 19 cases: 17 of the first
kind and 2 of the third; 5 refuse a chat row whose end of turn transformers reads as text. Before
such rows were refused (seed 386), a plain completion ending with an unknown token that shares
EOS's id got EOS (2086, and 1871's completions), a named token left out of a partial
``added_tokens_decoder`` was added with its own options (2316's other difference) and a row
refused for the EOS text was labelled by the completion refused (2580), 23 did.

With ``added_tokens_decoder`` entries drawn with options other than tokenizer.json's and entries
the vocabulary lacks (``vary_added_tokens``), seeds 0-1499 mismatch in 15 cases, all of these
kinds, where the engine before sdpo modelled those options (and refused the plain rows whose
appended EOS text transformers does not read as EOS) mismatched in 76 (and failed in 1).

Of 3,000 cases (seeds 0-2999) 18 mismatch, all of these kinds, also with rows holding a special
token other than BOS outside the vocabulary refused (before the plain row with special tokens
in its text was drawn; with it, seeds 0-1731 mismatch in 11 cases whether or not such rows are
refused, and 141 of them refuse one); with XGLM's and OpenAI GPT's
classes read as their files, Unigram files read as they are by the BPE classes and GPT-NeoX
Japanese's folders loaded, 539 did. On the draws before Unigram and OpenAI GPT-style vocabularies were drawn, 13 of 3,000
mismatched, and 553 with GPT-NeoX's, Cohere's, CodeGen's and Qwen3.5's classes read as their
files (and before the fixes this tool first came with, 409 of 2,000 did, on the draws of that
time).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import logging
import random
import shutil
import sys
import tempfile
import traceback
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

CORPUS = [
    "hello world, the weather in Paris is sunny today",
    "two  spaces and a line break\nHi there 12345 don't",
    "Sure thing. No way! café naïve 2024 [INST] hi [/INST]",
    "User: what is the answer? Assistant: the answer is 42",
    "system you are helpful user assistant",
    "नमस्ते दुनिया, हिंदी में लिखा गया पाठ 2024",
]
SPECIAL_POOL = [
    "<unk>", "<s>", "</s>", "<pad>", "<bos>", "<eos>", "<mask>", "<|im_start|>", "<|im_end|>",
    "<|endoftext|>", "<|eot_id|>", "<|begin_of_text|>", "<|padding|>", "<BOS_TOKEN>",
    "<|END_OF_TURN_TOKEN|>",
]  # fmt: skip
CLASSES = [
    None, "LlamaTokenizer", "LlamaTokenizerFast", "CodeLlamaTokenizer", "CodeLlamaTokenizerFast",
    "GemmaTokenizer", "GemmaTokenizerFast", "GPT2Tokenizer", "GPT2TokenizerFast",
    "Qwen2Tokenizer", "Qwen2TokenizerFast", "PreTrainedTokenizerFast", "",
    "Qwen3_5Tokenizer", "GPTNeoXTokenizer", "GPTNeoXTokenizerFast", "CohereTokenizer",
    "CohereTokenizerFast", "CodeGenTokenizer", "CodeGenTokenizerFast", "XGLMTokenizer",
    "XGLMTokenizerFast", "OpenAIGPTTokenizer", "OpenAIGPTTokenizerFast",
    "GPTNeoXJapaneseTokenizer",
]  # fmt: skip
MODEL_TYPES = [
    None, "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gpt2", "phi3", "code_llama",
    "", "unknown_model", 7, ["llama"], "Llama", "qwen3_5", "qwen3_5_text", "gpt_neox", "olmo",
    "olmoe", "cohere", "cohere2", "codegen", "stablelm", "xglm", "openai-gpt",
    "gpt_neox_japanese",
]  # fmt: skip
TEXTS = [
    "", "hello world", " hello world", "  two  spaces ", "line\nbreak\n\n", "\n\nHi", "\tTab",
    "12345 don't", "café cafe\u0301", "ｆｕｌｌ width", "emoji 🙂 here", "漢字",
    "Hi</s>there", "<s>[INST] hi [/INST]", "[INST]hi[/INST] ok", " <s> x",
    "<|im_start|>user\nhi<|im_end|>\n", "x<|endoftext|> y", "<bos>a<eos> b", "<pad><mask>",
    "<unk>", "a <|eot_id|>b", "<|begin_of_text|>Hi", "नमस्ते दुनिया", "पाठ 2024 x",
    "<BOS_TOKEN>hi<|END_OF_TURN_TOKEN|>", "a<extra_tok>b <EXTRA> x<extra>",
]  # fmt: skip
TEMPLATES = {
    "chatml": (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
        "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}"
        "{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    "llama2": (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}"
        "{{ '[INST] ' + m['content'] + ' [/INST]' }}{% else %}{{ ' ' + m['content'] + ' ' + "
        "eos_token }}{% endif %}{% endfor %}"
    ),
    "plain_eos": (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + eos_token + '\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    ),
    "open": (
        "{% if bos_token %}{{ bos_token }}{% endif %}{% for m in messages %}"
        "{{ '### ' + m['role'] + ':\\n' + m['content'] + '\\n\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '### assistant:\\n' }}{% endif %}"
    ),
}
PLAIN_ROWS = [
    {"prompt": "[INST] hi there [/INST]", "chosen": " Sure thing", "rejected": "\nNo way 12"},
    {"prompt": " the weather in Paris", "chosen": " is sunny", "rejected": " café"},
    {"prompt": "User: 12345\n", "chosen": "Assistant: 42", "rejected": "Assistant: no"},
    {"prompt": "cafe\u0301 naïve", "chosen": " 🙂 ok", "rejected": "  two"},
    # special tokens the draws name, in or outside the vocabulary (and class defaults)
    {"prompt": "Q: <pad> hi", "chosen": " <mask> ok<unk>", "rejected": " ▁<EOT> x<madeupword3>"},
]
CHAT_ROWS = [
    {
        "prompt": [{"role": "user", "content": "hello world"}],
        "chosen": [{"role": "assistant", "content": "Hi there 12"}],
        "rejected": [{"role": "assistant", "content": " no way"}],
    },
    {
        "prompt": [
            {"role": "system", "content": "you are helpful"},
            {"role": "user", "content": "café 🙂"},
        ],
        "chosen": [{"role": "assistant", "content": "Sure thing."}],
        "rejected": [{"role": "assistant", "content": "\nNo"}],
    },
]


CASES = ""  # --work-dir


def _maybe(rng: random.Random, p: float = 0.5) -> bool:
    return rng.random() < p


def build_tokenizer(rng: random.Random, folder: Path) -> dict:
    """Write tokenizer.json; return facts about it (style, specials)."""
    style = rng.choice(["sp", "bl", "ug", "gpt"])
    specials = rng.sample(SPECIAL_POOL, rng.randint(1, len(SPECIAL_POOL)))
    # specials in the trained vocab (as trainer special tokens) vs only added later
    in_vocab = [t for t in specials if _maybe(rng, 0.85)]
    facts = {"style": style, "specials": specials, "in_vocab": in_vocab}
    if style == "sp":
        unk = "<unk>" if "<unk>" in in_vocab and _maybe(rng, 0.7) else None
        model = models.BPE(unk_token=unk, byte_fallback=_maybe(rng, 0.7), fuse_unk=_maybe(rng, 0.8))
        tok = Tokenizer(model)
        initial = []
        if model.byte_fallback and _maybe(rng, 0.8):
            initial = [f"<0x{i:02X}>" for i in range(256)]
        tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")
        trainer = trainers.BpeTrainer(
            vocab_size=rng.choice([150, 300, 500]),
            special_tokens=in_vocab + initial,
            show_progress=False,
        )
        tok.train_from_iterator([t.replace(" ", "▁") for t in CORPUS * 5], trainer)
        norm = rng.choice(["llama", "replace", "none", "nfc_llama", "nfkc"])
        if norm == "llama":
            tok.normalizer = normalizers.Sequence(
                [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
            )
        elif norm == "replace":
            tok.normalizer = normalizers.Replace(" ", "▁")
        elif norm == "nfc_llama":
            tok.normalizer = normalizers.Sequence(
                [normalizers.NFC(), normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
            )
        elif norm == "nfkc":
            tok.normalizer = normalizers.NFKC()
        else:
            tok.normalizer = None
        pre = rng.choice(["none", "meta_first", "meta_always", "meta_never", "split_space"])
        if pre == "none" or norm in ("llama", "nfc_llama") and _maybe(rng, 0.6):
            tok.pre_tokenizer = None
        elif pre.startswith("meta"):
            tok.pre_tokenizer = pre_tokenizers.Metaspace(
                prepend_scheme=pre.split("_")[1], split=_maybe(rng)
            )
        else:
            tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
        tok.decoder = decoders.Sequence(
            [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        )
        facts["norm"], facts["pre"] = norm, pre
    elif style == "ug":  # a SentencePiece Unigram vocabulary, as XGLM's
        tok = Tokenizer(models.Unigram())
        tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")
        unk = "<unk>" if "<unk>" in in_vocab else None
        trainer = trainers.UnigramTrainer(
            vocab_size=rng.choice([120, 250]),
            special_tokens=in_vocab,
            unk_token=unk,
            show_progress=False,
        )
        tok.train_from_iterator([t.replace(" ", "▁") for t in CORPUS * 5], trainer)
        norm = rng.choice(["none", "spaces", "nfkc_spaces", "replace"])
        if norm == "spaces":
            tok.normalizer = normalizers.Replace(Regex(" {2,}"), " ")
        elif norm == "nfkc_spaces":
            tok.normalizer = normalizers.Sequence(
                [normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")]
            )
        elif norm == "replace":
            tok.normalizer = normalizers.Replace(" ", "▁")
        else:
            tok.normalizer = None
        pre = rng.choice(["always", "first", "never"])
        tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme=pre, split=_maybe(rng, 0.7))
        tok.decoder = decoders.Metaspace(prepend_scheme=pre)
        facts["norm"], facts["pre"] = norm, pre
    elif style == "gpt":  # lower-cased words with an end-of-word suffix, as OpenAI GPT's
        unk = "<unk>" if "<unk>" in in_vocab and _maybe(rng, 0.8) else None
        tok = Tokenizer(models.BPE(unk_token=unk, end_of_word_suffix="</w>"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        trainer = trainers.BpeTrainer(
            vocab_size=rng.choice([200, 400]),
            special_tokens=in_vocab,
            end_of_word_suffix="</w>",
            show_progress=False,
        )
        tok.train_from_iterator(CORPUS * 5, trainer)
        if _maybe(rng, 0.3):
            tok.normalizer = normalizers.NFC()
            tok.pre_tokenizer = pre_tokenizers.Whitespace()
        tok.decoder = decoders.BPEDecoder(suffix="</w>")
    else:
        tok = Tokenizer(models.BPE())
        digits = _maybe(rng, 0.25)
        apf = _maybe(rng, 0.3)
        if digits:
            tok.pre_tokenizer = pre_tokenizers.Sequence(
                [
                    pre_tokenizers.Digits(individual_digits=True),
                    pre_tokenizers.ByteLevel(add_prefix_space=apf),
                ]
            )
        else:
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=apf)
        trainer = trainers.BpeTrainer(
            vocab_size=rng.choice([300, 400, 600]),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            special_tokens=in_vocab,
            show_progress=False,
        )
        tok.train_from_iterator(CORPUS * 5, trainer)
        if _maybe(rng, 0.3):
            tok.pre_tokenizer = pre_tokenizers.Sequence(
                [
                    pre_tokenizers.Split(
                        Regex(r"\p{N}{1,3}| ?\p{L}+|\s+|[^\s\p{L}\p{N}]+"), "isolated"
                    ),
                    pre_tokenizers.ByteLevel(add_prefix_space=apf, use_regex=False),
                ]
            )
            facts["split"] = True
        tok.normalizer = normalizers.NFC() if _maybe(rng, 0.4) else None
        tok.decoder = decoders.ByteLevel()
        facts["digits"], facts["apf"] = digits, apf
    # added tokens: specials as special added tokens (not all of them)
    added = [t for t in specials if _maybe(rng, 0.7)]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in added])
    if _maybe(rng, 0.3):
        tok.add_tokens(
            [AddedToken("<think>", normalized=False), AddedToken("</think>", normalized=False)]
        )
    facts["added"] = added
    # post-processor
    pp = rng.choice(["none", "bos", "bos_eos", "bytelevel", "bos_other", "eos", "eos_front"])
    bos_cands = [
        t
        for t in ("<s>", "<bos>", "<|begin_of_text|>", "<BOS_TOKEN>")
        if tok.token_to_id(t) is not None
    ]
    eos_cands = [
        t
        for t in ("</s>", "<eos>", "<|endoftext|>", "<|im_end|>", "<|END_OF_TURN_TOKEN|>")
        if tok.token_to_id(t) is not None
    ]
    if pp in ("bos", "bos_other", "bos_eos") and bos_cands:
        bos = bos_cands[0] if pp != "bos_other" else rng.choice(bos_cands)
        single = f"{bos} $A"
        sp = [(bos, tok.token_to_id(bos))]
        if pp == "bos_eos" and eos_cands:
            eos = rng.choice(eos_cands)
            single += f" {eos}"
            sp.append((eos, tok.token_to_id(eos)))
        tok.post_processor = processors.TemplateProcessing(
            single=single, pair=f"{single} $B", special_tokens=sp
        )
        facts["pp_bos"] = bos
    elif pp == "eos" and eos_cands:  # EOS after every text, as OLMo's files have
        eos = rng.choice(eos_cands)
        tok.post_processor = processors.TemplateProcessing(
            single=f"$A {eos}",
            pair=f"$A {eos} $B {eos}",
            special_tokens=[(eos, tok.token_to_id(eos))],
        )
    elif pp == "eos_front" and eos_cands:  # EOS in front of every text, as XGLM's files have
        eos = eos_cands[0]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{eos} $A",
            pair=f"{eos} $A {eos} {eos} $B",
            special_tokens=[(eos, tok.token_to_id(eos))],
        )
    elif pp == "bytelevel":
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    facts["pp"] = pp
    tok.save(str(folder / "tokenizer.json"))
    return facts


def _token_value(rng: random.Random, default_pool: list[str], have: list[str]):
    kind = rng.choices(["str", "dict", "null", "missing_vocab"], [6, 2, 1, 0.3])[0]
    if kind == "null":
        return None
    if kind == "missing_vocab":
        return "<not_in_vocab>"
    pool = [t for t in default_pool if t in have] if _maybe(rng, 0.85) else default_pool
    token = rng.choice(pool or default_pool)
    if kind == "dict":
        return {
            "content": token,
            "lstrip": _maybe(rng, 0.2),
            "rstrip": _maybe(rng, 0.2),
            "normalized": _maybe(rng, 0.3),
            "single_word": False,
            "special": True,
            "__type": "AddedToken",
        }
    return token


def build_configs(rng: random.Random, folder: Path, facts: dict) -> dict:
    config: dict = {}
    cls = rng.choice(CLASSES)
    if cls is not None:
        config["tokenizer_class"] = cls
    for key in ("add_prefix_space", "legacy", "add_bos_token", "add_eos_token"):
        if _maybe(rng, 0.35):
            config[key] = rng.choice([True, False, None])
    pools = {
        "bos_token": ["<s>", "<bos>", "<|begin_of_text|>", "<|endoftext|>", "<BOS_TOKEN>"],
        "eos_token": [
            "</s>",
            "<eos>",
            "<|endoftext|>",
            "<|im_end|>",
            "<|eot_id|>",
            "<|END_OF_TURN_TOKEN|>",
        ],  # fmt: skip
        "unk_token": ["<unk>", "<|endoftext|>"],
        "pad_token": ["<pad>", "<unk>", "<|endoftext|>", "</s>"],
    }
    for key, pool in pools.items():
        if _maybe(rng, 0.6):
            config[key] = _token_value(rng, pool, facts["in_vocab"])
    atd = rng.choices(["absent", "complete", "partial"], [5, 4, 1])[0]
    facts["atd"] = atd
    if atd != "absent":
        decoder = {}
        tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        for i, added in tok.get_added_tokens_decoder().items():
            t = added.content
            if atd == "complete" or _maybe(rng, 0.7):
                decoder[str(i)] = {
                    "content": t,
                    "lstrip": False,
                    "normalized": added.normalized,
                    "rstrip": False,
                    "single_word": False,
                    "special": added.special,
                }
        config["added_tokens_decoder"] = decoder
    if _maybe(rng, 0.6):
        name = rng.choice(list(TEMPLATES))
        config["chat_template"] = TEMPLATES[name]
        facts["template"] = name
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    mc: dict = {}
    mt = rng.choice(MODEL_TYPES)
    if mt is not None:
        mc["model_type"] = mt
    if _maybe(rng, 0.3):
        mc["eos_token_id"] = rng.choice([0, 1, 2, [2, 3], None])
    if _maybe(rng, 0.2):
        mc["bos_token_id"] = rng.choice([0, 1, None])
    if mc or _maybe(rng, 0.5):
        (folder / "config.json").write_text(json.dumps(mc))
    facts["config"], facts["model_config"] = config, mc
    return facts


ADDED_TOKEN_OPTIONS = ("lstrip", "rstrip", "single_word", "normalized")


def vary_added_tokens(rng: random.Random, folder: Path, facts: dict) -> dict:
    """Give some ``added_tokens_decoder`` entries options other than tokenizer.json's (which
    transformers then applies) and add entries tokenizer.json lacks (which it gives new ids).
    Drawn from a generator of its own, so the other draws of a seed stay as they were."""
    config = facts["config"]
    decoder = config.get("added_tokens_decoder")
    if not decoder or not _maybe(rng, 0.4):
        return facts
    flipped = []
    for entry in decoder.values():
        if _maybe(rng, 0.3):
            option = rng.choice(ADDED_TOKEN_OPTIONS)
            entry[option] = not entry.get(option, False)
            flipped.append((entry["content"], option))
    if _maybe(rng, 0.3):
        decoder["9000"] = {"content": "<extra_tok>", "special": True}
    if _maybe(rng, 0.3):
        decoder["9001"] = {"content": "<Extra>", "normalized": True, "special": False}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    facts["atd_options"] = flipped
    return facts


MAP_POOL = ["<extra_tok>", "<EXTRA>", "<extra>", "<pad>", "<mask>", "<|im_end|>", "<not_in_vocab>"]
NAMED_MAP_POOLS = {
    "bos_token": ["<s>", "<bos>", "<|begin_of_text|>", "<BOS_TOKEN>"],
    "eos_token": ["</s>", "<eos>", "<|endoftext|>", "<|im_end|>", "<|eot_id|>"],
    "unk_token": ["<unk>", "<|endoftext|>"],
    "pad_token": ["<pad>", "<unk>", "</s>"],
    "mask_token": ["<mask>"],
}


def _map_token(rng: random.Random, pool: list[str], have: list[str]):
    """A special token as special_tokens_map.json or tokenizer_config.json may write it: a
    string, an AddedToken object (typed or not, with options), rarely null, outside the
    vocabulary or an object without content."""
    kind = rng.choices(
        ["str", "typed", "untyped", "null", "outside", "empty"], [5, 2, 2, 1, 1, 0.3]
    )[0]
    if kind == "null":
        return None
    if kind == "outside":
        return "<not_in_vocab>"
    if kind == "empty":
        return {"__type": "AddedToken"} if _maybe(rng) else {}
    inside = [t for t in pool if t in have]
    token = rng.choice(inside if inside and _maybe(rng, 0.8) else pool)
    if kind == "str":
        return token
    value = {"content": token}
    for option in ADDED_TOKEN_OPTIONS:
        if _maybe(rng, 0.2):
            value[option] = _maybe(rng, 0.7)
    if kind == "typed":
        value["__type"] = "AddedToken"
    return value


def _token_list(rng: random.Random, have: list[str], *, typed: bool) -> list:
    """A list of extra special tokens: strings and objects (``typed``: AddedToken ones, as
    tokenizer_config.json needs)."""
    tokens = []
    for token in rng.sample(MAP_POOL, rng.randint(1, 3)):
        if _maybe(rng, 0.3):
            value = {"content": token, "lstrip": _maybe(rng, 0.3)}
            if typed or _maybe(rng, 0.2):  # transformers fails on "special" in the map's list
                value["special"] = True
            tokens.append({**value, "__type": "AddedToken"} if typed or _maybe(rng) else value)
        else:
            tokens.append(token)
    return tokens


def write_special_tokens_map(rng: random.Random, folder: Path, facts: dict) -> dict:
    """Write special_tokens_map.json (which transformers reads where tokenizer_config.json has
    no added_tokens_decoder): named tokens as strings and as AddedToken objects, and
    extra_special_tokens (or additional_special_tokens) as a list or as an object of named
    tokens; sometimes give tokenizer_config.json a list or an object of its own beside it.
    Drawn from a generator of its own, so the other draws of a seed stay as they were."""
    if not _maybe(rng, 0.4):
        return facts
    have = facts["in_vocab"]
    token_map: dict = {}
    for key in rng.sample(list(NAMED_MAP_POOLS), rng.randint(0, 3)):
        token_map[key] = _map_token(rng, NAMED_MAP_POOLS[key], have)
    if _maybe(rng, 0.6):
        key = "extra_special_tokens" if _maybe(rng, 0.75) else "additional_special_tokens"
        if key == "extra_special_tokens" and _maybe(rng, 0.25):
            token_map[key] = {"image_token": _map_token(rng, MAP_POOL[:3], have)}
        else:
            token_map[key] = _token_list(rng, have, typed=False)
    if _maybe(rng, 0.3):
        config = facts["config"]
        key = rng.choice(["extra_special_tokens", "additional_special_tokens"])
        if key == "extra_special_tokens" and _maybe(rng, 0.4):
            config[key] = {"img_token": rng.choice(MAP_POOL[:3])}
        else:
            config[key] = _token_list(rng, have, typed=True)
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "special_tokens_map.json").write_text(json.dumps(token_map))
    facts["special_tokens_map"] = token_map
    return facts


ADDED_POOL = ["<extra_tok>", "<EXTRA>", "<extra>", "<tool>"]


def write_added_tokens_json(
    rng: random.Random, folder: Path, facts: dict, *, floats: random.Random
) -> dict:
    """Write added_tokens.json (token -> id), as releases before tokenizer_config.json had an
    added_tokens_decoder wrote it: tokens tokenizer.json lacks, with ids after its own (or with
    a gap), and sometimes one of tokenizer.json's added tokens (at its id or another), a named
    special token (outside the vocabulary, say), a piece of the vocabulary, or a token at an id
    one of tokenizer.json's added tokens has (which wins there), and sometimes with ids written
    as floats (``floats``: 5.0, or 5.5, which orders its token between 5's and 6's).
    transformers adds them where tokenizer_config.json has no added_tokens_decoder
    (``facts["legacy_added"]``: those it adds). Drawn from a generator of its own, so the other
    draws of a seed stay as they were."""
    if not _maybe(rng, 0.3):
        return facts
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    added = tok.get_added_tokens_decoder()
    next_id = tok.get_vocab_size(with_added_tokens=True) + (
        rng.randint(1, 50) if _maybe(rng, 0.2) else 0
    )
    tokens: dict[str, int] = {}
    for token in rng.sample(ADDED_POOL, rng.randint(1, 3)):
        tokens[token] = next_id
        next_id += 1
    if added and _maybe(rng, 0.3):
        i = rng.choice(sorted(added))
        tokens[added[i].content] = i if _maybe(rng) else next_id
    if _maybe(rng, 0.3):
        named = [
            t
            for k, v in {**facts["config"], **facts.get("special_tokens_map", {})}.items()
            if k.endswith("_token")
            and (t := v.get("content") if isinstance(v, dict) else v)
            and isinstance(t, str)
        ]
        if named:
            tokens[rng.choice(named)] = next_id + 1
    if _maybe(rng, 0.2):
        vocab = tok.get_vocab(with_added_tokens=False)
        words = sorted(p for p in vocab if len(p) >= 3 and p.strip("▁Ġ").isalpha())
        if words:
            word = rng.choice(words)
            tokens[word] = vocab[word]
    if added and _maybe(rng, 0.2):
        tokens["<lost>"] = rng.choice(sorted(added))
    # ids written as floats, as a hand-edited file may have them (5.0; 5.5, between 5 and 6),
    # drawn from a generator of their own (``floats``) so the other draws stay as they were
    if _maybe(floats, 0.3):
        tokens = {t: i + floats.choice([0.0, 0.5, -0.5]) for t, i in tokens.items()}
    (folder / "added_tokens.json").write_text(json.dumps(tokens))
    facts["added_tokens_json"] = tokens
    read = "added_tokens_decoder" not in facts["config"]
    facts["legacy_added"] = [t for t, i in tokens.items() if read and i not in added]
    return facts


class FileVocabulary:
    """The tokens of a folder's files, as transformers reads them: tokenizer.json's, and those of
    added_tokens.json it adds (by the ids ``hf_tok`` gives them). A token or id outside it is one
    transformers gives a new id past the model's embeddings."""

    def __init__(self, folder: Path, facts: dict, hf_tok) -> None:
        self.base = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.legacy = set(facts.get("legacy_added", ()))
        self.legacy_ids = {hf_tok.convert_tokens_to_ids(t) for t in self.legacy}

    def has_token(self, token: str) -> bool:
        return self.base.token_to_id(token) is not None or token in self.legacy

    def has_id(self, i: int) -> bool:
        return self.base.id_to_token(i) is not None or i in self.legacy_ids


def normalized_alike(hf_tok) -> bool:
    """Whether two of ``hf_tok``'s normalised added tokens are one text after its normaliser:
    the ``tokenizers`` library reads that text as either, which one changing from one process
    to the next."""
    backend = hf_tok.backend_tokenizer
    if backend.normalizer is None:
        return False
    texts = [
        backend.normalizer.normalize_str(t.content)
        for t in backend.get_added_tokens_decoder().values()
        if t.normalized
    ]
    texts = [t for t in texts if t]
    return len(set(texts)) < len(texts)


def trl_ids(hf_tok, row: dict):
    """TRL 1.16's tokenize_fn (its add_eos then tokenize_fn, run directly on one row)."""
    row = dict(row)
    conv = isinstance(row["prompt"], list)
    if not conv:
        eos = hf_tok.eos_token
        for k in ("chosen", "rejected"):
            if not row[k].endswith(eos):
                row[k] = row[k] + eos
        p = _tokenize(hf_tok, row["prompt"])["input_ids"]
        c = _tokenize(hf_tok, row["prompt"] + row["chosen"])["input_ids"]
        r = _tokenize(hf_tok, row["prompt"] + row["rejected"])["input_ids"]
    else:
        kw = {"tools": None}
        p = _tokenize(hf_tok, row["prompt"], add_generation_prompt=True, **kw)["input_ids"]
        c = _tokenize(hf_tok, row["prompt"] + row["chosen"], **kw)["input_ids"]
        r = _tokenize(hf_tok, row["prompt"] + row["rejected"], **kw)["input_ids"]
    n = min(common_prefix_length(p, c), common_prefix_length(p, r))
    return (list(p[:n]), list(c[n:]), list(r[n:])), len(p) - n


def sdpo_ids(tok: PairTokenizer, rows: list[dict], tmp: Path):
    path = tmp / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = read_preference_file(path)
    pairs, _ = tokenize_pairs(data, tok, max_length=4096)
    return [(p.prompt_ids, p.chosen_ids, p.rejected_ids) for p in pairs]


def classify_row(hf_tok, tok, row, ours, theirs, lost):
    """Known deliberate differences (README) -> a label, or None for a real mismatch."""
    conv = isinstance(row["prompt"], list)
    if not conv:
        if lost:
            return "deliberate:boundary_merge"
        bos = hf_tok.bos_token
        if bos and row["prompt"].startswith(bos):
            return "deliberate:no_second_bos"
        eos_id = hf_tok.eos_token_id
        # post-processor EOS: TRL's completions end with the text's EOS and the post-processor's
        if theirs[0] == ours[0] and all(t == o + [eos_id] for t, o in zip(theirs[1:], ours[1:])):
            return "deliberate:post_processor_eos"
        # a prompt whose first id is already the front token (text BOS, or an unknown token
        # sharing its id): no second one here
        if theirs[0][1:] == ours[0] and ours[0][:1] == theirs[0][:1] and theirs[1:] == ours[1:]:
            return "deliberate:no_second_bos_ids"
    else:
        o_p, o_c, o_r = ours
        t_p, t_c, t_r = theirs
        if o_p == t_p and o_c == t_c + [tok.eos_id] and o_r == t_r + [tok.eos_id]:
            return "deliberate:open_template_eos"
    return None


@contextlib.contextmanager
def _drawn_case(seed: int) -> Iterator[tuple[Path, Path, dict]]:
    """The case drawn from ``seed``: its scratch folder, the model folder in it (``m``, the
    tokenizer and configs written) and what was drawn; the scratch folder is removed after."""
    rng = random.Random(seed)
    tmp = Path(CASES) / f"c{seed}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        folder = tmp / "m"
        folder.mkdir()
        facts = build_configs(rng, folder, build_tokenizer(rng, folder))
        facts = vary_added_tokens(random.Random(f"atd{seed}"), folder, facts)
        facts = write_special_tokens_map(random.Random(f"stm{seed}"), folder, facts)
        facts = write_added_tokens_json(
            random.Random(f"atj{seed}"), folder, facts, floats=random.Random(f"atjf{seed}")
        )
        yield tmp, folder, facts
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run_case(seed: int) -> tuple[str, str]:
    """(label, what differs) for the case drawn from ``seed``."""
    try:
        with _drawn_case(seed) as (tmp, folder, facts):
            try:
                hf_tok = transformers.AutoTokenizer.from_pretrained(str(folder))
                hf_err = None
            except Exception as exc:
                hf_tok, hf_err = None, f"{type(exc).__name__}: {exc}"
            try:
                tok = PairTokenizer.from_dir(folder)
                our_err = None
            except Exception as exc:
                tok, our_err = None, f"{type(exc).__name__}: {exc}"
            if hf_err and our_err:
                return "both_error", ""
            if hf_err:
                return "MISMATCH:hf_error_only", f"hf: {hf_err[:300]}"
            if our_err:
                if "once the tokenizer's normaliser has read them" in our_err and (
                    normalized_alike(hf_tok)
                ):
                    return "deliberate:refused_normalized_added_tokens_alike", our_err[:200]
                base = FileVocabulary(folder, facts, hf_tok)
                eos = hf_tok.eos_token
                if eos is None:
                    return "deliberate:refused_no_eos", our_err[:200]
                if eos == "":  # an AddedToken object without content: TRL appends nothing
                    return "deliberate:refused_empty_eos", our_err[:200]
                if not base.has_token(str(eos)):
                    return "deliberate:refused_eos_outside_vocab", our_err[:200]
                bos = hf_tok.bos_token
                if "bos_token" in our_err and bos is not None and not base.has_token(str(bos)):
                    return "deliberate:refused_bos_outside_vocab", our_err[:200]
                return "MISMATCH:sdpo_error_only", our_err[:400]
            problems = []
            label_extra = []
            base = FileVocabulary(folder, facts, hf_tok)
            hf_eos_ok = hf_tok.eos_token is not None and base.has_token(hf_tok.eos_token)
            if tok.eos_token != hf_tok.eos_token:
                if hf_eos_ok:
                    problems.append(f"eos {tok.eos_token!r} vs {hf_tok.eos_token!r}")
                else:
                    label_extra.append("deliberate:eos_from_config_json")
            if tok.bos_token != hf_tok.bos_token:
                if hf_tok.bos_token is not None and not base.has_token(hf_tok.bos_token):
                    label_extra.append("deliberate:bos_outside_vocab")
                else:
                    problems.append(f"bos {tok.bos_token!r} vs {hf_tok.bos_token!r}")
            outside = [t for t in hf_tok.all_special_tokens if not base.has_token(t)]
            for text in TEXTS:
                try:
                    theirs = hf_tok.encode(text, add_special_tokens=False)
                except Exception as exc:
                    theirs = f"ERR {type(exc).__name__}"
                try:
                    ours = tok.encode_texts([text])[0]
                except Exception as exc:
                    ours = f"ERR {type(exc).__name__}"
                if isinstance(ours, str) and isinstance(theirs, str):
                    continue  # both fail on the text
                if ours != theirs:
                    if isinstance(theirs, list) and not all(map(base.has_id, theirs)):
                        label_extra.append("outside_vocab_special")
                        continue
                    if isinstance(theirs, str) and not isinstance(ours, str):
                        problems.append(f"HF_ENCODE_ERROR {text!r}")
                        continue
                    problems.append(f"encode {text!r}: ours {ours} hf {theirs}")
            row_sets = [("plain row", PLAIN_ROWS)] if hf_eos_ok else []
            if hf_tok.chat_template is not None and hf_eos_ok:
                row_sets.append(("chat row", CHAT_ROWS))
            for what, rows in row_sets:
                for row in rows:
                    try:
                        theirs, lost = trl_ids(hf_tok, row)
                    except Exception as exc:
                        theirs, lost = f"ERR {type(exc).__name__}: {exc}"[:200], 0
                    try:
                        ours = sdpo_ids(tok, [row], tmp)[0]
                    except Exception as exc:
                        ours = f"ERR {type(exc).__name__}: {exc}"[:300]
                    if isinstance(ours, str) and isinstance(theirs, str):
                        continue  # both fail on the row
                    if (
                        isinstance(ours, str)
                        and "TRL ends a plain completion with the text of the EOS" in ours
                        and isinstance(theirs, tuple)
                        and theirs[1 + ("field 'rejected'" in ours)][-1:] != [tok.eos_id]
                    ):
                        # an EOS read by its context (single_word, ...): TRL's completion
                        # (the field refused) ends with its text's pieces; sdpo refuses the row
                        label_extra.append("deliberate:refused_row_eos_text_not_eos")
                        continue
                    if (
                        isinstance(ours, str)
                        and "the chat template ends this completion's turn with" in ours
                        and isinstance(theirs, tuple)
                        and not all(tok.closes_turn(ids) for ids in theirs[1:])
                    ):
                        # an end of turn read by its context (single_word, ...) left as text:
                        # TRL's turn is open, ending with its pieces; sdpo refuses the row
                        label_extra.append("deliberate:refused_row_turn_end_text_not_read")
                        continue
                    if (
                        isinstance(ours, str)
                        and "is not in its vocabulary" in ours
                        and isinstance(theirs, tuple)
                        and not all(base.has_id(i) for part in theirs for i in part)
                    ):
                        # a BOS, or another special token, outside the vocabulary that the row uses:
                        # TRL's id is past the model's embeddings; sdpo refuses the row
                        kind = "bos" if "BOS token" in ours else "special"
                        label_extra.append(f"deliberate:refused_row_{kind}_outside_vocab")
                        continue
                    if ours != theirs:
                        if isinstance(theirs, tuple) and isinstance(ours, tuple):
                            known = classify_row(hf_tok, tok, row, ours, theirs, lost)
                            if known:
                                label_extra.append(known)
                                continue
                            if not all(base.has_id(i) for part in theirs for i in part):
                                label_extra.append("outside_vocab_special")
                                continue
                        shown = f" {row['prompt']!r}" if what == "plain row" else ""
                        problems.append(f"{what}{shown}: ours {ours} trl {theirs}")
            if problems:
                if all(p.startswith("HF_ENCODE_ERROR") for p in problems):
                    return "MISMATCH:hf_encode_error_only", "; ".join(problems)[:300] + (
                        f" | hf={type(hf_tok).__name__} style={facts['style']} unk={hf_tok.unk_token!r}"
                        f" model_unk={hf_tok.backend_tokenizer.model.unk_token!r}"
                    )
                info = (
                    f" | hf={type(hf_tok).__name__} style={facts['style']} atd={facts.get('atd')}"
                    f" pp={facts['pp']} bos={hf_tok.bos_token!r} tokbos={tok.bos_token!r} front="
                    f"{tok._post_processor_front_id()} add_bos={tok.add_bos} outside={outside}"
                )
                return "MISMATCH", "; ".join(problems)[:1500] + info
            return "ok" + ("+" + ",".join(sorted(set(label_extra))) if label_extra else ""), ""
    except Exception:
        return "HARNESS_ERROR", traceback.format_exc()[-800:]


def _load(root: str | None) -> None:
    """Import transformers, TRL and sdpo's tokenizer (from ``root``'s engine/ when given)."""
    global transformers, _tokenize, common_prefix_length
    global PairTokenizer, tokenize_pairs, read_preference_file
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    import transformers

    transformers.logging.set_verbosity_error()
    from trl.trainer.dpo_trainer import _tokenize, common_prefix_length

    if root is not None:
        for name, folder in (("sdpo.engine", "engine"), ("sdpo.kernels", "kernels")):
            spec = importlib.util.spec_from_file_location(
                name,
                f"{root}/{folder}/__init__.py",
                submodule_search_locations=[f"{root}/{folder}"],
            )
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
    from sdpo.engine.data import read_preference_file
    from sdpo.engine.tokenize import PairTokenizer, tokenize_pairs


def describe(seed: int) -> str:
    """The case's folder: what was drawn, and tokenizer.json without its vocabulary."""
    with _drawn_case(seed) as (_, folder, facts):
        tj = json.loads((folder / "tokenizer.json").read_text())
        short = {k: tj[k] for k in ("normalizer", "pre_tokenizer", "post_processor")}
        short["model"] = {k: v for k, v in tj["model"].items() if k not in ("vocab", "merges")}
        return json.dumps({**facts, "tokenizer.json": short}, default=str)[:3000]


def main() -> int:
    global CASES
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--start", type=int, default=0, help="first seed")
    parser.add_argument("--count", type=int, default=500, help="number of cases")
    parser.add_argument("--root", help="a checkout whose engine/ to test (default: installed)")
    parser.add_argument("--work-dir", default=str(Path(tempfile.gettempdir()) / "sdpo-tok-fuzz"))
    parser.add_argument("--jsonl", help="write one line per case here")
    parser.add_argument("-v", "--verbose", action="store_true", help="print each mismatch")
    args = parser.parse_args()
    _load(args.root)
    CASES = args.work_dir
    counts: Counter = Counter()
    lines = []
    try:
        for seed in range(args.start, args.start + args.count):
            label, detail = run_case(seed)
            counts[label.split(":")[0] if label.startswith("ok") else label] += 1
            lines.append(json.dumps({"seed": seed, "label": label, "detail": detail}) + "\n")
            if args.verbose and label.startswith(("MISMATCH", "HARNESS")):
                print(seed, label, detail[:600])
                print("   ", describe(seed)[:1500])
    finally:
        if args.jsonl:
            Path(args.jsonl).write_text("".join(lines))
        shutil.rmtree(CASES, ignore_errors=True)
    print(json.dumps(dict(sorted(counts.items())), indent=1))
    return 1 if any(k.startswith(("MISMATCH", "HARNESS")) for k in counts) else 0


if __name__ == "__main__":
    sys.exit(main())
