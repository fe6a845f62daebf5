"""Shared-prompt packing changes no results: each prompt computed once (chosen and rejected
attend to the same prompt rows) gives the hidden states, log-probs, gradients, training steps
and scores of the ordinary layout, which stores the prompt twice; the packer's layout is
checked on a hand-made example and the bottom-right attention mask against float64 truth."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from functools import partial
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from sdpo.cache import CacheKey, RefLogprobCache, RefValues
from sdpo.config import config_from_dict
from sdpo.engine.attention import available_attention_backends, varlen_attention
from sdpo.engine.compile import compile_decoder_layers
from sdpo.engine.model import ModelConfig, init_model
from sdpo.engine.packing import (
    TokenizedPair,
    batch_by_token_budget,
    pack_pairs,
    pack_pairs_shared,
    to_device,
)
from sdpo.engine.scoring import score_pairs
from sdpo.engine.trainer import DPOTrainer, TrainConfig, plan_steps
from sdpo.kernels import sequence_logprobs
from sdpo.losses import LossConfig, dpo_loss
from sdpo.runner import run_training
from tests.conftest import write_pairs

BETA = 0.5


def tiny_config(*, tied: bool = False) -> ModelConfig:
    return ModelConfig.from_hf_dict(
        {
            "model_type": "llama",
            "vocab_size": 89,
            "hidden_size": 36,
            "intermediate_size": 56,
            "num_hidden_layers": 2,
            "num_attention_heads": 6,
            "num_key_value_heads": 2,
            "head_dim": 6,
            "tie_word_embeddings": tied,
        }
    )


def random_pairs(
    lengths: list[tuple[int, int, int]], *, vocab: int, seed: int
) -> list[TokenizedPair]:
    """Pairs with the given (prompt, chosen, rejected) lengths and fresh random ids."""
    gen = torch.Generator().manual_seed(seed)

    def ids(n: int) -> list[int]:
        return torch.randint(3, vocab, (n,), generator=gen).tolist()

    return [
        TokenizedPair(index=10 + i, prompt_ids=ids(p), chosen_ids=ids(c), rejected_ids=ids(r))
        for i, (p, c, r) in enumerate(lengths)
    ]


# odd lengths, prompts of different length, one-token completions and a one-token prompt
LENGTHS = [(7, 5, 9), (3, 1, 4), (11, 6, 1), (1, 3, 2), (5, 13, 7)]


def unshared_to_shared_rows(pairs: list[TokenizedPair]) -> torch.Tensor:
    """For every row of ``pack_pairs(pairs)``, the row of the shared stream that holds the same
    token at the same position (built by plain loops, independently of the packer)."""
    rows: list[int] = []
    start = 0
    for pair in pairs:
        p, c, r = len(pair.prompt_ids), len(pair.chosen_ids), len(pair.rejected_ids)
        prompt = list(range(start, start + p))
        rows += prompt + list(range(start + p, start + p + c))
        rows += prompt + list(range(start + p + c, start + p + c + r))
        start += p + c + r
    return torch.tensor(rows, dtype=torch.int64)


def float64_logprobs(hidden, weight, labels, seq_ids, num_seqs: int) -> torch.Tensor:
    """(S,) summed log-probs in float64 by the textbook formula (the head ops return fp32)."""
    logp = torch.log_softmax(hidden.double() @ weight.double().t(), dim=-1)  # (N, V)
    picked = logp.gather(1, labels.clamp(min=0)[:, None])[:, 0]
    picked = torch.where(labels != -100, picked, 0.0)
    return torch.zeros(num_seqs, dtype=torch.float64).index_add(0, seq_ids, picked)


def forward_both(model, pairs):
    """(unshared hidden (N, H), shared hidden (N_shared, H), the two batches)."""
    plain = pack_pairs(pairs)
    shared = pack_pairs_shared(pairs)
    h_plain = model(plain.input_ids, plain.position_ids, plain.cu_seqlens, plain.max_seqlen)
    h_shared = model(
        shared.input_ids,
        shared.position_ids,
        shared.cu_seqlens,
        shared.max_seqlen,
        shared_prefix=shared.shared_prefix,
    )
    return h_plain, h_shared, plain, shared


# -- the packer --------------------------------------------------------------------------


def test_shared_packer_builds_the_expected_layout_on_a_hand_made_example():
    pairs = [
        TokenizedPair(index=5, prompt_ids=[1, 2, 3], chosen_ids=[4, 5], rejected_ids=[6]),
        TokenizedPair(index=7, prompt_ids=[8], chosen_ids=[9], rejected_ids=[10, 11, 12]),
    ]
    b = pack_pairs_shared(pairs)
    # stream: pair 0 = rows 0-2 prompt, 3-4 chosen, 5 rejected; pair 1 = 6 prompt, 7, 8-10
    assert b.input_ids.tolist() == [1, 2, 3, 4, 5, 6, 8, 9, 10, 11, 12]
    assert b.position_ids.tolist() == [0, 1, 2, 3, 4, 3, 0, 1, 1, 2, 3]
    assert b.cu_seqlens.dtype == torch.int32 and b.cu_seqlens_k.dtype == torch.int32
    assert b.cu_seqlens.tolist() == [0, 5, 6, 8, 11]  # [prompt+chosen], [rejected] per pair
    assert b.cu_seqlens_k.tolist() == [0, 5, 9, 11, 15]  # [prompt+chosen], [prompt+rejected]
    assert (b.max_seqlen, b.max_seqlen_k) == (5, 5)
    assert b.kv_index.tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 5, 6, 7, 6, 8, 9, 10]
    # chosen 0: rows 2, 3 predict 4, 5; rejected 0: row 2 predicts 6; pair 1 likewise
    assert b.head_index.tolist() == [2, 3, 2, 6, 6, 8, 9]
    assert b.labels.tolist() == [4, 5, 6, 9, 10, 11, 12]
    assert b.seq_ids.tolist() == [0, 0, 1, 2, 3, 3, 3]
    assert b.completion_tokens.tolist() == [2, 1, 1, 3]
    assert b.pair_indices.tolist() == [5, 7]
    assert b.pair_head_tokens() == [3, 4]
    assert (b.num_pairs, b.num_seqs, b.num_tokens, b.unshared_tokens) == (2, 4, 11, 15)
    assert b.unshared_tokens == pack_pairs(pairs).num_tokens == sum(p.num_tokens for p in pairs)
    assert b.num_tokens == sum(p.num_shared_tokens for p in pairs)


def test_shared_head_rows_carry_the_unshared_layouts_labels_in_sequence_order():
    pairs = random_pairs(LENGTHS, vocab=50, seed=1)
    plain, shared = pack_pairs(pairs), pack_pairs_shared(pairs)
    scored = plain.labels != -100
    to_shared = unshared_to_shared_rows(pairs)
    assert torch.equal(shared.head_index, to_shared[scored])
    assert torch.equal(shared.labels, plain.labels[scored])
    assert torch.equal(shared.seq_ids, plain.seq_ids[scored])
    assert torch.equal(shared.completion_tokens, plain.completion_tokens)
    assert torch.equal(shared.input_ids[to_shared], plain.input_ids)
    assert torch.equal(shared.position_ids[to_shared], plain.position_ids)
    # the key layout is the unshared stream's rows, in the unshared order
    assert torch.equal(shared.kv_index, to_shared)


def test_shared_batch_moves_with_to_device_and_rejects_empty_parts():
    pairs = random_pairs([(4, 3, 2)], vocab=50, seed=2)
    moved = to_device(pack_pairs_shared(pairs), torch.device("cpu"))
    assert moved.kv_index.tolist() == pack_pairs_shared(pairs).kv_index.tolist()
    with pytest.raises(ValueError, match="no pairs"):
        pack_pairs_shared([])
    bad = TokenizedPair(index=3, prompt_ids=[1], chosen_ids=[2], rejected_ids=[])
    with pytest.raises(ValueError, match="pair 3 has an empty rejected completion"):
        pack_pairs_shared([bad])


# -- attention -----------------------------------------------------------------------------


def test_sdpa_bottom_right_mask_matches_float64_attention_over_the_concatenated_sequence():
    """A rejected completion's queries over keys [prompt, rejected] equal ordinary causal
    attention over [prompt, rejected] as one sequence, in float64, forward and backward."""
    pairs = random_pairs(LENGTHS, vocab=50, seed=3)
    shared = pack_pairs_shared(pairs)
    to_shared = unshared_to_shared_rows(pairs)
    n, hq, hkv, d = shared.num_tokens, 6, 2, 5
    gen = torch.Generator().manual_seed(4)
    q, k, v = (
        torch.randn(n, h, d, generator=gen, dtype=torch.float64).requires_grad_(True)
        for h in (hq, hkv, hkv)
    )
    out = varlen_attention(
        q,
        k.index_select(0, shared.kv_index),
        v.index_select(0, shared.kv_index),
        cu_seqlens=shared.cu_seqlens,
        max_seqlen=shared.max_seqlen,
        cu_seqlens_k=shared.cu_seqlens_k,
        max_seqlen_k=shared.max_seqlen_k,
        backend="sdpa",
    )  # (N_shared, Hq, D)

    # truth: dense softmax attention per unshared sequence, on the same rows
    plain = pack_pairs(pairs)
    qu, ku, vu = (t[to_shared] for t in (q, k, v))
    ku = ku.repeat_interleave(hq // hkv, dim=1)
    vu = vu.repeat_interleave(hq // hkv, dim=1)
    seq, pos = plain.seq_ids, plain.position_ids
    allowed = (seq[:, None] == seq[None, :]) & (pos[None, :] <= pos[:, None])
    scores = torch.einsum("ihd,jhd->hij", qu, ku) / math.sqrt(d)
    truth = torch.einsum(
        "hij,jhd->ihd", scores.masked_fill(~allowed, float("-inf")).softmax(-1), vu
    )
    # every unshared row's output is the shared row's output (prompt rows: chosen's copy)
    assert out.shape == (n, hq, d)
    torch.testing.assert_close(out[to_shared], truth, rtol=0, atol=1e-12)

    weight = torch.randn(n, hq, d, generator=gen, dtype=torch.float64)
    grads = torch.autograd.grad((out * weight).sum(), (q, k, v))
    # the shared stream has one output per prompt row: count the chosen copy only
    prompt_len = torch.tensor([len(p.prompt_ids) for p in pairs])[seq // 2]
    counted = (seq % 2 == 0) | (pos >= prompt_len)  # (N,)
    truth_grads = torch.autograd.grad(
        (truth * weight[to_shared] * counted[:, None, None]).sum(), (q, k, v)
    )
    for name, g, t in zip("qkv", grads, truth_grads):
        torch.testing.assert_close(g, t, rtol=0, atol=1e-12, msg=f"d{name}")


def test_key_layout_with_fewer_keys_than_queries_is_rejected():
    q = torch.randn(5, 2, 4)
    cu = torch.tensor([0, 5], dtype=torch.int32)
    with pytest.raises(ValueError, match="5 queries but only 3 keys"):
        varlen_attention(
            q,
            q[:3, :1],
            q[:3, :1],
            cu_seqlens=cu,
            max_seqlen=5,
            cu_seqlens_k=torch.tensor([0, 3], dtype=torch.int32),
            max_seqlen_k=3,
            backend="sdpa",
        )


# -- the model ------------------------------------------------------------------------------


@pytest.mark.parametrize("tied,window", [(False, None), (True, None), (False, 4)])
def test_shared_hidden_states_and_logprobs_equal_the_unshared_path_in_float64(
    one_thread, tied, window
):
    """With a sliding window (a Mistral's, shorter than most sequences) a rejected completion's
    queries see the window's last prompt rows as the unshared sequence's do."""
    config = tiny_config(tied=tied)
    if window is not None:
        config = dataclasses.replace(config, model_type="mistral", sliding_window=window)
    model = init_model(config, seed=5 + tied, dtype=torch.float64)
    pairs = random_pairs(LENGTHS, vocab=config.vocab_size, seed=6 + tied)
    with torch.no_grad():
        h_plain, h_shared, plain, shared = forward_both(model, pairs)
    # every row of the unshared stream (prompt copies included) has its twin in the shared one
    torch.testing.assert_close(
        h_shared[unshared_to_shared_rows(pairs)], h_plain, rtol=0, atol=1e-10
    )
    weight = model.lm_head_weight
    lp_plain = float64_logprobs(h_plain, weight, plain.labels, plain.seq_ids, plain.num_seqs)
    lp_shared = float64_logprobs(
        h_shared.index_select(0, shared.head_index),
        weight,
        shared.labels,
        shared.seq_ids,
        shared.num_seqs,
    )
    assert lp_plain.abs().min() > 0.5  # real log-probs, not zeros
    torch.testing.assert_close(lp_shared, lp_plain, rtol=0, atol=1e-10)


def test_shared_dpo_gradients_equal_the_unshared_path_in_float64(one_thread):
    config = tiny_config()
    base = init_model(config, seed=8, dtype=torch.float64)
    pairs = random_pairs(LENGTHS, vocab=config.vocab_size, seed=9)
    gen = torch.Generator().manual_seed(10)
    ref_c, ref_r = (torch.randn(len(pairs), generator=gen, dtype=torch.float64) for _ in "cr")
    loss_cfg = LossConfig(beta=BETA)

    def grads(share: bool) -> tuple[float, dict[str, torch.Tensor]]:
        model = copy.deepcopy(base)
        if share:
            batch = pack_pairs_shared(pairs)
            hidden = model(
                batch.input_ids,
                batch.position_ids,
                batch.cu_seqlens,
                batch.max_seqlen,
                shared_prefix=batch.shared_prefix,
            ).index_select(0, batch.head_index)
        else:
            batch = pack_pairs(pairs)
            hidden = model(batch.input_ids, batch.position_ids, batch.cu_seqlens, batch.max_seqlen)
        seq = float64_logprobs(
            hidden, model.lm_head_weight, batch.labels, batch.seq_ids, batch.num_seqs
        )
        loss = dpo_loss(seq[0::2], seq[1::2], ref_c, ref_r, config=loss_cfg).losses.mean()
        loss.backward()
        return float(loss.detach()), {n: p.grad for n, p in model.named_parameters()}

    loss_plain, g_plain = grads(False)
    loss_shared, g_shared = grads(True)
    assert loss_shared == pytest.approx(loss_plain, rel=1e-12)
    assert set(g_shared) == set(g_plain)
    # RMSNorm computes in float32 whatever the model's dtype, and a prompt row's gradient is
    # summed before that rounding in the shared layout and after it in the unshared one: the
    # gradients agree to float32 rounding (a wrong mask or head row is off by far more)
    for name, g in g_plain.items():
        scale = float(g.abs().max())
        assert scale > 0, name
        torch.testing.assert_close(g_shared[name], g, rtol=1e-5, atol=1e-6 * scale, msg=name)


# -- training and scoring -------------------------------------------------------------------


def run_train_steps(model, pairs, ref, *, share: bool, loss_path: str, steps: int = 2):
    config = TrainConfig(
        learning_rate=1e-3,
        pairs_per_step=4,
        max_tokens_per_batch=70,
        shuffle=False,
        warmup_ratio=0.0,
        schedule="constant",
        precision="fp32",
        loss_path=loss_path,
        share_prompt=share,
    )
    trainer = DPOTrainer(
        model,
        config=config,
        loss_fn=partial(dpo_loss, config=LossConfig(beta=BETA)),
        kernels_impl="torch",
        max_chunk_tokens=9 if loss_path == "fused" else None,
        progress=False,
    )
    plan = plan_steps(pairs, config, epoch=0)
    assert any(len(step) > 1 for step in plan[:steps]), "want gradient accumulation"
    return [
        {k: float(v) for k, v in trainer.train_step(pairs, micro, ref).items()}
        for micro in plan[:steps]
    ]


@pytest.mark.parametrize("loss_path", ["fused", "plain"])
def test_shared_train_steps_give_the_same_metrics_and_weights(one_thread, loss_path):
    config = tiny_config()
    pairs = random_pairs(LENGTHS + [(6, 8, 3), (2, 5, 5), (9, 2, 4)], vocab=89, seed=12)
    plain = init_model(config, seed=13)
    shared = copy.deepcopy(plain)
    ref = score_pairs(plain, pairs, max_tokens_per_batch=1000, impl="torch")
    gen = torch.Generator().manual_seed(14)
    ref.chosen_logps = ref.chosen_logps + 2 * torch.randn(len(pairs), generator=gen)
    ref.rejected_logps = ref.rejected_logps + 2 * torch.randn(len(pairs), generator=gen)

    m_plain = run_train_steps(plain, pairs, ref, share=False, loss_path=loss_path)
    m_shared = run_train_steps(shared, pairs, ref, share=True, loss_path=loss_path)
    assert m_plain[1]["loss"] != pytest.approx(m_plain[0]["loss"], rel=1e-4), "did not train"
    for a, b in zip(m_shared, m_plain):
        assert a.keys() == b.keys()
        for key in b:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key
    for (name, a), b in zip(shared.named_parameters(), plain.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_shared_train_step_under_compile_and_checkpointing_matches_eager(one_thread):
    config = tiny_config()
    pairs = random_pairs(LENGTHS + [(6, 8, 3), (2, 5, 5), (9, 2, 4)], vocab=89, seed=15)
    eager = init_model(config, seed=16)
    fast = copy.deepcopy(eager)
    compile_decoder_layers(fast, backend="aot_eager")
    fast.gradient_checkpointing = True
    ref = score_pairs(eager, pairs, max_tokens_per_batch=1000, impl="torch")
    gen = torch.Generator().manual_seed(17)
    ref.chosen_logps = ref.chosen_logps + 2 * torch.randn(len(pairs), generator=gen)
    m_eager = run_train_steps(eager, pairs, ref, share=False, loss_path="fused", steps=1)
    m_fast = run_train_steps(fast, pairs, ref, share=True, loss_path="fused", steps=1)
    for a, b in zip(m_fast, m_eager):
        for key in b:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key
    for (name, a), b in zip(fast.named_parameters(), eager.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_shared_scoring_equals_unshared_scoring_with_the_same_batches(one_thread):
    config = tiny_config(tied=True)
    model = init_model(config, seed=18)
    pairs = random_pairs(LENGTHS * 3, vocab=config.vocab_size, seed=19)
    budget = 60
    assert len(batch_by_token_budget(pairs, max_tokens=budget)) > 3
    plain = score_pairs(model, pairs, max_tokens_per_batch=budget, impl="torch")
    shared = score_pairs(model, pairs, max_tokens_per_batch=budget, impl="torch", share_prompt=True)
    assert torch.equal(shared.pair_indices, plain.pair_indices)
    assert torch.equal(shared.chosen_tokens, plain.chosen_tokens)
    torch.testing.assert_close(shared.chosen_logps, plain.chosen_logps, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(shared.rejected_logps, plain.rejected_logps, rtol=1e-5, atol=1e-5)


def test_train_config_share_prompt_must_be_a_bool():
    assert TrainConfig().share_prompt is False
    with pytest.raises(ValueError, match="share_prompt must be true or false"):
        TrainConfig(share_prompt="yes")


# -- the reference cache --------------------------------------------------------------------


def _key(**changes) -> CacheKey:
    fields = dict(
        model_fingerprint="m" * 64,
        data_fingerprint="d" * 64,
        tokenizer_fingerprint="t" * 64,
        max_length=64,
        max_prompt_length=32,
        truncation="keep_end",
        dtype_policy="bf16",
        kernels_impl="torch",
    )
    fields.update(changes)
    return CacheKey(**fields)


def test_reference_cache_is_not_shared_between_the_two_layouts(tmp_path: Path):
    gen = torch.Generator().manual_seed(20)
    values = RefValues(
        pair_indices=torch.arange(5, dtype=torch.int64),
        chosen_logps=torch.randn(5, generator=gen),
        rejected_logps=torch.randn(5, generator=gen),
        chosen_tokens=torch.full((5,), 3, dtype=torch.int64),
        rejected_tokens=torch.full((5,), 4, dtype=torch.int64),
    )
    plain_key, shared_key = _key(), _key(share_prompt=True)
    # the unshared key is the key written before the option existed (old caches stay valid)
    assert "share_prompt" not in plain_key.fields()
    assert shared_key.digest() != plain_key.digest()
    plain_file = RefLogprobCache(tmp_path / "plain.safetensors")
    plain_file.save(values, plain_key)
    assert plain_file.load(plain_key)[1] == "ok"
    assert plain_file.load(shared_key)[1].startswith("key mismatch: share_prompt")
    shared_file = RefLogprobCache(tmp_path / "shared.safetensors")
    shared_file.save(values, shared_key)
    assert shared_file.load(shared_key)[1] == "ok"
    assert shared_file.load(plain_key)[1].startswith("key mismatch: share_prompt")


def test_two_step_sdpo_run_with_shared_prompts_matches_the_unshared_run(
    one_thread, tiny_model_dir, tmp_path
):
    far = write_pairs(tmp_path / "far.jsonl", n=8, seed=1, kind="far")
    near = write_pairs(tmp_path / "near.jsonl", n=8, seed=2, kind="near")
    outputs = {}
    for share in (False, True):
        cfg = config_from_dict(
            {
                "output_dir": str(tmp_path / f"run-{share}"),
                "model": {"path": str(tiny_model_dir)},
                "data": {
                    "sources": [
                        {"name": "far", "path": str(far)},
                        {"name": "near", "path": str(near)},
                    ],
                    "max_length": 32,
                    "max_prompt_length": 16,
                },
                "train": {
                    "learning_rate": 3e-3,
                    "pairs_per_step": 4,
                    "max_tokens_per_batch": 96,
                    "share_prompt": share,
                },
                "kernels": {"impl": "torch"},
                "sdpo": {"steps": 2, "partition": "given", "report_scoring": False},
            }
        )
        run_training(cfg, progress=False)
        out = Path(cfg.output_dir)
        with safe_open(out / "cache" / "initial.safetensors", "pt") as f:
            assert ("key.share_prompt" in f.metadata()) == share  # the cache key says which
        outputs[share] = (
            [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()],
            load_file(out / "cache" / "step-2.safetensors"),  # scored by the step-1 model
            load_file(out / "step-2" / "model.safetensors"),
        )
    (m_plain, ref_plain, w_plain), (m_shared, ref_shared, w_shared) = outputs[False], outputs[True]
    assert len(m_shared) == len(m_plain) >= 4
    for a, b in zip(m_shared, m_plain):
        for key in ("loss", "rewards/margins", "logps/chosen", "logps/rejected", "tokens"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), key
    for name in ("chosen_logps", "rejected_logps"):
        torch.testing.assert_close(ref_shared[name], ref_plain[name], rtol=1e-5, atol=1e-4)
    for name, w in w_plain.items():
        torch.testing.assert_close(w_shared[name], w, rtol=1e-4, atol=1e-5, msg=name)


# -- CUDA backends ----------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("model_type", ["llama", "mistral"])
def test_every_cuda_backend_runs_the_shared_layout_like_the_unshared_one_in_bfloat16(model_type):
    """Bottom-right causal alignment of flash-attn / varlen_attn with more keys than queries:
    the shared layout in bf16 matches the float64 unshared truth as closely as bf16 allows,
    hidden states, log-probs and parameter gradients, on every available backend; a Mistral's
    window of 50 slides over the longer sequences (aligned bottom-right too)."""
    cuda = torch.device("cuda")
    config = ModelConfig.from_hf_dict(
        {
            "model_type": model_type,
            "sliding_window": 50,
            "vocab_size": 257,
            "hidden_size": 256,
            "intermediate_size": 512,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 64,
        }
    )
    # long and short prompts, a one-token completion, a rejected longer than prompt + chosen
    pairs = random_pairs([(37, 129, 64), (5, 1, 200), (128, 77, 3), (1, 9, 33)], vocab=257, seed=21)
    base = init_model(config, seed=22)
    truth_model = copy.deepcopy(base).to(cuda, torch.float64)
    truth_model.attn_backend = "sdpa"
    plain = to_device(pack_pairs(pairs), cuda)
    h_truth = truth_model(plain.input_ids, plain.position_ids, plain.cu_seqlens, plain.max_seqlen)
    seq_truth = float64_logprobs(
        h_truth.cpu(),
        truth_model.lm_head_weight.cpu(),
        plain.labels.cpu(),
        plain.seq_ids.cpu(),
        plain.num_seqs,
    )
    seq_truth.sum().backward()
    h_truth = h_truth.detach()
    g_truth = {n: p.grad.double() for n, p in truth_model.named_parameters()}
    to_shared = unshared_to_shared_rows(pairs).to(cuda)
    shared = to_device(pack_pairs_shared(pairs), cuda)
    windowed = config.sliding_window is not None
    for backend in available_attention_backends(cuda, sliding_window=windowed):
        model = copy.deepcopy(base).to(cuda, torch.bfloat16)
        model.attn_backend = backend
        hidden = model(
            shared.input_ids,
            shared.position_ids,
            shared.cu_seqlens,
            shared.max_seqlen,
            shared_prefix=shared.shared_prefix,
        )
        err = (hidden[to_shared].double() - h_truth).abs().max().item()
        scale = h_truth.abs().max().item()
        assert err < 3e-2 * scale, f"{backend}: max abs error {err} (scale {scale})"
        seq = sequence_logprobs(
            hidden.index_select(0, shared.head_index),
            model.lm_head_weight,
            shared.labels,
            shared.seq_ids,
            shared.num_seqs,
        )
        per_token = (seq.double().cpu() - seq_truth.detach()) / shared.completion_tokens.cpu()
        assert per_token.abs().max().item() < 2e-2, f"{backend}: log-prob error {per_token}"
        seq.sum().backward()
        for name, p in model.named_parameters():
            g, t = p.grad.double(), g_truth[name]
            rel = ((g - t).norm() / t.norm()).item()
            assert rel < 5e-2, f"{backend}: {name} gradient off by {rel:.3g} (relative norm)"
