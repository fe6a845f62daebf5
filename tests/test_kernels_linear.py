"""sequence_logprobs and linear_pair_loss (hidden + lm_head weight) vs float64 truth.

Triton runs under the interpreter in float32 (it mishandles bf16 dot), with a small vocabulary
for speed; the PyTorch path also gets a V=50,257 case and a bf16 case. Tolerance rule: error
vs float64 truth no worse than plain PyTorch in the same dtype plus a small margin.
"""

import os

# The interpreter mode of Triton is fixed when triton.language is first imported: without a
# GPU the Triton kernels run interpreted; with one (the GPU-marked tests) they run compiled.
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from sdpo.kernels import linear_pair_loss, sequence_logprobs  # noqa: E402
from sdpo.kernels.linear_logprobs import default_chunk_tokens  # noqa: E402
from sdpo.kernels.logprobs import IGNORE_INDEX  # noqa: E402

IMPLS = ["torch", "triton"]
BETA = 0.1


def _batch(seed: int, *, vocab: int = 1031, hidden: int = 67, dtype=torch.float32, device="cpu"):
    """131 tokens over 3 pairs (6 sequences); sequence 3 has exactly one completion token."""
    gen = torch.Generator().manual_seed(seed)
    lengths, prompts = [30, 19, 12, 9, 33, 28], [10, 10, 4, 7, 20, 20]
    labels, seq_ids = [], []
    for s, (length, prompt) in enumerate(zip(lengths, prompts)):
        lab = torch.randint(0, vocab, (length,), generator=gen)
        lab[:prompt] = IGNORE_INDEX
        lab[-1] = IGNORE_INDEX
        labels.append(lab)
        seq_ids.append(torch.full((length,), s, dtype=torch.int64))
    labels, seq_ids = torch.cat(labels), torch.cat(seq_ids)
    assert labels.shape == (131,) and int((labels[seq_ids == 3] != IGNORE_INDEX).sum()) == 1
    h64 = torch.randn(131, hidden, generator=gen, dtype=torch.float64)
    w64 = torch.randn(vocab, hidden, generator=gen, dtype=torch.float64) * (2.0 / hidden**0.5)
    ref = torch.randn(len(lengths), generator=gen, dtype=torch.float64) * 5 - 40
    to = dict(device=device)
    return dict(
        h64=h64.to(**to),
        w64=w64.to(**to),
        h=h64.to(dtype).to(**to),
        w=w64.to(dtype).to(**to),
        labels=labels.to(**to),
        seq_ids=seq_ids.to(**to),
        num_seqs=len(lengths),
        ref=ref.to(**to),
    )


def _naive_seq_logps(h, w, labels, seq_ids, num_seqs):
    """Plain PyTorch: full logits in the inputs' dtype, upcast to fp32 (or float64 for truth)."""
    logits = h @ w.t()
    logits = logits if logits.dtype == torch.float64 else logits.float()
    logp = torch.log_softmax(logits, dim=-1).gather(1, labels.clamp(min=0).unsqueeze(1)).squeeze(1)
    logp = torch.where(labels != IGNORE_INDEX, logp, 0.0)
    return torch.zeros(num_seqs, dtype=logp.dtype, device=logp.device).index_add(0, seq_ids, logp)


def _dpo_pair_loss(ref: torch.Tensor):
    ref_chosen, ref_rejected = ref[0::2], ref[1::2]

    def pair_loss(chosen, rejected, pairs: slice):
        margin = (chosen - ref_chosen[pairs].to(chosen.dtype)) - (
            rejected - ref_rejected[pairs].to(rejected.dtype)
        )
        return -F.logsigmoid(BETA * margin).sum()

    return pair_loss


def _grads(fn, h, w):
    h = h.detach().clone().requires_grad_(True)
    w = w.detach().clone().requires_grad_(True)
    out = fn(h, w)
    out.backward()
    return out.detach(), h.grad, w.grad


def _assert_no_worse(name, ours, baseline, truth, *, rel_margin: float, factor: float = 1.0):
    scale = truth.abs().max().item() + 1e-30
    err_ours = (ours.double() - truth).abs().max().item()
    err_base = (baseline.double() - truth).abs().max().item()
    assert err_ours <= factor * err_base + rel_margin * scale, (
        f"{name}: error {err_ours:.3e} vs float64 truth exceeds the same-dtype PyTorch error "
        f"{err_base:.3e} + margin {rel_margin * scale:.3e}"
    )


