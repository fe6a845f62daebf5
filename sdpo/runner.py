"""The stepwise DPO runner: `sdpo train` from a config to T aligned checkpoints.

Step t trains on chunk t; its policy starts from M_{t-1} and its reference is M_{t-1}
(step 1: the initial model M0). The reference values of a chunk are computed once, with no
gradients, by the policy itself before its first update (so no second model is ever resident),
written to an on-disk cache, and training reads only the cache. The initial model's scoring pass
over all data is done once and serves three purposes: the easy-to-hard ranking, step 1's
reference values and the γ_ref report. With ``sdpo.reference`` naming another checkpoint, that
model is loaded, scores every chunk, is written to the cache and freed before the policy loads.
``steps = 1`` is plain DPO over all data.
"""

from __future__ import annotations

import dataclasses
import gc
import shutil
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from sdpo.cache import CacheKey, RefLogprobCache, RefValues, data_fingerprint, file_fingerprint
from sdpo.config import RunConfig, step_settings, write_resolved_config
from sdpo.engine.checkpoint import load_pretrained, model_fingerprint, save_pretrained
from sdpo.engine.data import read_preference_file
from sdpo.engine.packing import TokenizedPair
from sdpo.engine.precision import parameter_dtype, resolve_precision
from sdpo.engine.scoring import PairLogps, score_pairs
from sdpo.engine.tokenize import PairTokenizer, tokenize_pairs
from sdpo.engine.trainer import DPOTrainer, TrainConfig, plan_steps
from sdpo.kernels import resolve_impl
from sdpo.losses import dpo_loss
from sdpo.partition import describe_partition, partition_pairs
from sdpo.report import PLOT_HINT, StepReport, format_summary_table, plot_steps, write_reports

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
)


class OutputDirError(RuntimeError):
    pass


@dataclass(kw_only=True)
class RunResult:
    output_dir: Path
    reports: list[StepReport] = field(default_factory=list)
    scoring_calls: int = 0


def _log(message: str) -> None:
    print(f"[sdpo] {message}", flush=True)


def select_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def load_pairs(cfg: RunConfig, tokenizer: PairTokenizer, *, vocab_size: int) -> list[TokenizedPair]:
    """Read, validate and tokenize every source; pair ``index`` is the position in the pool."""
    rows = []
    for source in cfg.data.sources:
        rows.extend(
            read_preference_file(
                source.path,
                source=source.name,
                split=source.split,
                identical=cfg.data.identical_pairs,
            )
        )
    pairs, stats = tokenize_pairs(
        rows,
        tokenizer,
        max_length=cfg.data.max_length,
        max_prompt_length=cfg.data.max_prompt_length,
        truncation=cfg.data.truncation,
        vocab_size=vocab_size,
    )
    _log(
        f"data: {len(pairs)} pairs from {len(cfg.data.sources)} source(s); "
        f"{stats.num_truncated} truncated to max_length={cfg.data.max_length}"
    )
    return pairs


