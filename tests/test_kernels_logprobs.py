"""logprobs_from_logits (Triton under the interpreter, and the PyTorch reference) vs float64 truth.

Tolerance rule (Cut Cross-Entropy style): the op's error against float64 truth is no worse
than the error of plain PyTorch in the same dtype plus a small margin.
"""

import os

# The interpreter mode of Triton is fixed when triton.language is first imported: without a
# GPU the Triton kernels run interpreted; with one (the GPU-marked tests) they run compiled.
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from sdpo.kernels import logprobs_from_logits, resolve_impl  # noqa: E402
from sdpo.kernels.logprobs import IGNORE_INDEX  # noqa: E402
from tests.conftest import assert_no_worse, packed_labels  # noqa: E402

IMPLS = ["torch", "triton"]
VOCAB = 50_257  # not a multiple of any block size: the last block is a ragged tail


def _batch(seed: int, *, dtype=torch.float32, device="cpu"):
    """131 tokens over 3 sequences; sequence 1 has exactly one completion token."""
    gen = torch.Generator().manual_seed(seed)
    lengths, prompts = [61, 22, 48], [17, 20, 5]
    labels, seq_ids = packed_labels(lengths=lengths, prompts=prompts, vocab=VOCAB, gen=gen)
    assert int((labels[seq_ids == 1] != IGNORE_INDEX).sum()) == 1
    logits64 = torch.randn(sum(lengths), VOCAB, generator=gen, dtype=torch.float64) * 4.0
    return (
        logits64.to(device),
        logits64.to(dtype).to(device),
        labels.to(device),
        seq_ids.to(device),
        len(lengths),
    )


def _naive(logits: torch.Tensor, labels: torch.Tensor, seq_ids: torch.Tensor, num_seqs: int):
    """Plain PyTorch: log_softmax in the logits' dtype (float64 for truth), gather, index_add."""
    logp = torch.log_softmax(logits, dim=-1)
    picked = logp.gather(1, labels.clamp(min=0).unsqueeze(1)).squeeze(1)
    token = torch.where(labels != IGNORE_INDEX, picked, 0.0)
    seq = torch.zeros(num_seqs, dtype=token.dtype, device=token.device).index_add(0, seq_ids, token)
    return seq, token


@pytest.mark.parametrize("impl", IMPLS)
def test_token_and_sequence_logprobs_match_float64_truth(impl):
    logits64, logits, labels, seq_ids, s = _batch(seed=11)
    seq, token = logprobs_from_logits(logits, labels, seq_ids, s, impl=impl)
    assert seq.dtype == token.dtype == torch.float32
    assert seq.shape == (s,) and token.shape == labels.shape
    seq64, token64 = _naive(logits64, labels, seq_ids, s)
    seq32, token32 = _naive(logits, labels, seq_ids, s)
    assert_no_worse("token_logps", token, token32, token64, rel_margin=1e-6)
    assert_no_worse("seq_logps", seq, seq32, seq64, rel_margin=1e-6)
    assert torch.all(token[labels == IGNORE_INDEX] == 0)