def _check_sequence_logprobs(b, *, impl, chunk_tokens, rel_margin, factor=1.0):
    coeff = torch.linspace(-1.0, 2.0, b["num_seqs"], dtype=torch.float64, device=b["h"].device)
    args = (b["labels"], b["seq_ids"], b["num_seqs"])

    def ours(h, w):
        seq = sequence_logprobs(h, w, *args, impl=impl, chunk_tokens=chunk_tokens)
        assert seq.dtype == torch.float32 and seq.shape == (b["num_seqs"],)
        return (seq * coeff.float()).sum()

    def naive(h, w):
        return (
            _naive_seq_logps(h, w, *args)
            * coeff.to(torch.float64 if h.dtype == torch.float64 else torch.float32)
        ).sum()

    got = _grads(ours, b["h"], b["w"])
    truth = _grads(naive, b["h64"], b["w64"])
    base = _grads(naive, b["h"], b["w"])
    for name, o, t, r in zip(("value", "grad_hidden", "grad_weight"), got, truth, base):
        _assert_no_worse(name, o, r, t, rel_margin=rel_margin, factor=factor)
    seq = sequence_logprobs(b["h"], b["w"], *args, impl=impl, chunk_tokens=chunk_tokens)
    _assert_no_worse(
        "seq_logps",
        seq,
        _naive_seq_logps(b["h"], b["w"], *args),
        _naive_seq_logps(b["h64"], b["w64"], *args),
        rel_margin=rel_margin,
        factor=factor,
    )


@pytest.mark.parametrize("impl", IMPLS)
def test_sequence_logprobs_and_grads_match_float64_truth_over_ragged_chunks(impl):
    # chunk of 48 tokens: 131 = 2 full chunks + a tail of 35, chunks cut through sequences
    _check_sequence_logprobs(_batch(seed=31), impl=impl, chunk_tokens=48, rel_margin=2e-6)


def test_sequence_logprobs_torch_matches_float64_truth_at_gpt2_vocab():
    _check_sequence_logprobs(
        _batch(seed=32, vocab=50_257, hidden=24), impl="torch", chunk_tokens=64, rel_margin=2e-6
    )


def test_sequence_logprobs_bf16_torch_is_no_worse_than_plain_bf16_pytorch():
    b = _batch(seed=33, dtype=torch.bfloat16)
    _check_sequence_logprobs(b, impl="torch", chunk_tokens=40, rel_margin=2e-3, factor=1.5)


