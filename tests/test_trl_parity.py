"""sdpo's DPO step against TRL's ``DPOTrainer`` (1.16) itself, on the same model, the same rows
and the same batches, for every loss type both have, f-divergences, LD-DPO and WPO: the
reference values TRL precomputes, every logged metric of every optimizer step, and the weights
after the last step, to float32 rounding; also gradient accumulation, learning-rate decay and
weight decay, a whole two-step ``sdpo train`` against two TRL runs chained by hand, the eval
metrics against TRL's ``evaluate()``, and LoRA against TRL on a PEFT model (which also loads the
adapter sdpo writes). Run when trl and peft are installed (dev dependencies).

Not compared, because sdpo differs on purpose (README, Training): ``label_smoothing`` with the
sigmoid loss (cDPO; TRL 1.16's sigmoid ignores it), ``f_alpha_divergence_coef`` other than 0.5
(see ``LOSSES``), and ``rpo_alpha`` (a per-pair NLL; TRL 1.16's RPO is its ``sft`` type,
compared here as ``["sigmoid", "sft"]``)."""

from __future__ import annotations

import dataclasses
import json
import shutil
from functools import partial
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sdpo.engine.checkpoint import load_pretrained, save_pretrained
from sdpo.engine.model import ModelConfig, init_model
from sdpo.engine.scoring import score_pairs
from sdpo.engine.tokenize import PairTokenizer, tokenize_pairs
from sdpo.engine.trainer import (
    METRIC_KEYS,
    TOKEN_METRICS,
    DPOTrainer,
    TrainConfig,
    plan_steps,
)
from sdpo.losses import LossConfig, dpo_loss
from tests.conftest import TINY_SHAPE
from tests.test_tokenize import sentencepiece_like

trl = pytest.importorskip("trl")
transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

