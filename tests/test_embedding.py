"""The library API inside someone else's stack: a Hugging Face model (padded batches, its own
forward) with sdpo's log-prob op, DPO loss and reference cache, as the README shows."""

from __future__ import annotations

import pytest
import torch

from sdpo.cache import CacheKey, RefLogprobCache, RefValues
from sdpo.kernels import linear_pair_loss, sequence_logprobs
from sdpo.losses import LossConfig, dpo_loss, make_pair_loss

transformers = pytest.importorskip("transformers")


def _hf_model() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=131,
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return transformers.LlamaForCausalLM(config).eval()


def _padded_batch(seed: int):
    """4 rows = 2 pairs (chosen, rejected), right-padded; labels -100 on prompt and padding."""
    gen = torch.Generator().manual_seed(seed)
    lengths, prompt = [9, 6, 11, 4], [3, 3, 5, 5]
    T = max(lengths)
    ids = torch.randint(1, 131, (4, T), generator=gen)
    mask = torch.zeros(4, T, dtype=torch.long)
    labels = torch.full((4, T), -100)
    for b, (n, p) in enumerate(zip(lengths, prompt)):
        mask[b, :n] = 1
        labels[b, p - 1 : n - 1] = ids[b, p:n]  # position i predicts token i+1
    return ids, mask, labels


def test_sequence_logprobs_on_a_hugging_face_model_matches_float64_truth():
    model = _hf_model()
    ids, mask, labels = _padded_batch(1)
    hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, T, H)
    B, T, H = hidden.shape
    seq_ids = torch.arange(B).repeat_interleave(T)  # row index of every flattened position
    ours = sequence_logprobs(
        hidden.reshape(-1, H), model.lm_head.weight, labels.reshape(-1), seq_ids, B, impl="torch"
    )
    logits = (hidden.double() @ model.lm_head.weight.double().T).log_softmax(-1)  # (B, T, V)
    picked = logits.gather(-1, labels.clamp(min=0)[..., None])[..., 0] * (labels != -100)
    torch.testing.assert_close(ours.double(), picked.sum(-1), atol=1e-4, rtol=0)
    # and it is differentiable into the model's own parameters
    ours.sum().backward()
    assert model.model.layers[0].mlp.up_proj.weight.grad.abs().sum() > 0


def test_fused_pair_loss_and_cache_round_trip_in_an_outside_loop(tmp_path):
    model = _hf_model()
    ids, mask, labels = _padded_batch(2)
    B, T = ids.shape
    seq_ids = torch.arange(B).repeat_interleave(T)
    with torch.no_grad():  # the reference pass, cached to disk as a stack would do it
        hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
        ref = sequence_logprobs(
            hidden.reshape(-1, 48), model.lm_head.weight, labels.reshape(-1), seq_ids, B
        )
    counts = (labels != -100).sum(-1)
    values = RefValues(
        pair_indices=torch.tensor([0, 1]),
        chosen_logps=ref[0::2],
        rejected_logps=ref[1::2],
        chosen_tokens=counts[0::2],
        rejected_tokens=counts[1::2],
    )
    key = CacheKey(
        model_fingerprint="m",
        data_fingerprint="d",
        tokenizer_fingerprint="t",
        max_length=T,
        max_prompt_length=5,
        truncation="keep_end",
        dtype_policy="fp32",
        kernels_impl="torch",
    )
    cache = RefLogprobCache(tmp_path / "ref.safetensors")
    cache.save(values, key)
    cached, reason = cache.load(key)
    assert reason == "ok" and torch.equal(cached.chosen_logps, values.chosen_logps)

    cfg = LossConfig(beta=0.1)
    grads = []
    for fused in (True, False):
        model.zero_grad(set_to_none=True)
        hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state.reshape(-1, 48)
        if fused:
            pair_loss = make_pair_loss(
                cfg,
                ref_chosen=cached.chosen_logps,
                ref_rejected=cached.rejected_logps,
                normalizer=2,
            )
            loss, _ = linear_pair_loss(
                hidden, model.lm_head.weight, labels.reshape(-1), seq_ids, B, pair_loss=pair_loss
            )
            # policy == reference: every pair's loss is log 2
            assert float(loss.detach()) == pytest.approx(
                float(torch.log(torch.tensor(2.0))), abs=1e-5
            )
        else:
            seq = sequence_logprobs(
                hidden, model.lm_head.weight, labels.reshape(-1), seq_ids, B, impl="torch"
            )
            loss = dpo_loss(
                seq[0::2], seq[1::2], cached.chosen_logps, cached.rejected_logps, config=cfg
            ).losses.mean()
        loss.backward()
        grads.append(
            [
                model.lm_head.weight.grad.clone(),
                model.model.layers[1].mlp.down_proj.weight.grad.clone(),
            ]
        )
    for fused_grad, plain_grad in zip(*grads):
        assert plain_grad.abs().max() > 0
        torch.testing.assert_close(fused_grad, plain_grad, atol=1e-6, rtol=1e-4)
