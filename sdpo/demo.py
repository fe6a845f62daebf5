"""`sdpo demo`: the whole pipeline on a built-in task, on a CPU, in minutes, with no downloads.

The task: reverse a short sequence of digits ("reverse 3 1 4 1 =" -> "1 4 1 3"). A tiny
Llama-style model is fine-tuned (SFT) on part of the task until it is right some of the time.
Three preference sources of clearly different difficulty are built from training prompts, all
with the correct reversal as the chosen answer:

- ``random``: the rejected answer is a random digit string (easy to tell apart),
- ``copy``: the rejected answer is the prompt copied without reversing (a plausible mistake),
- ``near``: the rejected answer is the correct one with one digit changed (hard).

Then, as in the sDPO paper's table: SFT vs DPO (all data at once) vs sDPO easy-to-hard vs sDPO
with a random split, compared on held-out task accuracy (greedy exact match on prompts never
seen in training) and held-out preference accuracy (share of pairs where the model gives the
chosen answer the higher log-prob), plus γ_ref of each step's reference on its chunk.
"""

from __future__ import annotations

import json
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from sdpo.config import config_from_dict
from sdpo.engine.checkpoint import load_pretrained, save_pretrained
from sdpo.engine.files import atomic_open
from sdpo.engine.model import CausalLM, ModelConfig, init_model
from sdpo.engine.packing import TokenizedPair
from sdpo.engine.scoring import score_pairs
from sdpo.engine.tiny import build_tokenizer
from sdpo.engine.tokenize import PairTokenizer, tokenize_pairs
from sdpo.kernels import sequence_logprobs
from sdpo.runner import processing_files, run_training

DIGITS = [str(d) for d in range(10)]
SOURCES = ("random", "copy", "near")


@dataclass(kw_only=True)
class DemoSettings:
    """Sizes of one demo run; ``quick`` is the shortened mode CI runs."""

    length: int = 5  # digits to reverse
    sft_examples: int = 600
    # SFT stops early on purpose: the model is right on a minority of held-out prompts, so
    # preference training has something to teach (measured: 80 steps give about 11%).
    sft_steps: int = 80
    pairs_per_source: int = 1000
    heldout_prompts: int = 500
    dpo_epochs: int = 3
    dpo_learning_rate: float = 1e-4
    hidden: int = 64
    layers: int = 2

    @classmethod
    def quick(cls) -> DemoSettings:
        return cls(pairs_per_source=96, heldout_prompts=96, dpo_epochs=1)


def _prompt(digits: list[str]) -> str:
    return "reverse " + " ".join(digits) + " ="


def _answer(digits: list[str]) -> str:
    return " ".join(reversed(digits))


def build_task(settings: DemoSettings, rng: random.Random) -> tuple[list, list, dict]:
    """Disjoint SFT prompts, preference prompts and held-out prompts, plus the sources."""
    seen: set[tuple[str, ...]] = set()

    def fresh() -> list[str]:
        while True:
            digits = tuple(rng.choice(DIGITS) for _ in range(settings.length))
            if digits not in seen:
                seen.add(digits)
                return list(digits)

    sft = [fresh() for _ in range(settings.sft_examples)]
    heldout = [fresh() for _ in range(settings.heldout_prompts)]

    def rejected_for(kind: str, digits: list[str]) -> list[str]:
        right = list(reversed(digits))
        if kind == "random":
            wrong = [rng.choice(DIGITS) for _ in digits]
        elif kind == "copy":
            wrong = list(digits)
        else:  # near: one digit changed
            wrong = list(right)
            i = rng.randrange(len(wrong))
            wrong[i] = rng.choice([d for d in DIGITS if d != wrong[i]])
        return wrong if wrong != right else rejected_for("near", digits)

    sources = {
        kind: [
            {
                "prompt": _prompt(d),
                "chosen": _answer(d),
                "rejected": " ".join(rejected_for(kind, d)),
            }
            for d in (fresh() for _ in range(settings.pairs_per_source))
        ]
        for kind in SOURCES
    }
    heldout_pairs = [
        {"prompt": _prompt(d), "chosen": _answer(d), "rejected": " ".join(rejected_for(k, d))}
        for i, d in enumerate(heldout)
        for k in (SOURCES[i % len(SOURCES)],)
    ]
    return sft, heldout, {"sources": sources, "heldout_pairs": heldout_pairs}


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with atomic_open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