PAIRS, PAIRS_PER_STEP, STEPS = 12, 4, 3
LR, BETA, EPS = 2e-3, 0.1, 1e-3  # a larger Adam eps keeps rounding from being magnified


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny Llama-style model with a Llama-2-style tokenizer, and plain rows whose completions
    start with a space (so TRL and sdpo give the same ids)."""
    import random

    tmp = tmp_path_factory.mktemp("trl_parity")
    tok_dir = sentencepiece_like(tmp / "tok")
    tokenizer = PairTokenizer.from_dir(tok_dir)
    config = ModelConfig(vocab_size=tokenizer.vocab_size, **TINY_SHAPE)
    model_dir = tmp / "model"
    files = [tok_dir / "tokenizer.json", tok_dir / "tokenizer_config.json"]
    save_pretrained(init_model(config, seed=5), model_dir, extra_files=files)
    rng = random.Random(7)
    words = ["hi", "there", "say", "no", "sure", "thing", "way"]

    def text(n):
        return " ".join(rng.choice(words) for _ in range(n))

    rows = [
        {
            "prompt": f"[INST] {text(rng.randint(2, 6))} [/INST]",
            "chosen": " " + text(rng.randint(1, 6)),
            "rejected": " " + text(rng.randint(1, 6)),
        }
        for _ in range(PAIRS)
    ]
    pairs, stats = tokenize_pairs(rows, tokenizer, max_length=128)
    assert stats.num_prompt_boundary == 0
    return model_dir, rows, pairs


def _ours(
    model_dir: Path,
    pairs,
    loss: LossConfig,
    out: Path,
    *,
    micro_tokens: int = 4096,
    schedule: str = "constant",
    weight_decay: float = 0.0,
    model: torch.nn.Module | None = None,
    precision: str = "fp32",
) -> tuple[dict, list[dict]]:
    """sdpo's trainer on ``pairs`` (``model``: one set up already, else ``model_dir``'s):
    the final state dict and the metrics records."""
    model = load_pretrained(model_dir) if model is None else model
    ref = score_pairs(
        model,
        pairs,
        max_tokens_per_batch=4096,
        impl="torch",
        ld_alpha=loss.ld_alpha,
        precision=precision,
    )
    config = TrainConfig(
        learning_rate=LR,
        pairs_per_step=PAIRS_PER_STEP,
        max_tokens_per_batch=micro_tokens,
        warmup_ratio=0.0,
        schedule=schedule,
        weight_decay=weight_decay,
        adam_eps=EPS,
        max_grad_norm=1.0,
        shuffle=False,
        precision=precision,
    )
    trainer = DPOTrainer(
        model,
        config=config,
        loss_fn=partial(dpo_loss, config=loss),
        kernels_impl="torch",
        progress=False,
        output_dir=out,
        ld_alpha=loss.ld_alpha,
    )
    trainer.fit(pairs, ref)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, rows


_TRL_LOSS_KEYS = (
    "loss_weights",
    "label_smoothing",
    "discopop_tau",
    "f_divergence_type",
    "f_alpha_divergence_coef",
    "ld_alpha",
    "use_weighting",
    "router_aux_loss_coef",
)


def _trl_evaluate(
    model_dir: Path,
    train_rows: list[dict],
    eval_rows: list[dict],
    loss: LossConfig,
    tmp_path: Path,
    weights: dict[str, torch.Tensor],
) -> dict[str, float]:
    """TRL's ``evaluate()`` of ``eval_rows`` in one batch: the held-out reference values
    precomputed with the initial model of ``model_dir`` (sdpo's yardstick too), then the
    pairs scored with ``weights`` (the trained model's)."""
    evaluator = trl.DPOTrainer(
        model=transformers.AutoModelForCausalLM.from_pretrained(
            str(model_dir), dtype=torch.float32
        ),
        args=trl.DPOConfig(
            output_dir=str(tmp_path / "trl-eval"),
            per_device_eval_batch_size=len(eval_rows),
            max_length=None,
            report_to="none",
            use_cpu=True,
            bf16=False,
            disable_tqdm=True,
            precompute_ref_log_probs=True,
            **_trl_loss_options(loss),
        ),
        train_dataset=datasets.Dataset.from_list(train_rows),
        eval_dataset=datasets.Dataset.from_list(eval_rows),
        processing_class=transformers.PreTrainedTokenizerFast.from_pretrained(str(model_dir)),
    )
    evaluator.get_eval_dataloader()  # precomputes the held-out reference values with M0
    evaluator.model.load_state_dict(weights)  # then scores with the trained model
    return evaluator.evaluate()


def _trl_loss_options(loss: LossConfig) -> dict:
    """TRL's DPOConfig options of a loss config (the keys both have, where not the default)."""
    options = {"beta": loss.beta, "loss_type": loss.loss_type}
    for key in _TRL_LOSS_KEYS:
        if getattr(loss, key) != getattr(LossConfig(), key):
            options[key] = getattr(loss, key)
    return options


def _trl(
    model_dir: Path,
    rows: list[dict],
    loss: LossConfig,
    out: Path,
    *,
    accumulate: int = 1,
    schedule: str = "constant",
    weight_decay: float = 0.0,
    steps: int = STEPS,
    save_to: Path | None = None,
    model: torch.nn.Module | None = None,
    bf16: bool = False,
):
    """TRL's DPOTrainer on ``rows`` in order (``model``: one set up already, e.g. a PEFT model,
    else ``model_dir``'s): its precomputed reference values, final state dict and logs."""
    logs: list[dict] = []

    class Logs(transformers.TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                logs_copy = dict(logs)
                logs_copy["step"] = state.global_step
                logged.append(logs_copy)

    logged = logs

    class InOrder(trl.DPOTrainer):
        def _get_train_sampler(self, *a, **k):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    options = {
        "output_dir": str(out),
        "per_device_train_batch_size": PAIRS_PER_STEP // accumulate,
        "gradient_accumulation_steps": accumulate,
        "max_steps": steps,
        "learning_rate": LR,
        "lr_scheduler_type": schedule,
        "warmup_steps": 0,
        "adam_epsilon": EPS,
        "max_grad_norm": 1.0,
        "weight_decay": weight_decay,
        "precompute_ref_log_probs": True,
        "max_length": None,
        "logging_steps": 1,
        "logging_nan_inf_filter": False,
        "save_strategy": "no",
        "report_to": "none",
        "use_cpu": True,
        "bf16": bf16,  # TRL's default is bf16 autocast, on a CPU too: fp32 unless asked
        "disable_tqdm": True,
        "seed": 0,
    }
    options |= _trl_loss_options(loss)
    if model is None:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(model_dir), dtype=torch.float32, attn_implementation="sdpa"
        )
    trainer = InOrder(
        model=model,
        args=trl.DPOConfig(**options),
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=transformers.PreTrainedTokenizerFast.from_pretrained(str(model_dir)),
        callbacks=[Logs()],
    )
    ref = (
        torch.tensor(trainer.train_dataset["ref_chosen_logps"], dtype=torch.float64),
        torch.tensor(trainer.train_dataset["ref_rejected_logps"], dtype=torch.float64),
    )
    trainer.train()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if save_to is not None:  # a model folder for the next run: weights, config, tokenizer
        model.save_pretrained(str(save_to))
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(model_dir / name, save_to / name)
    return ref, state, logs


LOSSES = {
    "sigmoid": LossConfig(beta=BETA),
    "ipo": LossConfig(beta=BETA, loss_type="ipo"),
    "hinge": LossConfig(beta=BETA, loss_type="hinge"),
    "robust": LossConfig(beta=BETA, loss_type="robust", label_smoothing=0.2),
    "exo_pair": LossConfig(beta=BETA, loss_type="exo_pair", label_smoothing=0.1),
    "nca_pair": LossConfig(beta=BETA, loss_type="nca_pair"),
    "bco_pair": LossConfig(beta=BETA, loss_type="bco_pair"),
    "sppo_hard": LossConfig(beta=BETA, loss_type="sppo_hard"),
    "apo_zero": LossConfig(beta=BETA, loss_type="apo_zero"),
    "apo_down": LossConfig(beta=BETA, loss_type="apo_down"),
    "discopop": LossConfig(beta=BETA, loss_type="discopop", discopop_tau=0.1),
    "sigmoid_norm": LossConfig(beta=BETA, loss_type="sigmoid_norm"),
    "bco_mix": LossConfig(beta=BETA, loss_type=["sigmoid", "bco_pair"], loss_weights=[0.8, 0.2]),
    # RPO as TRL 1.16 writes it, and MPO (sigmoid + bco_pair + sft)
    "rpo_sft": LossConfig(beta=BETA, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5]),
    "mpo": LossConfig(
        beta=BETA, loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0]
    ),
    "sft": LossConfig(beta=BETA, loss_type="sft"),
    "js_divergence": LossConfig(beta=BETA, f_divergence_type="js_divergence"),
    # each completion's f' score divided by its own token count
    "ipo_forward_kl": LossConfig(beta=BETA, loss_type="ipo", f_divergence_type="forward_kl"),
    "sigmoid_norm_js": LossConfig(
        beta=BETA, loss_type="sigmoid_norm", f_divergence_type="js_divergence"
    ),
    # TRL's default coefficient: TRL 1.16 computes f'(u) = (u^(c-1) - 1) / (c-1), the f-DPO
    # paper's (1 - u^-c) / c (and TRL's own docs') with c replaced by 1 - c; both agree at 0.5
    "alpha_divergence": LossConfig(beta=BETA, f_divergence_type="alpha_divergence"),
    "ld_dpo": LossConfig(beta=BETA, ld_alpha=0.5),
    "wpo": LossConfig(beta=BETA, use_weighting=True),
    "ipo_ld_wpo": LossConfig(beta=BETA, loss_type="ipo", ld_alpha=0.3, use_weighting=True),
    # LD-DPO's weighted sums for the DPO term, the raw token log-probs for the sft term
    "rpo_sft_ld": LossConfig(
        beta=BETA, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5], ld_alpha=0.3
    ),
}


