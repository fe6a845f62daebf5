"""The in-memory sDPO loop (``sdpo.stepwise.run_sdpo``) and the Hugging Face wrapper
(``sdpo.engine.hf.PackedCausalLM``): the loop ends where the file-based runner ends on the same
settings, and a wrapped Hugging Face model computes what sdpo's own decoder computes."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sdpo.cache import RefValues
from sdpo.config import config_from_dict
from sdpo.engine.checkpoint import load_pretrained
from sdpo.engine.data import read_preference_file
from sdpo.engine.hf import PackedCausalLM
from sdpo.engine.packing import TokenizedPair
from sdpo.engine.scoring import PairLogps
from sdpo.engine.tokenize import PairTokenizer, tokenize_pairs
from sdpo.engine.trainer import TrainConfig
from sdpo.losses import LossConfig
from sdpo.runner import run_training
from sdpo.stepwise import run_sdpo
from tests.conftest import two_source_config, write_hf_model

transformers = pytest.importorskip("transformers")


def _pairs(cfg):
    tok = PairTokenizer.from_dir(cfg.model.path)
    rows = []
    for s in cfg.data.sources:
        rows += read_preference_file(s.path, source=s.name)
    pairs, _ = tokenize_pairs(
        rows,
        tok,
        max_length=cfg.data.max_length,
        max_prompt_length=cfg.data.max_prompt_length,
        truncation=cfg.data.truncation,
    )
    return pairs


def _config(tmp_path: Path, model_dir: Path, **sdpo):
    sdpo = {"partition": "easy_to_hard", "beta": [0.1, 0.2], **sdpo}
    return config_from_dict(
        two_source_config(tmp_path, model_dir, train={"log_every": 1}, sdpo=sdpo)
    )


@pytest.mark.parametrize("partition,steps", [("easy_to_hard", 2), ("random", 3)])
def test_run_sdpo_ends_where_the_runner_ends(
    tiny_model_dir, tmp_path, one_thread, partition, steps
):
    """Same weights bit for bit and the same per-step numbers, the report's scoring included,
    as ``sdpo train`` (CPU, fp32)."""
    betas = [0.1, 0.2, 0.15][:steps]
    cfg = _config(
        tmp_path, tiny_model_dir, partition=partition, steps=steps, beta=betas, report_scoring=True
    )
    result = run_training(cfg, progress=False)
    records: list[dict] = []
    model = load_pretrained(tiny_model_dir)
    reports = run_sdpo(
        model,
        _pairs(cfg),
        steps=steps,
        partition=partition,
        train=cfg.train,
        loss=cfg.loss,
        betas=cfg.sdpo.beta,
        source_order=["far", "near"],
        kernels_impl="torch",
        report_scoring=cfg.sdpo.report_scoring,
        log_hook=records.append,
    )
    final = load_file(Path(cfg.output_dir) / f"step-{steps}" / "model.safetensors")
    ours = model.state_dict()
    assert set(final) <= set(ours)
    for name, tensor in final.items():
        assert torch.equal(ours[name], tensor), name
    assert len(reports) == len(result.reports) == steps
    for a, b in zip(reports, result.reports, strict=True):
        assert (a.step, a.num_pairs, a.sources, a.beta) == (b.step, b.num_pairs, b.sources, b.beta)
        assert a.gamma_ref_chunk == b.gamma_ref_chunk
        assert a.gamma_ref_next_chunk == b.gamma_ref_next_chunk
        assert (a.gamma_ref_next_chunk is None) == (a.step == steps)
        assert a.reward_accuracy_before == b.reward_accuracy_before
        assert a.reward_accuracy_after == b.reward_accuracy_after is not None
        assert a.train_metrics["loss"] == b.train_metrics["loss"]
        # num_tokens counts on over the sDPO steps in both
        assert a.train_metrics["num_tokens"] == b.train_metrics["num_tokens"]
    assert reports[-1].train_metrics["num_tokens"] == records[-1]["num_tokens"]
    assert records[-1]["num_tokens"] > max(r["tokens"] for r in records)
    # each step starts from its reference: the first record's rewards are zero
    for t in range(1, steps + 1):
        first = next(r for r in records if r["sdpo_step"] == t)
        assert abs(first["rewards/chosen"]) < 1e-6 and abs(first["rewards/rejected"]) < 1e-6


def _hf_llama(model_dir: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float64, attn_implementation="sdpa"
    )


def test_a_wrapped_hugging_face_model_gives_each_sequence_its_own_hidden_states(tiny_model_dir):
    """float64: the packed stream through the wrapper equals each sequence run alone, and sdpo's
    own decoder on the same weights."""
    hf = _hf_llama(tiny_model_dir)
    wrapped = PackedCausalLM(hf)
    gen = torch.Generator().manual_seed(3)
    lengths = [7, 1, 13]
    ids = [torch.randint(0, hf.config.vocab_size, (n,), generator=gen) for n in lengths]
    stream = torch.cat(ids)
    positions = torch.cat([torch.arange(n) for n in lengths])
    cu = torch.tensor([0, 7, 8, 21], dtype=torch.int32)
    with torch.no_grad():
        packed = wrapped(stream, positions, cu, max(lengths))
        alone = torch.cat([hf.model(input_ids=x[None]).last_hidden_state[0] for x in ids])
        ours = load_pretrained(tiny_model_dir, dtype=torch.float64)(stream, positions, cu, 13)
    assert packed.shape == (21, hf.config.hidden_size)
    torch.testing.assert_close(packed, alone, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(packed, ours, rtol=1e-10, atol=1e-10)
    assert wrapped.lm_head_weight is hf.lm_head.weight
    with pytest.raises(ValueError, match="share_prompt"):
        wrapped(stream, positions, cu, 13, shared_prefix=object())


def test_run_sdpo_trains_a_wrapped_hugging_face_model_in_place(tiny_model_dir, tmp_path):
    """The wrapper's run matches sdpo's own decoder's run on the same weights (fp32), and the
    Hugging Face object the caller holds carries M_T."""
    cfg = _config(tmp_path, tiny_model_dir)
    pairs = _pairs(cfg)
    settings = dict(
        steps=2,
        partition="easy_to_hard",
        # a large adam_eps: Adam's first updates are near lr * sign(grad), so a gradient entry
        # near 0 would turn float rounding between two attention codes into a whole lr apart
        train=TrainConfig(
            learning_rate=3e-3, pairs_per_step=4, max_tokens_per_batch=128, adam_eps=1e-3
        ),
        loss=LossConfig(beta=0.1),
        kernels_impl="torch",
        source_order=["far", "near"],
    )
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    before = hf.model.layers[0].mlp.up_proj.weight.detach().clone()
    seen = []
    hf_reports = run_sdpo(  # wrapped in PackedCausalLM by run_sdpo
        hf, pairs, on_step_end=lambda r, m: seen.append((r.step, type(m))), **settings
    )
    own = load_pretrained(tiny_model_dir)
    own_reports = run_sdpo(own, pairs, **settings)
    assert seen == [(1, PackedCausalLM), (2, PackedCausalLM)]
    assert not torch.equal(hf.model.layers[0].mlp.up_proj.weight, before)
    hf_weights = dict(hf.named_parameters())
    for name, tensor in own.state_dict().items():
        torch.testing.assert_close(hf_weights[name], tensor, rtol=1e-4, atol=1e-5, msg=name)
    for a, b in zip(hf_reports, own_reports, strict=True):
        assert a.sources == b.sources
        assert a.gamma_ref_chunk == pytest.approx(b.gamma_ref_chunk, abs=1e-4)
        assert a.train_metrics["loss"] == pytest.approx(b.train_metrics["loss"], abs=1e-4)


def test_run_sdpo_refuses_bad_arguments_before_any_work(tiny_model_dir, tmp_path):
    cfg = _config(tmp_path, tiny_model_dir)
    pairs = _pairs(cfg)
    model = load_pretrained(tiny_model_dir)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    known = [p.index for p in pairs]
    cases = [
        (dict(partition="hardest_first"), "unknown partition"),
        (dict(partition=[known[:3]]), "1 chunks for steps = 2"),
        (dict(partition=[known[:3], [10_000]]), "not in pairs"),
        (dict(partition=[known[:3], known[2:5]]), "repeats"),
        (dict(partition=[known[:3], []]), "empty"),
        (dict(betas=[0.1]), "one per step"),
        (dict(steps=0), "positive int"),
        (dict(steps=len(pairs) + 1), "non-empty chunks"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            run_sdpo(model, pairs, **{"kernels_impl": "torch", **kwargs})
    with pytest.raises(TypeError, match="get_decoder"):
        PackedCausalLM(torch.nn.Linear(2, 2))
    # settings as a dict: named (an AttributeError on the first field read)
    with pytest.raises(
        TypeError, match=r"run_sdpo: loss must be a sdpo\.losses\.LossConfig, got dict"
    ):
        run_sdpo(model, pairs, loss={"beta": 0.1}, kernels_impl="torch")
    with pytest.raises(TypeError, match=r"run_sdpo: train must be a .*TrainConfig, got dict"):
        run_sdpo(model, pairs, train={"learning_rate": 1e-6}, kernels_impl="torch")
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, weights[name])


# the decoder shape of the in-memory transformers models here
_SHAPE = dict(
    vocab_size=48,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)


def _tiny_hf(*, dtype: torch.dtype = torch.float32, seed: int = 0):
    """A random Llama-family causal LM with tied embeddings, built in memory."""
    config = transformers.LlamaConfig(
        **_SHAPE,
        tie_word_embeddings=True,
        attn_implementation="sdpa",
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).to(dtype).eval()


def _hand_pairs(indices: list[int], *, vocab: int = 48, seed: int = 0) -> list[TokenizedPair]:
    gen = torch.Generator().manual_seed(seed)

    def ids(low: int, high: int) -> list[int]:
        n = int(torch.randint(low, high, (1,), generator=gen))
        return torch.randint(0, vocab, (n,), generator=gen).tolist()

    return [
        TokenizedPair(
            index=i, prompt_ids=ids(2, 6), chosen_ids=ids(1, 6), rejected_ids=ids(1, 6), source="s"
        )
        for i in indices
    ]


def test_run_sdpo_takes_any_int64_pair_indices(one_thread):
    """A caller's own ids (negative, sparse, near 2**63) train exactly as the ids 0..n-1 do: the
    reference lookup neither allocates by the largest id nor wraps a negative one around."""
    ids = [-7, 2**62, -1, 10**15, 0, 9]
    settings = dict(
        steps=2, train=TrainConfig(learning_rate=1e-2, pairs_per_step=3), kernels_impl="torch"
    )
    runs = []
    for indices in (list(range(len(ids))), ids):
        model = _tiny_hf()
        pairs = _hand_pairs(indices)
        chunks = [indices[:3], indices[3:]]
        reports = run_sdpo(model, pairs, partition=chunks, **settings)
        runs.append((model.state_dict(), [r.gamma_ref_chunk for r in reports]))
    (plain, plain_gamma), (own, own_gamma) = runs
    assert own_gamma == plain_gamma
    for name, tensor in plain.items():
        assert torch.equal(own[name], tensor), name


def test_reference_lookup_follows_a_replaced_index_column():
    """rows_for keeps its sorted view per table; a table whose pair_indices are replaced looks
    the new ones up, and a missing id is named."""
    n = 7
    table = PairLogps(
        pair_indices=torch.tensor([5, -3, 2**62, 0, 11, 4, 9]),
        chosen_logps=torch.randn(n),
        rejected_logps=torch.randn(n),
        chosen_tokens=torch.ones(n, dtype=torch.int64),
        rejected_tokens=torch.ones(n, dtype=torch.int64),
    )
    want = torch.tensor([2**62, -3, 9, 9])
    assert torch.equal(table.pair_indices[table.rows_for(want)], want)
    table.pair_indices = torch.tensor([6, 1, 3, 0, 2, 5, 4])
    assert table.rows_for(torch.tensor([0, 6, 4])).tolist() == [3, 0, 6]
    with pytest.raises(KeyError, match=r"\[9\]"):
        table.rows_for(torch.tensor([9]))


def test_the_wrapper_sets_the_whole_hugging_face_object_s_mode(one_thread):
    """run_sdpo leaves the model in training mode (as DPOTrainer.fit does): the object the caller
    holds says so too, not only the decoder inside it; eval() on the wrapper reaches it alike."""
    hf = _tiny_hf()
    run_sdpo(hf, _hand_pairs(range(4)), steps=2, partition="random", kernels_impl="torch")
    assert all(m.training for m in hf.modules())
    wrapped = PackedCausalLM(hf)
    wrapped.eval()
    assert not any(m.training for m in hf.modules())
    assert wrapped.train() is wrapped and all(m.training for m in hf.modules())


def test_training_leaves_no_gradients_behind(one_thread):
    """The last step's gradients are freed when each step's training ends: after run_sdpo the
    caller's own backward on the model gives exactly its own gradient, nothing added."""
    hf = _tiny_hf()
    pairs = _hand_pairs(range(4))
    run_sdpo(hf, pairs, steps=2, partition="random", kernels_impl="torch")
    assert all(p.grad is None for p in hf.parameters())
    ids = torch.tensor([pairs[0].prompt_ids + pairs[0].chosen_ids])
    hf(input_ids=ids, labels=ids).loss.backward()
    mine = {n: p.grad.clone() for n, p in hf.named_parameters()}
    hf.zero_grad(set_to_none=True)
    hf(input_ids=ids, labels=ids).loss.backward()
    for name, p in hf.named_parameters():
        assert torch.equal(p.grad, mine[name]), name


