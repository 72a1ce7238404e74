"""``strata.ops``: DeepSpeed's optimizer class names, mapped to strata's offloaded optimizers.

``strata.ops.adam.DeepSpeedCPUAdam``, ``strata.ops.adam.FusedAdam`` and
``strata.ops.adagrad.DeepSpeedCPUAdagrad`` take DeepSpeed's constructor arguments and return
strata optimizers (``strata.optim.OffloadAdamW``/``OffloadAdam``/``OffloadAdagrad``). Built
directly they keep their state in pinned DRAM (``offload_optimizer.device`` "cpu") unless a
``config=`` says otherwise; passed to ``strata.initialize`` they are rebuilt on the tiers that
the engine's config names.
"""

from . import adagrad, adam  # noqa: F401