@pytest.mark.parametrize("name", list(LOSSES))
def test_a_dpo_training_equals_trl_s_step_by_step(setup, tmp_path, name):
    model_dir, rows, pairs = setup
    loss = LOSSES[name]
    weights, ours = _ours(model_dir, pairs, loss, tmp_path / "ours")
    ref, trl_weights, theirs = _trl(model_dir, rows, loss, tmp_path / "trl")
    shutil.rmtree(tmp_path / "trl", ignore_errors=True)

    # TRL's precomputed reference log-probs are our scoring pass's (LD-weighted for LD-DPO)
    model = load_pretrained(model_dir)
    scores = score_pairs(
        model, pairs, max_tokens_per_batch=4096, impl="torch", ld_alpha=loss.ld_alpha
    )
    assert torch.allclose(scores.chosen_logps.double(), ref[0], rtol=1e-5, atol=1e-5)
    assert torch.allclose(scores.rejected_logps.double(), ref[1], rtol=1e-5, atol=1e-5)

    assert [r["step"] for r in theirs] == list(range(1, STEPS + 1))
    assert len(ours) == STEPS
    for step, (a, b) in enumerate(zip(ours, theirs, strict=True), start=1):
        for key in METRIC_KEYS:  # every metric both log
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), (step, key, a, b)
        assert a["num_tokens"] == b["num_tokens"], (step, a, b)

    assert weights.keys() <= trl_weights.keys() | {"lm_head.weight"}
    for key, w in weights.items():
        assert torch.allclose(w, trl_weights[key], rtol=1e-4, atol=1e-6), key


