"""Time and peak memory of the SDPA attention fallback on one long sequence, on CPU.

The fallback (``engine/attention.py``, backend "sdpa") runs where no flash kernel applies: on
CPU, in fp32 on CUDA, and for sliding windows on kernels without one. This runs it, forward and
backward, on one sequence of ``--tokens`` queries (``--extra-keys`` more keys than queries, as
in the shared-prompt layout; ``--window`` for a sliding window) and prints one JSON line: wall
seconds and the growth of the process's peak RSS (``ru_maxrss``) over the call, which is what
the attention held beyond its inputs. One case per process, so that each peak is its own.

    python benchmarks/attention_memory.py --tokens 8192 --window 1024
    python benchmarks/attention_memory.py --tokens 8192 --extra-keys 512
    python benchmarks/attention_memory.py --tokens 8192 --window 1024 --query-block 8192
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192, help="queries of the sequence")
    parser.add_argument("--extra-keys", type=int, default=0, help="keys before the first query")
    parser.add_argument("--window", type=int, default=None, help="sliding window (keys)")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--query-block", type=int, default=None, help="attention.QUERY_BLOCK (default: as set)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from sdpo.engine import attention
    from sdpo.engine.attention import varlen_attention

    if args.query_block is not None:
        attention.QUERY_BLOCK = args.query_block

    g = torch.Generator().manual_seed(0)
    lq, lk = args.tokens, args.tokens + args.extra_keys
    q = torch.randn(lq, args.heads, args.head_dim, generator=g).requires_grad_(True)
    k = torch.randn(lk, args.heads, args.head_dim, generator=g).requires_grad_(True)
    v = torch.randn(lk, args.heads, args.head_dim, generator=g).requires_grad_(True)
    layout = {}
    if args.extra_keys:
        layout = {"cu_seqlens_k": torch.tensor([0, lk], dtype=torch.int32), "max_seqlen_k": lk}
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    out = varlen_attention(
        q,
        k,
        v,
        cu_seqlens=torch.tensor([0, lq], dtype=torch.int32),
        max_seqlen=lq,
        backend="sdpa",
        window=args.window,
        **layout,
    )
    out.sum().backward()
    wall = time.perf_counter() - start
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before  # KiB on Linux
    result = {
        "tokens": lq,
        "extra_keys": args.extra_keys,
        "window": args.window,
        "heads": args.heads,
        "head_dim": args.head_dim,
        "query_block": attention.QUERY_BLOCK,
        "wall_s": round(wall, 3),
        "peak_rss_growth_mib": round(grown / 1024, 1),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