def test_peft_adapters_keep_fp32_over_a_bf16_model_and_alone_train(one_thread):
    """A bf16 model with PEFT LoRA adapters (fp32, as PEFT makes them) under precision "bf16":
    the adapters stay fp32, so updates near lr = 1e-5 (below a bf16 ulp of A's entries) are not
    rounded away; the frozen base is bitwise untouched and stays bf16."""
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(
        _tiny_hf(dtype=torch.bfloat16),
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    adapters = {n for n, p in model.named_parameters() if p.requires_grad}
    assert adapters and all(before[n].dtype == torch.float32 for n in adapters)
    run_sdpo(
        model,
        _hand_pairs(range(4)),
        steps=2,
        partition="random",
        train=TrainConfig(learning_rate=1e-5, precision="bf16", warmup_ratio=0.0),
        kernels_impl="torch",
    )
    for name, p in model.named_parameters():
        if name in adapters:
            assert p.dtype == torch.float32, name
            assert not torch.equal(p, before[name]), name
            # Adam moves each entry by at most lr per optimizer step (one per sDPO step here)
            assert (p - before[name]).abs().max() <= 2 * 1e-5 * 1.001, name
        else:
            assert p.dtype == torch.bfloat16 and torch.equal(p, before[name]), name


def test_run_sdpo_names_the_pair_of_a_bad_hand_built_id_before_any_work(one_thread):
    """A token id outside the model's vocabulary, or a pair index given twice, is refused with
    the pair and field named, before anything is scored or trained."""
    hf = _tiny_hf()
    weights = {k: v.clone() for k, v in hf.state_dict().items()}
    for value in (48, -2):
        pairs = _hand_pairs(range(4))
        pairs[2].rejected_ids[-1] = value
        k = len(pairs[2].rejected_ids) - 1
        with pytest.raises(
            ValueError, match=rf"pair 2: rejected_ids\[{k}\] holds token id {value}, .*48"
        ):
            run_sdpo(hf, pairs, steps=2, partition="random", kernels_impl="torch")
    with pytest.raises(ValueError, match=r"run_sdpo: pairs\[1\] and pairs\[3\] share the index 1"):
        run_sdpo(hf, _hand_pairs([0, 1, 3, 1, 3]), steps=2, kernels_impl="torch")
    with pytest.raises(TypeError, match="Linear has neither"):
        run_sdpo(torch.nn.Linear(2, 2), _hand_pairs(range(4)), kernels_impl="torch")
    for name, tensor in hf.state_dict().items():
        assert torch.equal(tensor, weights[name]), name


def test_run_sdpo_turns_off_a_hugging_face_model_s_dropout_for_the_run(tmp_path):
    """A Phi-3 built with dropout (residual and attention rates, the latter read by
    its attention modules in forward): trained with dropout off, each step starts at its
    reference (rewards 0, as under ``sdpo train``), and the caller's rates are back after."""
    rates = {"resid_pdrop": 0.3, "attention_dropout": 0.3}
    folder = write_hf_model(tmp_path / "phi3", "Phi3Config", pad_token_id=0, **rates)
    pairs = _pairs(_config(tmp_path, folder))
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    records = []
    run_sdpo(
        hf,
        pairs,
        steps=2,
        partition="random",
        train=TrainConfig(learning_rate=3e-3, pairs_per_step=4, max_tokens_per_batch=128),
        kernels_impl="torch",
        log_hook=records.append,
    )
    for t in (1, 2):
        first = next(r for r in records if r["sdpo_step"] == t)
        assert abs(first["rewards/chosen"]) < 1e-6 and abs(first["rewards/rejected"]) < 1e-6
    layer = hf.model.layers[0]
    assert layer.self_attn.attention_dropout == 0.3
    assert layer.resid_attn_dropout.p == layer.resid_mlp_dropout.p == 0.3


def _tiny_moe(*, seed: int = 0):
    """A random Qwen2-MoE (four experts, two per token, router coefficient 0.001)."""
    config = transformers.Qwen2MoeConfig(
        **_SHAPE,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=16,
        router_aux_loss_coef=0.001,
    )
    torch.manual_seed(seed)
    return transformers.Qwen2MoeForCausalLM(config).eval()


def test_run_sdpo_gives_a_lent_wrapper_its_own_router_coefficient_back(one_thread):
    """LossConfig(router_aux_loss_coef=...) weights the router loss of the run (the first loss
    is log 2 plus it times aux_loss), and a PackedCausalLM the caller passed has its
    own coefficient again after the run, whether it returns or raises, with no router loss
    left in it; the Hugging Face config is never touched."""
    model = PackedCausalLM(_tiny_moe())
    config = model.hf_model.config.to_dict()
    records: list[dict] = []
    settings = dict(
        steps=1,
        loss=LossConfig(router_aux_loss_coef=0.05),
        train=TrainConfig(learning_rate=1e-3),
        kernels_impl="torch",
        log_hook=records.append,
    )
    run_sdpo(model, _hand_pairs(range(2)), **settings)
    first = records[0]
    assert first["aux_loss"] > 1.0
    assert first["loss"] == pytest.approx(math.log(2) + 0.05 * first["aux_loss"], abs=1e-6)
    assert model.router_aux_loss_coef == 0.001 and model.pop_aux_loss() is None

    def stop(report, lent):
        assert lent.router_aux_loss_coef == 0.05
        raise RuntimeError("stopped by the caller")

    with pytest.raises(RuntimeError, match="stopped by the caller"):
        run_sdpo(model, _hand_pairs(range(2)), on_step_end=stop, **settings)
    assert model.router_aux_loss_coef == 0.001 and model.pop_aux_loss() is None
    assert model.hf_model.config.to_dict() == config


def test_a_multimodal_moe_trains_with_the_router_loss_of_its_text_config(one_thread):
    """Qwen3-VL-MoE's ForConditionalGeneration keeps its router settings (the coefficient,
    output_router_logits, the experts) in its text config alone, where TRL reads them: a
    training forward of the wrapper gives the router loss transformers computes on the padded
    batch, and run_sdpo adds it times that config's coefficient, as TRL does."""
    text = dict(
        **_SHAPE,
        head_dim=8,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        router_aux_loss_coef=0.02,
        rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [1, 1, 2]},
    )
    vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32)
    config = transformers.Qwen3VLMoeConfig(text_config=text, vision_config=vision)
    assert not hasattr(config, "router_aux_loss_coef")
    torch.manual_seed(0)
    hf = transformers.Qwen3VLMoeForConditionalGeneration(config).eval()
    model = PackedCausalLM(hf)
    assert model.router_aux_loss_coef == 0.02
    lengths = [5, 2, 4]
    ids = torch.randint(3, 48, (sum(lengths),), generator=torch.Generator().manual_seed(1))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    padded = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    for i, n in enumerate(lengths):
        padded[i, :n] = ids[cu[i] : cu[i + 1]]
    model.train()
    model(ids, torch.cat([torch.arange(n) for n in lengths]), cu, max(lengths))
    want = hf(input_ids=padded, attention_mask=(padded != 0).long(), output_router_logits=True)
    torch.testing.assert_close(model.pop_aux_loss(), want.aux_loss, rtol=1e-6, atol=1e-7)
    records: list[dict] = []
    run_sdpo(hf, _hand_pairs(range(2)), steps=1, kernels_impl="torch", log_hook=records.append)
    assert records[0]["aux_loss"] > 1.0
    assert records[0]["loss"] == pytest.approx(
        math.log(2) + 0.02 * records[0]["aux_loss"], abs=1e-6
    )