def test_gradient_accumulation_equals_trl_s(setup, tmp_path):
    """Each optimizer step in micro-batches on both sides (sdpo: a token budget that splits the
    step's 4 pairs; TRL: 2 micro-batches of 2 pairs): the same losses and weights as above."""
    model_dir, rows, pairs = setup
    loss = LOSSES["sigmoid"]
    budget = 2 * max(p.num_tokens for p in pairs)  # at most 2 pairs per micro-batch
    plan = plan_steps(
        pairs,
        TrainConfig(pairs_per_step=PAIRS_PER_STEP, max_tokens_per_batch=budget, shuffle=False),
        epoch=0,
    )
    assert all(len(step) >= 2 for step in plan), plan  # every step in several micro-batches
    weights, ours = _ours(model_dir, pairs, loss, tmp_path / "ours", micro_tokens=budget)
    _, trl_weights, theirs = _trl(model_dir, rows, loss, tmp_path / "trl", accumulate=2)
    assert len(ours) == len(theirs) == STEPS
    for step, (a, b) in enumerate(zip(ours, theirs, strict=True), start=1):
        # the token metrics differ by design here: TRL averages each micro-batch's ratio, sdpo
        # weighs every token of the step the same (README, Metrics)
        for key in (k for k in METRIC_KEYS if k not in TOKEN_METRICS):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), (step, key, a, b)
        assert a["num_tokens"] == b["num_tokens"], (step, a, b)
    for key, w in weights.items():
        assert torch.allclose(w, trl_weights[key], rtol=1e-4, atol=1e-6), key


@pytest.mark.parametrize(("schedule", "weight_decay"), [("linear", 0.0), ("cosine", 0.1)])
def test_the_learning_rate_decays_as_trl_s(setup, tmp_path, schedule, weight_decay):
    """No warm-up: the same linear or cosine decay over the pass, so the same updates; weight
    decay on the same parameters (matrices and embeddings, not norms). (With warm-up the
    schedules differ on purpose: sdpo's first step runs at lr / warm-up steps, as torchtitan's,
    where transformers' runs its first step at lr 0.)"""
    model_dir, rows, pairs = setup
    loss = LOSSES["sigmoid"]
    options = {"schedule": schedule, "weight_decay": weight_decay}
    weights, ours = _ours(model_dir, pairs, loss, tmp_path / "ours", **options)
    _, trl_weights, theirs = _trl(model_dir, rows, loss, tmp_path / "trl", **options)
    assert [r["lr"] for r in ours] == pytest.approx([r["learning_rate"] for r in theirs])
    assert ours[1]["lr"] < LR  # the rate does decay
    for step, (a, b) in enumerate(zip(ours, theirs, strict=True), start=1):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4), (step, a, b)
    for key, w in weights.items():
        assert torch.allclose(w, trl_weights[key], rtol=1e-4, atol=1e-6), key


