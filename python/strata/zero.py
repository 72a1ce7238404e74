"""``strata.zero``: DeepSpeed's ZeRO-3 context managers.

- ``Init(config_dict_or_path=..., remote_device=..., pin_memory=..., dtype=...)``: every
  parameter created inside goes to the param tier (``strata.param_tier``) as its module is
  built — when the outermost ``__init__`` of that module returns — so a model larger than
  memory can be built at all. The tier is the config's ``zero_optimization.offload_param``
  (``remote_device`` "cpu"/"nvme"/"cxl" overrides its device, ``pin_memory`` its pin_memory).
  Without a stage-3 config, or with ``offload_param.device`` none, parameters stay in the
  model's memory (they still get the ``ds_*`` attributes). ``dtype`` casts floating parameters
  as they are offloaded (fp32/fp64 also become the default dtype inside the block). Inside the
  block ``nn.Module.apply`` gathers each module's weights around the call and writes changes
  back (DeepSpeed's ``override_module_apply``), so ``model.apply(init_weights)`` works.
  With several ranks (ZeRO-3 across ranks) each parameter is broadcast from rank 0 as its
  module is built and partitioned: each rank keeps its chunk (``docs/stage3.md``).
- ``GatheredParameters(params, modifier_rank=None)``: the parameters are resident inside the
  block (fetched from the tier where they are not). With ``modifier_rank``, changes made in the
  block are written back to the tier and to the fp32 master weights on exit (and, with several
  ranks, broadcast from that rank first).
- ``register_external_parameter(module, parameter)``: the parameter is fetched with
  ``module`` as if it were its own.
"""

import contextlib

import torch

from . import comm
from . import config as _config
from . import param_tier as _pt
from .config import warn_once

_active = []  # Init blocks open, innermost last


def _all_subclasses(cls):
    out, todo = set(), [cls]
    while todo:
        c = todo.pop()
        for s in c.__subclasses__():
            if s not in out:
                out.add(s)
                todo.append(s)
    return out


class Init(contextlib.ContextDecorator):
    def __init__(self, module=None, data_parallel_group=None, mem_efficient_linear=True,
                 remote_device=None, pin_memory=False, config_dict_or_path=None, config=None,
                 enabled=True, dtype=None, mpu=None, zero_param_parallel_group=None,
                 zero_quantized_weights=False, zero_quantized_nontrainable_weights=False,
                 sequence_data_parallel_group=None, param_swapper=None):
        self.enabled = enabled
        self.dtype = dtype
        self._old_dtype = None
        self._patched = []
        self.tier = None
        if not enabled:
            return
        cfg = config_dict_or_path if config_dict_or_path is not None else config
        user = _config._read(cfg) if cfg is not None else {}
        if remote_device not in (None, "none"):
            user.setdefault("zero_optimization", {}).setdefault("offload_param", {})
            user["zero_optimization"]["offload_param"]["device"] = str(remote_device)
            if pin_memory:
                user["zero_optimization"]["offload_param"]["pin_memory"] = True
            user["zero_optimization"].setdefault("stage", 3)
        filled = _config.load_config(user, quiet=True)
        stage = int(_config.get(filled, "zero_optimization.stage"))
        if stage == 3:
            # With several ranks the tier is partitioned: each rank keeps its chunk of every
            # parameter (rank 0's values, broadcast as each module is built).
            self.tier = _pt.ParamTier(filled, tag="param")
        if module is not None:
            self._offload_tree(module)

    # ---- offloading a module's parameters once its construction is over -----------
    def _offload_tree(self, module):
        if self.dtype is not None:
            for p in module.parameters():
                if p.is_floating_point() and p.dtype != self.dtype and _pt.tier_of(p) is None:
                    p.data = p.data.to(self.dtype)
        if self.tier is not None:
            if self.tier.partitioned:
                with torch.no_grad():
                    for p in module.parameters():
                        if _pt.tier_of(p) is None:
                            comm.broadcast(p.data, 0)
            self.tier.offload_module(module)

    def _wrap_init(self, cls):
        orig = cls.__dict__.get("__init__")
        if orig is None or getattr(orig, "_strata_wrapped", False):
            return
        init = self

        def __init__(module, *args, **kwargs):
            depth = module.__dict__.get("_strata_init_depth", 0)
            module.__dict__["_strata_init_depth"] = depth + 1
            try:
                orig(module, *args, **kwargs)
            finally:
                module.__dict__["_strata_init_depth"] = depth
            if depth == 0:
                del module.__dict__["_strata_init_depth"]
                init._offload_tree(module)

        __init__._strata_wrapped = True
        __init__.__wrapped__ = orig
        cls.__init__ = __init__
        self._patched.append((cls, "__init__", orig))

    def __enter__(self):
        if not self.enabled:
            return self
        if self.dtype is not None and self.dtype in (torch.float32, torch.float64):
            # torch refuses half-precision default dtypes; those are cast at offload.
            self._old_dtype = torch.get_default_dtype()
            torch.set_default_dtype(self.dtype)
        for cls in _all_subclasses(torch.nn.Module):
            self._wrap_init(cls)
        init = self
        old_subclass = torch.nn.Module.__dict__.get("__init_subclass__")

        @classmethod
        def __init_subclass__(cls, **kwargs):
            super(torch.nn.Module, cls).__init_subclass__(**kwargs)
            init._wrap_init(cls)

        torch.nn.Module.__init_subclass__ = __init_subclass__
        self._patched.append((torch.nn.Module, "__init_subclass__", old_subclass))
        if self.tier is not None and (not self.tier.resident or self.tier.partitioned):
            orig_apply = torch.nn.Module.apply

            def apply(module, fn):
                for child in module.children():
                    child.apply(fn)
                with GatheredParameters(list(module.parameters(recurse=False)),
                                        modifier_rank=0):
                    fn(module)
                return module

            torch.nn.Module.apply = apply
            self._patched.append((torch.nn.Module, "apply", orig_apply))
        _active.append(self)
        return self

    def __exit__(self, *exc):
        for cls, name, orig in reversed(self._patched):
            if orig is None:
                delattr(cls, name)
            else:
                setattr(cls, name, orig)
        self._patched = []
        if self in _active:
            _active.remove(self)
        if self._old_dtype is not None:
            torch.set_default_dtype(self._old_dtype)
            self._old_dtype = None
        if self.tier is not None and self.tier.store is not None:
            self.tier.store.trim_staging()  # the largest parameter's staging memory
        return False