@pytest.mark.parametrize("impl", IMPLS)
def test_logits_gradient_matches_float64_truth_and_is_zero_on_masked_rows(impl):
    logits64, logits, labels, seq_ids, s = _batch(seed=12)
    gen = torch.Generator().manual_seed(13)
    g_seq = torch.randn(s, generator=gen, dtype=torch.float64)
    g_tok = torch.randn(labels.shape[0], generator=gen, dtype=torch.float64)

    def fused(x):
        return logprobs_from_logits(x, labels, seq_ids, s, impl=impl)

    def naive(x):
        return _naive(x, labels, seq_ids, s)

    def grad_of(x, op):
        x = x.detach().clone().requires_grad_(True)
        seq, tok = op(x)
        ((seq * g_seq.to(seq.dtype)).sum() + (tok * g_tok.to(tok.dtype)).sum()).backward()
        return x.grad

    ours = grad_of(logits, fused)
    truth = grad_of(logits64, naive)
    baseline = grad_of(logits, naive)
    assert ours.dtype == logits.dtype
    assert_no_worse("grad_logits", ours, baseline, truth, rel_margin=1e-6)
    assert torch.all(ours[labels == IGNORE_INDEX] == 0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("offset", [30.0, 1.0e4])
def test_logits_gradient_stays_exact_near_the_max_however_large_the_logits(impl, offset):
    """Rows of logits around ``offset`` (30: an LLM's usual top logit), labelled at or near
    their max: the gradient's softmax is formed from x - max and log s, as the forward's
    log-prob is, so it is as close to float64 as plain fp32 PyTorch's. (exp(x - lse) with the
    rounded lse = max + log s scales every probability of a row by the same error,
    |max| 2^-24: the row's gradient no longer sums to 0, 30x plain PyTorch's error at 30 and
    5,000x at 1e4.)"""
    gen = torch.Generator().manual_seed(21)
    logits = torch.randn(12, 37, generator=gen) * 3.0 + offset
    labels = logits.argmax(dim=1)
    labels[::3] = torch.randint(0, 37, (4,), generator=gen)
    labels[5] = IGNORE_INDEX
    seq_ids = torch.arange(12) // 4
    g_seq = torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64)

    def grad_of(x, op):
        x = x.detach().clone().requires_grad_(True)
        seq, _ = op(x, labels, seq_ids, 3)
        (seq * g_seq.to(seq.dtype)).sum().backward()
        return x.grad

    def ours(*args):
        return logprobs_from_logits(*args, impl=impl)

    truth, baseline = grad_of(logits.double(), _naive), grad_of(logits, _naive)
    got = grad_of(logits, ours)
    assert_no_worse("grad_logits", got, baseline, truth, rel_margin=1e-7, factor=2.0)
    # each scored row's gradient sums to 0 (its probabilities to 1), to fp32 rounding
    assert got.double().sum(dim=1).abs().max().item() < 1e-6


@pytest.mark.parametrize("impl", IMPLS)
def test_inplace_backward_writes_the_gradient_into_the_logits(impl):
    _, logits, labels, seq_ids, s = _batch(seed=14)
    logits = logits[:40].contiguous()
    labels, seq_ids = labels[:40], seq_ids[:40]
    s = int(seq_ids.max()) + 1
    weights = torch.arange(1.0, s + 1)

    x = logits.clone().requires_grad_(True)
    seq, _ = logprobs_from_logits(x, labels, seq_ids, s, impl=impl)
    (seq * weights).sum().backward()

    # A non-leaf logits tensor, as in a model: the gradient overwrites it and flows on.
    base = logits.clone().requires_grad_(True)
    y = base * 1.0
    seq, _ = logprobs_from_logits(y, labels, seq_ids, s, impl=impl, inplace_backward=True)
    (seq * weights).sum().backward()
    torch.testing.assert_close(base.grad, x.grad, rtol=0, atol=1e-7)
    torch.testing.assert_close(y.detach(), x.grad, rtol=0, atol=1e-7)  # written in place


@pytest.mark.parametrize("impl", IMPLS)
def test_inplace_backward_on_rows_that_share_memory_gives_the_plain_gradient(impl):
    """Logits whose rows are one row in memory (``expand``, stride 0): the gradient cannot be
    written over them (every row would land on the same bytes, the last one written winning),
    so the op forms it in a new tensor, as without ``inplace_backward``."""
    gen = torch.Generator().manual_seed(19)
    row = torch.randn(1, 37, generator=gen)
    labels = torch.randint(0, 37, (4,), generator=gen)
    seq_ids = torch.tensor([0, 0, 1, 1])

    def grad(inplace: bool):
        leaf = row.clone().requires_grad_(True)
        seq, _ = logprobs_from_logits(
            leaf.expand(4, 37), labels, seq_ids, 2, impl=impl, inplace_backward=inplace
        )
        (seq * torch.tensor([1.0, -2.0])).sum().backward()
        return leaf.grad

    torch.testing.assert_close(grad(True), grad(False), rtol=0, atol=0)