def test_trainer_and_scoring_name_the_wrapper_for_a_bare_hugging_face_model(one_thread):
    """A Hugging Face causal LM given to DPOTrainer or score_pairs as it is (run_sdpo wraps it,
    they do not) is refused up front with PackedCausalLM named, not by an AttributeError from
    inside transformers' mask code; the trainer leaves the model uncast."""
    from functools import partial

    from sdpo.engine.scoring import score_pairs
    from sdpo.engine.trainer import DPOTrainer
    from sdpo.losses import dpo_loss

    hf = _tiny_hf(dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="LlamaForCausalLM has no lm_head_weight.*PackedCausalLM"):
        score_pairs(hf, _hand_pairs(range(2)), max_tokens_per_batch=64, impl="torch")
    with pytest.raises(TypeError, match="DPOTrainer takes .*PackedCausalLM"):
        DPOTrainer(
            hf,
            config=TrainConfig(precision="fp32"),
            loss_fn=partial(dpo_loss, config=LossConfig()),
            kernels_impl="torch",
        )
    assert all(p.dtype == torch.bfloat16 for p in hf.parameters())


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_run_sdpo_under_no_grad_is_refused_before_any_work(one_thread, mode):
    """Called with gradients off (from an evaluation block), run_sdpo and DPOTrainer.fit say so
    up front, before the reference pass and with the weights untouched, not with PyTorch's
    "does not require grad" at the first backward; so does run_sdpo for a model whose every
    parameter is frozen."""
    from functools import partial

    from sdpo.engine.scoring import score_pairs
    from sdpo.engine.trainer import DPOTrainer
    from sdpo.losses import dpo_loss

    hf = _tiny_hf()
    weights = {k: v.clone() for k, v in hf.state_dict().items()}
    pairs = _hand_pairs(range(4))
    wrapped = PackedCausalLM(hf)
    ref = score_pairs(wrapped, pairs, max_tokens_per_batch=256, impl="torch")
    trainer = DPOTrainer(
        wrapped,
        config=TrainConfig(learning_rate=1e-2),
        loss_fn=partial(dpo_loss, config=LossConfig()),
        kernels_impl="torch",
        progress=False,
    )
    name = mode.__name__
    frozen = _tiny_hf().requires_grad_(False)  # nothing to train: refused alike
    with pytest.raises(ValueError, match="run_sdpo: LlamaForCausalLM has no trainable param"):
        run_sdpo(frozen, pairs, steps=2, partition="random", kernels_impl="torch")
    with pytest.raises(ValueError, match="DPOTrainer: PackedCausalLM has no trainable param"):
        DPOTrainer(
            PackedCausalLM(frozen), config=TrainConfig(), loss_fn=trainer.loss_fn, progress=False
        )
    with mode():
        with pytest.raises(RuntimeError, match=rf"run_sdpo trains .*inside torch.{name}\(\)"):
            run_sdpo(hf, pairs, steps=2, partition="random", kernels_impl="torch")
        with pytest.raises(RuntimeError, match=rf"DPOTrainer.fit trains .*torch.{name}\(\)"):
            trainer.fit(pairs, ref)
    for key, tensor in hf.state_dict().items():
        assert torch.equal(tensor, weights[key]), key


