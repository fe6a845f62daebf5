"""``model.implementation``: the runner and ``sdpo score`` on model types sdpo's own decoder does
not implement, run with transformers (``AutoModelForCausalLM`` in ``PackedCausalLM``): training,
step folders that reload with transformers, resume, LoRA, parity with sdpo's decoder, and the
settings refused before any work."""

from __future__ import annotations

import json
import math
import re
from functools import partial
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import sdpo.engine.hf as hf_mod
import sdpo.engine.trainer as trainer_mod
import sdpo.runner as runner_mod
from sdpo.cli import main
from sdpo.config import ConfigError, config_from_dict
from sdpo.engine import resume as resume_mod
from sdpo.engine.checkpoint import CheckpointError, check_model, load_model, save_pretrained
from sdpo.engine.data import read_preference_file
from sdpo.engine.packing import TokenizedPair
from sdpo.engine.scoring import score_pairs
from sdpo.engine.tokenize import PairTokenizer, tokenize_pairs
from sdpo.engine.trainer import TrainConfig, TrainingStopped
from sdpo.losses import LossConfig, dpo_loss
from sdpo.runner import RunInputError, run_training
from tests.conftest import two_source_config, write_hf_model, write_pairs

transformers = pytest.importorskip("transformers")


@pytest.fixture
def gemma_dir(tmp_path: Path) -> Path:
    """Gemma: not one of sdpo's decoders; scales its embeddings, ties lm_head to them. With an
    attention dropout, which training turns off (or the policy would leave its reference at
    once)."""
    return write_hf_model(tmp_path / "gemma", "GemmaConfig", attention_dropout=0.5)


def _config(tmp_path: Path, model_dir: Path, *, out: str = "run", **sections):
    train = {"pairs_per_step": 3, "save_every": 1, "keep_checkpoints": 3}
    train.update(sections.pop("train", {}))
    return config_from_dict(
        two_source_config(tmp_path, model_dir, out=out, far=6, near=5, train=train, **sections)
    )


def _records(out: Path) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "rewards/chosen" in r]


def _assert_each_step_starts_at_its_reference(out: Path, steps: int = 2) -> None:
    """Each sDPO step's first logged rewards are 0: the policy starts at its reference."""
    for t in range(1, steps + 1):
        first = next(r for r in _records(out) if r["sdpo_step"] == t)
        assert abs(first["rewards/chosen"]) < 1e-6 and abs(first["rewards/rejected"]) < 1e-6


def test_a_gemma_model_trains_resumes_and_its_steps_reload_with_transformers(
    gemma_dir, tmp_path, monkeypatch, capsys
):
    """Two sDPO steps of a tied-embedding Gemma: each step starts at its reference (rewards 0),
    step-<t>/ is a Hugging Face folder (the tie kept, lm_head stored once, gemma's config) whose
    transformers reload gives the logits of the trained weights in memory; ``--resume`` from
    inside step 2 ends at the same weights."""
    trained = {}
    save_step_end = runner_mod.StepwiseRunner._save_step_end

    def spy(self, model, **kwargs):
        hf = model.hf_model
        assert hf.lm_head.weight is hf.model.embed_tokens.weight  # the tie survived training
        trained[kwargs["t"]] = {k: v.clone() for k, v in hf.state_dict().items()}
        return save_step_end(self, model, **kwargs)

    monkeypatch.setattr(runner_mod.StepwiseRunner, "_save_step_end", spy)
    cfg = _config(tmp_path, gemma_dir)
    run_training(cfg, progress=False)
    assert "running it with transformers" in capsys.readouterr().out
    out = Path(cfg.output_dir)
    _assert_each_step_starts_at_its_reference(out)
    step = out / "step-2"
    config = json.loads((step / "config.json").read_text())
    assert config["model_type"] == "gemma" and config["dtype"] == "float32"
    assert config["attention_dropout"] == 0.5  # the folder's own rate, off while training
    assert "lm_head.weight" not in load_file(step / "model.safetensors")
    assert (step / "tokenizer.json").is_file()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(step, dtype=torch.float32)
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    memory = transformers.AutoModelForCausalLM.from_config(reloaded.config)
    memory.load_state_dict(trained[2])
    before = transformers.AutoModelForCausalLM.from_pretrained(gemma_dir, dtype=torch.float32)
    ids = torch.tensor([[1, 5, 9, 14, 3, 22]])
    with torch.no_grad():
        logits = reloaded(ids).logits
        torch.testing.assert_close(logits, memory.eval()(ids).logits, rtol=0, atol=0)
        assert not torch.allclose(logits, before(ids).logits)
    # sdpo loads its own step folder as the next run's model (auto: transformers again)
    assert hasattr(load_model(step), "hf_model")

    # stopped inside sDPO step 2 and resumed (the mid-step checkpoint holds a transformers
    # folder), the run ends bitwise where the uninterrupted one ended. Started with
    # model.checkpoint_every, which does nothing with checkpointing off: warned about, as for
    # sdpo's decoder, not refused; the resume leaves it out (a compute key that may change)
    cfg = _config(tmp_path, gemma_dir, out="resumed", model={"checkpoint_every": 2})
    monkeypatch.setattr(resume_mod, "_fault_counts", {})
    monkeypatch.setenv("SDPO_FAULT_AT", "train_step:3:TERM")
    with pytest.raises(TrainingStopped):
        run_training(cfg, progress=False)
    monkeypatch.delenv("SDPO_FAULT_AT")
    said = capsys.readouterr().out
    assert "warning: model.checkpoint_every = 2 does nothing while model.grad" in said
    assert not (Path(cfg.output_dir) / "step-2").exists()
    cfg = _config(tmp_path, gemma_dir, out="resumed")
    run_training(cfg, progress=False, resume=True)
    assert "model.checkpoint_every (2 -> 1)" in capsys.readouterr().out
    resumed = load_file(Path(cfg.output_dir) / "step-2" / "model.safetensors")
    uninterrupted = load_file(step / "model.safetensors")
    assert resumed.keys() == uninterrupted.keys()
    for name in resumed:
        assert torch.equal(resumed[name], uninterrupted[name]), name


def test_llama_under_transformers_trains_as_under_sdpo_s_decoder_in_float64(
    tiny_model_dir, tmp_path, monkeypatch
):
    """The same llama run with model.implementation "transformers" and "sdpo", its weights in
    float64: every step's weights agree to float64 rounding."""
    monkeypatch.setattr(runner_mod, "parameter_dtype", lambda precision: torch.float64)
    monkeypatch.setattr(trainer_mod, "parameter_dtype", lambda precision: torch.float64)
    # a large adam_eps: Adam's first updates are near lr * sign(grad), which would turn float
    # rounding of a gradient entry near 0 into a whole learning rate apart
    train = {"adam_eps": 1e-3, "save_every": 0}
    outs = {}
    for impl in ("sdpo", "transformers"):
        cfg = _config(
            tmp_path, tiny_model_dir, out=impl, model={"implementation": impl}, train=train
        )
        run_training(cfg, progress=False)
        outs[impl] = Path(cfg.output_dir)
    for t in (1, 2):
        ours = load_file(outs["sdpo"] / f"step-{t}" / "model.safetensors")
        theirs = load_file(outs["transformers"] / f"step-{t}" / "model.safetensors")
        assert ours.keys() == theirs.keys()
        initial = load_file(tiny_model_dir / "model.safetensors")
        for name in ours:
            assert ours[name].dtype == torch.float64
            assert not torch.equal(ours[name], initial[name].double()) or "norm" in name
            torch.testing.assert_close(theirs[name], ours[name], rtol=1e-10, atol=1e-12)


