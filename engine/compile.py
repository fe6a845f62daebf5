"""Regional ``torch.compile``: compile each decoder layer, not the whole model.

Why regional: the decoder layers are identical in code and shape, so Dynamo traces one layer
once and every other layer reuses the same compiled graph (parameters are graph inputs, not
constants). Compile time is that of one block instead of the whole network, and the parts that
do not benefit (the embedding lookup, the rotary tables, the fused log-prob head, which is a
``torch.compiler.disable`` region of its own) stay eager.

Why dynamic: packed batches change their token count N, the number of sequences S and the
longest sequence every batch. Compiling with ``dynamic=True`` makes those sizes (and the
``max_seqlen`` integer) symbolic from the first call, so a new batch shape never triggers a
recompile. Each layer keeps at most a handful of graphs: one with gradients (training), one
without (the scoring pass), and under activation checkpointing the recomputation reuses the
training graph.

What inductor gains inside a layer: RMSNorm (fp32 upcast, mean of squares, rsqrt, scale),
the rotary rotation, the SwiGLU ``silu(gate) * up`` product and the residual adds become a few
fused kernels instead of dozens of elementwise launches and round trips through memory; the
matmuls stay cuBLAS calls and attention stays the varlen/flash kernel.

On the per-sequence SDPA path (CPU, fp32 on a GPU) the attention loop syncs with the host and
runs one SDPA call per sequence; it runs eagerly between two graphs of the layer
(``engine/attention.py``), so a new sequence count does not recompile either.

Under FSDP (``train.fsdp``, ``engine/sharding.py``): compile first, then shard, as torchtitan
does; each compiled layer is one FSDP unit. ``nn.Module.compile`` compiles the module's call,
but Dynamo does not trace ``nn.Module._call_impl`` (torch's own module code): it starts at the
layer's ``forward``. FSDP2's pre- and post-forward hooks (``torch._dynamo.disable``-marked in
torch anyway) thus run eagerly around the compiled forward: they gather the layer's parameters
before it and free them after it, and the graph sees the gathered parameters as ordinary
inputs, the same graphs for every layer and every step. Under activation checkpointing FSDP
gathers again in the backward and the recomputation runs the compiled forward again. The
collectives stay FSDP's own (prefetched, overlapped by its streams), not part of any graph.

Memory for speed (``activation_memory_budget``): when AOTAutograd splits a compiled layer into
forward and backward graphs, its min-cut partitioner chooses which intermediate values the
backward keeps and which it recomputes. A budget below 1 (a fraction of what the default
partition keeps) makes it recompute the values that are cheapest per byte first (norms,
pointwise ops, then matmuls when the budget is low), which is selective activation checkpointing
decided per op by the compiler rather than per layer. The setting is torch's process-wide
``torch._functorch.config.activation_memory_budget``, read whenever a graph is compiled.
"""

from __future__ import annotations

import torch
from torch import nn

from sdpo.kernels.dispatch import build_compiler_disabled

__all__ = ["compile_decoder_layers", "decoder_layers"]


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The repeated blocks of a ``CausalLM`` (``model.model.layers``)."""
    try:
        layers = model.model.layers
    except AttributeError as exc:
        raise TypeError(
            f"compile_decoder_layers expects an sdpo CausalLM (blocks at model.model.layers); "
            f"{type(model).__name__} has none"
        ) from exc
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise TypeError(
            f"{type(model).__name__}.model.layers must be a non-empty nn.ModuleList, "
            f"got {type(layers).__name__}"
        )
    return layers


def compile_decoder_layers(
    model: nn.Module,
    *,
    mode: str | None = None,
    dynamic: bool = True,
    backend: str = "inductor",
    fullgraph: bool = False,
    activation_memory_budget: float | None = None,
) -> nn.Module:
    """Compile every decoder layer of ``model`` in place (``nn.Module.compile``); returns ``model``.

    ``mode`` is torch.compile's mode (None = default; "max-autotune-no-cudagraphs" tries more
    matmul/fusion configurations at a longer compile; CUDA-graph modes do not suit batches whose
    shape changes every step). ``dynamic=True`` marks the token count and ``max_seqlen``
    symbolic from the first call (see the module docstring). ``backend`` "eager" or "aot_eager"
    run the traced graphs without code generation: the CPU tests use them to check that tracing
    changes no numbers. Parameter names, the state dict and checkpoint I/O are unchanged. Call
    it before ``sharding.shard_model`` (the module docstring says why it composes with FSDP).

    ``activation_memory_budget`` (0 to 1; None leaves torch's setting, 1 by default): see the
    module docstring. It is process-wide: it applies to every graph compiled afterwards.

    Compiling twice is harmless (the second call replaces the first). Dynamo's per-code
    recompilation limit is raised to fit one graph per (grad mode x checkpointing) variant.
    """
    if activation_memory_budget is not None:
        if not 0.0 <= activation_memory_budget <= 1.0:
            raise ValueError(
                f"activation_memory_budget must be in [0, 1], got {activation_memory_budget!r}"
            )
        import torch._functorch.config as functorch_config

        functorch_config.activation_memory_budget = float(activation_memory_budget)
    layers = decoder_layers(model)
    build_compiler_disabled()
    # All layers share one code object; a few variants (grad / no grad) must fit under the limit.
    dynamo_config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(getattr(dynamo_config, name), 16))
            break
    options: dict = {"dynamic": dynamic, "backend": backend, "fullgraph": fullgraph}
    if mode is not None:
        options["mode"] = mode
    for layer in layers:
        layer.compile(**options)
    return model