def _sdpo_train(
    out: Path, model_dir: Path, data: dict, *, schedule: str, sdpo: dict, loss: dict | None = None
) -> None:
    """``sdpo train`` (``run_training``) with the optimizer settings of the TRL comparisons."""
    from sdpo.config import config_from_dict
    from sdpo.runner import run_training

    config = {
        "output_dir": str(out),
        "model": {"path": str(model_dir)},
        "data": {**data, "max_length": 128, "max_prompt_length": 64},
        "train": {
            "learning_rate": LR,
            "pairs_per_step": PAIRS_PER_STEP,
            "max_tokens_per_batch": 4096,
            "warmup_ratio": 0.0,
            "schedule": schedule,
            "adam_eps": EPS,
            "shuffle": False,
            "precision": "fp32",
        },
        "loss": {"beta": BETA, **(loss or {})},
        "kernels": {"impl": "torch"},
        "sdpo": sdpo,
    }
    run_training(config_from_dict(config), progress=False)


def test_a_two_step_sdpo_run_equals_two_trl_runs_chained_by_hand(setup, tmp_path):
    """``sdpo train`` with two sources (a given partition): step 1 trains M0 on source 1 against
    M0's values, step 2 trains M1 on source 2 against M1's values with a fresh optimizer. The
    same by hand with TRL: a DPOTrainer on source 1 (reference log-probs precomputed with M0),
    its model saved, then a new DPOTrainer from it on source 2. Both steps' weights agree."""

    model_dir, rows, _ = setup
    first, second = rows[:8], rows[8:]
    files = []
    for name, part in (("one", first), ("two", second)):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in part))
        files.append({"name": name, "path": str(path)})
    out = tmp_path / "run"
    _sdpo_train(
        out,
        model_dir,
        {"sources": files},
        schedule="linear",
        sdpo={"steps": 2, "partition": "given", "report_scoring": False},
    )

    start = model_dir
    for t, part in ((1, first), (2, second)):
        saved = tmp_path / f"trl-m{t}"  # M_t by TRL: step t+1's start and reference
        _, trl_weights, _ = _trl(
            start,
            part,
            LOSSES["sigmoid"],
            tmp_path / f"trl{t}",
            schedule="linear",
            steps=len(part) // PAIRS_PER_STEP,
            save_to=saved,
        )
        ours = load_file(str(out / f"step-{t}" / "model.safetensors"))
        assert ours.keys() <= trl_weights.keys()
        for key, w in ours.items():
            assert torch.allclose(w, trl_weights[key], rtol=1e-4, atol=1e-6), (t, key)
        start = saved


