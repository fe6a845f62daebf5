"""Sharded loading (``load_pretrained(..., shard=...)``, what ``train.fsdp`` runs) with real
``torch.distributed`` (gloo, two CPU processes): the model is built and sharded on the meta
device and each rank reads only its rows of every tensor. Its local shards are bitwise those of
a whole load followed by ``shard_model`` (untied with q/k/v biases from a multi-file checkpoint
with an index, tied from one file; fp32, bf16, bf16-mixed; odd row counts, so the shards are
uneven), and together they are the stored tensors; its forward equals one process's (compiled
layers too); and no rank ever allocates a whole weight matrix while loading."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_leaves

from sdpo.engine import sharding
from sdpo.engine.checkpoint import INDEX_NAME, load_pretrained, save_pretrained, weight_files
from sdpo.engine.compile import compile_decoder_layers
from sdpo.engine.model import CausalLM, ModelConfig, init_model
from sdpo.engine.precision import parameter_dtype
from tests.test_distributed import _alongside

PRECISIONS = ("fp32", "bf16", "bf16-mixed")


def _config(*, tied: bool) -> ModelConfig:
    # odd row counts everywhere they can be (vocab, intermediate, hidden, k/v heads x head_dim),
    # so FSDP2's dim-0 split gives the two ranks different row counts
    return ModelConfig(
        vocab_size=53,
        hidden_size=21,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=3,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=128,
        tie_word_embeddings=tied,
        attention_bias=not tied,  # Qwen2-style q/k/v biases: 1-D tensors split too
        model_type="llama" if tied else "qwen2",
    )


def _write(folder: Path, *, tied: bool, seed: int) -> Path:
    model = init_model(_config(tied=tied), seed=seed)
    # 8 KiB shards: the untied model spans several files listed in an index
    save_pretrained(model, folder, max_shard_bytes=8 * 2**10 if not tied else 2**30)
    return folder


def _batch() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(5)
    lengths = [7, 3, 11]
    ids = torch.randint(0, 53, (sum(lengths),), generator=g)
    pos = torch.cat([torch.arange(n) for n in lengths])
    cu = torch.tensor([0, 7, 10, 21], dtype=torch.int32)
    return ids, pos, cu, max(lengths)


def _forward(model: CausalLM, precision: str) -> dict[str, torch.Tensor]:
    """Final hidden states and every token's log-probabilities over the vocabulary (fp32)."""
    from sdpo.engine.precision import autocast_context

    ids, pos, cu, longest = _batch()
    with torch.no_grad(), autocast_context(precision, "cpu"):
        hidden = model(ids, pos, cu, longest)
        logits = hidden.float() @ model.lm_head_weight.float().T  # (N, V)
    sharding.reshard(model)
    return {"hidden": hidden.float(), "logprobs": logits.log_softmax(-1)}


