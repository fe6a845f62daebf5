"""Turning validated preference rows into token ids, the way TRL's ``DPOTrainer`` (1.16) does.

Each sequence is ``prompt ids + completion ids``; only completion tokens are scored. A pair is
tokenized as whole texts: the prompt text alone, and prompt + chosen and prompt + rejected as
one text each (plain rows: the strings joined as they are, so a completion normally starts with
its own space or newline; conversational rows: the model's chat template (jinja2, sandboxed)
applied to the prompt messages with ``add_generation_prompt=True``, and to prompt + completion
messages). A completion's ids are what follows the prompt's ids in prompt + completion's. So
each completion is tokenized in its context, as the model reads it after the prompt; encoding
the completion text on its own would give SentencePiece tokenizers (Llama 2, Mistral, SOLAR) a
stray word-boundary token at its start that the model never produces after a prompt.

Where the prompt's ids are not a prefix of prompt + completion's (counted in
``TokenizeStats.num_prompt_boundary``):
- plain rows: tokens merged across the boundary (a completion that does not start with a space
  or newline). The prompt's ids are kept whole and each completion is encoded on its own. (TRL
  moves the prompt's merged last ids into the completion instead, and warns.)
- conversational rows: the template renders the prompt alone differently (e.g. an empty
  thought block after the generation prompt). As TRL does, the completion starts where the
  prompt's ids part from both prompt + completion's ids.

Pipeline: ``tokenizer.json`` as transformers 5's ``AutoTokenizer`` loads it, which is as it
is, except where it builds one of the classes that keep only the file's vocabulary, merges,
added tokens and post-processor and make the rest themselves (Llama 2's and SOLAR's
``LlamaTokenizer``, ``CodeLlamaTokenizer``, ``GemmaTokenizer``, ``GPT2Tokenizer``,
``CodeGenTokenizer``, ``Qwen2Tokenizer``, ``Qwen3_5Tokenizer``, ``GPTNeoXTokenizer``,
``CohereTokenizer``, ``OpenAIGPTTokenizer``; ``XGLMTokenizer``, which also builds its own model
from the file's Unigram vocabulary): sdpo then builds the same pipeline
(``engine/tokenizer_classes.py``), with the class's default special tokens where
``tokenizer_config.json`` names none, and refuses a folder whose class it cannot reproduce
(``GPTNeoXJapaneseTokenizer``, a tokenizer of transformers' own written in Python). Every special
token ``tokenizer_config.json`` names, and every entry of its ``added_tokens_decoder``, is an
added token, as transformers registers it (``_add_registered_tokens``), with the options
(``lstrip``, ``rstrip``, ``single_word``, ``normalized``) of the ``added_tokens_decoder`` entry
where it differs from ``tokenizer.json``'s token, as transformers re-adds it. Where
``tokenizer_config.json`` has no ``added_tokens_decoder`` (folders saved by older releases),
the tokens ``added_tokens.json`` names are added before them, as transformers adds them
(``_legacy_added_tokens``): the tokenizer's own, with the next free ids where the vocabulary
lacks them, counted in its vocabulary size. Two normalised added tokens that the normaliser
makes one text are refused (``_check_normalized_added_tokens``): the tokenizers library reads
that text as either, which one changing from one process to the next.
One the vocabulary lacks (a named one, one listed in ``extra_special_tokens``/``additional_special_tokens`` or in
``added_tokens_decoder``, a class's default, CodeLlama's infilling tokens, XGLM's
"<madeupwordN>") gets a new id there, past the model's embeddings, as in transformers: a text
that holds it (split at it exactly as transformers splits it) is an error naming the text
(``PairTokenizer.encode_texts``), and in ``tokenize_pairs`` the row, field and token; a token
only named is no error. A text that holds CodeLlama's fill token ("<FILL_ME>") is an error too:
transformers' class reads it as an infilling request and leaves its pipeline changed for the
texts after.

BOS rule: text is encoded without the tokenizer's post-processor (``add_special_tokens=False``).
A plain prompt then gets in front the token ``tokenizer.json``'s post-processor puts in front of
plain text (BOS, as Llama's and Gemma's do; whatever token it is, the named BOS or not, or where
no BOS is named, as transformers adds it to TRL's prompts), unless the prompt already starts
with that token (TRL would give it a second one). ``config.json``'s ``bos_token_id`` is not
read (transformers does not read it: a chat template's ``bos_token`` is a named one only). A
named BOS the vocabulary lacks (transformers gives it a new id, past the model's embeddings) is
an error only for the rows that would get it: a text that holds it (a plain row's, or the chat
template's output), and every plain prompt where the class puts BOS in front (CodeLlama's).
``tokenizer_config.json``'s ``add_bos_token`` (and ``add_eos_token``) is not read:
transformers 5 ignores it when the folder has a ``tokenizer.json``, so the post-processor alone
decides what TRL's prompts get (CodeLlama's class replaces it with one that adds BOS, and
GPT-NeoX's with one that adds nothing). A
conversational prompt starts with BOS when the chat template writes it (``{{ bos_token }}``,
Llama 3's ``<|begin_of_text|>``), as transformers' ``apply_chat_template(tokenize=True)`` and so
TRL give it.

EOS rule: a plain completion gets EOS appended unless it already ends with the EOS token (its
text with EOS's text, its ids with EOS's id: one ending with an unknown token that shares EOS's
id gets EOS, as TRL gives it), so no
pair ends with a doubled EOS (nor with the post-processor's EOS after it, where
``tokenizer.json``'s adds one after every text: TRL's completions then end with two). TRL
appends the EOS token's text instead: where that token is an added token with ``single_word``,
``lstrip`` or ``normalized`` true, a row after whose completion transformers would not read that
text as EOS (TRL's completion ending with its pieces) is an error (``_check_eos_text``). A
conversational completion is what the chat template renders: when it ends with the template's
end of turn, a special token followed by whitespace at most (``<|eot_id|>``, ``<|im_end|>\\n``,
``</s>``, ``<end_of_turn>\\n``), nothing is added, as TRL does. A template that leaves the answer open (SOLAR's ``### Assistant:`` template writes no end
of turn) gets EOS appended, so the pair still teaches where an answer ends (TRL adds nothing).
A completion whose rendered text ends with such a token that transformers reads by its context
(an added token with ``single_word``, ``lstrip`` or ``normalized`` true) but does not read there
(e.g. with ``single_word``, right after a letter) is an error: TRL's turn would be open, ending
with the token's pieces, where sdpo's would get EOS.

Truncation (``max_length`` bounds each sequence, prompt + completion):
- "keep_end" (default): when a pair is too long, the prompt is first cut to
  ``max_prompt_length`` tokens keeping its END (the most recent turns; a leading BOS is kept),
  then each completion is cut at its end to fit (losing its EOS).
- "keep_start": the same, but the prompt keeps its START.
- "error": a pair over ``max_length`` is an error naming the row.
A pair whose completion would be left with no token is an error (raise ``max_length`` or lower
``max_prompt_length``); the number of truncated pairs is returned in ``TokenizeStats``.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import shlex
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from .data import DataError, cyclic_gc_paused, row_error
from .packing import TokenizedPair
from .tokenizer_classes import (
    CLASS_REGISTERED_TOKENS,
    CLASS_SPECIAL_TOKENS,
    CODE_LLAMA,
    EXTRA_SPECIAL_TOKENS_GIVEN,
    QWEN2,
    backend_class,
    build_as_transformers,
    class_defaults,
    class_registered_tokens,
    class_source,
    refusal,
)

TRUNCATION_POLICIES = ("keep_end", "keep_start", "error")
_FREED: list[int] = []  # in place of a row's ids once its pair is made (never changed)
_ENCODE_CHUNK = 4096  # texts per encode_batch call: bounds peak memory on large data sets
# rows tokenize_pairs takes through its stages together: one encode_batch call per text kind
# (_ENCODE_CHUNK); their texts and whole-sequence ids are a few tens of MB
_TOKENIZE_BLOCK = 4096


@dataclass(kw_only=True)
class TokenizeStats:
    num_pairs: int = 0
    num_truncated: int = 0  # pairs with a cut prompt or completion
    num_prompt_truncated: int = 0
    num_completion_truncated: int = 0  # pairs with a cut chosen or rejected
    num_identical: int = 0  # pairs whose chosen ids equal their rejected ids
    # pairs whose prompt ids are not all a prefix of prompt + completion's ids (tokens merged
    # across the boundary, or a template that renders the prompt alone differently)
    num_prompt_boundary: int = 0
    num_tokens: int = 0  # packed tokens of all pairs (the prompt counted twice)
    max_sequence_length: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def _token_content(value: Any) -> str | None:
    """Special tokens in tokenizer_config.json are a string or a serialised AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _is_added_token(value: Any) -> bool:
    """A serialised AddedToken as transformers reads one from ``tokenizer_config.json``: an
    object with ``"__type": "AddedToken"`` (it leaves any other object as it is)."""
    return isinstance(value, dict) and value.get("__type") == "AddedToken"


def _model_token(value: Any) -> str | None:
    """A model-specific ``*_token`` key's token: transformers registers it only when it is a
    string or an AddedToken (``_is_added_token``), and passes over any other value."""
    return _token_content(value) if isinstance(value, str) or _is_added_token(value) else None


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: could not read JSON ({exc}); fix or re-save the file") from exc
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object; fix or re-save the file")
    return value


# the named special tokens of transformers' tokenizers (``SPECIAL_TOKENS_ATTRIBUTES``)
NAMED_SPECIAL_TOKENS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
# the names transformers reads a message's reasoning under; each is given under all of them
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def template_special_tokens(config: dict) -> dict[str, str]:
    """The special tokens a chat template sees as variables, as transformers 5 gives them
    (``special_tokens_map``): from ``tokenizer_config.json``, the named ones (``bos_token``,
    ``eos_token``, ``unk_token``, ``sep_token``, ``pad_token``, ``cls_token``, ``mask_token``),
    every other ``*_token`` key (model-specific tokens such as Gemma 3's ``image_token``), and
    the named tokens of ``model_specific_special_tokens`` and of ``extra_special_tokens`` when
    that is an object (a list of tokens names none). A token written as "" or as an AddedToken
    without content is "" there, as transformers reads it (it adds no such token)."""
    named: dict[str, str] = {}
    specific: dict[str, str] = {}
    for key, value in config.items():
        if not key.endswith("_token"):
            continue
        model_token = isinstance(value, str) or _is_added_token(value)
        token = _token_text(value) if key in NAMED_SPECIAL_TOKENS or model_token else None
        if token is not None:
            (named if key in NAMED_SPECIAL_TOKENS else specific)[key] = token
    for key in ("model_specific_special_tokens", "extra_special_tokens"):
        tokens = config.get(key)
        if isinstance(tokens, dict):
            for name, value in tokens.items():
                token = _token_text(value)
                if token is not None and name not in NAMED_SPECIAL_TOKENS:
                    specific[str(name)] = token
    return {**named, **specific}


def _token_text(value: Any) -> str | None:
    """A special token's text as transformers reads it: a string as it is, an AddedToken
    dict's content ("" where it has none); None for anything else (no token)."""
    if isinstance(value, dict):
        value = value.get("content", "")
    return value if isinstance(value, str) else None


SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
# token -> id of the tokens added to a tokenizer, as transformers wrote them before
# tokenizer_config.json had an added_tokens_decoder (``_legacy_added_tokens``)
ADDED_TOKENS_FILE = "added_tokens.json"