# -- SFT: maximise the completion log-prob with the same packed forward and log-prob op --------
def sft(
    model: CausalLM, examples: list[TokenizedPair], *, steps: int, seed: int, batch: int = 32
) -> None:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    from sdpo.engine.packing import pack_pairs

    model.train()
    for step in range(steps):
        idx = torch.randint(len(examples), (batch,), generator=gen).tolist()
        packed = pack_pairs([examples[i] for i in idx])
        hidden = model(packed.input_ids, packed.position_ids, packed.cu_seqlens, packed.max_seqlen)
        seq = sequence_logprobs(
            hidden, model.lm_head_weight, packed.labels, packed.seq_ids, packed.num_seqs
        )
        # only the chosen sequences (the correct answer); rejected slots duplicate it
        loss = -seq[0::2].sum() / packed.completion_tokens[0::2].sum()
        for group in opt.param_groups:
            group["lr"] = 3e-3 * min(1.0, (step + 1) / 20) * (1 - step / steps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()


@torch.no_grad()
def greedy_accuracy(model: CausalLM, tokenizer: PairTokenizer, prompts: list[list[str]]) -> float:
    """Exact-match accuracy of greedy decoding of the reversal on ``prompts``."""
    model.eval()
    ids = [
        [tokenizer.bos_id, *row] for row in tokenizer.encode_texts([_prompt(d) for d in prompts])
    ]
    length = len(ids[0])
    tokens = torch.tensor(ids, dtype=torch.int64)  # (B, L): all prompts have the same length
    n_new = len(prompts[0])
    for _ in range(n_new):
        b, t = tokens.shape
        hidden = model(
            tokens.reshape(-1),
            torch.arange(t).repeat(b),
            torch.arange(0, (b + 1) * t, t, dtype=torch.int32),
            t,
        ).reshape(b, t, -1)  # (B, T, H)
        next_ids = (hidden[:, -1] @ model.lm_head_weight.T).argmax(-1)  # (B,)
        tokens = torch.cat([tokens, next_ids[:, None]], dim=1)
    correct = 0
    for row, digits in zip(tokens[:, length:].tolist(), prompts):
        correct += tokenizer.decode(row).split() == list(reversed(digits))
    return correct / len(prompts)


def preference_accuracy(model: CausalLM, pairs: list[TokenizedPair]) -> float:
    scores = score_pairs(model, pairs, max_tokens_per_batch=8192, impl="torch", precision="fp32")
    return float((scores.gamma > 0).float().mean())


def run_demo(*, output_dir: Path, quick: bool = False, seed: int = 0) -> dict:
    start = time.perf_counter()
    settings = DemoSettings.quick() if quick else DemoSettings()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    torch.manual_seed(seed)

    sft_prompts, heldout, data = build_task(settings, rng)
    # the tokenizer files, until the SFT model's folder takes them (not kept in the output)
    base_dir = tempfile.TemporaryDirectory(prefix="sdpo-demo-tokenizer-")
    base = Path(base_dir.name)
    build_tokenizer(base, words=["reverse", "=", *DIGITS])
    tokenizer = PairTokenizer.from_dir(base)
    config = ModelConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=settings.hidden,
        intermediate_size=settings.hidden * 3,
        num_hidden_layers=settings.layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=settings.hidden // 4,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    model = init_model(config, seed=seed)
    sft_rows = [
        {"prompt": _prompt(d), "chosen": _answer(d), "rejected": _answer(d)} for d in sft_prompts
    ]
    sft_pairs, _ = tokenize_pairs(sft_rows, tokenizer, max_length=64, max_prompt_length=32)
    print(f"[demo] SFT: {settings.sft_steps} steps on {len(sft_pairs)} examples ...", flush=True)
    sft(model, sft_pairs, steps=settings.sft_steps, seed=seed)
    sft_dir = out / "sft"
    save_pretrained(model, sft_dir, extra_files=processing_files(base))
    base_dir.cleanup()

    data_dir = out / "data"
    for kind, rows in data["sources"].items():
        _write_jsonl(data_dir / f"{kind}.jsonl", rows)
    heldout_pairs, _ = tokenize_pairs(
        [dict(r, source="heldout") for r in data["heldout_pairs"]],
        tokenizer,
        max_length=64,
        max_prompt_length=32,
    )

    def run_config(name: str, *, steps: int, partition: str) -> Path:
        cfg = config_from_dict(
            {
                "output_dir": str(out / name),
                "model": {"path": str(sft_dir)},
                "data": {
                    "sources": [{"name": k, "path": str(data_dir / f"{k}.jsonl")} for k in SOURCES],
                    "max_length": 64,
                    "max_prompt_length": 32,
                },
                "train": {
                    "learning_rate": settings.dpo_learning_rate,
                    "epochs": settings.dpo_epochs,
                    "pairs_per_step": 16,
                    "max_tokens_per_batch": 4096,
                    "warmup_ratio": 0.1,
                    "seed": seed,
                    "log_every": 5,
                },
                "loss": {"beta": 0.1},
                "sdpo": {"steps": steps, "partition": partition},
            }
        )
        print(f"\n[demo] === {name}: steps={steps}, partition={partition} ===", flush=True)
        result = run_training(cfg, progress=False, overwrite=True)
        return result

    runs = {
        "DPO (all data at once)": run_config("dpo", steps=1, partition="given"),
        "sDPO easy-to-hard": run_config("sdpo_easy_to_hard", steps=3, partition="easy_to_hard"),
        "sDPO random split": run_config("sdpo_random", steps=3, partition="random"),
    }

    rows = []
    sft_model = load_pretrained(sft_dir)
    rows.append(
        (
            "SFT",
            greedy_accuracy(sft_model, tokenizer, heldout),
            preference_accuracy(sft_model, heldout_pairs),
            [],
        )
    )
    for label, result in runs.items():
        final = load_pretrained(result.output_dir / f"step-{len(result.reports)}")
        rows.append(
            (
                label,
                greedy_accuracy(final, tokenizer, heldout),
                preference_accuracy(final, heldout_pairs),
                [r.gamma_ref_chunk for r in result.reports],
            )
        )

    print("\n[demo] held-out results (task: reverse", settings.length, "digits)")
    header = f"{'model':<24} {'task acc':>9} {'pref acc':>9}   mean γ_ref per step (on its chunk)"
    print(header)
    print("-" * len(header))
    for label, task_acc, pref_acc, gammas in rows:
        shown = " -> ".join(f"{g:+.2f}" for g in gammas)
        print(f"{label:<24} {task_acc:>9.3f} {pref_acc:>9.3f}   {shown}".rstrip())
    e2h = runs["sDPO easy-to-hard"].reports
    if e2h:
        order = " -> ".join("+".join(r.sources) for r in e2h)
        print(f"\n[demo] easy-to-hard order chosen by the SFT model's reward accuracy: {order}")
    # The paper's Figure 2 quantity: on the data of step t+1, the reference of step t+1
    # (M_t) against the reference of step t (M_{t-1}); sDPO's premise is that it rises.
    for label in ("sDPO easy-to-hard", "sDPO random split"):
        reports = runs[label].reports
        raised = [
            f"chunk {b.step}: {a.gamma_ref_next_chunk:+.2f} -> {b.gamma_ref_chunk:+.2f}"
            for a, b in zip(reports, reports[1:])
            if a.gamma_ref_next_chunk is not None
        ]
        print(f"[demo] {label}: γ_ref of the previous vs the new reference on {'; '.join(raised)}")
    elapsed = time.perf_counter() - start
    print(f"[demo] done in {elapsed:.0f} s; outputs under {out}")
    summary = {  # gamma_ref: each step's mean γ_ref on its chunk, as numbers
        "rows": [
            {"model": r[0], "task_accuracy": r[1], "preference_accuracy": r[2], "gamma_ref": r[3]}
            for r in rows
        ],
        "seconds": elapsed,
    }
    with atomic_open(out / "demo_summary.json", "w") as f:
        f.write(json.dumps(summary, indent=2) + "\n")
    return summary