def test_a_lora_training_equals_trl_with_peft(setup, tmp_path):
    """LoRA (rank 4, every projection): sdpo's adapter against TRL training a PEFT model that
    starts from the same A matrices (B is 0 on both sides): the same metrics at every step and
    the same adapter after the last one; and PEFT loads the adapter sdpo writes, giving the
    adapted model's logits."""
    peft = pytest.importorskip("peft")
    from sdpo.engine.lora import (
        LORA_TARGETS,
        attach_lora,
        lora_state_dict,
        peft_adapter_files,
    )

    model_dir, rows, pairs = setup
    rank, alpha = 4, 16.0
    model = load_pretrained(model_dir)
    attach_lora(model, rank=rank, alpha=alpha, targets=list(LORA_TARGETS), seed=3)
    start = lora_state_dict(model)

    def adapter_files(state):
        return peft_adapter_files(
            state,
            rank=rank,
            alpha=alpha,
            dropout=0.0,
            targets=list(LORA_TARGETS),
            base_model=str(model_dir),
        )

    # ours: the trainer on the adapted model (the base frozen by attach_lora)
    _, ours = _ours(model_dir, pairs, LOSSES["sigmoid"], tmp_path / "ours", model=model)
    ours_adapter, _ = adapter_files(lora_state_dict(model))

    # TRL on a PEFT model holding the same initial adapter
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    lora_config = peft.LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=0.0,
        target_modules=list(LORA_TARGETS),
        bias="none",
        task_type="CAUSAL_LM",
    )
    peft_model = peft.get_peft_model(hf, lora_config)
    initial, _ = adapter_files(start)
    assert not peft.set_peft_model_state_dict(peft_model, initial).unexpected_keys
    _, _, logs = _trl(model_dir, rows, LOSSES["sigmoid"], tmp_path / "trl", model=peft_model)
    assert len(ours) == len(logs) == STEPS
    for step, (a, b) in enumerate(zip(ours, logs, strict=True), start=1):
        for key in METRIC_KEYS:
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), (step, key, a, b)
    theirs = {
        k.replace(".default", ""): v for k, v in peft.get_peft_model_state_dict(peft_model).items()
    }
    assert theirs.keys() == ours_adapter.keys()
    for key, w in ours_adapter.items():
        assert torch.allclose(w, theirs[key], rtol=1e-4, atol=1e-6), key

    # the adapter sdpo writes, loaded by PEFT onto the base: the adapted model's logits
    folder = tmp_path / "adapter"
    folder.mkdir()
    tensors, adapter_config = adapter_files(lora_state_dict(model))
    from safetensors.torch import save_file

    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps(adapter_config))
    base = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    loaded = peft.PeftModel.from_pretrained(base, str(folder))
    ids = torch.tensor([pairs[0].prompt_ids + pairs[0].chosen_ids])
    with torch.no_grad():
        want = peft_model(input_ids=ids).logits
        got = loaded(input_ids=ids).logits
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("loss_name", ["sigmoid", "wpo", "rpo_sft_ld"])
def test_the_eval_metrics_equal_trl_s_evaluate(setup, tmp_path, loss_name):
    """Held-out pairs (``data.eval_sources``) after a DPO run: sdpo's eval/* record against the
    initial model equals TRL's ``evaluate()``, whose reference values are the initial model's
    too (precomputed); one eval batch on TRL's side, so its batch means are the means. With WPO
    both weight the eval loss by the trained policy's weights; with LD-DPO and sft both read
    the raw token log-probs in the sft term."""

    model_dir, rows, _ = setup
    train_rows, eval_rows = rows[:8], rows[8:]
    files = {}
    for name, part in (("train", train_rows), ("held", eval_rows)):
        files[name] = tmp_path / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps(r) + "\n" for r in part))
    out = tmp_path / "run"
    data = {
        "sources": [{"name": "train", "path": str(files["train"])}],
        "eval_sources": [{"name": "held", "path": str(files["held"])}],
    }
    loss = LOSSES[loss_name]
    _sdpo_train(
        out,
        model_dir,
        data,
        schedule="constant",
        sdpo={"steps": 1, "report_scoring": False},
        loss=_trl_loss_options(loss),  # the same key names in both configs
    )
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    ours = [r for r in records if "eval/loss" in r][-1]

    model = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    _trl(model_dir, train_rows, loss, tmp_path / "trl", steps=2, model=model)
    theirs = _trl_evaluate(model_dir, train_rows, eval_rows, loss, tmp_path, model.state_dict())
    assert abs(ours["eval/rewards/chosen"]) > 1e-4  # trained: the rewards are not 0
    for key in METRIC_KEYS:
        assert ours[f"eval/{key}"] == pytest.approx(theirs[f"eval_{key}"], rel=1e-4, abs=1e-5), key


