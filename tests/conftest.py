"""Shared builders for end-to-end tests: a tiny real model folder and preference files."""

from __future__ import annotations

import atexit
import contextlib
import gc
import json
import os
import random
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from sdpo.engine.tiny import write_tiny_model

# sdpo.kernels.IGNORE_INDEX, spelled out: importing sdpo.kernels here, before the kernel test
# modules choose Triton's interpreter mode, could fix that mode too early.
IGNORE_INDEX = -100

# Under pytest-xdist (``-n N``) N test processes share the cores: each takes its share of the
# intra-op threads torch would use alone, since N processes each with a thread per core spin
# against each other on the tests' small tensors (many times slower than a thread each).
if os.environ.get("PYTEST_XDIST_WORKER"):
    _workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    torch.set_num_threads(max(1, torch.get_num_threads() // _workers))

# The test files that take longest (25-140 s each on 2 shared cores, most of it ranks and CLI
# processes), longest first. `make test` hands whole files to its processes in collection order
# (--dist loadfile --no-loadscope-reorder): these go first, so that none starts last while the
# other process has nothing left to do.
LONGEST_FILES = (
    "test_distributed_faults.py",
    "test_fsdp.py",
    "test_lora_distributed.py",
    "test_speed_paths.py",
    "test_kernels_aot.py",
    "test_async_save.py",
    "test_faults.py",
    "test_out_of_memory.py",
    "test_cli.py",
    "test_tracking.py",
    "test_hub.py",
    "test_distributed.py",
)

WORDS = [f"w{i}" for i in range(40)]


def pytest_collection_modifyitems(config, items):
    """Under xdist, LONGEST_FILES first (in that order), the rest as collected."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        first = {name: i for i, name in enumerate(LONGEST_FILES)}
        items.sort(key=lambda item: first.get(item.path.name, len(first)))


# The cyclic garbage collector walks every tracked object of this process at each full
# collection: torch, transformers and Dynamo's caches make that a few tenths of a second each,
# and the runner and the libraries collect often. What is alive once collected after the
# collection of the tests and after each test module (its fixtures torn down) is moved out of
# the collector's sight (``gc.freeze``): later collections walk only what the tests since made,
# which they still free as before; nothing a test makes is frozen before its module ends.
def pytest_collection_finish(session):
    gc.collect()
    gc.freeze()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item, nextitem):
    yield
    if nextitem is None or nextitem.module is not item.module:
        gc.collect()
        gc.freeze()


def assert_no_worse(name, ours, baseline, truth, *, rel_margin: float, factor: float = 1.0):
    """The dtype-aware rule: ``ours`` is no further from the float64 ``truth`` than the
    same-dtype PyTorch ``baseline`` (times ``factor``), plus ``rel_margin`` of truth's scale."""
    scale = truth.abs().max().item() + 1e-30
    err_ours = (ours.double() - truth).abs().max().item()
    err_base = (baseline.double() - truth).abs().max().item()
    assert err_ours <= factor * err_base + rel_margin * scale, (
        f"{name}: error {err_ours:.3e} vs float64 truth exceeds the same-dtype PyTorch error "
        f"{err_base:.3e} + margin {rel_margin * scale:.3e}"
    )


def warm_cuda_blas(device: str | torch.device = "cuda") -> None:
    """Make cuBLAS's and cuBLASLt's workspaces exist before a test compares allocated memory.
    The first matmul of a thread on a stream allocates its workspace through the caching
    allocator and keeps it (tens of MiB on recent GPUs), so memory measured around the
    process's first matmul counts it, and the result would depend on the tests run before.
    fp32 and bf16 matmuls, with a bias (cuBLASLt) and without, on this thread and in a
    backward (autograd's thread for the device), and the mixed bf16 x bf16 -> fp32 addmm
    where torch has it."""
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.randn(64, 64, device=device, dtype=dtype, requires_grad=True)
        bias = torch.zeros(64, device=device, dtype=dtype)
        with torch.no_grad():
            torch.addmm(bias, a, a.t())
        (torch.addmm(bias, a, a.t()) + a @ a).sum().backward()
    a = torch.ones(64, 64, device=device, dtype=torch.bfloat16)
    c = torch.zeros(64, 64, device=device)
    # an older torch has none: the kernels do not use it either
    with contextlib.suppress(RuntimeError, TypeError, NotImplementedError):
        torch.addmm(c, a, a, out_dtype=torch.float32, out=c)
    del a, bias, c
    torch.cuda.synchronize(device)


@pytest.fixture
def cuda_blas_warm():
    """A CUDA test that compares allocated memory: skipped without CUDA; cuBLAS's workspaces
    made first (``warm_cuda_blas``)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    warm_cuda_blas()


@pytest.fixture
def one_thread():
    """Small CPU ops are slowed a hundredfold by thread oversubscription on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def packed_labels(
    *, lengths, prompts, vocab: int, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """labels/seq_ids of packed sequences with random labels in [0, vocab): prompt tokens and
    each sequence's last token are -100."""
    labels, seq_ids = [], []
    for s, (length, prompt) in enumerate(zip(lengths, prompts, strict=True)):
        lab = torch.randint(0, vocab, (length,), generator=gen)
        lab[:prompt] = IGNORE_INDEX
        lab[-1] = IGNORE_INDEX
        labels.append(lab)
        seq_ids.append(torch.full((length,), s, dtype=torch.int64))
    return torch.cat(labels), torch.cat(seq_ids)


def reference_token_metrics(model, pairs) -> dict[str, float]:
    """The token metrics of ``pairs`` under ``model`` in float64 from its full logits (one
    packed batch, the unshared layout): entropy over every completion token, each side's mean
    logit over its tokens, the top-1 accuracy (torch.argmax) over the chosen tokens."""
    from sdpo.engine.packing import pack_pairs

    batch = pack_pairs(list(pairs))
    with torch.no_grad():
        hidden = model(batch.input_ids, batch.position_ids, batch.cu_seqlens, batch.max_seqlen)
        logits = hidden.double() @ model.lm_head_weight.double().T  # (N, V)
    scored = batch.labels != IGNORE_INDEX
    chosen = scored & (batch.seq_ids % 2 == 0)
    rejected = scored & (batch.seq_ids % 2 == 1)
    logp = torch.log_softmax(logits, dim=-1)
    entropy = -(logp.exp() * logp).sum(-1)
    mean = logits.mean(-1)
    top1 = (logits.argmax(-1) == batch.labels).double()
    return {
        "entropy": float(entropy[scored].mean()),
        "logits/chosen": float(mean[chosen].mean()),
        "logits/rejected": float(mean[rejected].mean()),
        "mean_token_accuracy": float(top1[chosen].mean()),
    }


def dpo_trainer(model, config, loss=None, **kwargs):
    """``DPOTrainer`` with the sigmoid DPO loss at beta 0.1 (or the ``LossConfig`` ``loss``),
    the torch kernels and no progress bar, as the trainer tests run it; ``kwargs`` go to the
    trainer."""
    from functools import partial

    from sdpo.engine.trainer import DPOTrainer
    from sdpo.losses import LossConfig, dpo_loss

    return DPOTrainer(
        model,
        config=config,
        loss_fn=partial(dpo_loss, config=LossConfig(beta=0.1) if loss is None else loss),
        kernels_impl="torch",
        progress=False,
        **kwargs,
    )


def write_pairs(path: Path, *, n: int, seed: int, kind: str = "mixed") -> Path:
    """``n`` string pairs over WORDS. ``kind`` sets how the rejected answer relates to the
    chosen one, so sources of different difficulty can be built."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6)))
        chosen = " ".join(rng.choice(WORDS[:20]) for _ in range(rng.randint(1, 5)))
        if kind == "near":
            rejected = chosen + " " + rng.choice(WORDS)
        else:
            rejected = " ".join(rng.choice(WORDS[20:]) for _ in range(rng.randint(1, 5)))
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def two_source_config(
    tmp_path: Path, model_dir: Path, *, out: str = "run", far: int = 12, near: int = 10, **sections
) -> dict:
    """A config dict: a two-step sDPO run (partition "given") of ``model_dir`` over an easy
    source "far" and a hard one "near" (``far`` and ``near`` pairs, written under ``tmp_path``),
    with the torch kernels; ``sections`` update those sections' keys."""
    far_path = write_pairs(tmp_path / "far.jsonl", n=far, seed=1, kind="far")
    near_path = write_pairs(tmp_path / "near.jsonl", n=near, seed=2, kind="near")
    d = {
        "output_dir": str(tmp_path / out),
        "model": {"path": str(model_dir)},
        "data": {
            "sources": [
                {"name": "far", "path": str(far_path)},
                {"name": "near", "path": str(near_path)},
            ],
            "max_length": 32,
            "max_prompt_length": 16,
        },
        "train": {"learning_rate": 3e-3, "pairs_per_step": 4, "max_tokens_per_batch": 128},
        "kernels": {"impl": "torch"},
        "sdpo": {"steps": 2, "partition": "given", "report_scoring": False},
    }
    for name, values in sections.items():
        d.setdefault(name, {}).update(values)
    return d


# the decoder shape of the tiny models tests build from a config class (sdpo's ModelConfig or a
# transformers one)
TINY_SHAPE = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=256,
)


def write_byte_level_tokenizer(out: Path) -> Path:
    """The tiny tokenizer's ``tokenizer.json`` replaced by a byte-level BPE trained on WORDS
    (the same special tokens, ids 0-3), as model types whose tokenizer class keeps only the
    file's vocabulary and merges (Qwen2's) need: the word-level vocabulary there gives every
    word the unknown token. Returns ``out``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from sdpo.engine.tiny import SPECIAL_TOKENS, TEMPLATE_WORDS

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=list(SPECIAL_TOKENS),
        show_progress=False,
    )
    tok.train_from_iterator([" ".join([*TEMPLATE_WORDS, *WORDS])] * 4, trainer)
    tok.save(str(out / "tokenizer.json"))
    return out


def write_hf_model(
    out: Path, config_class: str, *, seed: int = 0, byte_level: bool = False, **overrides
) -> Path:
    """A random-init tiny transformers model of ``config_class`` (a name in ``transformers``,
    e.g. "GemmaConfig") with the tiny tokenizer (``byte_level``: its byte-level BPE variant,
    :func:`write_byte_level_tokenizer`), saved by ``save_pretrained`` in ``out``."""
    import transformers

    from sdpo.engine.tiny import build_tokenizer
    from sdpo.engine.tokenize import PairTokenizer

    build_tokenizer(out, words=WORDS)
    if byte_level:
        write_byte_level_tokenizer(out)
    settings = dict(vocab_size=PairTokenizer.from_dir(out).vocab_size, **TINY_SHAPE)
    settings.update(overrides)
    config = getattr(transformers, config_class)(**settings)
    torch.manual_seed(seed)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(out)
    return out


def write_partly_sliding_qwen(out: Path) -> Path:
    """A tiny Qwen2 whose later layers alone slide (``max_window_layers=1``), by a window of 64
    tokens, longer than every pair of the tests that use it: earlier releases fingerprinted
    such a model by its window alone, and ran it without a window on sequences within it."""
    return write_hf_model(
        out,
        "Qwen2Config",
        byte_level=True,
        use_sliding_window=True,
        sliding_window=64,
        max_window_layers=1,
    )


_TORCHRUN_TMP: list[str] = []  # the temporary folder of this test session's torchrun launches


def _torchrun_tmp() -> str:
    """A folder of this test session for what torchrun's agent leaves in the temporary folder
    (a ``torchelastic_*`` log folder per launch), removed when the session ends."""
    if not _TORCHRUN_TMP:
        _TORCHRUN_TMP.append(tempfile.mkdtemp(prefix="sdpo-tests-torchrun-"))
        atexit.register(shutil.rmtree, _TORCHRUN_TMP[0], True)
    return _TORCHRUN_TMP[0]


def torchrun_env(*drop: str) -> dict[str, str]:
    """This process's environment for a torchrun launch from a test: one thread per rank, no
    rendezvous variables of an enclosing launch (torchrun sets its own), nor the ``drop`` ones,
    and a temporary folder of the session's own (torchrun leaves a folder there per launch)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TMPDIR": _torchrun_tmp()}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", *drop):
        env.pop(var, None)
    return env


def write_two_source_run(
    root: Path, *, data: str = "", train: str = "", sdpo: str = "", tail: str = ""
) -> Path:
    """``root/run.toml``: a two-step sDPO run (partition "given") of the tiny model over an easy
    source "far" (12 pairs) and a hard one "near" (10 pairs), both written under ``root``.
    ``data``, ``train`` and ``sdpo`` are TOML lines added to those sections; ``tail`` follows
    at the end (more sections). ``output_dir`` is "out", to be set per run with --set."""
    model = write_tiny_model(root / "model", words=WORDS, hidden_size=32, seed=1)
    far = write_pairs(root / "far.jsonl", n=12, seed=1, kind="far")
    near = write_pairs(root / "near.jsonl", n=10, seed=2, kind="near")
    cfg = root / "run.toml"
    cfg.write_text(
        f"""output_dir = "out"
[model]
path = "{model}"
[data]
max_length = 32
max_prompt_length = 16
{data}
[[data.sources]]
name = "far"
path = "{far}"
[[data.sources]]
name = "near"
path = "{near}"
[train]
learning_rate = 3e-3
pairs_per_step = 4
keep_checkpoints = 100
{train}
[kernels]
impl = "torch"
[sdpo]
steps = 2
partition = "given"
{sdpo}
{tail}
"""
    )
    return cfg


def tiny_hf_dict(**overrides) -> dict:
    """A tiny Llama-style Hugging Face config dict (vocab 131, GQA 4/2 heads); overrides win."""
    d = {
        "model_type": "llama",
        "vocab_size": 131,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,  # GQA
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 256,
        "tie_word_embeddings": False,
    }
    d.update(overrides)
    return d


@pytest.fixture
def tiny_model_dir(tmp_path: Path) -> Path:
    return write_tiny_model(tmp_path / "model", words=WORDS, hidden_size=32, seed=1)
