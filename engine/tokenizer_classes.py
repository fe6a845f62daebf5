"""Which tokenizer class transformers 5's ``AutoTokenizer`` builds for a model folder, and what
that class changes in the folder's ``tokenizer.json``.

TRL's token ids come from that tokenizer, so sdpo (which reads ``tokenizer.json`` itself, with
no transformers at run time) has to build the same pipeline. Most folders load as the file is
(transformers' plain ``TokenizersBackend``). A few model-specific classes keep only the file's
vocabulary, merges, added tokens and post-processor and build the rest themselves, with their
own settings and defaults read from ``tokenizer_config.json``:

- ``LlamaTokenizer`` (Llama 2, SOLAR): no normaliser; a Metaspace pre-tokenizer that puts "▁" in
  front of a text unless it starts with a space (``add_prefix_space``, default true), and with
  ``legacy`` false (its default) only in front of the first piece of text, not after a special
  token; byte fallback, no unknown token.
- ``CodeLlamaTokenizer``: the same, but "▁" in front of the first piece whatever ``legacy``
  says, an unknown token, and a post-processor that always puts BOS in front of a text
  (``add_bos_token`` in tokenizer_config.json is not read beside a ``tokenizer.json``).
- ``GemmaTokenizer``: spaces replaced by "▁", nothing put in front of a text.
- ``GPT2Tokenizer``: byte-level with GPT-2's split and nothing more (a split of numbers into
  single digits in the file is dropped); a space put in front of each piece of text between
  special tokens when tokenizer_config.json's ``add_prefix_space`` is true (default false; the
  file's own setting is not read).
- ``Qwen2Tokenizer``: NFC, Qwen2's split, then byte-level with ``add_prefix_space`` as for GPT2
  (applied to every split piece; a null one reads as false).
- ``Qwen3_5Tokenizer`` (Qwen3.5, whose folders name Qwen2's class): the same with Qwen3.5's
  split, which keeps a word's combining marks (e.g. Devanagari's vowel signs) in the word.
- ``CodeGenTokenizer``: GPT2's pipeline (its own defaults: no pad token).
- ``GPTNeoXTokenizer`` (Pythia, OLMo 1, OLMoE, MPT, Mamba): NFC, then byte-level with GPT-2's
  split and ``add_prefix_space`` as for GPT2; its ``__init__`` rebuilds the post-processor from
  ``add_bos_token`` and ``add_eos_token``, which transformers drops beside a ``tokenizer.json``,
  so nothing is put around a text (the BOS or EOS of the file's post-processor, as OLMo's
  appends, is gone).
- ``CohereTokenizer`` (Command R, Aya): NFC, numbers split into single digits, then byte-level
  with ``add_prefix_space`` as for GPT2.
- ``OpenAIGPTTokenizer`` (``openai-gpt``): words ending with "</w>", BERT's normaliser
  (lower-cased, accents stripped) and pre-tokenizer, ``unk_token`` (default "<unk>") as the
  unknown token.

These are BPE classes: over a file of another model (a Unigram vocabulary, say) transformers
takes the vocabulary, in its order, as a BPE vocabulary without merges, and so does sdpo.

- ``XGLMTokenizer`` (``xglm``): a Unigram model over the file's vocabulary and scores, its
  unknown token at id 3 whatever the file says; the file's SentencePiece character map (if it
  has one), then runs of spaces made one; "▁" in front of every text unless
  ``add_prefix_space`` is false; EOS, not BOS, put in front of a text; seven
  "<madeupwordN>" special tokens. Over a file that is not Unigram transformers fails, and sdpo
  refuses the folder.

``GPTNeoXJapaneseTokenizer`` (``gpt_neox_japanese``) is a tokenizer of transformers' own,
written in Python, that reads ``vocab.txt`` and ``emoji.json`` (transformers fails on a folder
without them): sdpo cannot reproduce it and refuses the folder (``refusal``).

Each class also has default special tokens (``CLASS_SPECIAL_TOKENS``) that apply where
tokenizer_config.json names none: an EOS that TRL appends to plain completions, a BOS the chat
template sees. Other classes transformers builds its own way (those of encoder models) are
read as their file is.

The rules are those of transformers 5.24 (``AutoTokenizer.from_pretrained``,
``TokenizersBackend.convert_to_native_format`` and each class's ``__init__``).
"""

