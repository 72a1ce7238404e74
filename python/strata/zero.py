"""``strata.zero``: DeepSpeed's ZeRO-3 context managers, for scripts that use them.

strata does not partition parameters (ZeRO-3 configs run with whole parameters on every
rank; the optimizer state is still offloaded). So:

- ``Init(...)`` builds the model normally, with whole parameters in CPU memory (and in
  ``dtype`` when given); it says so once. Use it exactly as with DeepSpeed
  (``with strata.zero.Init(): model = ...``).
- ``GatheredParameters(params, modifier_rank=None)`` has nothing to gather. When
  ``modifier_rank`` is given (the block may change the weights), leaving the block copies the
  weights of rank ``modifier_rank`` to every rank (torch.distributed broadcast, when it is
  initialised) and re-reads the fp32 master weights of every strata optimizer that holds these
  parameters, so the change survives the next step. It says once that nothing is gathered.
- ``register_external_parameter(module, parameter)`` has nothing to do.
"""

import contextlib

import torch

from . import comm
from .config import warn_once


class Init(contextlib.ContextDecorator):
    def __init__(self, module=None, data_parallel_group=None, mem_efficient_linear=True,
                 remote_device=None, pin_memory=False, config_dict_or_path=None, config=None,
                 enabled=True, dtype=None, mpu=None, zero_param_parallel_group=None,
                 zero_quantized_weights=False, zero_quantized_nontrainable_weights=False,
                 sequence_data_parallel_group=None, param_swapper=None):
        self.enabled = enabled
        self.dtype = dtype
        self._old_dtype = None
        if enabled:
            warn_once("zero.Init: parameter partitioning is not implemented; the model is "
                      "built with whole parameters in CPU memory (remote_device and "
                      "offload_param have no effect); the optimizer state is still offloaded "
                      "as the config says")
        if module is not None and enabled and dtype is not None:
            module.to(dtype)

    def __enter__(self):
        if self.enabled and self.dtype is not None and self.dtype.is_floating_point:
            self._old_dtype = torch.get_default_dtype()
            # torch refuses half-precision default dtypes; fp16/bf16 models are cast by
            # strata.initialize() as fp16.enabled / bf16.enabled say.
            if self.dtype in (torch.float32, torch.float64):
                torch.set_default_dtype(self.dtype)
        return self

    def __exit__(self, *exc):
        if self._old_dtype is not None:
            torch.set_default_dtype(self._old_dtype)
            self._old_dtype = None
        return False


class GatheredParameters:
    def __init__(self, params, modifier_rank=None, fwd_module=None, enabled=True):
        if isinstance(params, torch.Tensor):
            params = [params]
        self.params = [p for p in (params or []) if isinstance(p, torch.Tensor)]
        self.modifier_rank = modifier_rank
        self.enabled = enabled
        if enabled:
            warn_once("zero.GatheredParameters: parameters are never partitioned in strata, so "
                      "there is nothing to gather; with modifier_rank, changes made in the "
                      "block are broadcast from that rank and re-read into the fp32 masters")

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        if not self.enabled or self.modifier_rank is None or exc_type is not None:
            return False
        if comm.is_initialized() and comm.get_world_size() > 1:
            with torch.no_grad():
                for p in self.params:
                    comm.broadcast(p.data, self.modifier_rank)
        from . import optim

        optim.sync_params(self.params)
        return False


def register_external_parameter(module, parameter):
    """Nothing to do: parameters are whole on every rank."""
    return None


def unregister_external_parameter(module, parameter):
    return None