def test_lora_on_a_gemma_model_writes_an_adapter_peft_loads_onto_the_step_before(
    gemma_dir, tmp_path
):
    """sdpo's LoRA attaches to the transformers model by module name; step-2/adapter/ is in
    PEFT's layout: loaded onto step-1/ and merged it gives step-2/'s weights."""
    peft = pytest.importorskip("peft")
    cfg = _config(tmp_path, gemma_dir, lora={"rank": 4, "alpha": 8}, train={"save_every": 0})
    run_training(cfg, progress=False)
    out = Path(cfg.output_dir)
    adapter = load_file(out / "step-2" / "adapter" / "adapter_model.safetensors")
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in adapter
    base = transformers.AutoModelForCausalLM.from_pretrained(out / "step-1", dtype=torch.float32)
    merged = peft.PeftModel.from_pretrained(base, out / "step-2" / "adapter").merge_and_unload()
    step2 = load_file(out / "step-2" / "model.safetensors")
    ours = merged.state_dict()
    for name, tensor in step2.items():
        torch.testing.assert_close(ours[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    initial = load_file(gemma_dir / "model.safetensors")
    name = "model.layers.1.mlp.down_proj.weight"
    assert not torch.equal(step2[name], initial[name])


def test_sdpo_score_runs_a_gemma_model_with_its_own_log_probs(gemma_dir, tmp_path, capsys):
    """``sdpo score`` on a model type sdpo's decoder lacks: each completion's log-prob is the
    sum transformers' own logits give, sequence by sequence."""
    data = write_pairs(tmp_path / "pairs.jsonl", n=4, seed=3)
    out = tmp_path / "scores.jsonl"
    args = ["score", "--model", str(gemma_dir), "--data", str(data), "--out", str(out)]
    assert main([*args, "--no-progress", "--impl", "torch"]) == 0
    scores = [json.loads(line) for line in out.read_text().splitlines()]
    pairs, _ = tokenize_pairs(
        read_preference_file(data), PairTokenizer.from_dir(gemma_dir), max_length=1024
    )
    hf = transformers.AutoModelForCausalLM.from_pretrained(gemma_dir, dtype=torch.float32)
    for pair, row in zip(pairs, sorted(scores, key=lambda r: r["index"]), strict=True):
        for field, completion in (
            ("logp_chosen", pair.chosen_ids),
            ("logp_rejected", pair.rejected_ids),
        ):
            ids = torch.tensor([pair.prompt_ids + completion])
            with torch.no_grad():
                logps = hf(ids).logits[0, :-1].log_softmax(-1)
            targets = ids[0, 1:]
            picked = logps.gather(1, targets[:, None])[:, 0][len(pair.prompt_ids) - 1 :]
            assert row[field] == pytest.approx(float(picked.sum()), rel=1e-5, abs=1e-5)
    # sdpo score refuses what needs sdpo's decoder, and --implementation sdpo (the scores
    # written above, which --overwrite lets it replace, are kept)
    written = out.read_bytes()
    assert main([*args, "--overwrite", "--share-prompt"]) == 2
    assert "--share-prompt need sdpo's own decoder" in capsys.readouterr().err
    assert main([*args, "--overwrite", "--implementation", "sdpo"]) == 2
    assert "model.implementation" in capsys.readouterr().err
    assert out.read_bytes() == written


@pytest.mark.parametrize(
    "sections, key",
    [
        ({"model": {"compile": True}}, "model.compile"),
        ({"model": {"compile": True, "activation_memory_budget": 0.5}}, "activation_memory_budget"),
        (
            {"model": {"checkpoint_every": 2, "gradient_checkpointing": True}},
            "model.checkpoint_every = 2 with model.gradient_checkpointing",
        ),
        ({"model": {"attn_backend": "sdpa"}}, "model.attn_backend"),
        ({"train": {"fsdp": True}}, "train.fsdp"),
        ({"train": {"share_prompt": True}}, "train.share_prompt"),
    ],
)
def test_settings_that_need_sdpo_s_decoder_are_refused_before_any_work(
    gemma_dir, tmp_path, sections, key
):
    cfg = _config(tmp_path, gemma_dir, **sections)
    with pytest.raises(RunInputError, match=f"model_type 'gemma'.*{key}"):
        run_training(cfg, progress=False)
    assert not Path(cfg.output_dir).exists()


def test_the_implementation_key_is_checked_and_forces_or_refuses(
    gemma_dir, tiny_model_dir, tmp_path
):
    with pytest.raises(ConfigError, match="model.implementation = 'hf' is not an option"):
        _config(tmp_path, gemma_dir, model={"implementation": "hf"})
    cfg = _config(tmp_path, gemma_dir, model={"implementation": "sdpo"})
    with pytest.raises(RunInputError, match="'gemma' is not one sdpo's.*model.implementation"):
        run_training(cfg, progress=False)
    # "transformers" forces it for a llama model too, with the same refusals
    cfg = _config(
        tmp_path, tiny_model_dir, model={"implementation": "transformers", "compile": True}
    )
    with pytest.raises(RunInputError, match='implementation = "transformers".*model.compile'):
        run_training(cfg, progress=False)
    assert not Path(cfg.output_dir).exists()
    assert check_model(tiny_model_dir).implementation == "sdpo"
    assert check_model(tiny_model_dir, "transformers").implementation == "transformers"


def test_models_sdpo_cannot_train_with_transformers_are_refused(tmp_path):
    """LoRA where the projections are fused (Phi-3's qkv_proj), and a logit soft-cap that is
    not a positive number: refused before any work, naming the cause."""
    phi3 = write_hf_model(tmp_path / "phi3", "Phi3Config", pad_token_id=0)
    cfg = _config(tmp_path, phi3, lora={"rank": 4})
    with pytest.raises(RunInputError, match=r"no nn.Linear self_attn.q_proj"):
        run_training(cfg, progress=False)
    assert not Path(cfg.output_dir).exists()
    gemma2 = write_hf_model(tmp_path / "gemma2", "Gemma2Config", final_logit_softcapping=-1.0)
    with pytest.raises(CheckpointError, match="final_logit_softcapping must be a number > 0"):
        check_model(gemma2)
    # a multimodal Gemma 3 (AutoModelForCausalLM gives its ForConditionalGeneration): the head's
    # keys sit in its text config, where the wrapper reads them too
    for cap in (30.0, -1.0):
        text = {"hidden_size": 32, "num_hidden_layers": 1, "final_logit_softcapping": cap}
        vision = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2}
        gemma3 = transformers.Gemma3Config(text_config=text, vision_config=vision)
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(gemma3)
        if cap > 0:
            assert hf_mod.PackedCausalLM(model).logit_softcap == cap
        else:
            with pytest.raises(ValueError, match="final_logit_softcapping must be a number > 0"):
                hf_mod.check_head(model)
    # it is checked as any model: its context is its text config's
    text.update(final_logit_softcapping=None, vocab_size=64, max_position_embeddings=96)
    folder = tmp_path / "gemma3"
    transformers.AutoModelForCausalLM.from_config(
        transformers.Gemma3Config(text_config=text, vision_config=vision)
    ).save_pretrained(folder)
    assert check_model(folder).max_position_embeddings == 96


def test_a_doge_with_its_experts_off_has_no_router_loss_and_with_them_on_is_refused(tmp_path):
    """Doge's config has the router loss keys with its experts off by default (``is_moe``):
    its training forward adds no router loss (its decoder returns no router logits); with its
    experts on, its load-balancing function takes product keys sdpo does not pass: refused
    before any weight is read, naming the key that trains it without that loss."""
    dense = write_hf_model(tmp_path / "dense", "DogeConfig")
    model = load_model(dense)
    assert model.router_aux_loss_coef == 0.0
    model.train()
    ids = torch.arange(3, 12)
    model(ids, torch.cat([torch.arange(4), torch.arange(5)]), torch.tensor([0, 4, 9]), 5)
    assert model.pop_aux_loss() is None
    moe = write_hf_model(
        tmp_path / "moe", "DogeConfig", is_moe=True, num_experts=16, num_experts_per_tok=2
    )
    with pytest.raises(CheckpointError, match=r"takes arguments sdpo does not know \(num_keys\)"):
        check_model(moe)
    # loss.router_aux_loss_coef = 0 trains it without that loss, as 0 in config.json does
    assert check_model(moe, router_aux_loss_coef=0.0).implementation == "transformers"
    config = json.loads((moe / "config.json").read_text())
    (moe / "config.json").write_text(json.dumps({**config, "router_aux_loss_coef": 0.0}))
    assert check_model(moe).implementation == "transformers"
    # a coefficient other than 0 has no router loss to weight on it with its experts off
    with pytest.raises(CheckpointError, match=r"k = 0.1, but DogeForCausalLM .*experts are off"):
        check_model(dense, router_aux_loss_coef=0.1, router_key="k")
    assert check_model(dense, router_aux_loss_coef=0.0).implementation == "transformers"


def _write_moe(folder: Path, **overrides) -> Path:
    """A random-init tiny Qwen2-MoE folder (``write_hf_model``): four experts, two per token,
    unless ``overrides`` say otherwise."""
    settings = dict(
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=16,
    )
    return write_hf_model(folder, "Qwen2MoeConfig", **{**settings, **overrides})


def test_a_lora_run_of_a_moe_model_weights_its_router_loss_by_the_loss_config_s_coef(
    tmp_path, capsys
):
    """loss.router_aux_loss_coef with LoRA on a Qwen2-MoE (config's coefficient 0.001): the
    first step's loss, the policy at its reference, is log 2 plus the override times the
    logged router loss."""
    moe = _write_moe(tmp_path / "moe")
    cfg = _config(
        tmp_path,
        moe,
        lora={"rank": 2, "targets": ["q_proj", "v_proj"]},
        loss={"router_aux_loss_coef": 0.05},
        sdpo={"steps": 1},
    )
    run_training(cfg, progress=False)
    first = _records(Path(cfg.output_dir))[0]
    assert first["aux_loss"] > 1.0
    assert first["loss"] == pytest.approx(math.log(2) + 0.05 * first["aux_loss"], abs=1e-6)
    # smaller micro-batches may resume it (after running out of memory, say), and the log says
    # the result then changes beyond rounding: the router loss is each micro-batch's
    capsys.readouterr()
    cfg.train.max_tokens_per_batch //= 2
    resumed = runner_mod.StepwiseRunner(cfg, progress=False, resume=True)
    _, pairs = resumed.load_inputs()
    resumed.data_fp = runner_mod.data_fingerprint(pairs)
    assert resumed.find_resume_point() is not None  # what a resume checks before any work
    said = capsys.readouterr().out
    assert "train.max_tokens_per_batch (128 -> 64)" in said
    assert "beyond float rounding here: train.max_tokens_per_batch with a mixture of experts" in (
        said
    )


def test_loss_router_aux_loss_coef_without_a_router_loss_is_refused_before_any_work(
    tiny_model_dir, tmp_path
):
    """TRL's DPOConfig.router_aux_loss_coef: a number other than 0 on a model that is not a
    mixture of experts is an error (0 is accepted: there is nothing to turn off), before any
    work, under either implementation and through run_sdpo; a negative one is a config error."""
    from sdpo.losses import LossConfig
    from sdpo.stepwise import run_sdpo

    for implementation, why in (("sdpo", "llama model"), ("transformers", "output_router_logits")):
        cfg = _config(
            tmp_path,
            tiny_model_dir,
            model={"implementation": implementation},
            loss={"router_aux_loss_coef": 0.01},
        )
        with pytest.raises(
            RunInputError, match=rf"loss.router_aux_loss_coef = 0.01, but .*{why}.* set it to 0"
        ):
            run_training(cfg, progress=False)
        assert not Path(cfg.output_dir).exists()
        assert check_model(tiny_model_dir, implementation, router_aux_loss_coef=0.0)
    for model in (
        load_model(tiny_model_dir),
        load_model(tiny_model_dir, implementation="transformers"),
    ):
        with pytest.raises(ValueError, match="loss.router_aux_loss_coef = 0.5, but"):
            run_sdpo(model, [], loss=LossConfig(router_aux_loss_coef=0.5))
    with pytest.raises(ConfigError, match="loss.router_aux_loss_coef must be unset .* got -0.1"):
        _config(tmp_path, tiny_model_dir, loss={"router_aux_loss_coef": -0.1})


def test_a_moe_model_is_saved_with_the_names_transformers_saves(tmp_path):
    """transformers 5 fuses a Qwen2-MoE's experts on loading and splits them on saving: sdpo's
    checks accept the stored names, and its checkpoints hold the same names and values."""
    moe = _write_moe(tmp_path / "moe")
    assert check_model(moe).implementation == "transformers"
    model = load_model(moe)
    out = tmp_path / "saved"
    save_pretrained(model, out)
    stored, saved = load_file(moe / "model.safetensors"), load_file(out / "model.safetensors")
    assert saved.keys() == stored.keys()
    for name in stored:
        assert torch.equal(saved[name], stored[name]), name
    assert json.loads((out / "config.json").read_text())["model_type"] == "qwen2_moe"
    # a training forward keeps the router's load-balancing loss over the real tokens, as
    # transformers computes it on the padded batch with its mask (here the sequences run in
    # groups of similar length, one long among short ones); none without gradients
    lengths = [30, 2, 3, 2, 4, 1]
    ids = torch.randint(3, 40, (sum(lengths),), generator=torch.Generator().manual_seed(1))
    positions = torch.cat([torch.arange(n) for n in lengths])
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    model.train()
    model(ids, positions, cu, max(lengths))
    aux = model.pop_aux_loss()
    assert model.router_aux_loss_coef == 0.001 and model.pop_aux_loss() is None
    padded = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(padded)
    for i, n in enumerate(lengths):
        padded[i, :n] = ids[cu[i] : cu[i + 1]]
        mask[i, :n] = 1
    want = model.hf_model(input_ids=padded, attention_mask=mask, output_router_logits=True)
    torch.testing.assert_close(aux, want.aux_loss, rtol=1e-6, atol=1e-7)
    with torch.no_grad():
        model(ids, positions, cu, max(lengths))
    assert model.pop_aux_loss() is None
    # the eval pass asks for it in eval mode, without gradients (recording_router_loss)
    model.eval()
    with torch.no_grad(), model.recording_router_loss():
        model(ids, positions, cu, max(lengths))
        torch.testing.assert_close(model.pop_aux_loss(), aux.detach(), rtol=1e-6, atol=1e-7)
    model(ids, positions, cu, max(lengths))
    assert model.pop_aux_loss() is None
    # score_pairs(return_router_loss=True): each pair gets its batch's, the same log-probs
    pair = TokenizedPair(index=0, prompt_ids=[3, 4, 5], chosen_ids=[6, 7], rejected_ids=[8])
    score = partial(score_pairs, model, [pair], max_tokens_per_batch=64, impl="torch")
    plain, with_aux = score(), score(return_router_loss=True)
    assert plain.router_loss is None and float(with_aux.router_loss[0]) > 1.0
    assert torch.equal(with_aux.chosen_logps, plain.chosen_logps)
    assert torch.equal(with_aux.rejected_logps, plain.rejected_logps)
    model.set_router_aux_loss_coef(0.0)
    with pytest.raises(ValueError, match="return_router_loss: PackedCausalLM computes no"):
        score(return_router_loss=True)
    model.set_router_aux_loss_coef(None)
    model.train()
    # a PEFT model (run_sdpo takes one) keeps the router loss of the model it wraps, as TRL
    # adds it for one (the adapter starts at zero: the same loss)
    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(r=2, target_modules=["q_proj"])
    wrapped = hf_mod.PackedCausalLM(peft.get_peft_model(model.hf_model, lora))
    wrapped.train()
    wrapped(ids, positions, cu, max(lengths))
    assert wrapped.router_aux_loss_coef == 0.001
    torch.testing.assert_close(wrapped.pop_aux_loss(), aux, rtol=1e-6, atol=1e-7)
    # loss.router_aux_loss_coef (TRL's DPOConfig option) replaces the config's coefficient,
    # on a PEFT model too; 0 turns the loss off, no router logits computed
    for packed in (model, wrapped):
        packed.set_router_aux_loss_coef(0.05)
        packed(ids, positions, cu, max(lengths))
        assert packed.router_aux_loss_coef == 0.05
        torch.testing.assert_close(packed.pop_aux_loss(), aux, rtol=1e-6, atol=1e-7)
        packed.set_router_aux_loss_coef(0.0)
        packed(ids, positions, cu, max(lengths))
        assert packed.router_aux_loss_coef == 0.0 and packed.pop_aux_loss() is None
    peft_model = wrapped.hf_model
    assert hf_mod.PackedCausalLM(peft_model, router_aux_loss_coef=0.2).router_aux_loss_coef == 0.2
    # the trainer applies a loss config's coefficient: 0 leaves the aux_loss record out and
    # lets a micro-batch be split over ranks; unset keeps the model's
    on = hf_mod.PackedCausalLM(peft_model)
    for coef, want in ((None, 0.001), (0.0, 0.0), (0.3, 0.3)):
        trainer = trainer_mod.DPOTrainer(
            on,
            config=TrainConfig(),
            loss_fn=partial(dpo_loss, config=LossConfig(router_aux_loss_coef=coef)),
            progress=False,
        )
        assert on.router_aux_loss_coef == want
        assert trainer.whole_micro_batches == bool(want)
        assert ("aux_loss" in trainer._reduced_keys) == bool(want)


def test_auto_runs_a_llama_with_a_rotary_scaling_sdpo_lacks_under_transformers(tmp_path):
    # a supported model type whose config asks for what sdpo's decoder lacks (YaRN rotary
    # scaling, as long-context Qwen and DeepSeek configs set): "auto" hands it to transformers,
    # whose logits the wrapped model then gives; "sdpo" refuses it naming the key
    yarn = {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 128}
    folder = write_hf_model(tmp_path / "yarn", "LlamaConfig", rope_scaling=yarn)
    info = check_model(folder, "auto")
    assert info.implementation == "transformers"
    assert "rope_type 'yarn'" in info.unsupported
    with pytest.raises(CheckpointError, match="rope_type 'yarn'.*model.implementation"):
        check_model(folder, "sdpo")
    model = load_model(folder, implementation="auto")
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    ids = torch.arange(3, 40)
    ours = model(ids, torch.arange(ids.numel()), torch.tensor([0, ids.numel()]), ids.numel())
    assert torch.allclose(ours @ model.lm_head_weight.T, hf(ids[None]).logits[0], atol=1e-5)


def test_gradient_checkpointing_recomputes_a_transformers_model_to_the_same_gradients(gemma_dir):
    """model.gradient_checkpointing on a transformers model: transformers' own checkpointing,
    the gradients of a training pass equal to those without it."""
    ids = torch.arange(3, 30)
    cu = torch.tensor([0, 11, ids.numel()])
    positions = torch.cat([torch.arange(11), torch.arange(ids.numel() - 11)])
    grads = []
    for checkpointing in (False, True):
        model = load_model(gemma_dir)
        if checkpointing:
            model.enable_gradient_checkpointing()
        model.train()
        assert model.is_gradient_checkpointing == checkpointing
        hidden = model(ids, positions, cu, 16)
        (hidden @ model.lm_head_weight.T).log_softmax(-1)[:, 7].sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-6, atol=1e-7, msg=name)


