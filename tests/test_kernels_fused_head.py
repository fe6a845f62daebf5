"""fused_token_logprobs / fused_sequence_logprobs (lm_head matmul fused with the logsumexp).

Without a GPU the kernel runs under the Triton interpreter in float32 (it mishandles bf16
dot). Tolerance rule: error vs float64 truth no worse than plain PyTorch in the same dtype
(full logits, log_softmax) plus a small margin.
"""

import math
import os

# The interpreter mode of Triton is fixed when triton.language is first imported: without a
# GPU the Triton kernels run interpreted; with one (the GPU-marked tests) they run compiled.
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

triton = pytest.importorskip("triton")

from sdpo.kernels import sequence_logprobs  # noqa: E402
from sdpo.kernels.fused_head import (  # noqa: E402
    _combine,
    _fused_head_kernel,
    fused_sequence_logprobs,
    fused_token_logprobs,
    num_splits,
)
from sdpo.kernels.logprobs import IGNORE_INDEX  # noqa: E402
from sdpo.kernels.triton_rows import launch  # noqa: E402
from tests.conftest import assert_no_worse, packed_labels  # noqa: E402

VOCAB = 50_257  # not a multiple of any tile width: the last vocabulary tile is ragged


def _batch(seed: int, *, vocab: int = VOCAB, hidden: int = 24, dtype=torch.float32, device="cpu"):
    """131 tokens over 3 packed sequences; sequence 1 has exactly one completion token.

    Prompt tokens and each sequence's last token are -100; one scored label is the first
    vocabulary index and one the last.
    """
    gen = torch.Generator().manual_seed(seed)
    lengths, prompts = [61, 22, 48], [17, 20, 5]
    labels, seq_ids = packed_labels(lengths=lengths, prompts=prompts, vocab=vocab, gen=gen)
    labels[30], labels[100] = 0, vocab - 1
    assert int((labels[seq_ids == 1] != IGNORE_INDEX).sum()) == 1
    h64 = torch.randn(labels.numel(), hidden, generator=gen, dtype=torch.float64)
    # logits of std ~3: a peaked softmax, so the max subtraction matters
    w64 = torch.randn(vocab, hidden, generator=gen, dtype=torch.float64) * (3.0 / hidden**0.5)
    return dict(
        h64=h64.to(device),
        w64=w64.to(device),
        h=h64.to(dtype).to(device),
        w=w64.to(dtype).to(device),
        labels=labels.to(device),
        seq_ids=seq_ids.to(device),
        num_seqs=len(lengths),
    )


def _naive(h, w, labels, seq_ids, num_seqs):
    """Plain PyTorch: full logits in the inputs' dtype (upcast to fp32; float64 for truth)."""
    logits = h @ w.t()
    logits = logits if logits.dtype == torch.float64 else logits.float()
    lse = torch.logsumexp(logits, dim=-1)
    picked = logits.gather(1, labels.clamp(min=0).unsqueeze(1)).squeeze(1)
    token = torch.where(labels != IGNORE_INDEX, picked - lse, 0.0)
    seq = torch.zeros(num_seqs, dtype=token.dtype, device=token.device).index_add(0, seq_ids, token)
    return token, lse, seq


def _check_against_truth(b, *, rel_margin: float, factor: float = 1.0, **kwargs):
    args = (b["labels"], b["seq_ids"], b["num_seqs"])
    token, lse = fused_token_logprobs(b["h"], b["w"], b["labels"], **kwargs)
    assert token.dtype == lse.dtype == torch.float32
    assert token.shape == lse.shape == b["labels"].shape
    assert bool((token[b["labels"] == IGNORE_INDEX] == 0).all())
    token64, lse64, seq64 = _naive(b["h64"], b["w64"], *args)
    token_b, lse_b, seq_b = _naive(b["h"], b["w"], *args)
    assert_no_worse("token_logps", token, token_b, token64, rel_margin=rel_margin, factor=factor)
    assert_no_worse("lse", lse, lse_b, lse64, rel_margin=rel_margin, factor=factor)
    if not kwargs:
        seq = fused_sequence_logprobs(b["h"], b["w"], *args)
        assert seq.dtype == torch.float32 and seq.shape == (b["num_seqs"],)
        assert_no_worse("seq_logps", seq, seq_b, seq64, rel_margin=rel_margin, factor=factor)