@pytest.mark.parametrize("impl", IMPLS)
def test_strided_labels_and_transposed_logits_give_the_contiguous_results(impl):
    """A labels column of a wider tensor and logits stored vocabulary-major (a transposed view):
    the kernels read labels at offset i and need unit stride along the vocabulary."""
    _, logits, labels, seq_ids, s = _batch(seed=16)
    # rows 30..69: the end of sequence 0 (its last token unscored) and the start of sequence 1,
    # as rows 0..69 were (a program per row: the rows' number sets no block boundary)
    logits = logits[30:70].contiguous()
    labels, seq_ids = labels[30:70], seq_ids[30:70]
    s = int(seq_ids.max()) + 1
    wide = torch.stack([labels, torch.full_like(labels, 7)], dim=1)
    strided = wide[:, 0]
    assert strided.stride() == (2,) and torch.equal(strided, labels)
    transposed = logits.t().contiguous().t()
    assert transposed.stride(-1) != 1
    weights = torch.linspace(0.5, 2.0, s, dtype=torch.float64)

    def run(x, lab):
        x = x.detach().clone().requires_grad_(True) if x.is_contiguous() else x.detach()
        leaf = x if x.requires_grad else x.t().contiguous().t().requires_grad_(True)
        seq, tok = logprobs_from_logits(leaf, lab, seq_ids, s, impl=impl)
        ((seq * weights.float()).sum() + tok.sum()).backward()
        return seq, tok, leaf.grad

    want = run(logits, labels)
    for x, lab in ((logits, strided), (transposed, labels), (transposed, strided)):
        for a, b in zip(run(x, lab), want, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


# the interpreter runs the forward's log(0) and -inf - -inf of an all -inf row in NumPy
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("impl", IMPLS)
def test_unscored_rows_of_masked_out_logits_get_zero_gradient(impl):
    """Rows whose logits are all -inf (or all at the float minimum, a common mask value) and
    whose label is -100: their log-prob is 0 and their gradient 0, not NaN, and the other
    rows keep the values and gradients they have without them."""
    _, logits, labels, seq_ids, s = _batch(seed=17)
    logits = logits[:40].contiguous()
    labels, seq_ids = labels[:40].clone(), seq_ids[:40]
    s = int(seq_ids.max()) + 1
    masked = torch.zeros(40, dtype=torch.bool)
    masked[[3, 4, 20]] = True
    labels[masked] = IGNORE_INDEX
    weights = torch.linspace(0.5, 2.0, s)

    def run(x):
        x = x.clone().requires_grad_(True)
        seq, tok = logprobs_from_logits(x, labels, seq_ids, s, impl=impl)
        ((seq * weights).sum() + tok.sum()).backward()
        return seq, tok, x.grad

    want_seq, want_tok, want_grad = run(logits)
    for fill in (-float("inf"), torch.finfo(torch.float32).min):
        seq, tok, grad = run(logits.masked_fill(masked.unsqueeze(1), fill))
        assert bool((grad[masked] == 0).all()), f"fill {fill}: masked rows' gradient is not 0"
        torch.testing.assert_close(grad[~masked], want_grad[~masked], rtol=0, atol=0)
        torch.testing.assert_close(seq, want_seq, rtol=0, atol=0)
        torch.testing.assert_close(tok, want_tok, rtol=0, atol=0)


EDGE_VOCAB = 37  # one 64-wide block with a tail of 27 (under the interpreter too)
F32_MAX = torch.finfo(torch.float32).max


def _edge_rows():
    """fp32 rows of EDGE_VOCAB logits at the edges of the float range, and their labels: -inf
    logits (one being the label's own), logits near +-1e4 labelled at their max, rows of equal
    logits (one below -1e30, one at bf16's largest magnitude), a row spanning the float range
    (x - max overflows to -inf), labels at the last column."""
    gen = torch.Generator().manual_seed(31)
    x = torch.randn(10, EDGE_VOCAB, generator=gen) * 3.0
    x[0, [0, 20, EDGE_VOCAB - 1]] = -float("inf")  # first column, mid row, the tail's last
    x[1, 5] = -float("inf")  # the label's own logit
    x[2] += 1.0e4
    x[3] -= 1.0e4
    x[4] = 7.0
    x[5] = -1.0e31  # below the -1e30 a running max must not start at
    x[6] = float(torch.finfo(torch.bfloat16).max)
    x[7, :18] = -3.0e38  # x - max overflows to -inf there
    x[7, 18:] = 3.0e38
    x[8, :20] = -3.0e38
    labels = torch.full((10,), EDGE_VOCAB - 1)
    labels[1] = 5
    labels[2:4] = x[2:4].argmax(dim=1)  # the label near the max: its log-prob must stay exact
    return x, labels


def _edge_truth(x64: torch.Tensor, labels: torch.Tensor):
    """float64 token log-probs, log sum p^2 and entropy (0 log 0 = 0), all from x - max."""
    logp = torch.log_softmax(x64, dim=-1)
    p = logp.exp()
    entropy = -torch.where(p > 0, p * logp, 0.0).sum(dim=-1)
    tok = logp.gather(1, labels.unsqueeze(1)).squeeze(1)
    return tok, torch.logsumexp(2.0 * logp, dim=-1), entropy, p


# the interpreter runs 0 * -inf and -inf - -inf of the -inf tail and logits in NumPy
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("impl", IMPLS)
def test_rows_at_the_edges_of_the_float_range_match_float64(impl):
    """-inf logits add nothing to the entropy (0, not 0 * -inf = NaN); a label of -inf logit
    has log-prob -inf and a finite gradient; a row whose logits all lie below -1e30 has its own
    lse, not -inf; the label's log-prob is exact near the max however large the logits (lse =
    m + log s alone rounds at |m| 2^-24); log sum p^2 and the entropy are exact at bf16's
    range. Both implementations, against float64 on the same values."""
    from sdpo.kernels.logprobs import rows_backward, rows_forward

    x, labels = _edge_rows()
    tok64, lsq64, ent64, p64 = _edge_truth(x.double(), labels)
    logp, lse, lsq, stats = rows_forward(x, labels, impl=impl, with_lsq=True, with_stats=True)
    assert torch.isfinite(lse).all() and torch.isfinite(lsq).all()
    assert torch.isfinite(stats[:, 0]).all()
    assert logp[1].item() == -float("inf")
    for name, ours, want in (
        ("logp", logp, tok64),
        ("lsq", lsq, lsq64),
        ("entropy", stats[:, 0], ent64),
    ):
        ok = torch.isfinite(want)
        err = (ours.double()[ok] - want[ok]).abs() / want[ok].abs().clamp(min=1.0)
        assert err.max().item() < 2e-6, f"{name}: rows {err.tolist()}"
    # the mean logit and the top-1 flag of the rows whose logit sum fits in fp32
    mean, top1 = x[:6].double().mean(dim=1), (x[:6].argmax(dim=1) == labels[:6]).float()
    torch.testing.assert_close(stats[:6, 1].double(), mean, rtol=1e-6, atol=1e-6)
    assert torch.equal(stats[:6, 2], top1)

    grad = rows_backward(x, labels, lse, torch.full((10,), 0.5), impl=impl)
    assert torch.isfinite(grad).all()
    # rows of moderate logits: 0.5 (onehot - p), the -inf label's included (p = 0 there)
    want = -0.5 * p64
    want[torch.arange(10), labels] += 0.5
    rows = [0, 1, 4]
    torch.testing.assert_close(grad[rows].double(), want[rows], rtol=0, atol=4e-7)

    # a vocabulary of one token: log-prob 0, entropy 0, gradient 0
    one = torch.tensor([[3.5], [-1.0e31]])
    logp, lse, stats = rows_forward(
        one, torch.zeros(2, dtype=torch.long), impl=impl, with_stats=True
    )
    assert logp.tolist() == [0.0, 0.0] and stats[:, 0].tolist() == [0.0, 0.0]
    assert rows_backward(
        one, torch.zeros(2, dtype=torch.long), lse, torch.ones(2), impl=impl
    ).tolist() == [[0.0], [0.0]]


def test_torch_compile_can_call_logprobs_from_logits():
    _, logits, labels, seq_ids, s = _batch(seed=15)
    logits = logits[:50].contiguous()
    labels, seq_ids = labels[:50], seq_ids[:50]
    s = int(seq_ids.max()) + 1

    def total(x):
        seq, tok = logprobs_from_logits(x, labels, seq_ids, s, impl="torch")
        return seq.sum() * 2.0 + tok.square().sum()

    compiled = torch.compile(total, backend="eager")
    torch.testing.assert_close(compiled(logits), total(logits))


def test_resolve_impl_picks_torch_on_cpu_and_rejects_unknown_names():
    assert resolve_impl("auto", torch.device("cpu")) == "torch"
    assert resolve_impl("torch", torch.device("cpu")) == "torch"
    assert resolve_impl("triton", torch.device("cpu")) == "triton"
    with pytest.raises(ValueError, match="kernels.impl"):
        resolve_impl("cuda-fast", torch.device("cpu"))


def test_shape_errors_name_the_argument():
    logits = torch.randn(5, 7)
    with pytest.raises(ValueError, match="labels"):
        logprobs_from_logits(
            logits, torch.zeros(4, dtype=torch.int64), torch.zeros(5, dtype=torch.int64), 1
        )
    with pytest.raises(ValueError, match="seq_ids"):
        logprobs_from_logits(
            logits, torch.zeros(5, dtype=torch.int64), torch.zeros(3, dtype=torch.int64), 1
        )
    with pytest.raises(ValueError, match=r"labels\[2\] = 7 is outside the vocabulary"):
        logprobs_from_logits(
            logits, torch.tensor([0, -100, 7, 1, 6]), torch.zeros(5, dtype=torch.int64), 1
        )


def test_sequence_index_and_device_errors_name_the_problem():
    """seq_ids outside [0, num_seqs), a num_seqs that is no int, index tensors on another
    device: clear errors from every op, not an IndexError or uninitialised values."""
    from sdpo.kernels import sequence_logprobs
    from sdpo.kernels.fused_head import fused_sequence_logprobs

    gen = torch.Generator().manual_seed(3)
    h, w = torch.randn(5, 8, generator=gen), torch.randn(11, 8, generator=gen)
    logits = h @ w.t()
    labels = torch.tensor([0, -100, 7, 1, 6])
    cases = [
        (
            torch.tensor([0, 0, 1, 1, 2]),
            2,
            ValueError,
            r"seq_ids\[4\] = 2 is outside \[0, num_seqs = 2\)",
        ),
        (torch.tensor([0, -1, 0, 0, 0]), 1, ValueError, r"seq_ids\[1\] = -1 is outside"),
        (torch.zeros(5, dtype=torch.int64), 1.0, TypeError, "num_seqs must be an int, got float"),
        (torch.zeros(5, dtype=torch.int64), 0, ValueError, "num_seqs is 0 but there are 5 tokens"),
    ]
    ops = [
        lambda seq, s: logprobs_from_logits(logits, labels, seq, s, impl="torch"),
        lambda seq, s: sequence_logprobs(h, w, labels, seq, s, impl="torch"),
        lambda seq, s: fused_sequence_logprobs(h, w, labels, seq, s),
    ]
    for op in ops:
        for seq_ids, num_seqs, error, message in cases:
            with pytest.raises(error, match=message):
                op(seq_ids, num_seqs)
    meta = labels.to("meta")
    for op in (
        lambda: logprobs_from_logits(logits, meta, torch.zeros(5, dtype=torch.int64), 1),
        lambda: sequence_logprobs(
            h, w, labels, torch.zeros(5, dtype=torch.int64, device="meta"), 1
        ),
    ):
        with pytest.raises(ValueError, match="is on meta but the values are on cpu"):
            op()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("dtype", "rel_margin"), [(torch.float32, 1e-6), (torch.bfloat16, 1e-3)])