def test_the_runner_turns_on_gradient_checkpointing_of_a_transformers_model(
    gemma_dir, tmp_path, monkeypatch
):
    seen = []
    load = runner_mod.load_model

    def spy(*args, **kwargs):
        model = load(*args, **kwargs)
        seen.append(model)
        return model

    monkeypatch.setattr(runner_mod, "load_model", spy)
    cfg = _config(tmp_path, gemma_dir, model={"gradient_checkpointing": True}, sdpo={"steps": 1})
    run_training(cfg, progress=False)
    assert seen and all(m.is_gradient_checkpointing for m in seen)


@pytest.mark.parametrize(
    "config_class, overrides",
    [("GraniteConfig", {"logits_scaling": 8.0}), ("CohereConfig", {"logit_scale": 0.0625})],
)
def test_a_constant_logit_scale_is_folded_into_the_hidden_states(tmp_path, config_class, overrides):
    # Granite divides its logits by logits_scaling, Cohere multiplies them by logit_scale: the
    # wrapped model's hidden states times lm_head.weight are transformers' logits exactly
    folder = write_hf_model(tmp_path / config_class, config_class, **overrides)
    model = load_model(folder)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    ids = torch.arange(3, 30)
    lengths = [10, ids.numel() - 10]
    positions = torch.cat([torch.arange(n) for n in lengths])
    with torch.no_grad():
        ours = model(ids, positions, torch.tensor([0, 10, ids.numel()]), max(lengths))
        logits = ours @ model.lm_head_weight.T
        for start, n in zip((0, 10), lengths, strict=True):
            theirs = hf(ids[None, start : start + n]).logits[0]
            torch.testing.assert_close(logits[start : start + n], theirs, rtol=1e-6, atol=1e-6)