def test_scoring_and_training_name_a_bad_hand_built_id_and_keep_the_mode(one_thread):
    """score_pairs and DPOTrainer.fit called directly (without run_sdpo's check) name the pair
    and field of a token id outside the vocabulary, not torch's "index out of range in self"
    from the embedding, and fit refuses them, or reference values that lack a pair, before its
    first update; the scoring pass gives the model its training mode back as it raises."""
    from functools import partial

    from sdpo.engine.scoring import score_pairs
    from sdpo.engine.trainer import DPOTrainer
    from sdpo.losses import dpo_loss

    wrapped = PackedCausalLM(_tiny_hf()).train()
    pairs = _hand_pairs(range(3))
    ref = score_pairs(wrapped, pairs, max_tokens_per_batch=256, impl="torch")
    pairs[2].chosen_ids[0] = 100
    with pytest.raises(ValueError, match=r"pair 2: chosen_ids\[0\] holds token id 100, .*48"):
        score_pairs(wrapped, pairs, max_tokens_per_batch=256, impl="torch")
    assert all(m.training for m in wrapped.modules())
    weights = {k: v.clone() for k, v in wrapped.state_dict().items()}
    trainer = DPOTrainer(
        wrapped,
        config=TrainConfig(learning_rate=1e-2, pairs_per_step=1, memory_probe=False),
        loss_fn=partial(dpo_loss, config=LossConfig()),
        kernels_impl="torch",
        progress=False,
    )
    with pytest.raises(ValueError, match=r"pair 2: chosen_ids\[0\] holds token id 100"):
        trainer.fit(pairs, ref)
    with pytest.raises(TypeError, match=r"loss_fn must be .*got LossConfig; .*partial\(sdpo"):
        DPOTrainer(wrapped, config=TrainConfig(), loss_fn=LossConfig(), progress=False)
    with pytest.raises(TypeError, match=r"DPOTrainer: config must be a .*TrainConfig, got dict"):
        DPOTrainer(wrapped, config={}, loss_fn=trainer.loss_fn, progress=False)
    pairs[2].chosen_ids[0] = 1  # and reference values that lack the last pair
    with pytest.raises(KeyError, match=r"no reference values for pairs \[2\]"):
        trainer.fit(pairs, PairLogps(**_first_rows(ref, 2)))
    # reference values scored for other token ids with the same indices (a cache file of
    # another max_length or truncation): named by pair and counts, as the loss would read the
    # other completions' sums as these
    longer = [*pairs[:1], replace(pairs[1], rejected_ids=[*pairs[1].rejected_ids, 3]), pairs[2]]
    n = len(pairs[1].rejected_ids)
    with pytest.raises(ValueError, match=rf"fit: .*pair 1 count .* {n} rejected .* and {n + 1} "):
        trainer.fit(longer, ref)
    with pytest.raises(ValueError, match=rf"run_sdpo: .*pair 1 .* {n} rejected tokens"):
        run_sdpo(wrapped, longer, steps=1, reference=ref, kernels_impl="torch")
    # the table RefLogprobCache.load returns: named with its conversion (an AttributeError
    # at its first lookup), and run_sdpo refuses it before M0's scoring pass
    table = RefValues.from_scores(ref)
    with pytest.raises(TypeError, match=r"fit takes .* PairLogps .*got RefValues: .*to_pair_logps"):
        trainer.fit(pairs, table)
    with pytest.raises(TypeError, match=r"run_sdpo takes .* PairLogps .*got RefValues"):
        run_sdpo(wrapped, pairs, steps=2, reference=table, kernels_impl="torch")
    # a data set's rows given as pairs: named (an AttributeError deep in the batch planner)
    rows = [*pairs[:2], {"prompt_input_ids": [1], "chosen_input_ids": [2]}]
    with pytest.raises(TypeError, match=r"score_pairs: pairs\[2\] is a dict, not a TokenizedPair"):
        score_pairs(wrapped, rows, max_tokens_per_batch=256, impl="torch")
    with pytest.raises(TypeError, match=r"DPOTrainer.fit: pairs\[2\] is a dict"):
        trainer.fit(rows, ref)
    with pytest.raises(TypeError, match=r"run_sdpo: pairs\[2\] is a dict"):
        run_sdpo(wrapped, rows, steps=2, kernels_impl="torch")
    # two pairs sharing an index: both read one pair's reference values (run_sdpo refused it)
    twins = [*pairs, *_hand_pairs([0], seed=9)]
    with pytest.raises(ValueError, match=r"score_pairs: pairs\[0\] and pairs\[3\] share the "):
        score_pairs(wrapped, twins, max_tokens_per_batch=256, impl="torch")
    with pytest.raises(ValueError, match=r"DPOTrainer.fit: pairs\[0\] and pairs\[3\] share"):
        trainer.fit(twins, ref)
    for key, tensor in wrapped.state_dict().items():  # refused before the first update
        assert torch.equal(tensor, weights[key]), key


