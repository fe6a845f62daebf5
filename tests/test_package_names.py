"""The repository's ``kernels/`` folder is the package ``sdpo.kernels``; with the repository
root on sys.path (as in this test session) it is also findable as a top-level ``kernels``, which
transformers probes for (Hugging Face's unrelated ``kernels`` distribution). Imported under that
name it must register nothing: a second registration of the ``sdpo::`` custom ops replaces the
live ones and leaves ``sdpo.kernels``' op handles dangling, which crashed later op calls."""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

import pytest
import torch
import torch._library.custom_ops as custom_ops

import sdpo.kernels
from sdpo.kernels import sequence_logprobs

ROOT = Path(__file__).resolve().parents[1]
OPS = (
    "sdpo::logprobs_fwd",
    "sdpo::logprobs_bwd",
    "sdpo::logprobs_bwd_inplace",
    "sdpo::sequence_logprobs_fwd",
    "sdpo::sequence_logprobs_bwd",
)


def _sequence_logprobs_match_float64() -> None:
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(11, 7, generator=g)
    weight = torch.randn(13, 7, generator=g)
    labels = torch.randint(0, 13, (11,), generator=g)
    labels[0] = -100
    seq_ids = torch.tensor([0] * 4 + [1] * 7)
    got = sequence_logprobs(hidden, weight, labels, seq_ids, num_seqs=2, impl="torch")
    logp = (hidden.double() @ weight.double().t()).log_softmax(-1)
    per_token = torch.where(labels >= 0, logp.gather(1, labels.clamp(min=0)[:, None])[:, 0], 0.0)
    want = torch.zeros(2, dtype=torch.float64).index_add_(0, seq_ids, per_token)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_the_kernels_folder_under_a_foreign_name_registers_nothing():
    spec = importlib.util.find_spec("kernels")
    if spec is None or Path(spec.origin).parent != ROOT / "kernels":
        pytest.skip("the repository root is not on sys.path here")
    libs = {op: custom_ops.OPDEF_TO_LIB[op] for op in OPS}
    foreign = importlib.import_module("kernels")
    assert foreign is not sdpo.kernels and foreign.__all__ == []
    assert not hasattr(foreign, "sequence_logprobs")
    for name in ("logprobs", "linear_logprobs"):
        with pytest.raises(ImportError, match=r"importable only as sdpo\.kernels"):
            importlib.import_module(f"kernels.{name}")
    # transformers' probe for Hugging Face's kernels package finds the folder: not a usable one
    transformers = pytest.importorskip("transformers")
    assert not transformers.utils.import_utils.is_kernels_available()
    # the live registrations are the ones sdpo.kernels made, and its ops still run
    assert all(custom_ops.OPDEF_TO_LIB[op] is lib for op, lib in libs.items())
    _sequence_logprobs_match_float64()