@pytest.mark.parametrize("impl", IMPLS)
def test_reference_pass_without_grad_equals_the_training_forward(impl):
    b = _batch(seed=34)
    args = (b["labels"], b["seq_ids"], b["num_seqs"])
    h = b["h"].clone().requires_grad_(True)
    w = b["w"].clone().requires_grad_(True)
    train = sequence_logprobs(h, w, *args, impl=impl, chunk_tokens=48)
    assert train.requires_grad
    with torch.no_grad():
        ref = sequence_logprobs(h, w, *args, impl=impl, chunk_tokens=48)
        _, pair_ref = linear_pair_loss(
            h, w, *args, pair_loss=_dpo_pair_loss(b["ref"]), impl=impl, chunk_tokens=48
        )
    assert not ref.requires_grad
    assert torch.equal(ref, train.detach())
    # Pair chunks cut the stream elsewhere; the rows are the same, so the numbers agree.
    torch.testing.assert_close(pair_ref, ref, rtol=1e-6, atol=1e-5)
    # With the reference values equal to the policy's own, DPO rewards start at 0.
    _, seq_logps = linear_pair_loss(
        h, w, *args, pair_loss=_dpo_pair_loss(ref), impl=impl, chunk_tokens=48
    )
    rewards = BETA * (seq_logps - ref)
    assert torch.all(rewards.abs() < 1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_linear_pair_loss_gradients_equal_autograd_through_sequence_logprobs(impl):
    b = _batch(seed=35)
    args = (b["labels"], b["seq_ids"], b["num_seqs"])
    pair_loss = _dpo_pair_loss(b["ref"])

    def fused(h, w):
        # ~40 tokens per chunk: chunks of 1-2 pairs, and the 61-token pair gets its own.
        loss, seq_logps = linear_pair_loss(
            h, w, *args, pair_loss=pair_loss, impl=impl, chunk_tokens=40
        )
        assert not seq_logps.requires_grad
        return loss

    def through_sequence_logprobs(h, w):
        seq = sequence_logprobs(h, w, *args, impl=impl, chunk_tokens=48)
        return pair_loss(seq[0::2], seq[1::2], slice(None))

    def truth_fn(h, w):
        seq = _naive_seq_logps(h, w, *args)
        return pair_loss(seq[0::2], seq[1::2], slice(None))

    got = _grads(fused, b["h"], b["w"])
    composed = _grads(through_sequence_logprobs, b["h"], b["w"])
    truth = _grads(truth_fn, b["h64"], b["w64"])
    base = _grads(truth_fn, b["h"], b["w"])
    for name, g, c, t, r in zip(("loss", "grad_hidden", "grad_weight"), got, composed, truth, base):
        torch.testing.assert_close(g, c, rtol=1e-5, atol=1e-6 * t.abs().max().item(), msg=name)
        _assert_no_worse(name, g, r, t, rel_margin=2e-6)


def test_linear_pair_loss_scales_its_stored_gradients_by_the_upstream_gradient():
    b = _batch(seed=36)
    args = (b["labels"], b["seq_ids"], b["num_seqs"])
    pair_loss = _dpo_pair_loss(b["ref"])
    _, h1, w1 = _grads(
        lambda h, w: linear_pair_loss(h, w, *args, pair_loss=pair_loss, impl="torch")[0],
        b["h"],
        b["w"],
    )
    _, h3, w3 = _grads(
        lambda h, w: -3.0 * linear_pair_loss(h, w, *args, pair_loss=pair_loss, impl="torch")[0],
        b["h"],
        b["w"],
    )
    torch.testing.assert_close(h3, -3.0 * h1)
    torch.testing.assert_close(w3, -3.0 * w1)


def test_grad_weight_in_weight_dtype_matches_fp32_accumulation_in_fp32():
    b = _batch(seed=37)
    args = (b["labels"], b["seq_ids"], b["num_seqs"])
    pair_loss = _dpo_pair_loss(b["ref"])
    fp32 = _grads(
        lambda h, w: linear_pair_loss(
            h, w, *args, pair_loss=pair_loss, impl="torch", chunk_tokens=40
        )[0],
        b["h"],
        b["w"],
    )
    same = _grads(
        lambda h, w: linear_pair_loss(
            h, w, *args, pair_loss=pair_loss, impl="torch", chunk_tokens=40, grad_weight_dtype=None
        )[0],
        b["h"],
        b["w"],
    )
    torch.testing.assert_close(same[2], fp32[2], rtol=1e-5, atol=1e-7)


def test_torch_compile_can_call_sequence_logprobs():
    b = _batch(seed=38)
    args = (b["labels"], b["seq_ids"], b["num_seqs"])

    def total(h, w):
        return sequence_logprobs(h, w, *args, impl="torch").sum() * 0.5

    compiled = torch.compile(total, backend="eager")
    torch.testing.assert_close(compiled(b["h"], b["w"]), total(b["h"], b["w"]))


def test_pair_loss_rejects_odd_sequence_counts_and_unpacked_streams():
    b = _batch(seed=39)
    pair_loss = _dpo_pair_loss(b["ref"])
    with pytest.raises(ValueError, match="odd"):
        linear_pair_loss(
            b["h"], b["w"], b["labels"], b["seq_ids"].clamp(max=4), 5, pair_loss=pair_loss
        )
    with pytest.raises(ValueError, match="non-decreasing"):
        linear_pair_loss(b["h"], b["w"], b["labels"], b["seq_ids"].flip(0), 6, pair_loss=pair_loss)
    with pytest.raises(ValueError, match="hidden size"):
        sequence_logprobs(b["h"][:, :-1], b["w"], b["labels"], b["seq_ids"], 6)


def test_default_chunk_rule_keeps_chunks_near_256_mib_and_at_least_1024_tokens():
    assert default_chunk_tokens(vocab_size=32_000, hidden_size=4096, dtype=torch.bfloat16) == 4096
    assert default_chunk_tokens(vocab_size=128_256, hidden_size=4096, dtype=torch.bfloat16) == 1024
    assert default_chunk_tokens(vocab_size=1_000_000, hidden_size=4096, dtype=torch.float32) == 1024


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(
    ("dtype", "rel_margin", "factor"), [(torch.float32, 2e-6, 1.0), (torch.bfloat16, 2e-3, 1.5)]
)
def test_triton_linear_ops_on_cuda_match_float64_truth(dtype, rel_margin, factor):
    b = _batch(seed=41, vocab=50_257, hidden=256, dtype=dtype, device="cuda")
    _check_sequence_logprobs(
        b, impl="triton", chunk_tokens=48, rel_margin=rel_margin, factor=factor
    )
    args = (b["labels"], b["seq_ids"], b["num_seqs"])
    pair_loss = _dpo_pair_loss(b["ref"])

    def truth_fn(h, w):
        seq = _naive_seq_logps(h, w, *args)
        return pair_loss(seq[0::2], seq[1::2], slice(None))

    got = _grads(
        lambda h, w: linear_pair_loss(
            h, w, *args, pair_loss=pair_loss, impl="triton", chunk_tokens=40
        )[0],
        b["h"],
        b["w"],
    )
    truth = _grads(truth_fn, b["h64"], b["w64"])
    base = _grads(truth_fn, b["h"], b["w"])
    for name, g, t, r in zip(("loss", "grad_hidden", "grad_weight"), got, truth, base):
        _assert_no_worse(name, g, r, t, rel_margin=rel_margin, factor=factor)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_reference_pass_on_cuda_holds_one_chunk_of_logits_at_most():
    n, hidden, vocab, chunk = 4096, 512, 32_000, 1024
    h = torch.randn(n, hidden, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(vocab, hidden, device="cuda", dtype=torch.bfloat16) * 0.05
    labels = torch.randint(0, vocab, (n,), device="cuda")
    seq_ids = torch.arange(n, device="cuda") // 512
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with torch.no_grad():
        sequence_logprobs(h, w, labels, seq_ids, 8, impl="triton", chunk_tokens=chunk)
    extra = torch.cuda.max_memory_allocated() - base
    one_chunk = chunk * vocab * 2
    assert extra <= one_chunk + 16 * n * 4 + 2**20, (
        f"reference pass held {extra} bytes, one chunk is {one_chunk}"
    )