from __future__ import annotations

import base64
import json
from typing import Any

from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    models,
    normalizers,
    pre_tokenizers,
    processors,
)

LLAMA = "LlamaTokenizer"
CODE_LLAMA = "CodeLlamaTokenizer"
GEMMA = "GemmaTokenizer"
GPT2 = "GPT2Tokenizer"
QWEN2 = "Qwen2Tokenizer"
QWEN3_5 = "Qwen3_5Tokenizer"
GPT_NEOX = "GPTNeoXTokenizer"
COHERE = "CohereTokenizer"
CODEGEN = "CodeGenTokenizer"
XGLM = "XGLMTokenizer"
OPENAI_GPT = "OpenAIGPTTokenizer"
GPT_NEOX_JAPANESE = "GPTNeoXJapaneseTokenizer"
# XGLM's registers these as special tokens besides those tokenizer_config.json lists
XGLM_MADEUP_WORDS = tuple(f"<madeupword{i}>" for i in range(7))
# the special tokens each class registers besides the named ones, by the keyword that sets each
# (a tokenizer_config.json key of that name replaces its default; null keeps none)
CLASS_REGISTERED_TOKENS: dict[str, dict[str, str]] = {
    CODE_LLAMA: {
        "prefix_token": "▁<PRE>",
        "middle_token": "▁<MID>",
        "suffix_token": "▁<SUF>",
        "eot_token": "▁<EOT>",
        "fill_token": "<FILL_ME>",
    },
    XGLM: {f"madeupword{i}": word for i, word in enumerate(XGLM_MADEUP_WORDS)},
}
# a key of the config ``tokenize._special_token_config`` gives: true where the tokenizer's
# __init__ is given extra_special_tokens (set, even null), beside which transformers drops the
# additional_special_tokens a class adds to (XGLM's "<madeupwordN>")
EXTRA_SPECIAL_TOKENS_GIVEN = "sdpo:extra_special_tokens_given"
# classes sdpo cannot reproduce: refused (``refusal``)
REFUSED_CLASSES = frozenset((GPT_NEOX_JAPANESE,))

