"""Time and peak memory of reading and tokenizing a large preference data set, on CPU.

``make DIR`` writes synthetic data to DIR: ``plain.jsonl`` and ``plain.json`` (the same rows as
JSON lines and as one JSON array; prompt about 400 characters, chosen and rejected about 1,200
each, words drawn from a list with non-ASCII ones such as "café" and "東京") and ``model/``, a
byte-level BPE of 1,000 ids trained on that text, with a ChatML template.

``measure DIR --stage read|tokenize --file plain.json`` runs the stage in a fresh interpreter and
prints one JSON line: wall and CPU seconds (user + system, every thread) of the stage, the
process's peak RSS (``ru_maxrss``, which includes the interpreter and imports: about 0.3 GiB),
and a sha256 of the rows read (``read``) or of the pairs' ``data_fingerprint`` (``tokenize``:
reading, then ``tokenize_pairs``), so that two versions can be compared for identical output.
``--engine PATH`` imports ``sdpo.engine`` from another checkout's ``engine/`` folder (a
baseline), the rest of sdpo from this one.

    python benchmarks/data_memory.py make /tmp/d --pairs 200000
    python benchmarks/data_memory.py measure /tmp/d --stage tokenize --file plain.jsonl
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

WORD_LIST = (
    "the of and to in is was for on that with as by at from his it an were are which this be "
    "or has had not first one their its new after who they have her she two been other when "
    "there all during into school time may years more most only over city some world would "
    "where later up such used many can state about national out known university united then "
    "made café naïve résumé 東京 données straße señor über jalapeño"
)
WORDS = WORD_LIST.split()
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def text(rng: random.Random, chars: int) -> str:
    words: list[str] = []
    size = 0
    while size < chars:
        word = rng.choice(WORDS)
        words.append(word)
        size += len(word) + 1
    return " ".join(words)


def make(folder: Path, *, pairs: int, seed: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    with (
        open(folder / "plain.jsonl", "w", encoding="utf-8") as lines,
        open(folder / "plain.json", "w", encoding="utf-8") as array,
    ):
        for i in range(pairs):
            row = {
                "prompt": text(rng, rng.randint(300, 500)),
                "chosen": " " + text(rng, rng.randint(900, 1500)),
                "rejected": " " + text(rng, rng.randint(900, 1500)),
            }
            line = json.dumps(row, ensure_ascii=False)
            lines.write(line + "\n")
            array.write(("[\n" if i == 0 else ",\n") + line)
        array.write("\n]\n")
    model = folder / "model"
    model.mkdir(exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1000,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((text(rng, 2000) for _ in range(2000)), trainer)
    tok.save(str(model / "tokenizer.json"))
    config = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "chat_template": CHATML}
    (model / "tokenizer_config.json").write_text(json.dumps(config))


def run_stage(folder: Path, *, stage: str, file: str, engine: str | None) -> dict:
    """The stage in this process (called in a fresh one by ``measure``)."""
    if engine is not None:  # a baseline's sdpo.engine, the rest of sdpo from this checkout
        import importlib.util

        import sdpo

        init = Path(engine) / "__init__.py"
        spec = importlib.util.spec_from_file_location(
            "sdpo.engine", init, submodule_search_locations=[str(Path(engine))]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules["sdpo.engine"] = module
        spec.loader.exec_module(module)
        sdpo.engine = module
    import warnings

    from sdpo.cache import data_fingerprint
    from sdpo.engine.data import read_preference_file
    from sdpo.engine.tokenize import PairTokenizer, tokenize_pairs

    tokenizer = PairTokenizer.from_dir(folder / "model") if stage == "tokenize" else None
    start = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rows = read_preference_file(folder / file)
    if stage == "tokenize":
        pairs, _ = tokenize_pairs(rows, tokenizer, max_length=2048, max_prompt_length=1024)
    wall = time.perf_counter() - t0
    end = resource.getrusage(resource.RUSAGE_SELF)
    if stage == "tokenize":
        digest = data_fingerprint(pairs)
    else:
        h = hashlib.sha256()
        for row in rows:
            h.update(json.dumps([row[k] for k in ("prompt", "chosen", "rejected")]).encode())
        digest = h.hexdigest()
    cpu = (end.ru_utime - start.ru_utime) + (end.ru_stime - start.ru_stime)
    return {
        "stage": stage,
        "file": file,
        "engine": engine or "this checkout",
        "rows": len(rows),
        "wall_s": round(wall, 2),
        "cpu_s": round(cpu, 2),
        "peak_rss_gib": round(end.ru_maxrss / 2**20, 2),  # ru_maxrss is in KiB on Linux
        "sha256": digest[:16],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("make", help="write the synthetic data and tokenizer")
    m.add_argument("folder", type=Path)
    m.add_argument("--pairs", type=int, default=200_000)
    m.add_argument("--seed", type=int, default=0)
    for name in ("measure", "stage"):  # "stage": what "measure" runs in a fresh interpreter
        p = sub.add_parser(name)
        p.add_argument("folder", type=Path)
        p.add_argument("--stage", choices=("read", "tokenize"), default="read")
        p.add_argument("--file", default="plain.jsonl")
        p.add_argument("--engine", default=None, help="another checkout's engine/ folder")
    args = parser.parse_args(argv)
    if args.command == "make":
        make(args.folder, pairs=args.pairs, seed=args.seed)
    elif args.command == "stage":
        print(
            json.dumps(run_stage(args.folder, stage=args.stage, file=args.file, engine=args.engine))
        )
    else:
        command = [sys.executable, __file__, "stage", str(args.folder), "--stage", args.stage]
        command += ["--file", args.file] + (["--engine", args.engine] if args.engine else [])
        print(subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
