"""Shared builders for end-to-end tests: a tiny real model folder and preference files."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from sdpo.engine.tiny import write_tiny_model

WORDS = [f"w{i}" for i in range(40)]


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


@pytest.fixture
def tiny_model_dir(tmp_path: Path) -> Path:
    return write_tiny_model(tmp_path / "model", words=WORDS, hidden_size=32, seed=1)