def _window_of(params):
    for p in params:
        t = _pt.tier_of(p)
        if t is not None and t.window is not None:
            return t.window
    return None


class _Standalone:
    """Gathers parameters whose tier has no window yet (before ``strata.initialize``)."""

    def __init__(self, params):
        self.params = [p for p in params if _pt.fetched_on_demand(p)]
        self.bufs = {}

    def gather(self):
        for p in self.params:
            if _pt.partitioned(p):  # all-gathered: every rank takes part
                with torch.no_grad():
                    p.data = _pt.read_weights(p)
                p.ds_status = _pt.AVAILABLE
                continue
            store = p._strata_tier.store
            buf = store.staging(store.record_bytes(p.ds_id))
            store.fetch(p.ds_id, buf)
            self.bufs[id(p)] = buf
            with torch.no_grad():
                p.data = _pt.tensor_from_buffer(buf, p.dtype)[:p.ds_numel].view(p.ds_shape)
            p.ds_status = _pt.AVAILABLE

    def write_back(self):
        for p in self.params:
            if _pt.partitioned(p):
                _pt.write_local(p, _pt.own_piece(p, p.data))
                continue
            p._strata_tier.store.store(p.ds_id, self.bufs[id(p)])

    def release(self):
        for p in self.params:
            with torch.no_grad():
                p.data = torch.empty(0, dtype=p.dtype)
            p.ds_status = _pt.NOT_AVAILABLE
        self.bufs = {}


class GatheredParameters:
    def __init__(self, params, modifier_rank=None, fwd_module=None, enabled=True):
        if isinstance(params, torch.Tensor):
            params = [params]
        self.params = [p for p in (params or []) if isinstance(p, torch.Tensor)]
        self.modifier_rank = modifier_rank
        self.enabled = enabled
        self._standalone = None
        self._window = None

    def __enter__(self):
        if not self.enabled:
            return self
        on_demand = [p for p in self.params if _pt.fetched_on_demand(p)]
        if on_demand:
            self._window = _window_of(on_demand)
            if self._window is not None:
                if not self._window.gather(on_demand):
                    raise ValueError(
                        f"strata: GatheredParameters needs {sum(p.ds_numel for p in on_demand)} "
                        "elements resident at once, more than the parameter window holds "
                        f"({self._window.tier.max_live}); gather fewer parameters at a time")
            else:
                self._standalone = _Standalone(on_demand)
                self._standalone.gather()
        return self

    def __exit__(self, exc_type, *exc):
        if not self.enabled:
            return False
        on_demand = [p for p in self.params if _pt.fetched_on_demand(p)]
        try:
            if self.modifier_rank is not None and exc_type is None:
                if comm.is_initialized() and comm.get_world_size() > 1:
                    with torch.no_grad():
                        for p in self.params:
                            comm.broadcast(p.data, self.modifier_rank)
                if self._standalone is not None:
                    self._standalone.write_back()
                elif self._window is not None:
                    for p in on_demand:
                        if _pt.partitioned(p):  # this rank's chunk of the new values
                            _pt.write_local(p, _pt.own_piece(p, p.data))
                            continue
                        self._window.write_back(p)
                from . import optim

                optim.sync_params(self.params)
        finally:
            if self._standalone is not None:
                self._standalone.release()
            elif self._window is not None:
                self._window.release(on_demand)
        return False


def register_external_parameter(module, parameter):
    """``parameter`` (used by ``module``'s forward but owned elsewhere) is fetched with
    ``module``."""
    w = _window_of([parameter])
    if w is None or not _pt.fetched_on_demand(parameter):
        return None
    entry = w._modules.get(id(module))
    if entry is None:
        import weakref

        w._modules[id(module)] = (weakref.ref(module), [parameter])
        w._hooks.append(module.register_forward_pre_hook(w._pre_forward))
        w._hooks.append(module.register_forward_hook(w._post_forward))
    elif all(q is not parameter for q in entry[1]):
        entry[1].append(parameter)
    return None


def unregister_external_parameter(module, parameter):
    w = _window_of([parameter])
    if w is None:
        return None
    entry = w._modules.get(id(module))
    if entry is not None:
        entry[1][:] = [q for q in entry[1] if q is not parameter]
    return None