@pytest.fixture
def gemma2_dir(tmp_path: Path) -> Path:
    """Gemma 2: its logits soft-capped, c * tanh(z / c), with c = 2 and weights of std 0.5 so
    that the cap bends the tiny model's logits (Gemma 2's own cap is 30)."""
    return write_hf_model(
        tmp_path / "gemma2", "Gemma2Config", final_logit_softcapping=2.0, initializer_range=0.5
    )


def test_sdpo_score_gives_a_soft_capped_model_the_log_probs_of_its_capped_logits(
    gemma2_dir, tmp_path
):
    """``sdpo score`` on Gemma 2: each completion's log-prob is the sum transformers' own
    (capped) logits give, and the uncapped logits would give other numbers."""
    data = write_pairs(tmp_path / "pairs.jsonl", n=3, seed=3)
    out = tmp_path / "scores.jsonl"
    args = ["score", "--model", str(gemma2_dir), "--data", str(data), "--out", str(out)]
    assert main([*args, "--no-progress"]) == 0
    scores = sorted(
        (json.loads(line) for line in out.read_text().splitlines()), key=lambda r: r["index"]
    )
    pairs, _ = tokenize_pairs(
        read_preference_file(data), PairTokenizer.from_dir(gemma2_dir), max_length=1024
    )
    # eager: the attention that applies Gemma 2's cap of the scores (an older transformers
    # picks SDPA by default, which leaves it out)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        gemma2_dir, dtype=torch.float32, attn_implementation="eager"
    )
    for pair, row in zip(pairs, scores, strict=True):
        for field, completion in (
            ("logp_chosen", pair.chosen_ids),
            ("logp_rejected", pair.rejected_ids),
        ):
            ids = torch.tensor([pair.prompt_ids + completion])
            targets = ids[0, 1:, None]
            start = len(pair.prompt_ids) - 1
            with torch.no_grad():
                out_ = hf(ids, output_hidden_states=True)
                capped = out_.logits[0, :-1].log_softmax(-1).gather(1, targets)[start:].sum()
                uncapped = hf.lm_head(out_.hidden_states[-1][0, :-1]).log_softmax(-1)
                uncapped = uncapped.gather(1, targets)[start:].sum()
            assert row[field] == pytest.approx(float(capped), rel=1e-5, abs=1e-5)
            assert abs(row[field] - float(uncapped)) > 1e-2