@dataclass(frozen=True)
class _TokenSources:
    """Where the special tokens of ``_special_token_config``'s config are written, for errors:
    ``keys``: a named key's or a model-specific token's (file, key as written: the name itself,
    or the object it is in), by name; ``listed``: each item of its ``extra_special_tokens`` list
    as (file, key as written, position there)."""

    keys: dict[str, tuple[str, str]]
    listed: list[tuple[str, str, int]]

    def key(self, name: str) -> tuple[str, str]:
        return self.keys.get(name, (TOKENIZER_CONFIG_FILE, name))


def _special_token_config(folder: Path, config: dict) -> tuple[dict, _TokenSources]:
    """``tokenizer_config.json``'s ``config`` with its special tokens read as transformers 5's
    ``from_pretrained`` and tokenizer ``__init__`` read them, and where each is written:
    ``additional_special_tokens`` is the list of extra special tokens where
    ``extra_special_tokens`` is unset or empty; an object under ``extra_special_tokens`` holds
    model-specific tokens, which with the string-valued model-specific ``*_token`` keys replace
    a ``model_specific_special_tokens`` of the file's own. ``special_tokens_map.json``'s tokens
    then win, where transformers reads that file: only when ``config`` has no
    ``added_tokens_decoder`` (folders saved before transformers wrote one, e.g. older Llama 2
    and Mistral uploads). An object there is a special AddedToken (with or without
    ``"__type": "AddedToken"``); a list under its ``extra_special_tokens`` adds its tokens to
    ``config``'s list, and an object there replaces that list, its tokens model-specific ones;
    its ``additional_special_tokens`` is the list only where ``extra_special_tokens`` is
    still unset. The config returned has the list under ``extra_special_tokens`` (no
    ``additional_special_tokens``), the model-specific tokens of objects under
    ``model_specific_special_tokens``, and ``EXTRA_SPECIAL_TOKENS_GIVEN`` true where the
    tokenizer's ``__init__`` is given ``extra_special_tokens`` (a class's own additions to
    ``additional_special_tokens`` are then dropped)."""
    merged = dict(config)
    keys: dict[str, tuple[str, str]] = {}
    listed_key = "extra_special_tokens"  # the key tokenizer_config.json's list is under
    if "additional_special_tokens" in merged and not merged.get("extra_special_tokens"):
        merged["extra_special_tokens"] = merged.pop("additional_special_tokens")
        listed_key = "additional_special_tokens"
    listed = merged.get("extra_special_tokens")
    sources = [(TOKENIZER_CONFIG_FILE, listed_key, i) for i in range(_list_length(listed))]
    specific = merged.get("model_specific_special_tokens")
    if isinstance(specific, dict):
        keys |= {str(k): (TOKENIZER_CONFIG_FILE, "model_specific_special_tokens") for k in specific}
    # (the keys stay: a tokenizer class reads its own, e.g. CodeLlama's fill_token)
    collected = {
        k: v
        for k, v in merged.items()
        if k.endswith("_token") and k not in NAMED_SPECIAL_TOKENS and isinstance(v, str)
    }
    if isinstance(listed, dict):
        collected |= merged.pop("extra_special_tokens")
        keys |= {str(k): (TOKENIZER_CONFIG_FILE, "extra_special_tokens") for k in listed}
    if collected:
        merged["model_specific_special_tokens"] = collected
    path = folder / SPECIAL_TOKENS_MAP_FILE
    if "added_tokens_decoder" in config or not path.is_file():
        token_map = {}
    else:
        token_map = _read_json(path)
    additional: list[tuple[str, str, int]] = []
    for key, value in token_map.items():
        if isinstance(value, dict) and key != "extra_special_tokens":
            # transformers makes a special AddedToken of any object there
            value = {**value, "special": True, "__type": "AddedToken"}
        elif key == "extra_special_tokens" and isinstance(value, list):
            # its tokens join the list (an object read as a special AddedToken)
            listed = merged.get(key)
            joined = list(listed) if isinstance(listed, list) else []
            for i, token in enumerate(value):
                if isinstance(token, dict):
                    _check_map_list_item(path, i, token)
                    token = {**token, "special": True, "__type": "AddedToken"}
                if token not in joined:
                    joined.append(token)
                    sources.append((SPECIAL_TOKENS_MAP_FILE, key, i))
            value = joined
        elif key == "extra_special_tokens" and isinstance(value, dict):
            sources = []  # the object replaces the list
            keys |= {str(k): (SPECIAL_TOKENS_MAP_FILE, key) for k in value}
        elif key == "additional_special_tokens":
            additional = [(SPECIAL_TOKENS_MAP_FILE, key, i) for i in range(_list_length(value))]
        keys[key] = (SPECIAL_TOKENS_MAP_FILE, key)
        merged[key] = value
    if isinstance(merged.get("extra_special_tokens"), dict):
        specific = merged.get("model_specific_special_tokens")
        merged["model_specific_special_tokens"] = {
            **(specific if isinstance(specific, dict) else {}),
            **merged.pop("extra_special_tokens"),
        }
    # the tokenizer's __init__: additional_special_tokens only where no extra_special_tokens
    merged[EXTRA_SPECIAL_TOKENS_GIVEN] = "extra_special_tokens" in merged
    if "additional_special_tokens" in merged and "extra_special_tokens" not in merged:
        merged["extra_special_tokens"] = merged.pop("additional_special_tokens")
        sources = additional
    merged.pop("additional_special_tokens", None)
    return merged, _TokenSources(keys=keys, listed=sources)


def _list_length(value: Any) -> int:
    return len(value) if isinstance(value, list) else 0


def _check_map_list_item(path: Path, position: int, value: dict) -> None:
    """Refuse an object listed under ``special_tokens_map.json``'s ``extra_special_tokens`` that
    transformers fails to read: one with ``"special"``, which it gives again."""
    if "special" in value:
        shown = json.dumps(value)
        raise ValueError(
            f"item {position} of extra_special_tokens in {path} is {shown[:120]}"
            f'{"..." if len(shown) > 120 else ""}, an object with "special", which '
            "transformers fails to read there (it makes every token listed there special "
            'itself; it fails to load a tokenizer from this folder too); remove "special" '
            "from the object, or write the token as a string, "
            f"{json.dumps(_token_content(value) or '<token>')}"
        )