def test_fused_logprobs_match_float64_truth_at_gpt2_vocab_with_a_k_tail():
    # H = 24 with the interpreter's BLOCK_K = 16: the second K step is masked; V = 50,257
    # over 4096-wide tiles in 3 slices: ragged slices and a ragged last tile.
    _check_against_truth(_batch(seed=51), rel_margin=1e-6)


@pytest.mark.parametrize(
    ("tiles", "splits", "hidden"),
    [
        # one slice; 17 tiles of 64 with a 7-column tail; H a multiple of BLOCK_K (no K mask)
        ({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 16}, 1, 32),
        # one tile per slice (every split boundary is a tile boundary), K tail
        ({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 16}, 17, 40),
        # slices of 3-4 tiles; 131 rows = 8 blocks of 16 + a 3-row tail
        ({"BLOCK_M": 16, "BLOCK_N": 128, "BLOCK_K": 32}, 2, 19),
    ],
)
def test_fused_logprobs_match_float64_truth_for_any_tiles_and_splits(tiles, splits, hidden):
    b = _batch(seed=52 + splits, vocab=1031, hidden=hidden)
    # labels on both sides of every tile boundary, where slices and tiles meet
    edges = torch.arange(tiles["BLOCK_N"], 1031, tiles["BLOCK_N"])
    scored = (b["labels"] != IGNORE_INDEX).nonzero().squeeze(1)
    picks = torch.cat([edges - 1, edges])[: scored.numel()]
    b["labels"][scored[: picks.numel()]] = picks
    _check_against_truth(b, rel_margin=1e-6, tiles=tiles, splits=splits)


def test_fused_reference_pass_matches_the_chunked_sequence_logprobs():
    b = _batch(seed=55, vocab=2053, hidden=33)
    args = (b["labels"], b["seq_ids"], b["num_seqs"])
    fused = fused_sequence_logprobs(b["h"], b["w"], *args)
    with torch.no_grad():
        chunked = sequence_logprobs(b["h"], b["w"], *args, impl="torch", chunk_tokens=48)
    torch.testing.assert_close(fused, chunked, rtol=1e-5, atol=1e-4)


def test_strided_labels_give_the_contiguous_results():
    """A labels column of a wider tensor: the kernel reads label i at offset i."""
    b = _batch(seed=56, vocab=1031, hidden=19)
    args = (b["seq_ids"], b["num_seqs"])
    strided = torch.stack([b["labels"], torch.full_like(b["labels"], 3)], dim=1)[:, 0]
    assert strided.stride() == (2,)
    want = fused_sequence_logprobs(b["h"], b["w"], b["labels"], *args)
    got = fused_sequence_logprobs(b["h"], b["w"], strided, *args)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="runs the kernel interpreted, on the CPU")
def test_split_offsets_past_two_to_the_31_land_in_their_slice():
    """A partial buffer of SPLITS·N > 2^31 entries (N = 2^28 + 1 tokens, 9 splits): the last
    split's partials start at 8·N = 2^31 + 8, an offset 32-bit arithmetic wraps negative (a
    store far before the buffer, which ends the process). The first 16 rows, run interpreted,
    give float64 truth. The buffers are reserved, not filled: only the pages of those rows are
    ever touched."""
    tile, splits, n, h = 16, 9, 2**28 + 1, 16
    assert (splits - 1) * n >= 2**31
    gen = torch.Generator().manual_seed(11)
    hidden = torch.randn(tile, h, generator=gen, dtype=torch.float64)  # the rows the grid runs
    weight = torch.randn(splits * tile, h, generator=gen, dtype=torch.float64)  # a tile a split
    labels = torch.randint(0, splits * tile, (tile,), generator=gen)
    try:
        part_max = torch.empty(splits * n)  # 9.7 GB of address space each, untouched
        part_sum = torch.empty(splits * n)
    except RuntimeError as e:  # an environment that refuses to reserve that much
        pytest.skip(f"cannot reserve the partial buffers: {e}")
    label_logit = torch.zeros(tile)
    launch(_fused_head_kernel, hidden.device)[(splits,)](  # one row block, every split
        hidden.float(),
        weight.float(),
        labels,
        part_max,
        part_sum,
        label_logit,
        n,
        splits * tile,
        h,
        splits,
        h,
        h,
        BLOCK_M=tile,
        BLOCK_N=tile,
        BLOCK_K=tile,
        EVEN_K=True,
        DOT_PRECISION="ieee",
        IGNORE=IGNORE_INDEX,
    )
    rows = slice(0, tile)
    logp, _ = _combine(
        part_max.view(splits, n)[:, rows], part_sum.view(splits, n)[:, rows], label_logit, labels
    )
    truth = (hidden @ weight.T).log_softmax(-1).gather(1, labels[:, None])[:, 0]
    torch.testing.assert_close(logp.double(), truth, rtol=0, atol=1e-5)