class StepwiseRunner:
    """Runs the T DPO steps of one sDPO configuration (see the module docstring)."""

    def __init__(self, cfg: RunConfig, *, progress: bool = True, overwrite: bool = False) -> None:
        self.cfg = cfg
        self.progress = progress
        self.overwrite = overwrite
        self.out = Path(cfg.output_dir)
        self.device = select_device()
        self.precision = resolve_precision(cfg.train.precision, self.device)
        self.impl = resolve_impl(cfg.kernels.impl, self.device)
        cache_dir = cfg.sdpo.cache_dir or (self.out / "cache")
        self.cache_dir = Path(cache_dir)
        self.scoring_calls = 0
        self.tokenizer_fp = ""

    # -- scoring and the cache -----------------------------------------------------------
    def score(self, model: torch.nn.Module, pairs: Sequence[TokenizedPair]) -> PairLogps:
        self.scoring_calls += 1
        budget = self.cfg.sdpo.score_tokens_per_batch or 4 * self.cfg.train.max_tokens_per_batch
        return score_pairs(
            model,
            pairs,
            max_tokens_per_batch=budget,
            impl=self.impl,
            chunk_tokens=self.cfg.kernels.chunk_tokens,
            precision=self.precision,
            progress=self.progress,
        )

    def cache_key(self, model_fp: str, pairs: Sequence[TokenizedPair]) -> CacheKey:
        d = self.cfg.data
        return CacheKey(
            model_fingerprint=model_fp,
            data_fingerprint=data_fingerprint(pairs),
            tokenizer_fingerprint=self.tokenizer_fp,
            max_length=d.max_length,
            max_prompt_length=d.max_prompt_length or 0,
            truncation=d.truncation,
            dtype_policy=self.precision,
            kernels_impl=self.impl,
        )

    def cached_reference(
        self, name: str, model: torch.nn.Module, model_fp: str, pairs: Sequence[TokenizedPair]
    ) -> PairLogps:
        """Reference values of ``pairs`` under ``model``, from the cache file ``name`` when its
        key and checksum match, else computed and written."""
        cache = RefLogprobCache(self.cache_dir / f"{name}.safetensors")
        key = self.cache_key(model_fp, pairs)
        values, reason = cache.load(key)
        if values is not None:
            _log(f"reference cache {cache.path.name}: reused")
            return values.to_pair_logps()
        if reason != "missing":
            _log(f"reference cache {cache.path.name}: recomputing ({reason})")
        scores = self.score(model, pairs)
        cache.save(RefValues.from_scores(scores), key)
        return scores

    # -- the run -------------------------------------------------------------------------
    def run(self) -> RunResult:
        cfg = self.cfg
        self.prepare_output_dir()
        write_resolved_config(cfg, self.out / "config.toml")
        model_dir = Path(cfg.model.path)
        tokenizer = PairTokenizer.from_dir(model_dir)
        self.tokenizer_fp = file_fingerprint(model_dir / "tokenizer.json")
        vocab = _config_vocab_size(model_dir)
        pairs = load_pairs(cfg, tokenizer, vocab_size=vocab)
        by_index = {p.index: p for p in pairs}
        dtype = parameter_dtype(self.precision)

        fixed_ref: PairLogps | None = None
        if cfg.sdpo.reference:
            fixed_ref = self._score_with_separate_reference(Path(cfg.sdpo.reference), pairs, dtype)

        model = load_pretrained(model_dir, dtype=dtype, device=self.device)
        model.attn_backend = cfg.model.attn_backend
        model.gradient_checkpointing = cfg.model.gradient_checkpointing
        t0 = time.perf_counter()
        initial = self.cached_reference("initial", model, model_fingerprint(model), pairs)
        initial_scoring_s = time.perf_counter() - t0
        _log(
            f"initial model: reward accuracy {float((initial.gamma > 0).float().mean()):.3f}, "
            f"mean γ {float(initial.gamma.mean()):.3f} over {len(pairs)} pairs"
        )
        partition_args = {
            "pairs_sources": [p.source for p in pairs],
            "pair_indices": [p.index for p in pairs],
            "gamma": initial.gamma.tolist(),
            "source_order": [s.name for s in cfg.data.sources],
            "seed": cfg.train.seed,
        }
        chunks = partition_pairs(cfg.sdpo.partition, steps=cfg.sdpo.steps, **partition_args)
        partition = describe_partition(cfg.sdpo.partition, chunks, **partition_args)
        _log("partition:\n" + partition.format())

        # With reset_optimizer = false, one optimizer and one LR schedule span all steps.
        optimizer = None
        schedule_total, schedule_done = None, 0
        if not cfg.sdpo.reset_optimizer:
            schedule_total = sum(
                len(plan_steps([by_index[i] for i in chunk], _train_config(cfg), epoch=e))
                for chunk in chunks
                for e in range(cfg.train.epochs)
            )

        reports: list[StepReport] = []
        for t, chunk in enumerate(chunks, start=1):
            chunk_pairs = [by_index[i] for i in chunk]
            t0 = time.perf_counter()
            if fixed_ref is not None:
                ref = fixed_ref
            elif t == 1:
                ref = initial
            else:  # M_{t-1} is the policy in memory, before its first update of this step
                ref = self.cached_reference(
                    f"step-{t}", model, model_fingerprint(model), chunk_pairs
                )
            ref_gamma = ref.gamma[ref.rows_for(torch.tensor(chunk, dtype=torch.int64))]
            next_gamma = self._next_chunk_gamma(t, chunks, by_index, model, ref, initial)
            scoring_s = (initial_scoring_s if t == 1 else 0.0) + time.perf_counter() - t0

            beta, lr = step_settings(cfg, t)
            trainer = DPOTrainer(
                model,
                config=dataclasses.replace(_train_config(cfg), learning_rate=lr),
                loss_fn=partial(dpo_loss, config=dataclasses.replace(cfg.loss, beta=beta)),
                kernels_impl=self.impl,
                chunk_tokens=cfg.kernels.chunk_tokens,
                output_dir=self.out,
                metrics_extra={"sdpo_step": t},
                progress=self.progress,
                optimizer=optimizer,
            )
            trainer.global_step = schedule_done
            _log(f"step {t}/{len(chunks)}: {len(chunk_pairs)} pairs, beta={beta}, lr={lr}")
            result = trainer.fit(
                chunk_pairs, ref, schedule_steps=schedule_total, schedule_offset=schedule_done
            )
            if not cfg.sdpo.reset_optimizer:
                optimizer, schedule_done = trainer.optimizer, schedule_done + result.optimizer_steps
            del trainer
            step_dir = self.out / f"step-{t}"
            save_pretrained(model, step_dir, extra_files=tokenizer_files(model_dir))
            acc_after = None
            if cfg.sdpo.report_scoring:
                acc_after = float((self.score(model, chunk_pairs).gamma > 0).float().mean())
            reports.append(
                StepReport(
                    step=t,
                    num_pairs=len(chunk_pairs),
                    sources=sorted({p.source for p in chunk_pairs}),
                    beta=beta,
                    learning_rate=lr,
                    train_metrics=result.last_metrics,
                    gamma_ref_chunk=float(ref_gamma.mean()),
                    gamma_ref_next_chunk=next_gamma,
                    reward_accuracy_before=float((ref_gamma > 0).float().mean()),
                    reward_accuracy_after=acc_after,
                    train_seconds=result.seconds,
                    scoring_seconds=scoring_s,
                )
            )
            _log(f"step {t} done: saved {step_dir}")
        write_reports(reports, self.out, partition=partition)
        print(format_summary_table(reports))
        if not plot_steps(self.out / "metrics.jsonl", reports, self.out / "sdpo_steps.png"):
            _log(PLOT_HINT)
        return RunResult(output_dir=self.out, reports=reports, scoring_calls=self.scoring_calls)

    def _next_chunk_gamma(
        self,
        t: int,
        chunks: list[list[int]],
        by_index: dict[int, TokenizedPair],
        model: torch.nn.Module,
        ref: PairLogps,
        initial: PairLogps,
    ) -> float | None:
        """Mean γ of step t's reference on chunk t+1 (the paper's Figure 2 quantity). Free for
        step 1 and for a fixed reference (both scored all data); a scoring pass otherwise."""
        if t >= len(chunks):
            return None
        upcoming = torch.tensor(chunks[t], dtype=torch.int64)
        if self.cfg.sdpo.reference or t == 1:
            source = ref if self.cfg.sdpo.reference else initial
        elif self.cfg.sdpo.report_scoring:
            source = self.score(model, [by_index[i] for i in chunks[t]])
        else:
            return None
        return float(source.gamma[source.rows_for(upcoming)].mean())

    def prepare_output_dir(self) -> None:
        """Refuse to mix two runs' outputs; with ``overwrite``, clear the old run's outputs
        (reference caches stay: they are keyed, so a matching one is reused safely)."""
        old = sorted(p.name for p in existing_outputs(self.out))
        if old and not self.overwrite:
            raise OutputDirError(
                f"output folder {self.out} already holds a run's outputs ({', '.join(old[:6])}); "
                "choose another output_dir or pass --overwrite to replace them"
            )
        for p in existing_outputs(self.out):
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink()
        self.out.mkdir(parents=True, exist_ok=True)

    def _score_with_separate_reference(
        self, ref_dir: Path, pairs: Sequence[TokenizedPair], dtype: torch.dtype
    ) -> PairLogps:
        """Load the named reference, score every pair, write the cache, free the model."""
        baseline = torch.cuda.memory_allocated() if self.device.type == "cuda" else 0
        ref_model = load_pretrained(ref_dir, dtype=dtype, device=self.device)
        probe = weakref.ref(ref_model.lm_head_weight)
        values = self.cached_reference("reference", ref_model, model_fingerprint(ref_model), pairs)
        del ref_model
        gc.collect()
        if probe() is not None:
            raise RuntimeError("the reference model is still referenced after caching its values")
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            now = torch.cuda.memory_allocated()
            _log(
                f"reference model freed: GPU memory {now / 2**20:.0f} MiB (before load {baseline / 2**20:.0f} MiB)"
            )
        return values


def existing_outputs(out: Path) -> list[Path]:
    """Files and folders of a previous run inside ``out`` (caches excluded)."""
    if not out.is_dir():
        return []
    names = {"metrics.jsonl", "config.toml", "sdpo_report.json", "sdpo_steps.png"}
    return [p for p in out.iterdir() if p.name in names or p.name.startswith("step-")]


def _config_vocab_size(model_dir: Path) -> int:
    import json

    config = json.loads((model_dir / "config.json").read_text())
    return int(config["vocab_size"])


def tokenizer_files(model_dir: Path) -> list[Path]:
    """The tokenizer files of a model folder, copied into every saved checkpoint."""
    return [model_dir / name for name in TOKENIZER_FILES if (model_dir / name).is_file()]


def _train_config(cfg: RunConfig) -> TrainConfig:
    return cfg.train if isinstance(cfg.train, TrainConfig) else TrainConfig(**vars(cfg.train))


def run_training(cfg: RunConfig, *, progress: bool = True, overwrite: bool = False) -> RunResult:
    return StepwiseRunner(cfg, progress=progress, overwrite=overwrite).run()
