"""sdpo: a performance-first training engine for stepwise Direct Preference Optimization.

Layers (dependencies point one way): ``sdpo.kernels`` (fused log-prob ops) <- ``sdpo.engine``
(model, attention, packing, checkpoints, training loop) <- ``sdpo`` (losses, reference cache,
partitioning, the stepwise runner, config and CLI).
"""

__version__ = "0.1.0"