def test_fused_head_refuses_a_pass_that_needs_gradients():
    b = _batch(seed=56, vocab=131, hidden=16)
    h = b["h"].clone().requires_grad_(True)
    args = (b["labels"], b["seq_ids"], b["num_seqs"])
    with pytest.raises(RuntimeError, match="no-grad reference pass"):
        fused_sequence_logprobs(h, b["w"], *args)
    with torch.no_grad():
        seq = fused_sequence_logprobs(h, b["w"], *args)
    assert not seq.requires_grad


def test_fused_head_input_errors_name_the_problem():
    b = _batch(seed=57, vocab=131, hidden=16)
    h, w, labels, seq_ids = b["h"], b["w"], b["labels"], b["seq_ids"]
    with pytest.raises(ValueError, match="hidden size mismatch"):
        fused_token_logprobs(h[:, :-1], w, labels)
    with pytest.raises(ValueError, match="seq_ids"):
        fused_sequence_logprobs(h, w, labels, seq_ids[:-1], 3)
    bad = labels.clone()
    bad[4] = 131
    with pytest.raises(ValueError, match=r"labels\[4\] = 131 is outside the vocabulary"):
        fused_token_logprobs(h, w, bad)
    with pytest.raises(ValueError, match="power of two"):
        fused_token_logprobs(h, w, labels, tiles={"BLOCK_M": 24, "BLOCK_N": 64, "BLOCK_K": 16})


def test_split_rule_gives_several_waves_and_never_an_empty_slice():
    # N=16,384 tokens on an H100 (132 SMs): 128 row blocks of 128 -> 17 slices, 16.5 waves
    assert num_splits(num_tokens=16_384, vocab_size=32_000, sm_count=132) == 17
    # few tokens: as many slices as 256-wide tiles allow
    assert num_splits(num_tokens=131, vocab_size=1031, sm_count=132) == 5
    assert num_splits(num_tokens=1_000_000, vocab_size=128_256, sm_count=132) == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("hidden", [256, 200])  # 200: not a multiple of BLOCK_K = 64