def _template_messages(messages: list[dict]) -> list[dict]:
    """Messages as transformers' ``apply_chat_template`` hands them to the template: keys whose
    value is None dropped, and a message's reasoning (``reasoning_content``, ``thinking`` or
    ``reasoning``, the first one set) given as ``reasoning_content`` and, unless the message
    has its own, as ``thinking`` (Qwen3 and DeepSeek-R1 templates read the first, gpt-oss's the
    second)."""
    out = []
    for message in messages:
        if not isinstance(message, dict):
            out.append(message)
            continue
        message = {k: v for k, v in message.items() if v is not None}
        reasoning = next((message[k] for k in REASONING_FIELDS if k in message), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


def _first_id(value: Any) -> int | None:
    if isinstance(value, list):
        value = value[0] if value else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _shown(text: str) -> str:
    return f"{text[:80]!r}{'...' if len(text) > 80 else ''}"


class TextEncodeError(ValueError):
    """A text the tokenizer fails to encode; ``index``: its position in the texts given,
    ``problem`` and ``fix``: what is wrong and what to do, for a row's error (by default, a
    failure of the tokenizer, ``cause``)."""

    def __init__(
        self,
        name: str,
        text: str,
        cause: Exception | None = None,
        *,
        index: int,
        problem: str | None = None,
        fix: str | None = None,
    ) -> None:
        self.problem = problem or (
            f"the tokenizer cannot encode the text {_shown(text)} ({cause}); transformers' "
            "tokenizer fails on it too"
        )
        self.fix = fix or (
            "remove the characters the vocabulary lacks from the row, or fix the tokenizer "
            "(its unknown token, unk_token in tokenizer_config.json, must be in the vocabulary)"
        )
        super().__init__(f"{name}: text {index}: {self.problem}; {self.fix}")
        self.index = index


class SpecialTokenOutsideVocabError(TextEncodeError):
    """A text that holds a special token outside the vocabulary (``PairTokenizer.outside_vocab``),
    which transformers gives an id past the model's embeddings; ``token``: that token."""

    def __init__(self, name: str, text: str, *, token: str, problem: str, fix: str, index: int):
        super().__init__(
            name,
            text,
            index=index,
            problem=f"{problem}, and the text {_shown(text)} holds it",
            fix=f"{fix}, or remove it from the text",
        )
        self.token = token


class PairTokenizer:
    """A ``tokenizers.Tokenizer`` plus what DPO tokenization needs: EOS, BOS and the chat template."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        eos_token: str,
        bos_token: str | None = None,
        add_bos: bool | None = None,
        chat_template: str | None = None,
        tool_use_template: str | None = None,
        special_tokens: dict[str, str] | None = None,
        name: str = "tokenizer",
        bos_in_front: bool = False,
        outside_vocab: dict[str, tuple[str, str | None]] | None = None,
        fill_token: str | None = None,
        added_file_tokens: Sequence[str] = (),
    ) -> None:
        self.tokenizer = tokenizer
        self.name = name
        # id -> token of the tokens that only added_tokens.json names (``_legacy_added_tokens``):
        # the tokenizer's own, but a model that was not resized for them lacks their ids
        self.added_file_tokens = {
            i: t for t in added_file_tokens if (i := tokenizer.token_to_id(t)) is not None
        }
        # CodeLlama's infilling token: transformers' class reads a text holding it as a prefix
        # and a suffix to encode between its infilling tokens, and leaves its pipeline changed
        # for the texts after (its normaliser then puts "▁" in front of every piece of text).
        # Not reproduced: a text holding it is an error (``encode_texts``)
        self.fill_token = fill_token
        # every special token transformers registers that the vocabulary lacks: token -> (where
        # it is named, the change that drops it). transformers gives each a new id past the
        # vocabulary (outside the model's embeddings); so does ``tokenizer`` here (added as a
        # special token where it lacks one), so a text is split at it exactly as there, and a
        # text that holds one is an error (``encode_texts``). A named BOS outside the vocabulary
        # is one of them: an error for the rows that would get it, not before
        self.outside_vocab = dict(outside_vocab or {})
        if bos_token is not None and tokenizer.token_to_id(bos_token) is None:
            self.outside_vocab.setdefault(
                bos_token,
                (
                    "bos_token",
                    "set bos_token in tokenizer_config.json to the vocabulary's BOS token",
                ),
            )
        lacking = [t for t in self.outside_vocab if tokenizer.token_to_id(t) is None]
        if lacking:
            from tokenizers import AddedToken

            tokenizer.add_tokens([AddedToken(t, special=True) for t in lacking])
        self._outside_ids = {
            i: t for t in self.outside_vocab if (i := tokenizer.token_to_id(t)) is not None
        }
        # ids below it are no special token outside the vocabulary (new ids come last)
        self._outside_from = min(self._outside_ids, default=None)
        self.eos_token = eos_token
        self.eos_id = self._require_id(eos_token, "eos_token")
        self.bos_token = bos_token  # the template's ``bos_token``: only a named one
        named_bos_id = (
            None
            if bos_token is None or bos_token in self.outside_vocab
            else tokenizer.token_to_id(bos_token)
        )
        self.missing_bos = bos_token if bos_token is not None and named_bos_id is None else None
        # ``bos_in_front``: the class's post-processor puts the named BOS in front of every plain
        # prompt (with its new id where the vocabulary lacks it)
        self.missing_bos_in_front = bos_in_front and self.missing_bos is not None
        # the EOS token's options that make transformers read its text as EOS only in some
        # contexts (e.g. "single_word true": not right after a letter), or None: TRL's plain
        # completions, which end with its text, are then checked (``_check_eos_text``)
        added_tokens = tokenizer.get_added_tokens_decoder()
        self.eos_read_by_context = _read_by_context(tokenizer, added_tokens.get(self.eos_id))
        front = self._post_processor_front_id()
        # bos_id: the id a plain prompt starts with (BOS rule). By default the token the
        # post-processor puts in front of text: transformers gives it to TRL's plain prompts,
        # whether or not it is the named BOS (or a BOS is named at all)
        if add_bos is None:
            add_bos = front is not None
            self.bos_id = front if add_bos else named_bos_id
        else:
            self.bos_id = front if named_bos_id is None else named_bos_id
        self.add_bos = bool(add_bos) and self.bos_id is not None
        self.chat_template = chat_template
        # the template transformers picks for a conversation with tools, when the folder names
        # one "tool_use" (additional_chat_templates/tool_use.jinja, or a named template in
        # tokenizer_config.json)
        self.tool_use_template = tool_use_template
        # the special tokens the chat template sees besides BOS and EOS (``pad_token``,
        # ``unk_token``, ...: template_special_tokens); eos_token/bos_token above win over these
        # (a BOS written without content is no BOS here, and "" there, as in transformers)
        given = ("eos_token",) if bos_token is None else ("bos_token", "eos_token")
        self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if k not in given}
        self._templates: dict[str, Any] = {}  # compiled, by source
        self._vocab_ints: list[int] | None = None  # encode_texts' int object of each id
        self._max_id: int | None = None
        self._blank_ids: dict[int, bool] = {}  # closes_turn: whether an id decodes to whitespace
        # special tokens a chat template closes a turn with (<|eot_id|>, <|im_end|>, </s>, ...):
        # every special token but BOS and the unknown-token marker (the model's, or the named
        # one: LlamaTokenizer's pipeline has none in its model)
        unks = {
            getattr(tokenizer.model, "unk_token", None),
            (special_tokens or {}).get("unk_token"),
        }
        not_closing = {self.bos_id, named_bos_id, *(tokenizer.token_to_id(u) for u in unks if u)}
        self.turn_end_ids = {
            i
            for i, token in added_tokens.items()
            if token.special and i not in not_closing and i not in self._outside_ids
        } | {self.eos_id}
        # those of them transformers reads by their context (as ``eos_read_by_context``):
        # token -> its options; a template's end of turn written with one may stay text
        self.turn_ends_read_by_context = {
            added_tokens[i].content: context
            for i in self.turn_end_ids
            if i in added_tokens
            and (context := _read_by_context(tokenizer, added_tokens[i])) is not None
        }

    def _require_id(self, token: str, key: str) -> int:
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None or token_id in self._outside_ids:
            where = self.outside_vocab.get(token, (f"{key} in tokenizer_config.json",))[0]
            raise ValueError(
                f"{self.name}: {key} {token!r} is not in the tokenizer's vocabulary; fix {where}"
            )
        return token_id

    def outside_vocab_error(self, row: dict, position: int, use: tuple[str, str, str]):
        """The row error for ``use``: (field, how the row uses it, token), a special token
        outside the vocabulary (``outside_vocab``)."""
        field, how, token = use
        return row_error(
            row,
            f"{self._outside_problem(token)}, and {how}: transformers (and so TRL) would give it "
            "a new id, outside the model's embeddings",
            fix=self._outside_fix(token) + ", or remove it from the row",
            field=field,
            position=position,
        )

    def _outside_problem(self, token: str) -> str:
        if token == self.missing_bos:
            return f"the tokenizer's BOS token {token!r} is not in its vocabulary"
        where = self.outside_vocab[token][0]
        added = self.tokenizer.get_added_tokens_decoder().get(self.tokenizer.token_to_id(token))
        kind = "special token" if added is None or added.special else "added token"
        return f"the tokenizer's {kind} {token!r} ({where}) is not in its vocabulary"

    def _outside_fix(self, token: str) -> str:
        config_fix = self.outside_vocab[token][1]
        if token == self.missing_bos:
            return config_fix or "name the vocabulary's BOS token as bos_token"
        return (
            f"add {token!r} to tokenizer.json's added tokens and resize the model's embeddings "
            "to match" + (f", {config_fix}" if config_fix else "")
        )

    def _post_processor_front_id(self) -> int | None:
        """The token ``tokenizer.json``'s post-processor puts in front of a text, if any (probed
        with "a", else with the EOS token, which every pipeline encodes)."""
        for probe in ("a", self.eos_token):
            try:
                if not self.tokenizer.encode(probe, add_special_tokens=False).ids:
                    continue  # "a" outside the vocabulary
                processed = self.tokenizer.encode(probe, add_special_tokens=True)
            except Exception:  # a character the model cannot encode (an unknown token it lacks)
                continue
            return processed.ids[0] if processed.special_tokens_mask[0] else None
        return None

    @classmethod
    def from_dir(cls, model_dir: str | os.PathLike) -> PairTokenizer:
        """Load ``tokenizer.json`` and ``tokenizer_config.json`` (EOS/BOS, other special tokens;
        ``special_tokens_map.json``'s over them where transformers reads it:
        ``_special_token_config``) and the chat template (``chat_template.jinja`` or
        tokenizer_config.json's ``chat_template``, as transformers picks it:
        ``_find_chat_templates``). The pipeline and default special tokens of the tokenizer
        class transformers builds for the folder (``engine/tokenizer_classes.py``) apply; an EOS
        still missing is taken from ``config.json``'s ``eos_token_id``. A ``config.json``
        ``model_type`` that is a list or an object is an error, as in transformers."""
        folder = Path(model_dir)
        path = folder / "tokenizer.json"
        if not path.is_file() and (folder / SENTENCEPIECE_FILE).is_file():
            raise FileNotFoundError(_sentencepiece_only_message(folder))
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: sdpo reads tokenizers in the `tokenizers` JSON format; save "
                f"one into {folder} (e.g. with transformers' fast tokenizer .save_pretrained)"
            )
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:  # the Rust side raises a plain Exception
            raise ValueError(f"{path}: not a valid tokenizer.json ({exc}); re-save it") from exc
        file_added = [t.content for t in tokenizer.get_added_tokens_decoder().values()]
        config_path = folder / "tokenizer_config.json"
        own_config = _read_json(config_path) if config_path.is_file() else {}
        config, sources = _special_token_config(folder, own_config)
        model_config_path = folder / "config.json"
        model_config = _read_json(model_config_path) if model_config_path.is_file() else {}
        model_type = model_config.get("model_type")
        if isinstance(model_type, (list, dict)):
            raise ValueError(
                f"{model_config_path}: model_type is {model_type!r}, not a model type name "
                "(transformers fails to load a tokenizer from this folder too); write the "
                'model\'s type as a string, e.g. "model_type": "llama"'
            )
        cls_name = backend_class(tokenizer, config, model_config)
        reason = refusal(tokenizer, cls_name)
        if reason is not None:
            raise ValueError(
                f"{folder}: {class_source(config, model_config)} makes transformers build "
                f"{reason}. Use a model whose tokenizer.json holds its tokenizer; if this "
                f'tokenizer.json is the one to use, set "tokenizer_class": '
                f'"PreTrainedTokenizerFast" in {config_path} (transformers then reads the file '
                "as it is too)"
            )
        _check_added_token_objects(folder, own_config)
        _check_special_token_values(folder, config, sources, tokenizer)
        if "added_tokens_decoder" in own_config:
            _check_added_tokens_decoder(config_path, own_config["added_tokens_decoder"])
        legacy = (
            []
            if "added_tokens_decoder" in own_config
            else _legacy_added_tokens(folder, config, sources, tokenizer)
        )
        file_lacks = [t for t, _, _ in legacy if tokenizer.token_to_id(t) is None]
        named = _registered_tokens(config, cls_name, sources=sources)
        config = class_defaults(tokenizer, config, cls_name)
        if cls_name is not None:
            tokenizer = _drop_unlisted_added_tokens(tokenizer, config)
        if cls_name is not None and legacy:
            tokenizer = _interleave_legacy_added_tokens(tokenizer, config, legacy)
        outside = _add_registered_tokens(tokenizer, config, cls_name, legacy=legacy)
        try:
            build_as_transformers(tokenizer, config, cls_name)
        except ValueError as exc:
            raise ValueError(f"{config_path}: {exc}") from None
        # the registered tokens the vocabulary lacks get new ids past it, as in transformers
        # (the class's own ones as strings, after those tokenizer_config.json names)
        contents = {t.content for t in outside}
        outside += [
            _added_token(t) for t in named if t not in contents and tokenizer.token_to_id(t) is None
        ]
        if outside:
            tokenizer.add_tokens(outside)
        if cls_name == QWEN2:
            # its __init__ ends by adding every special token (the named ones and those listed)
            # again as a plain special token: their AddedToken options are dropped
            tokenizer.add_tokens([_added_token(t) for t in _special_tokens(config)])
        _check_normalized_added_tokens(
            tokenizer,
            folder=folder,
            where={
                **dict.fromkeys(file_added, "tokenizer.json's added tokens"),
                **{t: where for t, (where, _) in named.items()},
                **dict.fromkeys((t for t, _, _ in legacy), ADDED_TOKENS_FILE),
            },
        )

        eos = _token_content(config.get("eos_token"))
        if eos is None:  # TRL could not end a plain completion: config.json's EOS instead
            eos_id = _first_id(model_config.get("eos_token_id"))
            eos = None if eos_id is None else tokenizer.id_to_token(eos_id)
        if eos is None:
            raise ValueError(_no_eos_message(folder, tokenizer, cls_name))
        templates = _find_chat_templates(folder, config)
        bos = _token_content(config.get("bos_token"))
        return cls(
            tokenizer,
            eos_token=eos,
            # only a named BOS, as transformers reads it (not config.json's bos_token_id): the
            # chat template's bos_token; plain prompts get what the post-processor puts in front
            bos_token=bos,
            add_bos=None,  # the post-processor's (module docstring, BOS rule)
            chat_template=templates.get("default", next(iter(templates.values()), None)),
            tool_use_template=templates.get("tool_use"),
            special_tokens=template_special_tokens(config),
            name=str(folder),
            # CodeLlama's post-processor puts the named BOS in front (its id, new where the
            # vocabulary lacks it)
            bos_in_front=cls_name == CODE_LLAMA,
            outside_vocab={t.content: named.get(t.content, _UNNAMED) for t in outside},
            fill_token=(
                _token_content(
                    config.get("fill_token", CLASS_REGISTERED_TOKENS[CODE_LLAMA]["fill_token"])
                )
                if cls_name == CODE_LLAMA
                else None
            ),
            added_file_tokens=file_lacks,
        )

    @property
    def vocab_size(self) -> int:
        """Tokens of the vocabulary and its added tokens (not the special tokens outside it)."""
        return self.tokenizer.get_vocab_size(with_added_tokens=True) - len(self._outside_ids)

    def ids_below(self, limit: int) -> dict[str, int]:
        """token -> id of every token a text can be given with an id below ``limit`` (a model's
        ``vocab_size``): the vocabulary and its added tokens, those of ``added_tokens.json``
        included, not the special tokens outside the vocabulary (a text holding one is an
        error). Two tokenizers whose maps agree give a model the same ids for the same tokens."""
        vocab = self.tokenizer.get_vocab(with_added_tokens=True)
        return {t: i for t, i in vocab.items() if i < limit and i not in self._outside_ids}

    @property
    def fingerprint(self) -> str:
        """Changes whenever tokenization would: the vocabulary/pipeline, specials, template."""
        h = hashlib.sha256(self.tokenizer.to_str().encode())
        parts: list[Any] = [
            self.eos_token,
            self.bos_token,
            self.add_bos,
            self.chat_template,
            self.tool_use_template,
        ]
        if self.special_tokens:
            parts.append(self.special_tokens)
        h.update(json.dumps(parts).encode())
        return h.hexdigest()[:16]

    @property
    def max_id(self) -> int:
        """The largest id the tokenizer gives (vocabulary and added tokens; ids may have gaps)."""
        if self._max_id is None:
            ids = self.tokenizer.get_vocab(with_added_tokens=True).values()
            self._max_id = max(i for i in ids if i not in self._outside_ids)
        return self._max_id

    def encode_texts(self, texts: Sequence[str]) -> list[list[int]]:
        """Ids of each text, without the post-processor's special tokens. A text that holds a
        special token outside the vocabulary (``outside_vocab``: transformers would give it an
        id outside the model's embeddings) is an error, ``SpecialTokenOutsideVocabError``,
        naming the text's index and the token.

        The lists hold one int object per vocabulary id, shared by every occurrence: a fresh
        int per token would cost 36 bytes a token instead of 8 (the list slot), on every rank
        (``engine/token_cache.py`` loads its lists the same way)."""
        outside, first = self._outside_ids, self._outside_from
        fill = self.fill_token
        ints = self._vocab_ints
        if ints is None:
            self._vocab_ints = ints = list(range(self.vocab_size))
        share = ints.__getitem__
        out: list[list[int]] = []
        for start in range(0, len(texts), _ENCODE_CHUNK):
            chunk = list(texts[start : start + _ENCODE_CHUNK])
            if fill is not None:
                k = next((k for k, text in enumerate(chunk) if fill in text), None)
                if k is not None:
                    raise self._infilling_error(chunk[k], start + k)
            try:
                encodings = self.tokenizer.encode_batch(chunk, add_special_tokens=False)
            except Exception as exc:  # the Rust side raises a plain Exception
                raise self._encode_error(chunk, start, exc) from None
            for k, e in enumerate(encodings):
                ids = e.ids
                if first is not None and ids and max(ids) >= first:
                    token = next((outside[i] for i in ids if i in outside), None)
                    if token is not None:
                        raise SpecialTokenOutsideVocabError(
                            self.name,
                            chunk[k],
                            token=token,
                            problem=self._outside_problem(token),
                            fix=self._outside_fix(token),
                            index=start + k,
                        )
                try:  # ids are never negative: only an id past the table misses it
                    out.append(list(map(share, ids)))
                except IndexError:
                    out.append(ids)
        return out

    def _infilling_error(self, text: str, index: int) -> TextEncodeError:
        fill = self.fill_token
        return TextEncodeError(
            self.name,
            text,
            index=index,
            problem=f"the text {_shown(text)} holds {fill!r}, which transformers' "
            "CodeLlamaTokenizer (and so TRL) reads as an infilling request: the text before and "
            "after it encoded as a prefix and a suffix between its infilling tokens (an error "
            "with two of them), and its pipeline left changed for the texts after, which sdpo "
            "does not reproduce",
            fix=f"remove {fill!r} from the text, or, to read it as any other token, set "
            '"fill_token": null in tokenizer_config.json',
        )

    def _encode_error(self, texts: list[str], start: int, exc: Exception) -> TextEncodeError:
        """The error for the first of ``texts`` the tokenizer fails on (as transformers'
        tokenizer fails on it: e.g. a character outside the vocabulary, with an unknown token
        the vocabulary lacks)."""
        index, cause = 0, exc
        for k, text in enumerate(texts):
            try:
                self.tokenizer.encode(text, add_special_tokens=False)
            except Exception as err:
                index, cause = k, err
                break
        return TextEncodeError(self.name, texts[index], cause, index=start + index)

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def render_chat(
        self,
        messages: list[dict],
        *,
        add_generation_prompt: bool,
        tools: list[dict] | None = None,
        template_kwargs: dict[str, Any] | None = None,
    ) -> str:
        """Apply the chat template as transformers' ``apply_chat_template(messages, tools=tools,
        add_generation_prompt=..., **template_kwargs)`` does (trim_blocks, lstrip_blocks,
        sandbox): ``tools`` (tool JSON schemas; None when there are none) and ``documents``
        (None) are always defined, every special token of the tokenizer is a variable
        (``bos_token`` only when there is one; ``pad_token``, ``unk_token``, ...:
        template_special_tokens), ``template_kwargs`` are extra template variables (Qwen3's
        ``enable_thinking``) that may override them, the messages lose their None values and
        have their reasoning under each of its names (_template_messages), and with tools the
        "tool_use" template is used when the tokenizer has one."""
        source = self.chat_template
        if tools is not None and self.tool_use_template is not None:
            source = self.tool_use_template
        if source is None:
            raise ValueError(
                f"{self.name}: the data is conversational but the tokenizer has no chat "
                "template; add the model's chat template (chat_template.jinja, or chat_template "
                "in tokenizer_config.json), or use string rows"
            )
        template = self._templates.get(source)
        if template is None:
            template = self._templates[source] = _compile_template(source)
        variables = {**self.special_tokens, "eos_token": self.eos_token}
        if self.bos_token is not None:
            variables["bos_token"] = self.bos_token
        variables.update(template_kwargs or {})
        try:
            return template.render(
                messages=_template_messages(messages),
                tools=tools,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **variables,
            )
        except ChatTemplateError:
            raise
        except Exception as exc:  # jinja's undefined attributes, the template's type errors, ...
            raise ChatTemplateRenderError(
                f"{type(exc).__name__}: {exc}{_template_line(exc)}"
            ) from exc

    def prompt_ids(self, ids: list[int]) -> list[int]:
        """Apply the BOS rule (module docstring) to encoded prompt ids."""
        if self.add_bos and ids[:1] != [self.bos_id]:
            return [self.bos_id, *ids]
        return ids

    def completion_ids(self, ids: list[int], text: str | None = None) -> list[int]:
        """Apply the EOS rule of plain rows (module docstring) to encoded completion ids, of
        the completion ``text`` when given: ids that end with EOS's id where the text does not
        end with its text (an unknown token that shares that id) get EOS too, as in TRL."""
        if ids[-1:] == [self.eos_id] and (text is None or text.endswith(self.eos_token)):
            return ids
        return [*ids, self.eos_id]

    def closes_turn(self, ids: list[int]) -> bool:
        """Whether ``ids`` end with a special token, followed by whitespace at most: the end of
        turn a chat template writes (``<|eot_id|>``, ``<|im_end|>\\n``, ``</s>``)."""
        blank = self._blank_ids
        for i in reversed(ids):
            if i in self.turn_end_ids:
                return True
            is_blank = blank.get(i)
            if is_blank is None:  # one decode per id, not per completion (a Rust call each)
                text = self.tokenizer.decode([i], skip_special_tokens=False)
                is_blank = blank[i] = not text.replace("▁", " ").strip()
            if not is_blank:
                return False
        return False


def _read_by_context(tokenizer: Tokenizer, added: Any) -> str | None:
    """The options of the added token ``added`` (or None) that make transformers read its text
    as that token only in some contexts (e.g. "single_word true": not right after a letter),
    as "single_word true and ...", or None."""
    if added is None:
        return None
    context = [
        f"{name} true"
        for name, on in (
            ("single_word", added.single_word),
            ("lstrip", added.lstrip),
            ("normalized", added.normalized and tokenizer.normalizer is not None),
        )
        if on
    ]
    return " and ".join(context) or None


def _no_eos_message(folder: Path, tokenizer: Tokenizer, cls_name: str | None) -> str:
    """Why the folder has no EOS token and what to add where (TRL ends plain completions with
    it; a chat template may need it)."""
    default = CLASS_SPECIAL_TOKENS.get(cls_name or "", {}).get("eos_token")
    if default is not None:
        why = f"transformers' {cls_name} would use {default!r}, which is not in the vocabulary"
    else:
        why = "the tokenizer class transformers builds for it has no default EOS"
    return (
        f"{folder}: no EOS token: tokenizer_config.json names no eos_token (nor "
        f"{SPECIAL_TOKENS_MAP_FILE}, where transformers reads it), config.json has no "
        f'eos_token_id, and {why}; add "eos_token": "<the token that ends a text>"'
        f"{_special_tokens_hint(tokenizer)} to {folder / 'tokenizer_config.json'}"
    )


def _special_tokens_hint(tokenizer: Tokenizer) -> str:
    """' (its special tokens: ...)': the first special added tokens of ``tokenizer``, for a
    refusal that asks for one of them (EOS), or "" where it has none."""
    specials = [t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special]
    return f" (its special tokens: {', '.join(map(repr, specials[:8]))})" if specials else ""


SENTENCEPIECE_FILE = "tokenizer.model"


def _sentencepiece_only_message(folder: Path) -> str:
    """What to do with a folder that has a SentencePiece ``tokenizer.model`` and no
    ``tokenizer.json`` (older Llama 2 style uploads). transformers converts the model on loading;
    saving only the converted pipeline keeps ``tokenizer_config.json`` as it is, so ``legacy``,
    ``add_prefix_space`` and the special tokens still read as transformers reads them on the
    original folder. ``save_pretrained`` would rewrite that file, and transformers 5 leaves
    ``legacy`` out of it: a ``legacy: true`` folder would then read "<s>[INST]" without the "▁"
    transformers puts after "<s>" on the original folder."""
    command = (
        'python -c "import sys; from transformers import AutoTokenizer; d = sys.argv[1]; '
        "AutoTokenizer.from_pretrained(d).backend_tokenizer.save(d + '/tokenizer.json')\" "
        + shlex.quote(str(folder))
    )
    return (
        f"{folder / 'tokenizer.json'} not found: {folder} has only a SentencePiece "
        f"{SENTENCEPIECE_FILE}, and sdpo reads tokenizers in the `tokenizers` JSON format. "
        "Write the tokenizer.json transformers converts it to, once, leaving "
        f"tokenizer_config.json as it is (needs transformers and sentencepiece): {command} "
        "(not save_pretrained, which rewrites tokenizer_config.json and can drop its `legacy`)"
    )


def _named_tokens(config: dict) -> list[Any]:
    """The special tokens ``tokenizer_config.json`` names, as written (strings or AddedToken
    dicts, whose options transformers applies where it adds the token): the named and
    model-specific ones (those of ``template_special_tokens``) and those listed in
    ``extra_special_tokens`` (``_special_token_config``'s list)."""
    named = [
        v
        for k, v in config.items()
        if k.endswith("_token")
        and (_token_content(v) if k in NAMED_SPECIAL_TOKENS else _model_token(v))
    ]
    for key in ("model_specific_special_tokens", "extra_special_tokens"):
        tokens = config.get(key)
        if isinstance(tokens, dict):
            named += [
                v for k, v in tokens.items() if _token_content(v) and k not in NAMED_SPECIAL_TOKENS
            ]
    listed = config.get("extra_special_tokens")
    return [*named, *(listed if isinstance(listed, list) else [])]


def _special_tokens(config: dict) -> list[str]:
    """transformers' ``all_special_tokens`` of a folder of ``config``: the named special tokens
    (``NAMED_SPECIAL_TOKENS``), then those listed in ``extra_special_tokens``
    (``_special_token_config``'s list), each once."""
    listed = config.get("extra_special_tokens")
    values = [config.get(k) for k in NAMED_SPECIAL_TOKENS]
    tokens = [_token_content(v) for v in [*values, *(listed if isinstance(listed, list) else [])]]
    return list(dict.fromkeys(t for t in tokens if t is not None))


def _check_special_token_values(
    folder: Path, config: dict, sources: _TokenSources, tokenizer: Tokenizer
) -> None:
    """Refuse a folder transformers 5 fails to load for a special token's value: a named one
    (``bos_token``, ..., ``mask_token``) or a model-specific one (under
    ``model_specific_special_tokens`` or ``extra_special_tokens``) that is neither a string nor
    an AddedToken, e.g. an object without ``"__type": "AddedToken"``, which only
    ``special_tokens_map.json``'s named tokens may leave out (``_special_token_config`` adds
    it), or such a value in the list of extra special tokens; and an empty EOS (an empty string,
    or an AddedToken without content), which transformers reads as the token "" and TRL so
    appends to plain completions as nothing. ``config`` and ``sources``:
    ``_special_token_config``'s; ``tokenizer``: tokenizer.json's, for the refusal's hint."""

    def place(name: str) -> str:
        file, key = sources.key(name)
        return (
            f"{name} in {folder / file}" if key == name else f"{name} of {key} in {folder / file}"
        )

    found = [(k, config.get(k), place(k)) for k in NAMED_SPECIAL_TOKENS]
    tokens = config.get("model_specific_special_tokens")
    if isinstance(tokens, dict):
        found += [
            (str(k), v, place(str(k)))
            for k, v in tokens.items()
            if str(k) not in NAMED_SPECIAL_TOKENS
        ]
    # the list transformers adds as special tokens, each where it is written
    listed = config.get("extra_special_tokens")
    for value, (file, key, i) in zip(listed if isinstance(listed, list) else [], sources.listed):
        found.append((None, value, f"item {i} of {key} in {folder / file}"))
    for name, value, where in found:
        if (
            name == "eos_token"
            and (value == "" or _is_added_token(value))
            and not _token_content(value)
        ):
            raise ValueError(
                f"{where} is "
                + ("an empty string" if value == "" else 'an AddedToken without "content"')
                + ": transformers reads it as the EOS token '' (not config.json's "
                "eos_token_id), which TRL appends to a plain completion as nothing, so no "
                'completion would end; write the EOS token there, "eos_token": "<the token '
                f'that ends a text>"{_special_tokens_hint(tokenizer)}'
            )
        # null: no such token, for a named key only (transformers fails on one in an object
        # of model-specific tokens or in the list)
        if isinstance(value, str) or _is_added_token(value):
            continue
        if value is None and name in NAMED_SPECIAL_TOKENS:
            continue
        content = _token_content(value) or "<token>"
        shown = json.dumps(value)
        if isinstance(value, dict):
            shown = f"{shown[:120]}{'...' if len(shown) > 120 else ''}, an object without "
            shown += '"__type": "AddedToken",'
        elif value is not None:
            shown = f"{shown[:120]}, of type {type(value).__name__},"
        else:
            shown = "null,"
        string = (
            json.dumps(content) if name is None else f"{json.dumps(name)}: {json.dumps(content)}"
        )
        raise ValueError(
            f"{where} is {shown} not a special token transformers reads (it fails to load a "
            f"tokenizer from this folder too); write the token as a string, {string}"
            + (
                ', or add "__type": "AddedToken" to the object to keep its options'
                if isinstance(value, dict)
                else ", or remove it"
                if value is None
                else ""
            )
        )


# where a registered token is named, and the change that drops it, when nothing says
_UNNAMED = ("a special token transformers registers", None)


def _registered_tokens(
    config: dict, cls: str | None, *, sources: _TokenSources
) -> dict[str, tuple[str, str | None]]:
    """Every special token transformers registers for a folder of ``config``
    (``_special_token_config``'s, before ``class_defaults``; ``sources``: where each is
    written) and
    tokenizer class ``cls``: token -> (where it is named, the change that drops it, if any).
    The named ones and those listed (``_named_tokens``), the entries of
    ``added_tokens_decoder``, then the class's defaults for the keys ``config`` lacks
    (``CLASS_SPECIAL_TOKENS``, ``CLASS_REGISTERED_TOKENS``: CodeLlama's infilling tokens,
    XGLM's "<madeupwordN>"). transformers gives those the vocabulary lacks a new id, past the
    model's embeddings (``PairTokenizer``'s ``outside_vocab``)."""

    out: dict[str, tuple[str, str | None]] = {}
    for name, token in template_special_tokens(config).items():
        if not token:  # written without content: transformers adds no token
            continue
        file, key = sources.key(name)
        shown = name if key == name else f"{name} of {key}"
        if name == "bos_token":
            fix = f"set bos_token in {file} to the vocabulary's BOS token"
        else:
            fix = f"remove {shown} from {file}"
        out.setdefault(token, (f"{shown} in {file}", fix))
    listed = config.get("extra_special_tokens")
    for value, (file, key, _) in zip(listed if isinstance(listed, list) else [], sources.listed):
        token = _token_content(value)
        if token is not None:
            out.setdefault(token, (f"listed in {file}'s {key}", f"remove it from {file}'s {key}"))
    decoder = config.get("added_tokens_decoder")
    for number, value in decoder.items() if isinstance(decoder, dict) else ():
        token = _token_content(value)
        if token is not None:
            out.setdefault(
                token,
                (
                    f"entry {number} of tokenizer_config.json's added_tokens_decoder",
                    "remove that entry from tokenizer_config.json's added_tokens_decoder",
                ),
            )
    defaults = CLASS_SPECIAL_TOKENS.get(cls or "", {})
    own = {k: t for k, t in defaults.items() if k not in config}
    for key, token in {**own, **class_registered_tokens(config, cls)}.items():
        if key.startswith("madeupword"):  # XGLM's, set by no key
            out.setdefault(token, (f"one of transformers' {cls}'s own special tokens", None))
        else:
            out.setdefault(
                token,
                (
                    f"transformers' {cls}'s default {key}",
                    f'set "{key}": null in tokenizer_config.json',
                ),
            )
    return out


# the options of an AddedToken: true or false (tokenizers fails on any other value)
ADDED_TOKEN_OPTIONS = ("single_word", "lstrip", "rstrip", "normalized", "special")


def _check_added_tokens_decoder(path: Path, decoder: Any) -> None:
    """Refuse a ``tokenizer_config.json`` ``added_tokens_decoder`` that transformers fails to
    load, which makes each entry an ``AddedToken`` under ``int(key)``: not an object, a key
    Python's ``int`` does not read ("5.0", "x"), an entry that is not an object, or one whose
    ``content`` is not a string or whose option (``lstrip``, ...) is not true or false."""
    where = f"{path}: added_tokens_decoder"
    example = '{"32000": {"content": "<tool>", "special": true}}'
    if not isinstance(decoder, dict):
        raise ValueError(
            f"{where} is {json.dumps(decoder)[:80]}, not an object of id -> token "
            f"(transformers fails to load a tokenizer from this folder too); write it as "
            f"{example}, as transformers saves it"
        )
    for key, value in decoder.items():
        try:
            int(key)
        except ValueError:
            raise ValueError(
                f"{where}: the key {key!r} is not an integer id (transformers fails to load a "
                f"tokenizer from this folder too); write the token's id, as in {example}"
            ) from None
        problem = _added_token_problem(value) if isinstance(value, dict) else "not an object"
        if problem is not None:
            raise ValueError(
                f"{where}: entry {key} is {json.dumps(value)[:120]}, {problem} (transformers "
                f"fails to load a tokenizer from this folder too); write each entry as in "
                f"{example}"
            )


def _added_token_problem(value: dict, options: Sequence[str] = ADDED_TOKEN_OPTIONS) -> str | None:
    """Why ``tokenizers.AddedToken(**value)`` fails, or None: a ``content`` that is neither a
    string nor null, or one of ``options`` (those it is given) that is neither true nor false.
    Other keys it passes over."""
    if not isinstance(value.get("content"), (str, type(None))):
        return "its content is not a string"
    wrong = [k for k in options if not isinstance(value.get(k, False), bool)]
    return f"its {wrong[0]} is neither true nor false" if wrong else None


def _typed_added_tokens(value: Any, where: str) -> Iterator[tuple[str, dict]]:
    """Every object marked ``"__type": "AddedToken"`` in ``value``, at any depth, with where it
    is (``where``, then ``.key`` and ``[index]``): transformers makes each an AddedToken on
    reading ``tokenizer_config.json`` (``convert_added_tokens``)."""
    if isinstance(value, dict) and value.get("__type") == "AddedToken":
        yield where, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _typed_added_tokens(item, f"{where}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _typed_added_tokens(item, f"{where}[{i}]")


def _check_added_token_objects(folder: Path, config: dict) -> None:
    """Refuse a folder whose special tokens written as objects transformers fails to make
    AddedTokens of (``_added_token_problem``: a content that is not a string, an option
    neither true nor false): in ``tokenizer_config.json`` (``config``) every object marked
    ``"__type": "AddedToken"`` (``added_tokens_decoder`` aside:
    ``_check_added_tokens_decoder``); in ``special_tokens_map.json``, where transformers reads
    it (no ``added_tokens_decoder``), every object it holds by a key (its ``special`` replaced)
    and every object listed under ``extra_special_tokens``, and any marked one within."""
    found = [
        (TOKENIZER_CONFIG_FILE, where, value, ADDED_TOKEN_OPTIONS)
        for key, item in config.items()
        if key != "added_tokens_decoder"
        for where, value in _typed_added_tokens(item, key)
    ]
    path = folder / SPECIAL_TOKENS_MAP_FILE
    token_map = _read_json(path) if path.is_file() and "added_tokens_decoder" not in config else {}
    not_special = tuple(k for k in ADDED_TOKEN_OPTIONS if k != "special")
    for key, item in token_map.items():
        if isinstance(item, dict) and key != "extra_special_tokens":
            found.append((SPECIAL_TOKENS_MAP_FILE, key, item, not_special))
        elif key == "extra_special_tokens" and isinstance(item, list):
            found += [
                (SPECIAL_TOKENS_MAP_FILE, f"{key}[{i}]", value, ADDED_TOKEN_OPTIONS)
                for i, value in enumerate(item)
                if isinstance(value, dict)
            ]
        else:
            found += [
                (SPECIAL_TOKENS_MAP_FILE, where, value, ADDED_TOKEN_OPTIONS)
                for where, value in _typed_added_tokens(item, key)
            ]
    for file, where, value, options in found:
        problem = _added_token_problem(value, options)
        if problem is not None:
            raise ValueError(
                f"{folder / file}: {where} is {json.dumps(value)[:120]}, {problem} "
                "(transformers fails to load a tokenizer from this folder too); write the "
                'token as "content": "<token>" and each option as true or false'
            )


def _decoder_entries(config: dict) -> list[dict]:
    """The entries of ``config``'s ``added_tokens_decoder`` (checked by
    ``_check_added_tokens_decoder``) as transformers reads them: in the order of their ids
    (``int(key)``), one of two keys that are the same id ("7" and "07") replacing the other."""
    decoder = config.get("added_tokens_decoder")
    if not isinstance(decoder, dict):
        return []
    by_id = {int(key): value for key, value in decoder.items()}
    return [by_id[i] for i in sorted(by_id)]


def _drop_unlisted_added_tokens(tokenizer: Tokenizer, config: dict) -> Tokenizer:
    """``tokenizer`` without the added tokens of ``tokenizer.json`` that a
    ``tokenizer_config.json`` with ``added_tokens_decoder`` neither lists there nor names as a
    special token: a class transformers builds itself (engine/tokenizer_classes.py) registers
    only those (it reads ``tokenizer.json``'s own list only where ``added_tokens_decoder`` is
    missing), so their text is split like any other there; a named one that the model's
    vocabulary has is dropped too, to be added again with its named options, as transformers
    adds it. Saved folders list every added token; a hand-edited one may not."""
    if not isinstance(config.get("added_tokens_decoder"), dict):
        return tokenizer
    keep = {v.get("content") for v in _decoder_entries(config)}
    # a named special token the model's vocabulary has is added again with its own options
    # (``_add_registered_tokens``), as transformers adds it, not with the file's
    named = {_token_content(v) for v in _named_tokens(config)}
    keep |= {t for t in named if t is not None and tokenizer.model.token_to_id(t) is None}
    if all(t.content in keep for t in tokenizer.get_added_tokens_decoder().values()):
        return tokenizer  # as saved folders are (no serialisation of a large vocabulary)
    state = json.loads(tokenizer.to_str())
    state["added_tokens"] = [t for t in state["added_tokens"] if t.get("content") in keep]
    return Tokenizer.from_str(json.dumps(state))


def _check_normalized_added_tokens(
    tokenizer: Tokenizer, *, folder: Path, where: dict[str, str]
) -> None:
    """Refuse two normalised added tokens that ``tokenizer``'s normaliser makes the same text
    ("<extra>" and "<EXTRA>" under a lower-casing one, as OpenAI GPT's class has): the
    ``tokenizers`` library then reads that text as one or the other, which one changing from
    one process to the next (transformers' ids for the folder with it), so no ids here could
    be transformers'. ``where``: token -> the file (or setting) that adds it."""
    if tokenizer.normalizer is None:
        return  # two added tokens differ in their text
    first: dict[str, tuple[int, str]] = {}
    for token_id, token in sorted(tokenizer.get_added_tokens_decoder().items()):
        if not token.normalized:
            continue  # matched on the raw text, before normalising
        text = tokenizer.normalizer.normalize_str(token.content)
        if not text:
            continue  # matches nowhere
        other_id, other = first.setdefault(text, (token_id, token.content))
        if other_id == token_id:
            continue
        places = {where.get(t, "tokenizer.json's added tokens") for t in (other, token.content)}
        place = " and ".join(sorted(places))
        raise ValueError(
            f"{folder}: the added tokens {other!r} (id {other_id}) and {token.content!r} (id "
            f"{token_id}), of {place}, are one text, {text!r}, once the tokenizer's normaliser "
            "has read them: transformers reads that text as one or the other, which one "
            "changing from one load of the folder to the next, so their ids cannot be matched. "
            f"Rename one of them in {place}, keeping its id, so that the two differ after "
            "normalising"
        )


def _added_token(value: Any) -> Any:
    """A ``tokenizers.AddedToken`` as transformers makes it of a token in
    ``tokenizer_config.json``: an AddedToken dict's options, the library's defaults for those it
    lacks (``normalized`` true unless ``special``); a string, a special token (not normalized)."""
    from tokenizers import AddedToken

    if isinstance(value, str):
        return AddedToken(value, special=True)
    options = {k: bool(value[k]) for k in ADDED_TOKEN_OPTIONS if k in value}
    return AddedToken(value["content"], **options)


def _legacy_added_tokens(
    folder: Path, config: dict, sources: _TokenSources, tokenizer: Tokenizer
) -> list[tuple[str, bool, float]]:
    """The tokens of ``folder``'s ``added_tokens.json`` as transformers 5 adds them to a folder
    whose ``tokenizer_config.json`` has no ``added_tokens_decoder`` (folders saved by older
    releases; the caller checks that): (token, special, its id there) in the order of those
    ids.
    transformers makes each an ``added_tokens_decoder`` entry under its id, one of
    ``tokenizer.json``'s added tokens replacing it where that has the same id, and adds those
    entries in the order of their ids, but does not keep the ids: a token keeps its vocabulary
    id, and another gets the next free one. A token is special, and not normalized, where it is
    a named special token (``bos_token``, ..., ``mask_token``) or one of the list of extra
    special tokens, each as transformers reads it at that point: as a string in
    ``tokenizer_config.json`` or as a string or an object in ``special_tokens_map.json``
    (``additional_special_tokens`` only from ``tokenizer_config.json``: the map's becomes the
    list later); otherwise normal text, normalized (``_add_registered_tokens`` makes one that
    names a named or model-specific token special all the same, as transformers' ``__init__``
    does). ``config`` and ``sources``: ``_special_token_config``'s. In a folder transformers
    rebuilds with a class of its own, which adds ``tokenizer.json``'s added tokens again in
    the same order of ids, a token here whose id is below that of one of those the vocabulary
    lacks takes that one's new id there, moving it and those after it on
    (``_interleave_legacy_added_tokens``); files are written with the ids after the
    tokenizer's own."""
    path = folder / ADDED_TOKENS_FILE
    if not path.is_file():
        return []
    # transformers reads the ids only to order the tokens (Python's sort): any number does,
    # 5.0 and 5 alike (one key), 5.5 and Infinity in their places among the others
    entries: dict[float, str] = {}
    for token, index in _read_json(path).items():
        if not isinstance(index, (int, float)):
            raise ValueError(
                f"{path}: the id of {token!r} is {json.dumps(index)[:80]}, not a number; "
                "transformers orders this file's tokens by their ids, and fails on one it "
                "cannot compare with the others' (or orders ids that are all text as text). "
                "Write the token's id as an integer (the id the model's embeddings hold it "
                "at), or remove the entry"
            )
        if math.isnan(index):
            raise ValueError(
                f"{path}: the id of {token!r} is NaN, which has no place among the others: "
                "transformers adds this file's tokens in the order of their ids, and with NaN "
                "that order is whatever its sort makes of the file's order. Write the token's "
                "id as an integer (the id the model's embeddings hold it at), or remove the "
                "entry"
            )
        entries[index] = token  # a later token with the same id replaces an earlier one
    for index in tokenizer.get_added_tokens_decoder():
        entries.pop(index, None)

    def content(file: str, value: Any) -> str | None:
        """``value``'s token (written in ``file``) where transformers counts it special at this
        point."""
        if isinstance(value, str):
            return value or None
        if isinstance(value, dict) and file == SPECIAL_TOKENS_MAP_FILE:
            return _token_content(value)  # an AddedToken there; a dict of the config's is not
        return None

    special = {content(sources.key(k)[0], config.get(k)) for k in NAMED_SPECIAL_TOKENS}
    listed = config.get("extra_special_tokens")
    for value, (file, key, _) in zip(listed if isinstance(listed, list) else [], sources.listed):
        if not (file == SPECIAL_TOKENS_MAP_FILE and key == "additional_special_tokens"):
            special.add(content(file, value))
    return [(entries[i], entries[i] in special, i) for i in sorted(entries)]


def _registered_added_tokens(tokenizer: Tokenizer, config: dict, cls: str | None) -> list[Any]:
    """The added tokens transformers adds to ``tokenizer`` (``tokenizer.json``'s pipeline) on
    loading a folder of ``config``, in its order (``TokenizersBackend.__init__``): each entry of
    ``added_tokens_decoder`` (by key) unless ``tokenizer.json`` has that very token, options and
    all (an entry with other ``lstrip``, ``rstrip``, ``single_word``, ``normalized`` or
    ``special`` replaces the file's token: its options apply), then every named or listed
    special token (``_named_tokens``) not added yet, then those class ``cls`` registers itself
    for the keys ``config`` lacks (``CLASS_REGISTERED_TOKENS``). The key of an
    ``added_tokens_decoder`` entry is not read: the token keeps its vocabulary id, and one the
    vocabulary lacks gets the next free id, past the model's embeddings."""
    have = {repr(t) for t in tokenizer.get_added_tokens_decoder().values()}
    entries = [v for v in _decoder_entries(config) if isinstance(v.get("content"), str)]
    tokens = [t for t in map(_added_token, entries) if repr(t) not in have]
    contents = {t.content for t in tokenizer.get_added_tokens_decoder().values()}
    contents |= {t.content for t in tokens}
    own = list(class_registered_tokens(config, cls).values())
    for value in [*_named_tokens(config), *own]:
        token = _token_content(value)
        if token is not None and token not in contents:
            tokens.append(_added_token(value if isinstance(value, dict) else token))
            contents.add(token)
    return tokens


def _legacy_tokens(config: dict, legacy: Sequence[tuple[str, bool, float]]) -> list[Any]:
    """The AddedTokens transformers makes of ``legacy``'s tokens (``_legacy_added_tokens``):
    special and not normalized, or normalized text; one that the special-token attributes hold
    once built (a named or model-specific token) is made special, its other options kept."""
    from tokenizers import AddedToken

    named = {t for t in template_special_tokens(config).values() if t}
    return [
        AddedToken(token, normalized=not special, special=special or token in named)
        for token, special, _ in legacy
    ]


def _interleave_legacy_added_tokens(
    tokenizer: Tokenizer, config: dict, legacy: Sequence[tuple[str, bool, float]]
) -> Tokenizer:
    """``tokenizer`` with ``legacy``'s tokens added among ``tokenizer.json``'s own the way a
    class transformers builds itself adds them: it starts from the model's vocabulary and adds
    both files' tokens together in the order of their ids (``tokenizer.json``'s and those of
    ``added_tokens.json``), each the vocabulary lacks taking the next free id. So a token of
    ``added_tokens.json`` whose id there is below one of ``tokenizer.json``'s the vocabulary
    lacks takes that one's id, and moves it and those after it on; where none is below, the
    file's ids stand and ``tokenizer`` is returned as it is."""
    state = json.loads(tokenizer.to_str())
    lacking = [
        t for t in state["added_tokens"] if tokenizer.model.token_to_id(t["content"]) is None
    ]
    last = max((t["id"] for t in lacking), default=None)
    if last is None or all(index > last for _, _, index in legacy):
        return tokenizer
    from tokenizers import AddedToken

    state["added_tokens"] = [t for t in state["added_tokens"] if t not in lacking]
    rebuilt = Tokenizer.from_str(json.dumps(state))
    merged = [
        (t["id"], AddedToken(t["content"], **{k: t[k] for k in ADDED_TOKEN_OPTIONS if k in t}))
        for t in lacking
    ]
    merged += [(index, t) for (_, _, index), t in zip(legacy, _legacy_tokens(config, legacy))]
    rebuilt.add_tokens([t for _, t in sorted(merged, key=lambda entry: entry[0])])
    return rebuilt


def _add_registered_tokens(
    tokenizer: Tokenizer,
    config: dict,
    cls: str | None,
    *,
    legacy: Sequence[tuple[str, bool, float]] = (),
) -> list[Any]:
    """Add to ``tokenizer`` the tokens transformers adds on loading (``_registered_added_tokens``)
    that its vocabulary has; return the others (transformers gives each a new id, past the
    model's embeddings: ``PairTokenizer``'s ``outside_vocab``). A named special token that
    ``tokenizer.json`` has only as a vocabulary entry so becomes one token, as in transformers:
    ``<|im_end|>`` written by a chat template is one id, not "<", "|", "im", ...; and an
    ``added_tokens_decoder`` entry's options (``lstrip``, ...) replace the file's.

    ``legacy``: the tokens of ``added_tokens.json`` (``_legacy_added_tokens``), which
    transformers takes as entries of ``added_tokens_decoder`` ahead of all others: each is added
    first, in their order, a token the vocabulary lacks with the next free id, as there. They
    are the tokenizer's own (counted in its vocabulary size): the folder's model was resized to
    hold them when they were added."""
    have = {repr(t) for t in tokenizer.get_added_tokens_decoder().values()}
    own = [t for t in _legacy_tokens(config, legacy) if repr(t) not in have]
    if own:
        tokenizer.add_tokens(own)
    tokens = _registered_added_tokens(tokenizer, config, cls)
    inside = [t for t in tokens if tokenizer.token_to_id(t.content) is not None]
    if inside:
        tokenizer.add_tokens(inside)
    return [t for t in tokens if tokenizer.token_to_id(t.content) is None]


CHAT_TEMPLATE_FILE = "chat_template.jinja"
CHAT_TEMPLATE_DIR = "additional_chat_templates"  # named templates, <name>.jinja (transformers 5)
PROCESSOR_CHAT_TEMPLATE_FILE = "chat_template.json"  # a processor's {"chat_template": ...}


def _find_chat_templates(folder: Path, config: dict) -> dict[str, str]:
    """The folder's chat templates by name, as transformers' ``from_pretrained`` reads them:
    template files (``chat_template.jinja``, the "default"; ``additional_chat_templates/
    <name>.jinja``) take priority over ``tokenizer_config.json``'s ``chat_template`` (one
    string, the "default", or a list of ``{"name", "template"}``); with neither, a processor's
    ``chat_template.json``."""
    templates = {}
    if (folder / CHAT_TEMPLATE_FILE).is_file():
        templates["default"] = (folder / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
    if (folder / CHAT_TEMPLATE_DIR).is_dir():
        for path in sorted((folder / CHAT_TEMPLATE_DIR).glob("*.jinja")):
            templates[path.name.removesuffix(".jinja")] = path.read_text(encoding="utf-8")
    if templates:
        return templates
    template = config.get("chat_template")
    if isinstance(template, list):
        return {
            str(t.get("name")): t["template"]
            for t in template
            if isinstance(t, dict) and isinstance(t.get("template"), str)
        }
    if isinstance(template, str):
        return {"default": template}
    if (folder / PROCESSOR_CHAT_TEMPLATE_FILE).is_file():
        template = _read_json(folder / PROCESSOR_CHAT_TEMPLATE_FILE).get("chat_template")
        return {"default": template} if isinstance(template, str) else {}
    return {}


class ChatTemplateError(ValueError):
    """Raised by a chat template's ``raise_exception`` (e.g. roles that do not alternate)."""


class ChatTemplateRenderError(ValueError):
    """A chat template that failed while rendering for another reason (an undefined attribute,
    a type error in the template); the message names the exception and the template's line."""


def _template_line(exc: BaseException) -> str:
    """ " at line N of the chat template", from the traceback jinja gives template code."""
    line = None
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<template>":
            line = tb.tb_lineno
        tb = tb.tb_next
    return "" if line is None else f" at line {line} of the chat template"


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(message)


def _compile_template(source: str):
    """The template in the environment transformers' ``apply_chat_template`` renders it in."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(jinja2.ext.Extension):
        """``{% generation %}...{% endgeneration %}`` marks the assistant's text for
        transformers' assistant-token mask (TRL's training templates, which its SFT trainer
        saves with the model); it renders as its body."""

        tags = {"generation"}

        def parse(self, parser: jinja2.parser.Parser) -> list[jinja2.nodes.Node]:
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=["jinja2.ext.loopcontrols", GenerationBlock],
    )

    def tojson(
        value: Any,
        ensure_ascii: bool = False,
        indent: int | None = None,
        separators: tuple[str, str] | None = None,
        sort_keys: bool = False,
    ) -> str:
        return json.dumps(
            value,
            ensure_ascii=ensure_ascii,
            indent=indent,
            separators=separators,
            sort_keys=sort_keys,
        )

    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateError as exc:
        raise ValueError(f"the chat template does not compile ({exc}); fix chat_template") from exc


def _render_row(row: dict, tokenizer: PairTokenizer, position: int) -> tuple[str, str, str, bool]:
    """(prompt text, prompt + chosen text, prompt + rejected text, conversational)."""
    prompt, chosen, rejected = row["prompt"], row["chosen"], row["rejected"]
    if isinstance(prompt, str) and isinstance(chosen, str) and isinstance(rejected, str):
        return prompt, prompt + chosen, prompt + rejected, False
    if not (isinstance(prompt, list) and isinstance(chosen, list) and isinstance(rejected, list)):
        raise row_error(
            row,
            "prompt, chosen and rejected mix strings and message lists",
            fix="read the data with read_preference_file, which normalises mixed rows",
            position=position,
        )
    # the row's template inputs, as TRL passes them (engine/data.py)
    inputs = {"tools": row.get("tools"), "template_kwargs": row.get("chat_template_kwargs")}
    tool_use = inputs["tools"] is not None and tokenizer.tool_use_template is not None
    if tokenizer.chat_template is None and not tool_use:
        # a system prompt column (columns.system, score --columns system=...) makes string
        # rows messages too
        system = bool(prompt) and isinstance(prompt[0], dict) and prompt[0].get("role") == "system"
        raise row_error(
            row,
            "the row is conversational (message lists"
            + (", or strings a system prompt column turns into messages" if system else "")
            + f"), and the tokenizer of {tokenizer.name} has no chat template to render it",
            fix="add the model's chat template to that folder (chat_template.jinja, or "
            "chat_template in tokenizer_config.json), or give prompt, chosen and rejected as "
            "strings" + (" without a system prompt column (columns.system)" if system else ""),
            field="prompt",
            position=position,
        )
    texts = []
    for field, messages, generation in (
        ("prompt", prompt, True),
        ("chosen", prompt + chosen, False),
        ("rejected", prompt + rejected, False),
    ):
        try:
            texts.append(
                tokenizer.render_chat(messages, add_generation_prompt=generation, **inputs)
            )
        except ChatTemplateError as exc:
            raise row_error(
                row,
                f"the chat template rejected the messages: {exc}",
                fix="fix the roles/order of the row's messages to what the template accepts",
                field=field,
                position=position,
            ) from None
        except ChatTemplateRenderError as exc:
            raise row_error(
                row,
                f"the chat template failed to render the {field} messages ({exc})",
                fix="give the row's messages (and its tools, chat_template_kwargs) the keys and "
                "types the template reads; if every row fails, fix the chat template",
                field=field,
                position=position,
            ) from None
    return texts[0], texts[1], texts[2], True


def _is_prefix(a: list[int], b: list[int]) -> bool:
    return len(a) <= len(b) and b[: len(a)] == a


def _common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix (list comparisons in C: a whole prefix at once)."""
    if _is_prefix(a, b):
        return len(a)
    lo, hi = 0, min(len(a), len(b))  # a[:lo] == b[:lo]; the prefixes part at or before hi
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


@cyclic_gc_paused()
def tokenize_pairs(
    rows: Sequence[dict],
    tokenizer: PairTokenizer,
    *,
    max_length: int,
    max_prompt_length: int | None = None,
    truncation: str = "keep_end",
    vocab_size: int | None = None,
) -> tuple[list[TokenizedPair], TokenizeStats]:
    """Tokenize validated rows (from ``read_preference_file``) into ``TokenizedPair``s.

    ``max_length`` bounds each sequence (prompt + completion, EOS included); truncation policy as
    in the module docstring. ``vocab_size``: the model's; every id must be below it (a larger id
    means the tokenizer does not belong to the model). ``TokenizedPair.index`` is the row's
    position in ``rows``."""
    if truncation not in TRUNCATION_POLICIES:
        raise ValueError(f"truncation must be one of {TRUNCATION_POLICIES}, got {truncation!r}")
    if max_length < 2:
        raise ValueError(
            f"max_length must be >= 2 (a prompt and a completion token), got {max_length}"
        )
    if max_prompt_length is not None and not 1 <= max_prompt_length < max_length:
        raise ValueError(
            f"max_prompt_length must be in [1, max_length) = [1, {max_length}), got "
            f"{max_prompt_length}"
        )
    check_vocab = vocab_size is not None and tokenizer.max_id >= vocab_size
    stats = TokenizeStats(num_pairs=len(rows))
    pairs: list[TokenizedPair] = []
    # Rows go through the stages a block at a time, so only one block's texts and
    # whole-sequence ids are held beside the pairs. Errors still come out as when every row went
    # through each stage before the next stage began: the first error of the earliest stage
    # that has one. An error is kept until no earlier stage can fail any more, which the later
    # blocks check (only the stages before the kept error's).
    kept: tuple[int, Exception] | None = None  # (stage, its first error)
    for start in range(0, len(rows), _TOKENIZE_BLOCK):
        stages = _tokenize_block(
            rows,
            range(start, min(start + _TOKENIZE_BLOCK, len(rows))),
            tokenizer,
            pairs=pairs,
            stats=stats,
            max_length=max_length,
            max_prompt_length=max_prompt_length,
            truncation=truncation,
            vocab_size=vocab_size if check_vocab else None,
        )
        for stage in itertools.count():
            if kept is not None and stage >= kept[0]:
                break
            try:
                next(stages)
            except StopIteration:
                break
            except Exception as exc:  # any error: which one comes out is the contract
                kept = (stage, exc)
                break
        stages.close()
    if kept is not None:
        raise kept[1]
    return pairs, stats


def _tokenize_block(
    rows: Sequence[dict],
    block: range,
    tokenizer: PairTokenizer,
    *,
    pairs: list[TokenizedPair],
    stats: TokenizeStats,
    max_length: int,
    max_prompt_length: int | None,
    truncation: str,
    vocab_size: int | None,
) -> Iterator[None]:
    """``tokenize_pairs``'s work on the rows at positions ``block``, one stage per step of the
    iterator (each stage's errors in row order): render, a BOS outside the vocabulary in front
    of plain prompts, where the EOS token is read by its context the EOS text after chosen and
    after rejected, encode the prompts, prompts + chosen, prompts + rejected (each encode also
    finds special tokens outside the vocabulary), encode alone the completions of plain rows
    whose tokens merge across the boundary; the last step makes the pairs, appended to
    ``pairs`` and counted in ``stats``. The number of stages depends only on the tokenizer.
    ``vocab_size``: check every id against it (None: no check needed)."""
    rendered = [_render_row(rows[i], tokenizer, i) for i in block]
    yield
    if tokenizer.missing_bos_in_front:  # BOS outside the vocabulary in front of plain prompts
        k = next((k for k, r in enumerate(rendered) if not r[3]), None)
        if k is not None:
            i = block[k]
            how = "transformers' tokenizer class puts it in front of every plain prompt"
            raise tokenizer.outside_vocab_error(rows[i], i, ("prompt", how, tokenizer.missing_bos))
    yield
    # one list per text, each dropped once encoded, and each row's ids once its pair is made:
    # the texts (rendered conversations, prompt + completion) and the ids of whole sequences
    # are copies of the data set several times its size, not needed all at once
    prompt_texts = [t[0] for t in rendered]
    chosen_texts = [t[1] for t in rendered]
    rejected_texts = [t[2] for t in rendered]
    conversational = [t[3] for t in rendered]
    del rendered

    def encode(batch: list[str], fields: Sequence[str], positions: Sequence[int]) -> list:
        """``batch`` encoded; a text the tokenizer fails on is an error naming its row and
        field (``batch[k]`` is of row ``positions[k]``'s field ``fields[k]``)."""
        try:
            return tokenizer.encode_texts(batch)
        except SpecialTokenOutsideVocabError as exc:
            i = positions[exc.index]
            conv = conversational[i - block.start]
            how = "the chat template writes it" if conv else "the text contains it"
            use = (fields[exc.index], how, exc.token)
            raise tokenizer.outside_vocab_error(rows[i], i, use) from None
        except TextEncodeError as exc:
            i = positions[exc.index]
            raise row_error(
                rows[i], exc.problem, fix=exc.fix, field=fields[exc.index], position=i
            ) from None

    if tokenizer.eos_read_by_context is not None:
        _check_eos_text(rows, block, tokenizer, "chosen", chosen_texts, conversational)
        yield
        _check_eos_text(rows, block, tokenizer, "rejected", rejected_texts, conversational)
        yield
    prompt_ids = encode(prompt_texts, ["prompt"] * len(block), block)
    del prompt_texts
    yield
    # a conversational completion's text that ends with an end of turn transformers reads by
    # its context: that token (checked against the ids below)
    context_ends = tuple(tokenizer.turn_ends_read_by_context)

    def turn_end_written(texts: list[str]) -> list[str | None]:
        if not context_ends:
            return []
        return [
            next((t for t in context_ends if text.rstrip().endswith(t)), None) if conv else None
            for text, conv in zip(texts, conversational)
        ]

    turn_ends = [turn_end_written(chosen_texts)]
    chosen_full = encode(chosen_texts, ["chosen"] * len(block), block)
    del chosen_texts
    yield
    turn_ends.append(turn_end_written(rejected_texts))
    rejected_full = encode(rejected_texts, ["rejected"] * len(block), block)
    del rejected_texts
    yield
    # plain rows whose prompt ids are not a prefix of prompt + completion's: each completion
    # encoded on its own (module docstring)
    merged = [
        k
        for k, conv in enumerate(conversational)
        if not conv
        and not (
            _is_prefix(prompt_ids[k], chosen_full[k])
            and _is_prefix(prompt_ids[k], rejected_full[k])
        )
    ]
    alone = encode(
        [rows[block[k]][field] for k in merged for field in ("chosen", "rejected")],
        ["chosen", "rejected"] * len(merged),
        [block[k] for k in merged for _ in range(2)],
    )
    alone_of = {k: (alone[2 * j], alone[2 * j + 1]) for j, k in enumerate(merged)}
    del alone
    yield

    for k, i in enumerate(block):
        row = rows[i]
        encoded_alone = k in alone_of
        if encoded_alone:
            cut = len(prompt_ids[k])
            completions = list(alone_of.pop(k))
        else:
            # the completion starts where the prompt's ids and the prompt + completion's ids
            # part: the prompt's end, unless a template renders the prompt alone differently
            cut = min(
                _common_prefix(prompt_ids[k], chosen_full[k]),
                _common_prefix(prompt_ids[k], rejected_full[k]),
            )
            completions = [chosen_full[k][cut:], rejected_full[k][cut:]]
            if cut == 0 and prompt_ids[k]:
                raise row_error(
                    row,
                    "the chat template renders prompt + completion without the rendered prompt "
                    "at its start (not one leading token in common), so the completion cannot "
                    "be separated",
                    fix="use a chat template whose output for a conversation starts with its "
                    "output for the conversation's first turns (add_generation_prompt=True)",
                    field="prompt",
                    position=i,
                )
        stats.num_prompt_boundary += encoded_alone or cut < len(prompt_ids[k])
        # BOS: plain rows by the BOS rule; conversational rows as the template writes them
        prompt = prompt_ids[k][:cut]
        prompt = prompt if conversational[k] else tokenizer.prompt_ids(prompt)
        prompt_ids[k] = chosen_full[k] = rejected_full[k] = _FREED  # sliced from: not needed
        for name, ids in zip(("chosen", "rejected"), completions):
            if not ids:
                raise row_error(
                    row,
                    "the completion encodes to no tokens",
                    fix="give the completion text the tokenizer can encode, or remove the row",
                    field=name,
                    position=i,
                )
        if not conversational[k]:  # plain text: EOS closes each completion
            completions = [
                tokenizer.completion_ids(ids, text if isinstance(text, str) else None)
                for ids, text in zip(completions, (row.get("chosen"), row.get("rejected")))
            ]
        else:  # conversational: the template's end of turn, else EOS
            for name, ids, ends in zip(("chosen", "rejected"), completions, turn_ends):
                token = ends[k] if ends else None
                if token is not None and not tokenizer.closes_turn(ids):
                    context = tokenizer.turn_ends_read_by_context[token]
                    raise row_error(
                        row,
                        f"the chat template ends this completion's turn with {token!r}, an "
                        f"added token with {context}: after this completion transformers does "
                        "not read that text as the token, so TRL's completion would end with "
                        "its pieces (an open turn), where sdpo would append EOS",
                        fix=f"set {context.split(' ')[0]} to false for {token!r} in "
                        "tokenizer.json's added_tokens and tokenizer_config.json's "
                        "added_tokens_decoder"
                        + (
                            ", or end the message with a full stop or a space"
                            if context.startswith("single_word")
                            else ""
                        ),
                        field=name,
                        position=i,
                    )
            completions = [
                ids if tokenizer.closes_turn(ids) else [*ids, tokenizer.eos_id]
                for ids in completions
            ]
        if not prompt:
            raise row_error(
                row,
                "the prompt encodes to no tokens and the tokenizer adds no BOS",
                fix="give the row a prompt the tokenizer can encode",
                field="prompt",
                position=i,
            )
        prompt, completions, prompt_cut, completion_cut = _truncate(
            row,
            i,
            prompt,
            completions,
            max_length=max_length,
            max_prompt_length=max_prompt_length,
            truncation=truncation,
            bos_id=tokenizer.bos_id if tokenizer.add_bos else None,
        )
        pair = TokenizedPair(
            index=i,
            prompt_ids=prompt,
            chosen_ids=completions[0],
            rejected_ids=completions[1],
            source=str(row.get("source", "")),
            truncated=prompt_cut or completion_cut,
        )
        if vocab_size is not None:
            _check_vocab(row, i, pair, vocab_size=vocab_size, tokenizer=tokenizer)
        stats.num_prompt_truncated += prompt_cut
        stats.num_completion_truncated += completion_cut
        stats.num_truncated += pair.truncated
        stats.num_identical += pair.chosen_ids == pair.rejected_ids
        stats.num_tokens += pair.num_tokens
        stats.max_sequence_length = max(
            stats.max_sequence_length, len(prompt) + max(len(c) for c in completions)
        )
        pairs.append(pair)


def _check_eos_text(
    rows: Sequence[dict],
    block: range,
    tokenizer: PairTokenizer,
    field: str,
    texts: list[str],
    conversational: list[bool],
) -> None:
    """Refuse a plain row whose completion TRL would not end with EOS: TRL appends the EOS
    token's text to a plain completion (unless it ends with it), and where that token is read by
    its context (``PairTokenizer.eos_read_by_context``: single_word, lstrip, normalized) the
    text may not encode to EOS there, leaving TRL's completion ending in its pieces where sdpo's
    ends with EOS. ``texts[k]``: prompt + ``field`` of the row at ``block[k]``. Encodes the plain
    rows' texts once more, in such folders only."""
    eos = tokenizer.eos_token
    plain = [k for k, conv in enumerate(conversational) if not conv]
    ended = [texts[k] if texts[k].endswith(eos) else texts[k] + eos for k in plain]
    try:
        encodings = tokenizer.tokenizer.encode_batch(ended, add_special_tokens=False)
    except Exception as exc:  # as TRL's tokenizer fails on it (e.g. an unknown token it lacks)
        error = tokenizer._encode_error(ended, 0, exc)
        i = block[plain[error.index]]
        raise row_error(rows[i], error.problem, fix=error.fix, field=field, position=i) from None
    for k, e in zip(plain, encodings):
        if e.ids[-1:] != [tokenizer.eos_id]:
            i = block[k]
            raise row_error(
                rows[i],
                f"TRL ends a plain completion with the text of the EOS token {eos!r}, which "
                f"is an added token with {tokenizer.eos_read_by_context}: after this "
                "completion transformers does not read that text as EOS, so TRL's completion "
                "would end with its pieces where sdpo's would end with EOS",
                fix=f"set {tokenizer.eos_read_by_context.split(' ')[0]} to false for "
                f"{eos!r} in tokenizer.json's added_tokens and tokenizer_config.json's "
                "added_tokens_decoder, or give the row as messages",
                field=field,
                position=i,
            )


def _truncate(
    row: dict,
    position: int,
    prompt: list[int],
    completions: list[list[int]],
    *,
    max_length: int,
    max_prompt_length: int | None,
    truncation: str,
    bos_id: int | None,
) -> tuple[list[int], list[list[int]], bool, bool]:
    longest = max(len(c) for c in completions)
    if len(prompt) + longest <= max_length:
        return prompt, completions, False, False
    if truncation == "error":
        raise row_error(
            row,
            f"the pair is {len(prompt) + longest} tokens (prompt {len(prompt)} + longest "
            f"completion {longest}), over max_length {max_length}",
            fix="raise max_length, shorten or remove the row, or choose truncation 'keep_end' "
            "or 'keep_start'",
            position=position,
        )
    prompt_cut = False
    if max_prompt_length is not None and len(prompt) > max_prompt_length:
        prompt_cut = True
        if truncation == "keep_start":
            prompt = prompt[:max_prompt_length]
        elif bos_id is not None and prompt[0] == bos_id:
            # keep the end, but keep BOS in front: models are trained to see it at position 0
            prompt = [bos_id, *prompt[len(prompt) - (max_prompt_length - 1) :]]
        else:
            prompt = prompt[len(prompt) - max_prompt_length :]
    room = max_length - len(prompt)
    if room < 1:
        raise row_error(
            row,
            f"the prompt alone is {len(prompt)} tokens"
            + (" after cutting to max_prompt_length" if prompt_cut else "")
            + f", leaving no room for the completion within max_length {max_length}",
            fix="raise max_length, or set max_prompt_length below max_length so long prompts "
            "are cut",
            field="prompt",
            position=position,
        )
    completion_cut = any(len(c) > room for c in completions)
    return prompt, [c[:room] for c in completions], prompt_cut, completion_cut


def _check_vocab(
    row: dict, position: int, pair: TokenizedPair, *, vocab_size: int, tokenizer: PairTokenizer
) -> None:
    top = max(max(pair.prompt_ids), max(pair.chosen_ids), max(pair.rejected_ids))
    if top >= vocab_size and top in tokenizer.added_file_tokens:
        token = tokenizer.added_file_tokens[top]
        raise row_error(
            row,
            f"the row holds {token!r}, a token of {ADDED_TOKENS_FILE} in {tokenizer.name}, "
            f"which transformers (and so TRL) gives id {top}, outside the model's vocabulary "
            f"(vocab_size {vocab_size}): the model was not resized for it",
            fix=f"resize the model's embeddings to hold it, remove it from {ADDED_TOKENS_FILE}, "
            "or remove it from the row",
            position=position,
        )
    if top >= vocab_size:
        raise row_error(
            row,
            f"token id {top} is outside the model's vocabulary (vocab_size {vocab_size}); the "
            f"tokenizer {tokenizer.name} has {tokenizer.vocab_size} tokens",
            fix="the tokenizer does not match the model: use the tokenizer saved with the model "
            "checkpoint",
            position=position,
        )


__all__ = [
    "ChatTemplateError",
    "ChatTemplateRenderError",
    "DataError",
    "NAMED_SPECIAL_TOKENS",
    "PairTokenizer",
    "REASONING_FIELDS",
    "SpecialTokenOutsideVocabError",
    "TextEncodeError",
    "TokenizeStats",
    "TRUNCATION_POLICIES",
    "template_special_tokens",
    "tokenize_pairs",
]