def test_triton_logprobs_on_cuda_match_float64_truth(dtype, rel_margin):
    assert resolve_impl("auto", torch.device("cuda")) == "triton"
    logits64, logits, labels, seq_ids, s = _batch(seed=21, dtype=dtype, device="cuda")
    seq, token = logprobs_from_logits(logits, labels, seq_ids, s, impl="triton")
    seq64, token64 = _naive(logits64, labels, seq_ids, s)
    seq_t, token_t = _naive(logits.float(), labels, seq_ids, s)  # PyTorch on the same bf16 logits
    assert_no_worse("token_logps", token, token_t, token64, rel_margin=rel_margin)
    assert_no_worse("seq_logps", seq, seq_t, seq64, rel_margin=rel_margin)

    g_seq = torch.randn(s, device="cuda", dtype=torch.float64)
    x = logits.clone().requires_grad_(True)
    (logprobs_from_logits(x, labels, seq_ids, s, impl="triton")[0] * g_seq.float()).sum().backward()
    x64 = logits64.clone().requires_grad_(True)
    (_naive(x64, labels, seq_ids, s)[0] * g_seq).sum().backward()
    xt = logits.clone().requires_grad_(True)
    (_naive(xt.float(), labels, seq_ids, s)[0] * g_seq.float()).sum().backward()
    assert_no_worse("grad_logits", x.grad, xt.grad, x64.grad, rel_margin=rel_margin, factor=1.5)