@pytest.mark.parametrize(
    ("dtype", "rel_margin", "factor"), [(torch.float32, 2e-6, 1.0), (torch.bfloat16, 2e-3, 1.5)]
)
def test_fused_head_on_cuda_matches_float64_truth_and_the_chunked_pass(
    hidden, dtype, rel_margin, factor
):
    b = _batch(seed=58, hidden=hidden, dtype=dtype, device="cuda")
    _check_against_truth(b, rel_margin=rel_margin, factor=factor)
    args = (b["labels"], b["seq_ids"], b["num_seqs"])
    fused = fused_sequence_logprobs(b["h"], b["w"], *args)
    with torch.no_grad():
        chunked = sequence_logprobs(b["h"], b["w"], *args, impl="triton", chunk_tokens=48)
    # The chunked pass rounds logits to the compute dtype; the fused one keeps fp32: they may
    # differ by about plain PyTorch's own error in this dtype, no more.
    _, _, seq64 = _naive(b["h64"], b["w64"], *args)
    _, _, seq_b = _naive(b["h"], b["w"], *args)
    err_base = (seq_b.double() - seq64).abs().max().item()
    diff = (fused.double() - chunked.double()).abs().max().item()
    scale = seq64.abs().max().item()
    assert diff <= 2 * factor * err_base + rel_margin * scale, (
        f"fused vs chunked reference pass differ by {diff:.3e}; plain PyTorch's error in "
        f"{dtype} is {err_base:.3e}"
    )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_head_on_cuda_writes_no_logits():
    n, hidden, vocab = 4096, 512, 32_000
    h = torch.randn(n, hidden, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(vocab, hidden, device="cuda", dtype=torch.bfloat16) * 0.05
    labels = torch.randint(0, vocab, (n,), device="cuda")
    seq_ids = torch.arange(n, device="cuda") // 512
    with torch.no_grad():
        fused_sequence_logprobs(h, w, labels, seq_ids, 8)  # autotuning allocates; warm up first
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with torch.no_grad():
        fused_sequence_logprobs(h, w, labels, seq_ids, 8)
    extra = torch.cuda.max_memory_allocated() - base
    # the (splits, N) fp32 partials and the combine's temporaries of that shape (splits is at
    # most cdiv(V, 256)), a few (N,) vectors: ~16 MB here, where logits would be 262 MB
    limit = 8 * triton.cdiv(vocab, 256) * n * 4 + 16 * n * 4 + 2**20
    assert extra <= limit, f"fused reference pass held {extra} bytes (limit {limit})"


def test_fused_logprobs_of_large_confident_logits_match_float64_truth():
    """Logits of magnitude ~1e3 whose label is the row's largest: plain fp32 PyTorch gets the
    label's log-prob nearly exactly (label logit minus max cancels), and so must the kernel;
    a logsumexp kept in base-2 units would round the max at |x| · 2^-24 and bias every token."""
    b = _batch(seed=57, vocab=1031, hidden=24)
    for key in ("h64", "h"):
        b[key] = b[key] * 300.0
    scored = b["labels"] != IGNORE_INDEX
    best = (b["h"].double() @ b["w"].double().t()).argmax(dim=1)
    b["labels"] = torch.where(scored, best, b["labels"])
    _check_against_truth(b, rel_margin=1e-6)


def test_fused_logprobs_at_the_edges_of_the_float_range_match_float64_truth():
    """Integer hidden states and weights, so that fp32 forms the logits exactly: logits near
    +-1e4 labelled at their max (the log-prob is (label - max) - log sum, exact, where max +
    log sum alone rounds at |max| 2^-24), and rows whose logits all lie below -1e30 (their own
    lse, not -inf). Several splits of several tiles, labels at the ragged tail's last column."""
    gen = torch.Generator().manual_seed(61)
    vocab, n = 1031, 12
    hidden = torch.randint(-3, 4, (n, 16), generator=gen).float()
    weight = torch.randint(-3, 4, (vocab, 16), generator=gen).float()
    hidden[:, 0] = torch.tensor([1.0, -1.0]).repeat(n // 2)
    weight[:, 0] = 1.0e4
    logits64 = hidden.double() @ weight.double().t()  # exact in fp32 too
    labels = logits64.argmax(dim=1)
    labels[::3] = vocab - 1
    tiles = {"BLOCK_M": 16, "BLOCK_N": 256, "BLOCK_K": 16}
    token, lse = fused_token_logprobs(hidden, weight, labels, tiles=tiles, splits=3)
    want = torch.log_softmax(logits64, dim=-1).gather(1, labels.unsqueeze(1)).squeeze(1)
    torch.testing.assert_close(token.double(), want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lse.double(), torch.logsumexp(logits64, dim=-1), rtol=1e-7, atol=0)

    # every logit -2e31 (below a -1e30 start of the running max): log-prob -log V
    weight[:, 0], weight[:, 1:] = -2.0e31, 0.0
    token, lse = fused_token_logprobs(hidden.abs(), weight, labels, tiles=tiles, splits=3)
    torch.testing.assert_close(token, torch.full((n,), -math.log(vocab)), rtol=1e-6, atol=0)
    assert torch.isfinite(lse).all()


def test_a_compiled_caller_runs_the_fused_head_eagerly_and_gets_its_numbers():
    """The fused head is no custom op: a compiled scoring function graph-breaks around it
    instead of tracing into the Triton launch (which failed under the interpreter)."""
    b = _batch(seed=17, vocab=211)
    args = (b["labels"], b["seq_ids"], b["num_seqs"])

    def score(h, w):
        with torch.no_grad():
            return fused_sequence_logprobs(h, w, *args) * 2.0

    eager = score(b["h"], b["w"])
    compiled = torch.compile(score, backend="aot_eager")(b["h"], b["w"])
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
    truth = 2.0 * _naive(b["h64"], b["w64"], *args)[2]
    torch.testing.assert_close(compiled.double(), truth, rtol=1e-5, atol=1e-5)