def test_bf16_mixed_is_trl_s_default_precision(setup, tmp_path):
    """TRL's default precision (fp32 weights and AdamW states, bf16 autocast, on a CPU too) is
    sdpo's ``bf16-mixed``: the same steps to bf16 rounding (the two fused heads round in
    different places, so the steps agree to about 1e-4, not bit for bit)."""
    model_dir, rows, pairs = setup
    loss = LOSSES["sigmoid"]
    mixed, ours = _ours(model_dir, pairs, loss, tmp_path / "ours", precision="bf16-mixed")
    _, theirs_w, theirs = _trl(model_dir, rows, loss, tmp_path / "trl", bf16=True)
    assert mixed["model.embed_tokens.weight"].dtype == torch.float32  # fp32 master weights
    for step, (a, b) in enumerate(zip(ours, theirs, strict=True), start=1):
        for key in ("loss", "logps/chosen", "logps/rejected"):
            assert a[key] == pytest.approx(b[key], rel=1e-3), (step, key, a, b)
    for key, w in mixed.items():
        assert torch.allclose(w, theirs_w[key], rtol=0, atol=2e-3), key


@pytest.mark.parametrize("coef", [None, 0.05])
def test_a_mixture_of_experts_run_by_transformers_trains_as_trl_trains_it(setup, tmp_path, coef):
    """A Qwen2-MoE (``model.implementation`` auto: transformers in ``PackedCausalLM``), one
    ``sdpo train`` step against TRL on the same rows: every metric of every optimizer step and
    the weights after the last, to float32 rounding. TRL adds the router's load-balancing loss
    times the config's router_aux_loss_coef (0.001) to each batch's loss and logs it as
    ``aux_loss``; so does sdpo. With ``loss.router_aux_loss_coef`` (TRL's DPOConfig option of
    that name) the loss takes that coefficient instead, in both (one optimizer step), and the
    held-out pairs scored after it give TRL's ``evaluate()``: its eval_loss adds the router
    loss of the held-out batch times that coefficient, and eval_aux_loss is that loss."""
    from sdpo.engine.checkpoint import load_model

    _, rows, _ = setup
    steps = 2 if coef is None else 1
    rows, eval_rows = rows[: steps * PAIRS_PER_STEP], rows[steps * PAIRS_PER_STEP :]
    model_dir = tmp_path / "model"
    sentencepiece_like(model_dir)
    config = transformers.Qwen2MoeConfig(
        vocab_size=PairTokenizer.from_dir(model_dir).vocab_size,
        **TINY_SHAPE,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=16,
    )
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(model_dir)
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    sources = {"sources": [{"name": "rows", "path": str(data)}]}
    if coef is not None:
        held = tmp_path / "held.jsonl"
        held.write_text("".join(json.dumps(r) + "\n" for r in eval_rows))
        sources["eval_sources"] = [{"name": "held", "path": str(held)}]
    override = {} if coef is None else {"router_aux_loss_coef": coef}
    _sdpo_train(
        out,
        model_dir,
        sources,
        schedule="constant",
        sdpo={"steps": 1, "report_scoring": False},
        loss=override,
    )
    records = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]
    ours = [r for r in records if "rewards/chosen" in r]
    loss = dataclasses.replace(LOSSES["sigmoid"], **override)
    _, trl_weights, theirs = _trl(model_dir, rows, loss, tmp_path / "trl", steps=steps)
    assert len(ours) == len(theirs) == steps
    for step, (a, b) in enumerate(zip(ours, theirs, strict=True), start=1):
        for key in (*METRIC_KEYS, "aux_loss"):  # the router loss logged as TRL logs it
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), (step, key, a, b)
    weights = load_model(out / "step-1").hf_model.state_dict()
    assert weights.keys() == trl_weights.keys()
    for key, w in weights.items():
        assert torch.allclose(w, trl_weights[key], rtol=1e-4, atol=1e-6), key
    if coef is None:
        return
    # the held-out pairs in one batch on both sides, against the initial model's values
    theirs = _trl_evaluate(model_dir, rows, eval_rows, loss, tmp_path, trl_weights)
    held_out = [r for r in records if "eval/loss" in r][-1]
    assert held_out["eval/aux_loss"] > 1.0
    for key in ("loss", "aux_loss", "rewards/margins"):
        assert held_out[f"eval/{key}"] == pytest.approx(theirs[f"eval_{key}"], rel=1e-4), key