def test_a_soft_capped_model_trains_from_its_reference_and_its_steps_reload(
    gemma2_dir, tmp_path, capsys
):
    """Two sDPO steps of Gemma 2, with WPO's weighting and LD-DPO's length desensitization
    (the outputs only the kernels' fused path had): each step's first rewards are 0 (the
    reference pass and the training forward compute the same capped log-probs), the weights
    move, and step-2/ reloads with transformers and with sdpo, its cap kept."""
    cfg = _config(
        tmp_path,
        gemma2_dir,
        train={"save_every": 0},
        loss={"use_weighting": True, "ld_alpha": 0.5, "rpo_alpha": 0.5},
    )
    run_training(cfg, progress=False)
    assert "soft-capped (final_logit_softcapping = 2)" in capsys.readouterr().out
    out = Path(cfg.output_dir)
    _assert_each_step_starts_at_its_reference(out)
    step = out / "step-2"
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(step, dtype=torch.float32)
    assert reloaded.config.final_logit_softcapping == 2.0
    before = load_file(gemma2_dir / "model.safetensors")
    after = load_file(step / "model.safetensors")
    assert not torch.equal(
        after["model.layers.0.mlp.up_proj.weight"], before["model.layers.0.mlp.up_proj.weight"]
    )
    assert load_model(step).logit_softcap == 2.0


def test_a_model_without_an_sdpa_path_loads_with_eager_attention(tmp_path):
    # transformers 5 words the refusal "scaled_dot_product_attention", without "sdpa"
    folder = write_hf_model(tmp_path / "gemma2", "Gemma2Config", final_logit_softcapping=None)
    model = load_model(folder)
    assert model.hf_model.config._attn_implementation == "eager"


def test_a_model_that_caps_its_attention_scores_runs_eager_attention_where_sdpa_is_offered(
    tmp_path, monkeypatch
):
    """Gemma 2 caps its attention scores (attn_logit_softcapping), which SDPA cannot do. A
    transformers release that offers SDPA for it all the same (5.17 does, and its SDPA path
    leaves the cap out without a word) must not be taken up on it: the model runs eager
    attention, its logits transformers' eager model's."""
    import transformers

    folder = write_hf_model(
        tmp_path / "gemma2",
        "Gemma2Config",
        final_logit_softcapping=None,
        attn_logit_softcapping=1.0,
        initializer_range=0.2,
    )
    # Gemma 2 as such a release declares it
    monkeypatch.setattr(transformers.Gemma2PreTrainedModel, "_supports_sdpa", True)
    model = load_model(folder)
    assert model.hf_model.config._attn_implementation == "eager"
    eager = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager")
    ids = torch.arange(3, 12).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(
            model.hf_model(input_ids=ids).logits, eager(input_ids=ids).logits, rtol=0, atol=0
        )


def test_out_of_memory_training_a_soft_capped_model_points_at_its_head_s_chunk(
    gemma2_dir, tmp_path, monkeypatch
):
    # its head holds kernels.chunk_tokens rows of logits; kernels.max_chunk_tokens does nothing
    monkeypatch.setattr(resume_mod, "_fault_counts", {})
    monkeypatch.setenv("SDPO_FAULT_AT", "micro_batch:1:OOM")
    with pytest.raises(runner_mod.OutOfMemoryStop) as e:
        run_training(_config(tmp_path, gemma2_dir), progress=False)
    assert "kernels.chunk_tokens = 256 (now its default)" in str(e.value)
    assert "kernels.max_chunk_tokens" not in str(e.value)


def test_one_long_sequence_among_short_ones_is_not_padded_to_the_longest(tmp_path):
    """A micro-batch of one long and many short sequences: the wrapped decoder never runs on
    more than twice the real tokens (padding every sequence to the longest cost 8 times), and
    each sequence's logits are transformers' own on it alone; here a Mistral with a sliding
    window shorter than the long sequence, which transformers' SDPA masks apply under padding."""
    folder = write_hf_model(tmp_path / "mistral", "MistralConfig", sliding_window=4)
    model = load_model(folder, implementation="transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    calls = []
    model.model.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(kwargs["input_ids"].numel()), with_kwargs=True
    )
    lengths = [3, 2, 40, 5, 2, 6, 4, 3, 2, 1]
    _check_packed_against_each_alone(model, hf, lengths)
    assert sum(calls) <= 2 * sum(lengths) < len(lengths) * max(lengths)


def _check_packed_against_each_alone(model, hf, lengths: list[int]) -> None:
    """``model``'s logits of random sequences of ``lengths`` packed into one call are ``hf``'s
    (the transformers model) on each sequence alone."""
    gen = torch.Generator().manual_seed(0)
    seqs = [torch.randint(3, 40, (n,), generator=gen) for n in lengths]
    ids = torch.cat(seqs)
    positions = torch.cat([torch.arange(n) for n in lengths])
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    with torch.no_grad():
        logits = model(ids, positions, cu, max(lengths)) @ model.lm_head_weight.T
        want = torch.cat([hf(s[None]).logits[0] for s in seqs])
    torch.testing.assert_close(logits, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "config_class,overrides",
    [
        (  # Phi-3: long factors for the whole batch once a position passes 8
            "Phi3Config",
            dict(
                pad_token_id=0,
                original_max_position_embeddings=8,
                rope_parameters={
                    "rope_type": "longrope",
                    "rope_theta": 1e4,
                    "short_factor": [1.0, 1.5, 2.0, 3.0],
                    "long_factor": [2.0, 4.0, 8.0, 16.0],
                },
            ),
        ),
        (  # dynamic NTK: a base rescaled by the batch's longest position past 8
            "LlamaConfig",
            dict(
                max_position_embeddings=8,
                rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4},
            ),
        ),
    ],
)
def test_a_rotary_set_by_the_longest_position_rotates_each_sequence_as_alone(
    tmp_path, config_class, overrides
):
    """transformers picks longrope's factors (or dynamic NTK's base) from the longest position
    of the whole batch: a short sequence padded beside a long one would be rotated as the long
    one, so the wrapper runs them in separate decoder calls."""
    folder = write_hf_model(tmp_path / "m", config_class, **overrides)
    model = load_model(folder, implementation="auto")
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    _check_packed_against_each_alone(model, hf, [3, 20, 5, 2])


def test_the_fingerprint_of_a_transformers_model_follows_the_model_not_the_library(gemma_dir):
    """What a newer transformers adds to a config (a new key set to None, another value of an
    output switch or of the version) keeps the fingerprint that keys the reference caches and
    the resume check; another weight or architecture value changes it."""
    from sdpo.engine.checkpoint import model_fingerprint

    model = load_model(gemma_dir)
    before = model_fingerprint(model)
    config = model.hf_model.config
    config.use_some_new_feature = None
    config.id2label = {0: "A", 1: "B"}
    config.transformers_version = "99.0.0"
    assert model_fingerprint(model) == before
    config.rms_norm_eps = 1e-5
    assert model_fingerprint(model) != before
    config.rms_norm_eps = load_model(gemma_dir).hf_model.config.rms_norm_eps
    assert model_fingerprint(model) == before
    with torch.no_grad():
        model.hf_model.model.norm.weight[0] += 1
    assert model_fingerprint(model) != before


