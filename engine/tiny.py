"""Tiny, fully offline stand-ins for real model folders, used by the tests and ``sdpo demo``.

A real Hugging Face model folder holds ``tokenizer.json`` (the ``tokenizers`` library's format),
``tokenizer_config.json`` (special tokens and the chat template) and the model itself. The
builders here write the same files, small enough to make in milliseconds, so every test runs the
real loading code paths with no download.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

from .files import atomic_write_json, atomic_write_text

# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------

PAD_TOKEN = "<pad>"
BOS_TOKEN = "<bos>"
EOS_TOKEN = "<eos>"
UNK_TOKEN = "<unk>"
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN)  # ids 0, 1, 2, 3

# One turn per message as "role : content", then "assistant :" to ask for a reply. Every piece is
# a whitespace-separated word, so rendering a prompt and then prompt + reply gives texts whose
# tokens line up exactly at the boundary.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] }} : {{ message['content'] }} "
    "{% endfor %}"
    "{% if add_generation_prompt %}assistant : {% endif %}"
)
TEMPLATE_WORDS = ("system", "user", "assistant", ":")

# The Whitespace pre-tokenizer splits text into runs of word characters and runs of other
# non-space characters; a vocabulary word must be exactly one such run to ever be matched.
_PRE_TOKEN = re.compile(r"\w+|[^\w\s]+")


def build_tokenizer(
    out_dir: str | os.PathLike,
    *,
    words: list[str],
    chat_template: str | None = DEFAULT_CHAT_TEMPLATE,
) -> Path:
    """Write a word-level ``tokenizer.json`` and ``tokenizer_config.json`` into ``out_dir``.

    The vocabulary is the special tokens (<pad>=0, <bos>=1, <eos>=2, <unk>=3), then the words of
    the default chat template, then ``words`` in order (duplicates skipped). Unknown words map to
    <unk>. The post-processor adds <bos> in front of text (``add_bos_token`` is true too), so
    prompts start with <bos>. Returns ``out_dir``."""
    vocab: dict[str, int] = {}
    for word in (*SPECIAL_TOKENS, *TEMPLATE_WORDS, *words):
        if word in vocab:
            continue
        if word not in SPECIAL_TOKENS and _PRE_TOKEN.fullmatch(word) is None:
            raise ValueError(
                f"tokenizer word {word!r} would be split by the whitespace pre-tokenizer; use "
                "words that are one run of letters/digits/underscores or one run of punctuation"
            )
        vocab[word] = len(vocab)

    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    tokenizer.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in vocab if t in SPECIAL_TOKENS]
    )
    # BOS in front of plain text, as Llama's post-processor adds it (what transformers reads)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A $B:1",
        special_tokens=[(BOS_TOKEN, vocab[BOS_TOKEN])],
    )

    config: dict[str, object] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "unk_token": UNK_TOKEN,
        "add_bos_token": True,
        "add_eos_token": False,
        "model_max_length": 1_000_000,
    }
    if chat_template is not None:
        config["chat_template"] = chat_template

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "tokenizer.json", tokenizer.to_str(pretty=True))
    atomic_write_json(out / "tokenizer_config.json", config)
    return out


# ---------------------------------------------------------------------------------------------
# Model folder
# ---------------------------------------------------------------------------------------------


def write_tiny_model(
    out_dir: str | os.PathLike,
    *,
    words: list[str],
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    tie_word_embeddings: bool = False,
    seed: int = 0,
) -> Path:
    """A complete random-init Llama-style model folder (config.json, model.safetensors and the
    tokenizer files of ``build_tokenizer``), loadable by ``load_pretrained`` and transformers."""
    import tempfile

    from .checkpoint import save_pretrained
    from .model import ModelConfig, init_model
    from .tokenize import PairTokenizer

    out = Path(out_dir)
    with tempfile.TemporaryDirectory() as tmp:
        build_tokenizer(tmp, words=words)
        vocab = PairTokenizer.from_dir(tmp).vocab_size
        config = ModelConfig(
            vocab_size=vocab,
            hidden_size=hidden_size,
            intermediate_size=hidden_size * 3,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=num_kv_heads,
            head_dim=hidden_size // num_heads,
            max_position_embeddings=1024,
            tie_word_embeddings=tie_word_embeddings,
        )
        model = init_model(config, seed=seed)
        files = [Path(tmp) / "tokenizer.json", Path(tmp) / "tokenizer_config.json"]
        save_pretrained(model, out, extra_files=files)
    return out