class _Allocations(TorchDispatchMode):
    """Records every storage an op allocates (an output whose storage is none of its inputs'):
    its shape and bytes. Views of a memory-mapped file (what safetensors hands out) allocate
    nothing; a tensor copied whole to a device or cast to another dtype does."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []
        self.largest = 0

    @staticmethod
    def _plain(tree) -> list[torch.Tensor]:
        out, todo = [], [x for x in tree_leaves(tree) if isinstance(x, torch.Tensor)]
        while todo:
            t = todo.pop()
            if is_traceable_wrapper_subclass(t):  # a DTensor: its local tensor
                inner = (getattr(t, name) for name in t.__tensor_flatten__()[0])
                todo.extend(x for x in inner if isinstance(x, torch.Tensor))
            else:
                out.append(t)
        return out

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = {
            t.untyped_storage().data_ptr()
            for t in self._plain((args, kwargs))
            if t.device.type != "meta"
        }
        inputs |= {
            s.data_ptr() for s in tree_leaves((args, kwargs)) if isinstance(s, torch.UntypedStorage)
        }
        out = func(*args, **kwargs)
        for t in self._plain(out):
            if t.device.type == "meta" or t.untyped_storage().nbytes() == 0:
                continue
            if t.untyped_storage().data_ptr() not in inputs:
                self.shapes.append(tuple(t.shape))
                self.largest = max(self.largest, t.untyped_storage().nbytes())
        return out


def _local(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        name: (p.to_local() if sharding.is_dtensor(p) else p).detach().clone()
        for name, p in model.named_parameters()
    }


def _loads(folders: dict[str, Path]) -> dict:
    """On each rank, per model and precision: the local shards of the sharded load and of a whole
    load then ``shard_model``, their buffers, the allocations of both loads, the forwards."""
    out = {}
    for kind, folder in folders.items():
        for precision in PRECISIONS:
            dtype = parameter_dtype(precision)

            def shard(model, precision=precision):
                sharding.shard_model(model, precision=precision, device="cpu")

            with _Allocations() as ours:
                model = load_pretrained(folder, dtype=dtype, shard=shard)
            with _Allocations() as whole:
                reference = load_pretrained(folder, dtype=dtype)
                sharding.shard_model(reference, precision=precision)
            out[kind, precision] = {
                "local": _local(model),
                "reference": _local(reference),
                "local_padded_bytes": max(
                    -(-p.shape[0] // 2) * p[0].numel() * p.element_size()
                    for p in model.parameters()
                ),
                "buffers": dict(model.named_buffers()),
                "reference_buffers": dict(reference.named_buffers()),
                "allocated": ours.shapes,
                "largest": ours.largest,
                "whole_allocated": whole.shapes,
                "forward": _forward(model, precision),
                "reference_forward": _forward(reference, precision),
            }
    # compiled layers, compiled on the meta device before sharding (as the runner does)
    folder = folders["untied"]

    def compiled(model):
        compile_decoder_layers(model, backend="eager")
        sharding.shard_model(model, precision="fp32", device="cpu")

    model = load_pretrained(folder, shard=compiled)
    out["compiled"] = {"local": _local(model), "forward": _forward(model, "fp32")}
    return out


@pytest.fixture(scope="module")
def loads(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp_load")
    folders = {
        "untied": _write(tmp / "untied", tied=False, seed=3),
        "tied": _write(tmp / "tied", tied=True, seed=4),
    }
    assert (folders["untied"] / INDEX_NAME).is_file()
    assert len(set(weight_files(folders["untied"]).values())) > 2
    single, ranks = _alongside(
        lambda: {
            (kind, precision): _forward(
                load_pretrained(folder, dtype=parameter_dtype(precision)), precision
            )
            for kind, folder in folders.items()
            for precision in PRECISIONS
        },
        tmp,
        _loads,
        folders,
    )
    return folders, single, ranks


def _stored(folder: Path, name: str, dtype: torch.dtype) -> torch.Tensor:
    with safe_open(weight_files(folder)[name], framework="pt") as f:
        return f.get_tensor(name).to(dtype)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("kind", ["untied", "tied"])
def test_sharded_load_gives_the_local_shards_of_a_whole_load_then_shard(loads, kind, precision):
    folders, _, ranks = loads
    dtype = parameter_dtype(precision)
    uneven = 0
    for got in ranks:
        got = got[kind, precision]
        assert got["local"].keys() == got["reference"].keys()
        for name, want in got["reference"].items():
            assert got["local"][name].dtype == want.dtype == dtype, name
            assert torch.equal(got["local"][name], want), name
        assert got["buffers"].keys() == got["reference_buffers"].keys()
        for name, b in got["reference_buffers"].items():
            assert torch.equal(got["buffers"][name], b), name
    # together the two ranks' rows are the stored tensors, in order (an independent truth of
    # the split): every tensor, lm_head absent when tied
    first, second = (r[kind, precision]["local"] for r in ranks)
    for name in first:
        want = _stored(folders[kind], name, dtype)
        assert torch.equal(torch.cat([first[name], second[name]]), want), name
        uneven += first[name].shape[0] != second[name].shape[0]
    assert ("lm_head.weight" in first) == (kind == "untied")
    assert uneven >= 5  # the odd row counts did split unevenly


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("kind", ["untied", "tied"])
def test_sharded_load_forward_equals_one_process(loads, kind, precision):
    _, single, ranks = loads
    want = single[kind, precision]
    # bf16-mixed: sharded, the fp32 master weights are gathered as bf16 copies; in one process
    # autocast casts them per op, so the two round differently (within bf16's precision)
    eps = torch.finfo(torch.bfloat16).eps if precision == "bf16-mixed" else 1e-6
    for got in ranks:
        got = got[kind, precision]
        for key, value in want.items():
            # the same shards give the same bits as a whole load then shard_model
            assert torch.equal(got["forward"][key], got["reference_forward"][key]), key
            tol = 8 * eps * value.abs().max().item()
            assert (got["forward"][key] - value).abs().max().item() <= tol, key


def test_sharded_load_of_compiled_layers_equals_one_process(loads):
    _, single, ranks = loads
    for got in ranks:
        for name, t in got["untied", "fp32"]["local"].items():
            assert torch.equal(got["compiled"]["local"][name], t), name
        for key, value in single["untied", "fp32"].items():
            assert torch.allclose(got["compiled"]["forward"][key], value, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", ["untied", "tied"])
def test_sharded_load_never_allocates_a_whole_weight_matrix(loads, kind):
    _, _, ranks = loads
    config = _config(tied=kind == "tied")
    with torch.device("meta"):
        matrices = {tuple(p.shape) for p in CausalLM(config).parameters() if p.dim() == 2}
    for got in ranks:
        for precision in PRECISIONS:
            got_p = got[kind, precision]
            assert got_p["allocated"], "the recorder saw the shards being allocated"
            assert not matrices & set(got_p["allocated"]), (precision, got_p["allocated"])
            # nothing larger than the largest padded local shard, anywhere in the load
            assert got_p["largest"] <= got_p["local_padded_bytes"], precision
        # the check can fail: a whole load allocates every matrix whole when it casts to bf16
        assert matrices <= set(got[kind, "bf16"]["whole_allocated"])


def test_sharded_load_refuses_a_bad_checkpoint_with_the_whole_loads_error(tmp_path):
    """The same checks and messages as a whole load, before anything is built or sharded."""
    from sdpo.engine.checkpoint import CheckpointError

    folder = _write(tmp_path / "m", tied=True, seed=6)
    config_path = folder / "config.json"
    for change in ({"intermediate_size": 39}, {"tie_word_embeddings": False}):
        config = {**json.loads(config_path.read_text()), **change}
        config_path.write_text(json.dumps(config))
        with pytest.raises(CheckpointError) as whole:
            load_pretrained(folder)
        called = []
        with pytest.raises(CheckpointError) as sharded:
            load_pretrained(folder, shard=called.append)
        assert str(sharded.value) == str(whole.value)
        assert ("has shape" in str(whole.value)) == ("intermediate_size" in change)
        assert not called