def test_a_transformers_model_s_fingerprint_ignores_where_its_version_puts_a_setting(tmp_path):
    """transformers moved StableLM's (and GLM's, Phi's, ...) partial_rotary_factor from the
    config's top into rope_parameters (5.17 wrote both, 5.24 the latter), spelled the rotary
    as rope_theta/rope_scaling {"type"} before 5, and adds output switches to config types:
    the same weights and settings keep their fingerprint, so that a resume after upgrading it
    is not refused as other weights; a setting of another value changes it. The fingerprint
    of the recipe before (every key of ``to_dict`` as it stood) is an earlier one of the
    same model, so that runs and caches it keyed stay valid."""
    import hashlib

    from transformers import PretrainedConfig

    from sdpo.engine.checkpoint import (
        earlier_model_fingerprints,
        model_fingerprint,
        model_state_dict,
    )

    model = load_model(write_hf_model(tmp_path / "m", "StableLmConfig"))
    config = model.hf_model.config
    assert config.to_dict()["rope_parameters"]["partial_rotary_factor"] == 0.25
    before = model_fingerprint(model)

    def before_recipe() -> str:
        d = config.to_dict()
        for key in (*hf_mod._VOLATILE_KEYS, *PretrainedConfig().to_dict(), "use_cache"):
            if key != "model_type":
                d.pop(key, None)
        d = {k: v for k, v in d.items() if v is not None}
        text = json.dumps({"transformers": "StableLmForCausalLM", "config": d}, sort_keys=True)
        h = hashlib.sha256(text.encode())
        for name, t in model_state_dict(model).items():
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
            h.update(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    assert before_recipe() in earlier_model_fingerprints(model)
    config.partial_rotary_factor = 0.25  # where 5.17 also wrote it
    config.output_router_logits = False
    assert model_fingerprint(model) == before
    rope = config.rope_parameters
    config.rope_parameters = None  # the spelling before transformers 5
    config.rope_theta, config.rope_scaling = rope["rope_theta"], {"type": "default"}
    assert model_fingerprint(model) == before
    config.partial_rotary_factor = 0.5  # another rotary, in either place
    assert model_fingerprint(model) != before
    config.partial_rotary_factor, config.rope_parameters = 0.25, {**rope, "rope_theta": 500.0}
    assert model_fingerprint(model) != before


def test_a_model_whose_logits_are_scaled_is_refused(tmp_path, monkeypatch):
    """Falcon-H1 multiplies its logits by lm_head_multiplier: refused before any weight is
    read, as the other scaled heads are; and a head transform no config key names is caught
    when the model loads, by its own logits on a few tokens."""
    falcon = write_hf_model(
        tmp_path / "falcon",
        "FalconH1Config",
        mamba_d_ssm=32,
        mamba_n_heads=4,
        mamba_d_head=8,
        mamba_d_state=8,
        mamba_chunk_size=8,
        lm_head_multiplier=0.5,
    )
    with pytest.raises(CheckpointError, match="lm_head_multiplier = 0.5"):
        check_model(falcon)
    # Granite's logits_scaling, as if no key named it (so no factor folds it in)
    granite = write_hf_model(tmp_path / "granite", "GraniteConfig", logits_scaling=4.0)
    monkeypatch.setattr(hf_mod, "_LOGIT_SCALES", {})
    with pytest.raises(CheckpointError, match="GraniteForCausalLM .* computes logits other"):
        load_model(granite)


def test_sdpo_score_refuses_pairs_longer_than_the_context_and_applies_a_sliding_window(
    tmp_path, capsys
):
    """``sdpo score`` names the row of a pair longer than the model's context, as ``sdpo
    train`` does; a Mistral's pairs longer than its sliding window score on sdpo's decoder
    ("auto") to the log-probs transformers gives them."""
    data = write_pairs(tmp_path / "pairs.jsonl", n=3, seed=3)
    mistral = write_hf_model(tmp_path / "mistral", "MistralConfig", sliding_window=3)
    short = write_hf_model(tmp_path / "short", "GemmaConfig", max_position_embeddings=6)
    args = ["score", "--data", str(data), "--no-progress", "--impl", "torch"]
    scores = {}
    for implementation in ("sdpo", "transformers"):
        out = tmp_path / f"{implementation}.jsonl"
        run = [*args, "--model", str(mistral), "--implementation", implementation]
        assert main([*run, "--out", str(out)]) == 0
        scores[implementation] = [json.loads(line) for line in out.read_text().splitlines()]
    # a prompt of two or more words and a completion of two or more tokens pass the window
    assert any(r["chosen_tokens"] >= 2 for r in scores["sdpo"])
    for ours, theirs in zip(scores["sdpo"], scores["transformers"], strict=True):
        for key in ("logp_chosen", "logp_rejected"):
            assert ours[key] == pytest.approx(theirs[key], rel=1e-5, abs=1e-4)
    assert main([*args, "--model", str(short)]) == 2
    assert "max_position_embeddings 6); pass --max-length <= 6" in capsys.readouterr().err


def test_a_missing_tensor_is_refused_before_work_even_beside_names_transformers_converts(
    tmp_path,
):
    """Stored names the model does not have (experts stored one by one, a stray tensor) do not
    hide a missing one: the check follows transformers' own renaming and fusing, so a missing
    weight is refused before any work, not when the model is loaded."""
    from safetensors.torch import save_file

    moe = _write_moe(tmp_path / "moe", num_hidden_layers=1, num_experts=2)
    assert check_model(moe).implementation == "transformers"  # the experts fuse on loading
    stored = load_file(moe / "model.safetensors")

    def refused(drop: str, add: str | None, missing: str) -> None:
        tensors = {k: v for k, v in stored.items() if not re.search(drop, k)}
        if add is not None:
            tensors[add] = torch.zeros(2)
        save_file(tensors, moe / "model.safetensors", metadata={"format": "pt"})
        with pytest.raises(CheckpointError, match=rf"missing tensors \['{re.escape(missing)}'"):
            check_model(moe)

    q = "model.layers.0.self_attn.q_proj.weight"
    refused(re.escape(q), None, q)
    refused(re.escape(q), "model.layers.0.stray.weight", q)
    # one of the two sources of the fused gate and up projection (every expert's up_proj)
    refused(r"experts\.\d+\.up_proj", None, "model.layers.0.mlp.experts.gate_up_proj")


def test_one_expert_s_missing_tensor_is_refused_before_work_naming_it(tmp_path):
    """A MoE folder that lacks one expert's tensor (the other experts' stored: transformers
    stacks them into one tensor and fails on loading) is refused by the pre-work check, which
    names the folder and the tensor, and by ``sdpo train`` before its output folder exists; a
    whole expert missing is refused too."""
    from safetensors.torch import save_file

    moe = _write_moe(tmp_path / "moe", num_hidden_layers=1)
    stored = load_file(moe / "model.safetensors")
    expert = "model.layers.0.mlp.experts.{}.{}_proj.weight"

    def without(*names: str) -> None:
        kept = {k: v for k, v in stored.items() if k not in names}
        assert len(kept) == len(stored) - len(names)
        save_file(kept, moe / "model.safetensors", metadata={"format": "pt"})

    without(expert.format(3, "up"))
    with pytest.raises(CheckpointError) as caught:
        check_model(moe)
    said = str(caught.value)
    assert f"weights in {moe} lack ['{expert.format(3, 'up')}']" in said, said
    assert "model.layers.0.mlp.experts.gate_up_proj" in said
    cfg = _config(tmp_path, moe)
    with pytest.raises(RunInputError, match=re.escape(expert.format(3, "up"))):
        run_training(cfg, progress=False)
    assert not Path(cfg.output_dir).exists()
    # the last expert whole: every source of both stacked tensors lacks index 3
    without(*(expert.format(3, p) for p in ("gate", "up", "down")))
    with pytest.raises(CheckpointError, match="lack") as caught:
        check_model(moe)
    for p in ("gate", "up", "down"):
        assert expert.format(3, p) in str(caught.value)
    without()  # every tensor stored again: the check passes
    assert check_model(moe).implementation == "transformers"


# A step's first rewards under bf16 (on the CPU and on CUDA): the scoring pass and the training
# forward run the same weights, but in padded batches of other shapes, whose matmuls may round
# differently in bf16; beta times such differences stays well under 2e-3. A policy that leaves its
# reference (attention dropout left on, say) gives 5e-2 or more on these models (measured on the
# CPU), and their rewards after one update exceed 1e-2.
BF16_REWARD_TOL = 2e-3
# A step's loss under bf16 or bf16-mixed against fp32's on the CPU, after up to three updates (a
# bf16 weight rounds each update to half an ulp of itself): measured 3e-3 at most on the 2-step
# Gemma run below, whose loss moves by 6e-2 over the run.
BF16_LOSS_TOL = 5e-3


def _hf_logps(model, pairs) -> tuple[torch.Tensor, torch.Tensor]:
    """Each pair's summed chosen and rejected log-probs under a transformers model, one
    sequence at a time in float64 (the completion's tokens given the prompt)."""
    sums = []
    for pair in pairs:
        for completion in (pair.chosen_ids, pair.rejected_ids):
            ids = torch.tensor([pair.prompt_ids + completion])
            with torch.no_grad():
                logps = model(ids).logits[0, :-1].double().log_softmax(-1)
            taken = logps.gather(1, ids[0, 1:, None])[len(pair.prompt_ids) - 1 :]
            sums.append(taken.sum())
    return torch.stack(sums[0::2]), torch.stack(sums[1::2])


def _no_plot(monkeypatch) -> None:
    """Skip the end-of-run figure (about a second a run on the CPU) where a test reads none."""
    monkeypatch.setattr(runner_mod, "plot_steps", lambda *args: True)


def test_a_separate_reference_gives_each_step_s_start_its_log_probs(tmp_path, monkeypatch):
    """``sdpo.reference`` naming another Gemma: each sDPO step's first rewards are beta times
    the step's policy (the initial model, then step-1/) minus the reference's log-probs, each
    as transformers computes it, not 0."""
    # weights of std 0.2: logits far from uniform, so the two models' log-probs differ
    gemma_dir = write_hf_model(tmp_path / "gemma", "GemmaConfig", initializer_range=0.2)
    ref_dir = write_hf_model(tmp_path / "ref", "GemmaConfig", seed=7, initializer_range=0.2)
    _no_plot(monkeypatch)
    # one optimizer step per chunk (6 and 5 pairs): a step's first rewards cover its chunk
    cfg = _config(
        tmp_path,
        gemma_dir,
        train={"pairs_per_step": 6, "save_every": 0},
        sdpo={"reference": str(ref_dir)},
    )
    run_training(cfg, progress=False)
    out = Path(cfg.output_dir)
    pairs, _ = tokenize_pairs(
        [r for s in cfg.data.sources for r in read_preference_file(s.path, source=s.name)],
        PairTokenizer.from_dir(gemma_dir),
        max_length=cfg.data.max_length,
        max_prompt_length=cfg.data.max_prompt_length,
    )
    load = transformers.AutoModelForCausalLM.from_pretrained
    ref_chosen, ref_rejected = _hf_logps(load(ref_dir, dtype=torch.float64), pairs)
    beta = cfg.loss.beta
    for t, policy_dir in ((1, gemma_dir), (2, out / "step-1")):
        chunk = [i for i, p in enumerate(pairs) if p.source == ("far", "near")[t - 1]]
        chosen, rejected = _hf_logps(
            load(policy_dir, dtype=torch.float64), [pairs[i] for i in chunk]
        )
        first = next(r for r in _records(out) if r["sdpo_step"] == t)
        want_chosen = beta * float((chosen - ref_chosen[chunk]).mean())
        want_rejected = beta * float((rejected - ref_rejected[chunk]).mean())
        assert abs(want_chosen) > 1e-2 and abs(want_rejected) > 1e-2  # not the policy itself
        assert first["rewards/chosen"] == pytest.approx(want_chosen, rel=1e-4, abs=1e-6)
        assert first["rewards/rejected"] == pytest.approx(want_rejected, rel=1e-4, abs=1e-6)


def test_bf16_runs_start_at_their_reference_lose_what_fp32_loses_and_reload(tmp_path, monkeypatch):
    """``train.precision`` bf16 and bf16-mixed on a Gemma: each step's first rewards are 0 to
    bf16 rounding, every optimizer step's loss is the fp32 run's to bf16 rounding (while the
    loss moves by more over the run), and step-2/ holds the run's weight dtype and reloads
    with transformers, its tie kept."""
    # weights of std 0.2: logits far from uniform, so the loss moves and bf16 rounding shows
    folder = write_hf_model(tmp_path / "gemma", "GemmaConfig", initializer_range=0.2)
    _no_plot(monkeypatch)
    runs = {}
    for precision in ("fp32", "bf16", "bf16-mixed"):
        cfg = _config(
            tmp_path,
            folder,
            out=precision,
            train={"precision": precision, "save_every": 0, "learning_rate": 1e-2},
        )
        run_training(cfg, progress=False)
        runs[precision] = (_records(Path(cfg.output_dir)), Path(cfg.output_dir) / "step-2")
    fp32 = runs["fp32"][0]
    assert len(fp32) >= 4
    assert max(r["loss"] for r in fp32) - min(r["loss"] for r in fp32) > 5 * BF16_LOSS_TOL
    for precision, weights in (("bf16", torch.bfloat16), ("bf16-mixed", torch.float32)):
        records, step = runs[precision]
        for t in (1, 2):
            first = next(r for r in records if r["sdpo_step"] == t)
            assert abs(first["rewards/chosen"]) < BF16_REWARD_TOL, (precision, first)
            assert abs(first["rewards/rejected"]) < BF16_REWARD_TOL, (precision, first)
        assert len(records) == len(fp32)
        for ours, theirs in zip(records, fp32, strict=True):
            assert ours["loss"] == pytest.approx(theirs["loss"], abs=BF16_LOSS_TOL), precision
        stored = load_file(step / "model.safetensors")
        assert {v.dtype for v in stored.values()} == {weights}
        reloaded = transformers.AutoModelForCausalLM.from_pretrained(step)
        assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
        for name, value in reloaded.state_dict().items():
            if name != "lm_head.weight":
                assert torch.equal(value, stored[name]), (precision, name)


def test_bf16_keeps_in_fp32_what_transformers_keeps_and_step_folders_store_it(
    tmp_path, monkeypatch
):
    """A GLM-4 MoE keeps its router's gate and score-correction bias in fp32 when transformers
    loads it in bf16 (``_keep_in_fp32_modules_strict``, as DeepSeek-V3's). Under ``train.precision
    = "bf16"`` the trainer leaves every tensor as transformers loaded it (the gate and the
    rotary's inverse frequencies were cast to bf16, and the gate trained in bf16), and step-1/
    stores the gate in fp32 and the bias, which nothing trains, as the input's bits (it was
    stored rounded to bf16); transformers reloads it to the stored tensors."""
    folder = write_hf_model(
        tmp_path / "glm",
        "Glm4MoeConfig",
        moe_intermediate_size=16,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_shared_experts=1,
    )
    bf16 = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    with torch.no_grad():
        for name, buffer in bf16.named_buffers():
            if name.endswith("e_score_correction_bias"):  # not bf16 numbers
                buffer.copy_(0.1234567 + 0.01 * torch.randn(buffer.shape))
    bf16.save_pretrained(folder)
    given = load_file(folder / "model.safetensors")
    kept = sorted(k for k, v in given.items() if v.dtype == torch.float32)
    assert kept == [
        "model.layers.1.mlp.gate.e_score_correction_bias",
        "model.layers.1.mlp.gate.weight",
    ]

    model = load_model(folder, dtype=torch.bfloat16)
    loaded = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    as_loaded = {name: t.detach().clone() for name, t in loaded.items()}
    assert {str(t.dtype) for t in as_loaded.values()} == {"torch.bfloat16", "torch.float32"}
    trainer_mod.cast_for_precision(model, "bf16")
    for name, t in {**dict(model.named_parameters()), **dict(model.named_buffers())}.items():
        assert t.dtype == as_loaded[name].dtype and torch.equal(t, as_loaded[name]), name
    # a model in fp32 (run_sdpo's caller's) is cast to bf16 but those, kept as they are
    model = load_model(folder, dtype=torch.float32)
    trainer_mod.cast_for_precision(model, "bf16")
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    for name in kept:
        assert tensors[name].dtype == torch.float32 and torch.equal(tensors[name], given[name])
    assert {p.dtype for n, p in model.named_parameters() if n not in kept} == {torch.bfloat16}

    _no_plot(monkeypatch)
    train = {"precision": "bf16", "pairs_per_step": 6, "save_every": 0}
    run = two_source_config(tmp_path, folder, far=3, near=3, train=train, sdpo={"steps": 1})
    run_training(config_from_dict(run), progress=False)
    step = Path(run["output_dir"]) / "step-1"
    stored = load_file(step / "model.safetensors")
    assert {k for k, v in stored.items() if v.dtype == torch.float32} == set(kept)
    bias = "model.layers.1.mlp.gate.e_score_correction_bias"
    assert torch.equal(stored[bias], given[bias])
    gate = "model.layers.1.mlp.gate.weight"
    assert not torch.equal(stored[gate], given[gate])  # trained
    assert json.loads((step / "config.json").read_text())["dtype"] == "bfloat16"
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(step).state_dict()
    for name in kept:  # the experts' tensors are fused on loading, under other names
        assert reloaded[name].dtype == torch.float32 and torch.equal(reloaded[name], stored[name])


# -- on CUDA ----------------------------------------------------------------------------------


def _cuda_hf_model(tmp_path: Path, config_class: str, **overrides) -> Path:
    """A tiny model whose logits are far from uniform (weights of std 0.2), with an attention
    dropout of 0.5 that training must turn off: a policy that is not its own reference shows."""
    return write_hf_model(
        tmp_path / config_class,
        config_class,
        initializer_range=0.2,
        attention_dropout=0.5,
        **overrides,
    )


def _loaded_models(monkeypatch, *, then=None) -> list:
    """Every model the runner loads, appended as it loads them (``then(model)`` called on
    each)."""
    seen = []
    load = runner_mod.load_model

    def spy(*args, **kwargs):
        model = load(*args, **kwargs)
        seen.append(model)
        if then is not None:
            then(model)
        return model

    monkeypatch.setattr(runner_mod, "load_model", spy)
    return seen


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision", ["bf16", "bf16-mixed"])
@pytest.mark.parametrize(
    "config_class, overrides, attention",
    [
        ("GemmaConfig", {}, "sdpa"),
        ("Gemma2Config", {"final_logit_softcapping": 2.0}, "eager"),
    ],
)
def test_on_cuda_a_transformers_model_starts_each_step_at_its_reference(
    tmp_path, monkeypatch, config_class, overrides, attention, precision
):
    """A 2-step ``sdpo train`` of a Gemma (SDPA) and a soft-capped Gemma 2 (eager attention) on
    CUDA in bf16 and bf16-mixed: each step's first rewards are 0 to bf16 rounding, every loss
    is finite, and the policy moves (its later rewards are not 0)."""
    seen = _loaded_models(monkeypatch)
    folder = _cuda_hf_model(tmp_path, config_class, **overrides)
    cfg = _config(tmp_path, folder, train={"precision": precision, "save_every": 0})
    run_training(cfg, progress=False)
    weights = torch.bfloat16 if precision == "bf16" else torch.float32
    assert seen
    for model in seen:
        assert model.lm_head_weight.device.type == "cuda"
        assert model.lm_head_weight.dtype == weights
        assert model.hf_model.config._attn_implementation == attention
        assert model.logit_softcap == overrides.get("final_logit_softcapping")
    records = _records(Path(cfg.output_dir))
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    for t in (1, 2):
        first = next(r for r in records if r["sdpo_step"] == t)
        assert abs(first["rewards/chosen"]) < BF16_REWARD_TOL, first
        assert abs(first["rewards/rejected"]) < BF16_REWARD_TOL, first
    moved = max(abs(r[k]) for r in records for k in ("rewards/chosen", "rewards/rejected"))
    assert moved > 5 * BF16_REWARD_TOL, records


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_gradient_checkpointing_of_a_transformers_model_keeps_the_numbers(
    tmp_path, monkeypatch
):
    """``model.gradient_checkpointing = true`` on CUDA (bf16-mixed, SDPA): the decoder layers
    run again in each backward (the recompute happens), and every optimizer step's loss and
    gradient norm, the first step's and those after updates, equal those without it to bf16
    rounding."""
    calls = []

    def count_layer_0(model):
        # calls of layer 0's MLP with gradients on: the training forwards and their recomputes
        # (a hook on the layer itself may stay outside what transformers recomputes, and a
        # recompute may stop once it has what the backward needs, before a forward hook)
        model.model.layers[0].mlp.register_forward_pre_hook(
            lambda *_: calls.append(1) if torch.is_grad_enabled() else None
        )

    seen = _loaded_models(monkeypatch, then=count_layer_0)
    folder = _cuda_hf_model(tmp_path, "GemmaConfig")
    runs = {}
    for checkpointing in (False, True):
        seen.clear()
        calls.clear()
        cfg = _config(
            tmp_path,
            folder,
            out=f"checkpointing-{checkpointing}",
            model={"gradient_checkpointing": checkpointing},
            train={"precision": "bf16-mixed", "save_every": 0},
            sdpo={"steps": 1},
        )
        run_training(cfg, progress=False)
        assert seen and all(m.is_gradient_checkpointing == checkpointing for m in seen)
        assert seen[0].lm_head_weight.device.type == "cuda"
        runs[checkpointing] = (_records(Path(cfg.output_dir)), len(calls))
    (plain, plain_calls), (recomputed, recomputed_calls) = runs[False], runs[True]
    # every training forward of layer 0's MLP runs once more in its backward
    assert plain_calls > 0 and recomputed_calls == 2 * plain_calls, (plain_calls, recomputed_calls)
    # the same losses and gradient norms step by step, to bf16 rounding (the backward of SDPA's
    # attention may add in another order); the updates move the loss by more than that
    assert len(plain) == len(recomputed) >= 2
    for ours, theirs in zip(recomputed, plain, strict=True):
        assert ours["loss"] == pytest.approx(theirs["loss"], abs=2e-3), (ours, theirs)
        assert ours["grad_norm"] == pytest.approx(theirs["grad_norm"], rel=1e-2), (ours, theirs)
    assert abs(plain[-1]["loss"] - plain[0]["loss"]) > 1e-2