# the special tokens each class's __init__ defaults to (transformers 5.24)
CLASS_SPECIAL_TOKENS: dict[str, dict[str, str]] = {
    LLAMA: {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
    CODE_LLAMA: {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
    GEMMA: {
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "unk_token": "<unk>",
        "pad_token": "<pad>",
        "mask_token": "<mask>",
    },
    GPT2: {
        "bos_token": "<|endoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
    },
    QWEN2: {
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
    },
    QWEN3_5: {
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
    },
    GPT_NEOX: {
        "bos_token": "<|endoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|padding|>",
    },
    COHERE: {
        "bos_token": "<BOS_TOKEN>",
        "eos_token": "<|END_OF_TURN_TOKEN|>",
        "unk_token": "<UNK>",
        "pad_token": "<PAD>",
        "cls_token": "<CLS>",
        "sep_token": "<SEP>",
        "mask_token": "<MASK_TOKEN>",
    },
    CODEGEN: {
        "bos_token": "<|endoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
    },
    XGLM: {
        "bos_token": "<s>",
        "eos_token": "</s>",
        "sep_token": "</s>",
        "cls_token": "<s>",
        "unk_token": "<unk>",
        "pad_token": "<pad>",
    },
    OPENAI_GPT: {"unk_token": "<unk>"},
}

# model types transformers registers one of these classes for (``TOKENIZER_MAPPING_NAMES``), of
# those it has a configuration for: another type in config.json fails transformers' AutoConfig,
# and AutoTokenizer then goes by no model type (so "code_llama", registered to CodeLlama's class,
# is not here: CodeLlama's checkpoints are of type "llama")
_MODEL_TYPE_CLASSES: dict[str, str] = {
    "idefics": LLAMA,
    "idefics2": LLAMA,
    **dict.fromkeys(
        (
            "gemma", "gemma2", "gemma3", "gemma3_text", "gemma3n", "gemma3n_text",
            "recurrent_gemma", "shieldgemma2", "t5gemma", "diffusion_gemma", "zaya",
        ),
        GEMMA,
    ),
    **dict.fromkeys(
        (
            "gpt2", "gpt_neo", "gptj", "codegen", "opt", "phi", "starcoder2", "dbrx", "emu3",
            "jais2", "blip-2", "instructblip", "instructblipvideo", "hyperclovax_vision_v2",
        ),
        GPT2,
    ),
    **dict.fromkeys(
        (
            "qwen2", "qwen2_moe", "qwen2_vl", "qwen2_5_vl", "qwen2_audio", "qwen2_5_omni",
            "qwen3", "qwen3_moe", "qwen3_next", "qwen3_vl", "qwen3_vl_moe", "qwen3_omni_moe",
            "qwen3_asr", "colqwen2", "internvl", "ovis2", "hunyuan_vl", "lighton_ocr",
            "audioflamingo3", "cosmos3_omni", "dots3_note", "fun_asr_nano",
            "moss_transcribe_diarize", "qianfan_ocr", "vibevoice",
        ),
        QWEN2,
    ),
    **dict.fromkeys(
        ("qwen3_5", "qwen3_5_text", "qwen3_5_moe", "qwen3_5_moe_text", "qwen4_exp"), QWEN3_5
    ),
    **dict.fromkeys(
        (
            "gpt_neox", "olmo", "olmoe", "mpt", "mamba", "mamba2", "falcon_mamba", "rwkv",
            "xlstm",
        ),
        GPT_NEOX,
    ),
    **dict.fromkeys(("cohere", "cohere2", "aya_vision"), COHERE),
    "xglm": XGLM,
    "openai-gpt": OPENAI_GPT,
    "gpt_neox_japanese": GPT_NEOX_JAPANESE,
}  # fmt: skip
# model types whose folders are known to name a wrong class: their registered class wins
# (``MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS``, of those registered to one of these classes)
_REGISTERED_CLASS_WINS = frozenset(
    {"qwen2", "hyperclovax_vision_v2", "qwen3_5", "qwen3_5_moe", "qwen3_5_moe_text", "qwen4_exp"}
)
# model types transformers registers its plain backend for (and has a configuration for): their
# folders load as the file is, whatever class they name (Mistral's and Phi-3's folders name
# LlamaTokenizer)
_PLAIN_MODEL_TYPES = frozenset(
    (
        "EvollaModel", "aria", "beam", "bigbird_pegasus", "canary", "cohere_asr", "ernie4_5",
        "ernie4_5_moe", "flex_olmo", "fuyu", "glm", "glm4", "glm4_moe",
        "glm4_moe_lite", "glm4v", "glm4v_moe", "glm_image", "glmasr", "got_ocr2", "gpt_bigcode",
        "gradium_phonon_tts", "granite", "granitemoe", "granitemoehybrid", "granitemoeshared",
        "hyperclovax", "internlm3", "iquestcoder", "jamba", "kimi_k25", "kimi_linear", "kosmos-2",
        "llava", "llava_next", "mimo_v2_flash", "minicpm3", "minicpm_ocr", "minicpmv4_6",
        "minicpmv4_7", "minimax_m2", "ministral", "ministral3", "mistral", "mistral3",
        "mistral_large4", "mixtral", "modernbert", "modernbert-decoder", "molmo2", "nemo_speechlm",
        "nemotron", "nystromformer", "olmo2", "olmo3", "olmo_hybrid", "omniasr", "paddleocr_vl",
        "pegasus_x", "persimmon", "phi3", "phimoe", "pix2struct", "pixtral", "pocket_tts",
        "smolvlm", "stablelm", "umt5", "vipllava", "voxtral", "voxtral_realtime", "xlm-roberta-xl",
    )
)  # fmt: skip
_PLAIN = "TokenizersBackend"
# classes that give tokenizer_config.json's add_prefix_space to their pre-tokenizer as it is (a
# null fails there); Qwen2's and Qwen3.5's read null as false
_PREFIX_SPACE_AS_GIVEN = frozenset((GPT2, CODEGEN, GPT_NEOX, COHERE))

# Qwen2Tokenizer's split (transformers' PRETOKENIZE_REGEX for it)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen3_5Tokenizer's: Qwen2's with combining marks (\p{M}) read as part of a word
QWEN3_5_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _class_name(value: Any) -> str | None:
    if not isinstance(value, str) or not value:
        return None
    return value if value == "PreTrainedTokenizerFast" else value.removesuffix("Fast")


def _is_byte_level(tokenizer: Tokenizer) -> bool:
    """Whether a component of the pipeline is byte-level (transformers looks for "ByteLevel" in
    the file's text)."""
    parts = (tokenizer.normalizer, tokenizer.pre_tokenizer, tokenizer.post_processor)
    parts += (tokenizer.decoder,)
    return any(p is not None and b'"ByteLevel"' in p.__getstate__() for p in parts)


def backend_class(tokenizer: Tokenizer, config: dict, model_config: dict) -> str | None:
    """Which of this module's classes ``AutoTokenizer`` builds for a folder with
    ``tokenizer.json`` (``tokenizer``), ``tokenizer_config.json`` (``config``) and
    ``config.json`` (``model_config``), or None where it loads the file as it is (or builds a
    class sdpo does not reproduce). The class named in tokenizer_config.json (else config.json)
    is the one built, except: a folder with its own tokenizer code (``auto_map``) is read as
    its file, and so is one whose tokenizer_config.json names the class "" (as transformers
    reads a name it has no class for); a model type registered to transformers' plain backend
    loads the file as it is; ``qwen2`` model folders get Qwen2Tokenizer whatever they name;
    ``LlamaTokenizer`` over a byte-level file (Llama 3's) is read as the file; and a folder
    that names no class gets its model type's class. Every class is returned whatever the
    file's model: the BPE classes rebuild another model's vocabulary as BPE without merges
    (``build_as_transformers``), and ``refusal`` says where sdpo cannot build the class (XGLM's
    Unigram model over another model, and ``REFUSED_CLASSES``)."""
    if "auto_map" in config or config.get("tokenizer_class") == "":
        # own tokenizer code; or a name transformers knows no class by: its plain backend
        return None
    named = _class_name(config.get("tokenizer_class")) or _class_name(
        model_config.get("tokenizer_class")
    )
    model_type = model_config.get("model_type")
    model_type = model_type if isinstance(model_type, str) and model_type else None
    registered = _PLAIN if model_type in _PLAIN_MODEL_TYPES else _MODEL_TYPE_CLASSES.get(model_type)
    registered_wins = model_type in _REGISTERED_CLASS_WINS
    if named == LLAMA and not registered_wins and _is_byte_level(tokenizer):
        return None
    if named is None:
        chosen = registered
    elif registered is not None and registered != named:
        chosen = None if registered == _PLAIN else (registered if registered_wins else named)
    else:
        chosen = named
    return chosen if chosen in CLASS_SPECIAL_TOKENS or chosen in REFUSED_CLASSES else None


def class_source(config: dict, model_config: dict) -> str:
    """Where the class ``backend_class`` picks is named: tokenizer_config.json's
    ``tokenizer_class``, else config.json's, else config.json's ``model_type``."""
    for file, settings, key in (
        ("tokenizer_config.json", config, "tokenizer_class"),
        ("config.json", model_config, "tokenizer_class"),
        ("config.json", model_config, "model_type"),
    ):
        if _class_name(settings.get(key)) is not None or key == "model_type":
            return f"{file}'s {key} {settings.get(key)!r}"
    return ""  # not reached


def refusal(tokenizer: Tokenizer, cls: str | None) -> str | None:
    """Why sdpo cannot build the pipeline of ``cls`` (``backend_class``'s choice) over
    ``tokenizer``, or None where it can."""
    if cls == GPT_NEOX_JAPANESE:
        return (
            f"transformers' {cls}, a tokenizer of its own written in Python that reads vocab.txt "
            "and emoji.json, not tokenizer.json (AutoTokenizer fails on a folder without them), "
            "whose ids sdpo cannot reproduce"
        )
    if cls == XGLM and not isinstance(tokenizer.model, models.Unigram):
        kind = json.loads(tokenizer.model.__getstate__()).get("type", "non-Unigram")
        return (
            f"transformers' {cls}, which builds a Unigram model from tokenizer.json's vocabulary; "
            f"this tokenizer.json has a {kind} model, which it cannot read (AutoTokenizer fails "
            "on this folder too)"
        )
    return None


def class_defaults(tokenizer: Tokenizer, config: dict, cls: str | None) -> dict:
    """``config`` with ``cls``'s default special tokens (``CLASS_SPECIAL_TOKENS``) under the
    keys it lacks, as transformers' class gives them (a key set to null keeps no token). Only
    tokens in the vocabulary are added, and BOS: transformers would give another one a new id,
    outside the model's embeddings (for EOS, ``PairTokenizer.from_dir`` then looks further or
    says what to add; a BOS outside the vocabulary is an error for the rows that would get it,
    ``PairTokenizer.outside_vocab``)."""
    defaults = CLASS_SPECIAL_TOKENS.get(cls or "", {})
    added = {
        key: token
        for key, token in defaults.items()
        if key not in config and (key == "bos_token" or tokenizer.token_to_id(token) is not None)
    }
    return {**config, **added} if added else config


def class_registered_tokens(config: dict, cls: str | None) -> dict[str, str]:
    """The tokens ``cls`` registers itself (``CLASS_REGISTERED_TOKENS``) for a folder of
    ``config``: those whose key it lacks, and none of XGLM's, which its ``__init__`` adds to
    ``additional_special_tokens``, where extra_special_tokens is given
    (``EXTRA_SPECIAL_TOKENS_GIVEN``): transformers then drops that list."""
    if cls == XGLM and config.get(EXTRA_SPECIAL_TOKENS_GIVEN):
        return {}
    return {k: t for k, t in CLASS_REGISTERED_TOKENS.get(cls or "", {}).items() if k not in config}


def build_as_transformers(tokenizer: Tokenizer, config: dict, cls: str | None) -> None:
    """Give ``tokenizer`` the normaliser, pre-tokenizer and BPE settings ``cls``'s ``__init__``
    builds (module docstring; None: the file's, left as they are), reading
    ``add_prefix_space`` and ``legacy`` from ``config`` (tokenizer_config.json, with
    ``class_defaults`` applied) as the class does."""
    if cls is None:
        return
    if cls == XGLM:
        _build_xglm(tokenizer, config)
        return
    if not isinstance(tokenizer.model, models.BPE):
        # these classes build a BPE model from the file's vocabulary (a Unigram one taken in its
        # order) and merges, of which another model has none
        tokenizer.model = models.BPE(vocab=tokenizer.get_vocab(with_added_tokens=False), merges=[])
    if cls == OPENAI_GPT:
        _build_openai_gpt(tokenizer, config)
        return
    model = tokenizer.model
    model.dropout = None
    model.ignore_merges = False
    model.continuing_subword_prefix = None
    model.end_of_word_suffix = None
    add_prefix_space = config.get("add_prefix_space")
    if cls in (LLAMA, CODE_LLAMA, GEMMA):
        model.byte_fallback = True
        model.fuse_unk = True
        # Llama's builds its BPE with no unknown token (bytes stand in for every character);
        # CodeLlama's and Gemma's with tokenizer_config.json's unk_token, their default "<unk>"
        # where it names none, written as text (a null one is "None"). One the vocabulary lacks
        # fails a text with a character that neither the vocabulary nor its byte tokens cover,
        # as in transformers (PairTokenizer.encode_texts says which text)
        unk = config.get("unk_token", "<unk>")
        unk = unk.get("content") if isinstance(unk, dict) else unk
        model.unk_token = None if cls == LLAMA else str(unk)
    else:  # byte-level
        if (
            cls in _PREFIX_SPACE_AS_GIVEN
            and "add_prefix_space" in config
            and add_prefix_space is None
        ):
            # these classes pass it to their ByteLevel pre-tokenizer, which refuses None
            raise ValueError(
                f"add_prefix_space is null, which transformers' {cls} cannot build "
                "(AutoTokenizer fails on this folder too); set it to false (the class's default) "
                "or true"
            )
        model.byte_fallback = False
        model.fuse_unk = False
        model.unk_token = None
    if cls in (LLAMA, CODE_LLAMA):
        if add_prefix_space is False:
            scheme = "never"
        elif cls == CODE_LLAMA or not config.get("legacy", False):
            scheme = "first"
        else:
            scheme = "always"
        tokenizer.normalizer = None
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement="▁", prepend_scheme=scheme, split=False
        )
    elif cls == GEMMA:
        tokenizer.normalizer = normalizers.Replace(" ", "▁")
        tokenizer.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    elif cls in (GPT2, CODEGEN):
        tokenizer.normalizer = None
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=bool(add_prefix_space))
    elif cls == GPT_NEOX:
        tokenizer.normalizer = normalizers.NFC()
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=bool(add_prefix_space))
        # its __init__ rebuilds the post-processor from add_bos_token and add_eos_token, which
        # transformers drops beside a tokenizer.json: nothing put around a text
        tokenizer.post_processor = None
    elif cls == COHERE:
        tokenizer.normalizer = normalizers.NFC()
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=bool(add_prefix_space)),
            ]
        )
    else:  # Qwen2, Qwen3.5
        split = QWEN2_SPLIT if cls == QWEN2 else QWEN3_5_SPLIT
        tokenizer.normalizer = normalizers.NFC()
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=bool(add_prefix_space), use_regex=False),
            ]
        )
    if cls == CODE_LLAMA:
        # its __init__ passes add_bos_token=True, which rebuilds the post-processor: BOS in front
        bos = config.get("bos_token")
        bos = bos.get("content") if isinstance(bos, dict) else bos
        bos_id = tokenizer.token_to_id(bos) if isinstance(bos, str) and bos else None
        if bos_id is None:
            tokenizer.post_processor = processors.TemplateProcessing(
                single="$A:0", pair="$A:0 $B:1"
            )
        else:
            tokenizer.post_processor = processors.TemplateProcessing(
                single=f"{bos}:0 $A:0",
                pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                special_tokens=[(bos, bos_id)],
            )