def test_a_float_or_bool_id_is_refused_before_any_forward_or_update(one_thread):
    """A float inside a later micro-batch was refused only when fit packed it, after the
    earlier optimizer steps had changed the weights (score_pairs: after the earlier batches'
    forwards), and a bool trained as token 0 or 1. fit, score_pairs and run_sdpo refuse
    either before any forward, naming the pair, field and position."""
    from functools import partial

    from sdpo.engine.scoring import score_pairs
    from sdpo.engine.trainer import DPOTrainer
    from sdpo.losses import dpo_loss

    wrapped = PackedCausalLM(_tiny_hf()).train()
    pairs = _hand_pairs(range(4))
    ref = score_pairs(wrapped, pairs, max_tokens_per_batch=256, impl="torch")
    weights = {k: v.clone() for k, v in wrapped.state_dict().items()}
    trainer = DPOTrainer(
        wrapped,
        config=TrainConfig(learning_rate=1e-2, pairs_per_step=1, shuffle=False, memory_probe=False),
        loss_fn=partial(dpo_loss, config=LossConfig()),
        kernels_impl="torch",
        progress=False,
    )
    forwards = []
    wrapped.register_forward_pre_hook(lambda *_: forwards.append(1))
    for value, message in ((8.5, r"8\.5, a float"), (True, r"True, a bool")):
        pairs[3].rejected_ids[1:2] = [value]  # in the last pair, the last optimizer step
        match = rf"pair 3: rejected_ids\[1\] is {message}; token ids must be ints"
        with pytest.raises(TypeError, match=match):
            trainer.fit(pairs, ref)
        with pytest.raises(TypeError, match=match):
            score_pairs(wrapped, pairs, max_tokens_per_batch=16, impl="torch")
        with pytest.raises(TypeError, match=match):
            run_sdpo(wrapped, pairs, steps=2, partition="random", kernels_impl="torch")
    assert not forwards
    for key, tensor in wrapped.state_dict().items():
        assert torch.equal(tensor, weights[key]), key


def _first_rows(table: PairLogps, n: int) -> dict:
    return {
        k: getattr(table, k)[:n]
        for k in (
            "pair_indices",
            "chosen_logps",
            "rejected_logps",
            "chosen_tokens",
            "rejected_tokens",
        )
    }