def _content(value: Any) -> Any:
    """A special token of tokenizer_config.json: a string, or an AddedToken's content."""
    return value.get("content") if isinstance(value, dict) else value


def _precompiled_charsmap(tokenizer: Tokenizer) -> bytes | None:
    """The SentencePiece character map of the file's normaliser (at its top or in its sequence),
    which transformers hands to the classes that rebuild a SentencePiece normaliser."""
    if tokenizer.normalizer is None:
        return None
    state = json.loads(tokenizer.normalizer.__getstate__())
    parts = state.get("normalizers", []) if state.get("type") == "Sequence" else [state]
    for part in parts:
        if part.get("type") == "Precompiled" and "precompiled_charsmap" in part:
            return base64.b64decode(part["precompiled_charsmap"])
    return None


def _build_xglm(tokenizer: Tokenizer, config: dict) -> None:
    """XGLMTokenizer's ``__init__``: a Unigram model over the file's vocabulary and scores with
    the unknown token at id 3 whatever the file says, the file's SentencePiece character map
    (if any) then runs of spaces made one, a Metaspace pre-tokenizer that puts "▁" in front of
    every text unless ``add_prefix_space`` is false (default true), EOS (not BOS) in front of a
    text, and seven "<madeupwordN>" special tokens."""
    for key in ("bos_token", "eos_token"):
        if key in config and not _content(config[key]):
            raise ValueError(
                f"{key} is null, which transformers' {XGLM} cannot build (its post-processor "
                f"names BOS and EOS; AutoTokenizer fails on this folder too); set {key} (the "
                f"class's default is {CLASS_SPECIAL_TOKENS[XGLM][key]!r})"
            )
    vocab = [tuple(entry) for entry in json.loads(tokenizer.model.__getstate__())["vocab"]]
    if len(vocab) < 4:
        raise ValueError(
            f"transformers' {XGLM} makes id 3 its unknown token, and this vocabulary has "
            f"{len(vocab)} entries (AutoTokenizer fails on this folder too)"
        )
    charsmap = _precompiled_charsmap(tokenizer)
    tokenizer.model = models.Unigram(vocab, unk_id=3, byte_fallback=False)
    steps = [normalizers.Replace(Regex(r" {2,}"), " ")]
    if charsmap is not None:
        steps.insert(0, normalizers.Precompiled(charsmap))
    tokenizer.normalizer = normalizers.Sequence(steps)
    scheme = "always" if config.get("add_prefix_space", True) else "never"
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme)
    madeup = [
        w
        for w in class_registered_tokens(config, XGLM).values()
        if tokenizer.token_to_id(w) is not None
    ]
    tokenizer.add_special_tokens([AddedToken(w, special=True, normalized=False) for w in madeup])
    eos = str(_content(config.get("eos_token", "</s>")))
    eos_id = tokenizer.token_to_id(eos)
    if eos_id is None:  # a new id in transformers, outside the model's embeddings: no EOS here
        tokenizer.post_processor = None
        return
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{eos}:0 $A:0",
        pair=f"{eos}:0 $A:0 {eos}:0 {eos}:0 $B:0",
        special_tokens=[(eos, eos_id)],
    )


def _build_openai_gpt(tokenizer: Tokenizer, config: dict) -> None:
    """OpenAIGPTTokenizer's ``__init__``: the file's BPE vocabulary and merges, words ending
    with "</w>", tokenizer_config.json's ``unk_token`` as the unknown token (default "<unk>",
    written as text; one the vocabulary lacks fails a text with a character the vocabulary does
    not cover, as in transformers), BERT's normaliser (lower-casing, accents stripped) and
    BERT's pre-tokenizer; the file's post-processor is kept."""
    model = tokenizer.model
    model.dropout = None
    model.continuing_subword_prefix = ""
    model.end_of_word_suffix = "</w>"
    model.fuse_unk = False
    model.byte_fallback = False
    model.ignore_merges = False
    model.unk_token = str(_content(config.get("unk_token", "<unk>")))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()


__all__ = [
    "CLASS_SPECIAL_TOKENS",
    "EXTRA_SPECIAL_TOKENS_GIVEN",
    "REFUSED_CLASSES",
    "backend_class",
    "build_as_transformers",
    "class_defaults",
    "class_registered_tokens",
    "class_source",
    "refusal",
]
