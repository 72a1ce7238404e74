"""The DeepSpeed-style training engine returned by ``strata.initialize``.

``Engine`` wraps the model (``engine.module``) and a strata optimizer whose state lives on the
tiers the config names. The training loop is DeepSpeed's:

    loss = engine(batch)     # forward (fp16.auto_cast casts floating inputs to fp16)
    engine.backward(loss)    # loss / gradient_accumulation_steps (x loss scale with fp16)
    engine.step()            # acts at accumulation boundaries only

At a boundary ``step()`` reads the global gradient statistics from the engine (sum of squares
and inf/NaN, in a fixed order), skips the step on an fp16 overflow (lowering the loss scale and
counting it), folds the loss-scale inverse and the clip coefficient
``min(1, gradient_clipping / (norm + 1e-6))`` into one gradient multiplier that the C++ update
applies on the fly, runs the update, zeroes the gradients, and steps the LR schedule
(``lr_scheduler.step()`` is skipped on overflow, as in DeepSpeed). ``global_steps`` counts
boundaries (skipped ones too), ``micro_steps`` calls to ``step()``.

Several ranks (torch.distributed initialised, e.g. by ``python -m strata launch``): every rank
starts from rank 0's weights, the optimizer is strata.sharded's data-parallel version (ZeRO
stage 0, 1 or 2: gradients reduced in buckets, the state sharded across ranks), the gradient
statistics are global, ``save_checkpoint``/``load_checkpoint`` are collectives (each rank its
shard), and only rank 0 prints. See docs/distributed.md.

See docs/deepspeed.md for what is honoured and what is accepted without effect.
"""

import logging
import math
import os
import time

import torch

from . import checkpoint as _ckpt
from . import comm
from . import config as _config
from . import loss_scaler as _loss_scaler
from . import lr_schedules
from . import overlap_choice
from . import param_tier as _pt
from . import sharded as _sharded
from ._torch_compat import note_optimizer_step
from .optim import (OffloadAdagrad, OffloadAdam, OffloadAdamW, OffloadSGD, _OffloadOptimizer)
from .testing.kill_points import kill_during, kill_point

log = logging.getLogger("strata")

_engine_counter = 0


class _ClientOptimizer(torch.optim.Optimizer):
    """A client optimizer strata cannot offload, run as given on the model's parameters.

    The engine still does gradient accumulation, fp16 loss scaling (the gradients are unscaled
    in place before ``step``), clipping and the schedule; the optimizer's state stays wherever
    it keeps it. It is a ``torch.optim.Optimizer`` whose ``param_groups``, ``state`` and
    ``defaults`` are the client's own (DeepSpeed's wrappers likewise expose the client as
    ``.optimizer``), so torch's and DeepSpeed's schedulers and ``isinstance`` checks accept it.
    ``torch.optim.Optimizer.__init__`` is not called: there is nothing of its own to hold.
    """

    def __init__(self, optimizer):  # noqa: super().__init__ deliberately not called
        self.optimizer = optimizer
        self._pending_grad_mul = None
        self._poisoned = None
        self.closed = False

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value):
        self.optimizer.param_groups = value

    @property
    def state(self):
        return self.optimizer.state

    @state.setter
    def state(self, value):
        self.optimizer.state = value

    @property
    def defaults(self):
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value):
        self.optimizer.defaults = value

    def add_param_group(self, param_group):
        self.optimizer.add_param_group(param_group)

    def __repr__(self):
        return f"_ClientOptimizer({self.optimizer!r})"

    def _params(self):
        seen = set()
        for g in self.optimizer.param_groups:
            for p in g["params"]:
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    yield p

    def grad_stats(self):
        total = 0.0
        for p in self._params():
            if p.grad is not None:
                total += float(p.grad.detach().double().pow(2).sum())
        return total, not math.isfinite(total)

    def grad_arenas(self):
        return [p.grad for p in self._params() if p.grad is not None]

    def step(self, closure=None):
        mul = self._pending_grad_mul
        self._pending_grad_mul = None
        if mul is not None and mul != 1.0:
            with torch.no_grad():
                for p in self._params():
                    if p.grad is not None:
                        p.grad.mul_(mul)
        return self.optimizer.step(closure)

    def zero_grad(self, set_to_none=None):
        for p in self._params():
            if p.grad is not None:
                p.grad.detach_()
                p.grad.zero_()

    def state_dict(self):
        return self.optimizer.state_dict()

    def load_state_dict(self, sd):
        self.optimizer.load_state_dict(sd)

    def close(self):
        self.closed = True


def _named_unique_params(module):
    """name -> parameter for the module's parameters, the first name of tied ones."""
    out = {}
    for name, p in module.named_parameters():
        out.setdefault(id(p), name)
    return out


_TORCH_TO_STRATA = {
    torch.optim.AdamW: OffloadAdamW,
    torch.optim.Adam: OffloadAdam,
    torch.optim.SGD: OffloadSGD,
    torch.optim.Adagrad: OffloadAdagrad,
}


class Engine(torch.nn.Module):
    """The engine; build it with ``strata.initialize`` (see the module doc)."""

    def __init__(self, *, module, config, optimizer=None, model_parameters=None,
                 lr_scheduler=None, training_data=None, collate_fn=None, args=None):
        super().__init__()
        global _engine_counter
        _engine_counter += 1
        self._tag = f"e{_engine_counter}"
        self.module = module
        self._config = config
        self._closed = False
        self.world_size = comm.get_world_size()
        self.global_rank = comm.get_rank()
        self.local_rank = comm.get_local_rank()
        if args is not None and getattr(args, "local_rank", None) not in (None, -1):
            self.local_rank = int(args.local_rank)
        self.global_steps = 0
        self.global_samples = 0
        self.micro_steps = 0
        self.skipped_steps = 0
        self._boundary_override = None
        self._global_grad_norm = None
        self._step_applied = False
        self._client_torch_optimizer = None
        self._timers = {"forward": 0.0, "backward": 0.0, "step": 0.0}
        self._progress = _config.get(config, "strata.progress")
        self._overlap_backward = bool(_config.get(config, "strata.overlap_backward"))
        self._overlap_mode = str(_config.get(config, "strata.overlap_mode"))
        self._overlap_plain = False   # strata.overlap_mode auto chose a plain backward
        self.overlap_decision = None  # {"overlap", "why", "from_step"} once decided
        self._phase_s = {"forward": 0.0, "backward": 0.0}  # this step's, all micro-steps
        self._boundaries = 0

        # DeepSpeed's names of modules with sparse gradients (sparse_gradients): strata refuses
        # such modules (_check_module), so the set is always empty.
        self.sparse_tensor_module_names = set()
        self._gradient_average = self._check_allreduce_op(config)
        self._grads_released = False
        self._check_module(module)
        self.device = self._module_device(module)
        if self.world_size > 1:
            comm.quiet_other_ranks()  # rank-0-only warnings, unless STRATA_LOG_ALL_RANKS=1
            self._broadcast_module()
        fp32_sources = self._cast_module()
        self.param_tier = self._configure_param_tier()
        self._load_hook = None
        self.optimizer = self._configure_optimizer(optimizer, model_parameters, fp32_sources)
        del fp32_sources
        try:
            self.lr_scheduler = self._configure_lr_scheduler(
                lr_scheduler, optimizer if isinstance(optimizer, torch.optim.Optimizer) else None)
            self.loss_scaler = _loss_scaler.from_config(config, rank0=self.global_rank == 0,
                                                        stage=self.zero_optimization_stage())
            if self.loss_scaler is not None and self.optimizer is not None:
                # DeepSpeed's fp16 optimizers carry their scaler as loss_scale_config
                # (cur_scale, cur_iter, scale_window, dynamic_loss_scale): the same object.
                self.optimizer.loss_scale_config = self.loss_scaler
            self.training_dataloader = self._configure_dataloader(training_data, collate_fn)
        except BaseException:
            self.close()  # release the optimizer's pool and swap file now, not at GC
            raise
        if hasattr(module, "register_load_state_dict_post_hook"):
            self._load_hook = module.register_load_state_dict_post_hook(self._after_module_load)
        self._report_threads()
        self._check_openmp_spin()

    def _check_openmp_spin(self):
        """A CPU model whose torch threads fill every core: torch's OpenMP threads spin between
        ops unless OMP_WAIT_POLICY says otherwise, taking CPU from the BLAS's own threads and
        strata's update and I/O threads. Said once; the variable must be set before Python starts
        (libgomp reads it when it loads), which ``python -m strata launch`` does."""
        if self.device.type != "cpu" or not isinstance(self.optimizer, _OffloadOptimizer):
            return
        if not comm.openmp_spins():
            return
        if "OpenMP" not in torch.__config__.parallel_info():
            return
        cores = _config._C.usable_cpus()
        if torch.get_num_threads() < cores:
            return
        _config.warn_once(
            f"torch's {torch.get_num_threads()} OpenMP threads fill the {cores} CPUs and spin "
            "between operations (OMP_WAIT_POLICY unset), taking CPU from the BLAS and from "
            "strata's update and I/O threads; set OMP_WAIT_POLICY=PASSIVE in the environment "
            "before Python starts (python -m strata launch does; measured in "
            "docs/performance.md, 'torch's OpenMP threads')")

    def _report_threads(self):
        """Say at start which threads will share the cores, so oversubscription is visible."""
        if self.global_rank != 0 or self._progress == "off" or not isinstance(self.optimizer, _OffloadOptimizer):
            return
        st = self.optimizer.stats()
        cores = _config._C.usable_cpus()
        during = _config._C.backward_update_threads(torch.get_num_threads())
        io = st.get("io_backend") or "none (state in memory)"
        print(f"[strata] threads: update {st.get('threads')} ({st.get('isa')}), "
              f"{during if self._overlap_backward and self.world_size == 1 else 0} while backward runs; "
              f"torch intra-op {torch.get_num_threads()}; I/O {io}; {cores} CPUs", flush=True)

    # ---- set-up ------------------------------------------------------------
    @staticmethod
    def _check_allreduce_op(config):
        op = str(_config.get(config, "gradient_allreduce_op")).lower()
        if op == "sum" and int(_config.get(config, "zero_optimization.stage")) == 3:
            raise ValueError("gradient_allreduce_op='sum' is not supported with ZeRO stage 3 "
                             "(as in DeepSpeed)")
        return op != "sum"

    @staticmethod
    def _check_module(module):
        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"strata.initialize: model must be a torch.nn.Module, not "
                            f"{type(module).__name__}")
        for name, m in module.named_modules():
            if isinstance(m, (torch.nn.Embedding, torch.nn.EmbeddingBag)) and m.sparse and any(
                    p.requires_grad for p in m.parameters()):
                raise ValueError(
                    f"strata: {name or 'the model'} ({type(m).__name__}) produces sparse "
                    "gradients (sparse=True); strata needs dense gradients — construct it with "
                    "sparse=False")

    @staticmethod
    def _module_device(module):
        devices = {p.device for p in module.parameters()}
        if len(devices) > 1:
            raise ValueError("strata: the model's parameters live on several devices "
                             f"({', '.join(sorted(str(d) for d in devices))}); move the model "
                             "to one device first")
        dev = next(iter(devices)) if devices else torch.device("cpu")
        if dev.type == "meta":
            raise ValueError(
                "strata: the model's parameters are on the meta device (shape only, no memory); "
                "materialise the model first (model.to_empty(device='cpu') and load its "
                "weights) — strata.zero.Init does not defer parameter creation")
        return dev

    def _broadcast_module(self):
        """Several ranks: every rank starts from rank 0's weights and buffers (as DeepSpeed's
        engine does), before any cast, so the fp32 masters agree too."""
        with torch.no_grad():
            seen = set()
            for t in list(self.module.parameters()) + list(self.module.buffers()):
                if t.data_ptr() in seen or t.numel() == 0:
                    continue
                seen.add(t.data_ptr())
                comm.broadcast(t.data, 0)

    def _dp_class(self, klass):
        """Several ranks: the data-parallel version of a strata optimizer class
        (strata.sharded: ZeRO stage 0, 1 or 2 as the config says)."""
        return _sharded.sharded_class(klass) if self.world_size > 1 else klass

    def _new_optimizer(self, klass):
        opt = klass.__new__(klass)
        opt._param_names = self._names_by_id()
        opt._dp_synced_init = True  # _broadcast_module already gave every rank rank 0's weights
        return opt

    def _cast_module(self):
        """fp16/bf16: cast the module as DeepSpeed does, keeping references to the fp32
        weights so that the masters start from them, not from their rounded copies."""
        target = None
        if self.fp16_enabled():
            target = torch.float16
        elif self.bfloat16_enabled():
            target = torch.bfloat16
        if target is None:
            return {}
        params = list(self.module.parameters())
        tiered = [p for p in params if _pt.on_tier(p)]
        if tiered:
            # Built under strata.zero.Init: the weights on the param tier are the model's;
            # they must already be in the training dtype (zero.Init(dtype=...)).
            wrong = sorted({str(p.dtype) for p in tiered if p.dtype != target})
            if wrong:
                raise ValueError(
                    f"strata: the model was built under strata.zero.Init with {', '.join(wrong)} "
                    f"weights, but the config trains in {target} ({'fp16' if self.fp16_enabled() else 'bf16'}"
                    f".enabled); build it with strata.zero.Init(dtype={target}, ...)")
        sources = {id(p): p.data for p in params
                   if p.dtype == torch.float32 and p.requires_grad and not _pt.on_tier(p)}
        with torch.no_grad():
            for p in params:
                if not _pt.on_tier(p) and p.is_floating_point():
                    p.data = p.data.to(target)
            for m in self.module.modules():
                for k, b in m._buffers.items():
                    if b is not None and b.is_floating_point():
                        m._buffers[k] = b.to(target)
        return sources

    def _configure_param_tier(self):
        """ZeRO stage 3: the param tier the model's weights live on (``strata.param_tier``).
        A model built under ``strata.zero.Init`` is already on it; one built outside is moved
        now (its whole weights were in memory until then: said once), and so are parameters
        added after its construction. With several ranks each rank keeps its chunk of every
        parameter (partitioned; rank 0's weights, broadcast before). With weights fetched on
        demand (cxl, nvme, or partitioned) a ``ParamWindow`` fetches each module's weights
        around its forward and backward."""
        if self.zero_optimization_stage() != 3:
            return None
        params = list(self.module.parameters())
        tiers = {id(t): t for p in params for t in [_pt.tier_of(p)] if t is not None}
        if len(tiers) > 1:
            raise ValueError("strata: the model's parameters were built under several "
                             "strata.zero.Init blocks with different configs; use one")
        tier = next(iter(tiers.values()), None)
        names = self._names_by_id()
        built_outside = tier is None
        if tier is None:
            tier = _pt.ParamTier(self._config, tag=f"{self._tag}-param")
        moved = 0
        for p in params:
            nbytes = p.numel() * p.element_size()
            if tier.offload(p, names.get(id(p))):
                moved += nbytes
        if built_outside and moved:
            _config.warn_once(
                f"zero_optimization.stage 3: the model was built outside strata.zero.Init, so "
                f"its {moved / 2**20:.1f} MiB of weights were all in memory before moving to "
                f"the param tier ({tier.describe()}); build it under "
                "strata.zero.Init(config_dict_or_path=...) to avoid that peak")
        if tier.store is not None:
            tier.store.trim_staging()
            lanes = _pt.lanes_for(self.device) if tier.lanes is None else None
            if lanes is not None:
                tier.attach_lanes(lanes)
        if tier.on_demand and tier.window is None:
            _pt.ParamWindow(tier, self.module)
        return tier

    # DeepSpeed's ZERO_SUPPORTED_OPTIMIZERS (deepspeed/runtime/zero/utils.py), by name so that
    # no import is needed; strata's own classes (and DeepSpeed's names for them) are tested.
    _ZERO_TESTED = (torch.optim.Adam, torch.optim.AdamW, torch.optim.Adagrad)

    def _check_client_optimizer(self, client):
        """DeepSpeed refuses, under ZeRO (stage >= 1), a client optimizer outside its tested
        list unless ``zero_allow_untested_optimizer`` is true."""
        if self.zero_optimization_stage() < 1 or isinstance(client, _OffloadOptimizer):
            return
        if type(client) in self._ZERO_TESTED:
            return
        if not _config.get(self._config, "zero_allow_untested_optimizer"):
            raise _config.DeepSpeedAssertion(
                f"strata.initialize: {type(client).__name__} is not one of the optimizers "
                "DeepSpeed tests with ZeRO (torch Adam, AdamW, Adagrad, or DeepSpeed's/strata's "
                'own); add "zero_allow_untested_optimizer": true to the config to use it')
        if self.global_rank == 0:
            _config.warn_once(f"ZeRO with an untested optimizer ({type(client).__name__}): "
                              "proceed with caution")

    def _check_data_types(self, params):
        """DeepSpeed at ZeRO stage 0 takes only grad_accum_dtype == the model's dtype
        ("unsupported mix of model_dtype and grad_accum_dtype"). strata also honours fp32
        accumulation for a bf16/fp16 model in one process (docs/deepspeed.md); every other
        mix at stage 0 is refused as DeepSpeed refuses it."""
        want = _config.get(self._config, "data_types.grad_accum_dtype")
        if want is None or self.zero_optimization_stage() != 0:
            return
        names = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16,
                 "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
        accum = names.get(str(want).lower())
        model = {p.dtype for p in params if p.requires_grad}
        for dt in model:
            if dt == accum:
                continue
            if accum == torch.float32 and dt in (torch.bfloat16, torch.float16) \
                    and self.world_size == 1:
                continue
            raise NotImplementedError(
                f"strata: unsupported mix of model dtype {dt} and data_types.grad_accum_dtype "
                f"{want!r} at ZeRO stage 0 (as in DeepSpeed); use the model's dtype"
                + (", or fp32 accumulation in one process" if self.world_size == 1 else
                   ", or ZeRO stage 2 for fp32 accumulation with several ranks"))

    def _configure_optimizer(self, client, model_parameters, fp32_sources):
        cfg = self._config
        params = model_parameters if model_parameters is not None else self.module.parameters()
        if isinstance(params, torch.Tensor):
            params = [params]
        params = list(params)
        if isinstance(client, torch.optim.Optimizer):
            self._check_client_optimizer(client)
        flat = [p for x in params for p in (x["params"] if isinstance(x, dict) else [x])]
        self._check_data_types([p for p in flat if isinstance(p, torch.Tensor)])
        if client is not None and cfg.get("optimizer"):
            _config.warn_once("a client optimizer was passed to initialize(): the config's "
                              "optimizer section is not used (as in DeepSpeed)")
        if client is None:
            if not cfg.get("optimizer"):
                return None
            opt = self._optimizer_from_config(params)
        elif isinstance(client, _OffloadOptimizer):
            opt = client
            opt._param_names = self._names_by_id()
            opt.config = cfg
            opt._tag = opt._tag or self._tag
            if self.world_size > 1:
                opt._rank = self.global_rank
                opt._set_data_parallel(True)  # this rank's shard on this engine's tiers
            else:
                opt._rebuild()  # on this engine's tiers; masters kept (also across the cast)
            fp32_sources = {}
        elif isinstance(client, torch.optim.Optimizer):
            opt = self._convert_torch_optimizer(client)
        elif callable(client):
            made = client(params)
            return self._configure_optimizer(made, model_parameters, fp32_sources)
        else:
            raise TypeError(f"strata.initialize: optimizer must be a torch.optim.Optimizer or "
                            f"a callable that builds one, not {type(client).__name__}")
        if isinstance(opt, _OffloadOptimizer) and fp32_sources:
            managed = opt._b.managed
            opt._write_masters({i: fp32_sources[id(p)] for i, p in enumerate(managed)
                                if id(p) in fp32_sources})
        return opt

    def _names_by_id(self):
        return {pid: name for pid, name in _named_unique_params(self.module).items()}

    def _optimizer_from_config(self, params):
        sec = self._config["optimizer"]
        kind = sec["type"]
        p = dict(sec.get("params") or {})
        common = dict(config=self._config, tag=self._tag, rank=self.global_rank)
        if kind in ("Adam", "AdamW"):
            # The parsed config holds every parameter the type takes (the schema's defaults).
            adamw = True if kind == "AdamW" else bool(p["adam_w_mode"])
            # torch_adam is warned about by the config parser (accepted, not acted on).
            amsgrad = bool(p["amsgrad"])
            hyper = dict(lr=p["lr"], betas=tuple(p["betas"]), eps=p["eps"],
                         weight_decay=p["weight_decay"], bias_correction=bool(p["bias_correction"]))
            if amsgrad:
                # DeepSpeed's Adam classes refuse amsgrad; strata's own run it.
                klass = self._dp_class(OffloadAdamW if adamw else OffloadAdam)
                opt = self._new_optimizer(klass)
                klass.__init__(opt, params, amsgrad=True, **hyper, **common)
                return opt
            # The class DeepSpeed builds for this config: DeepSpeedCPUAdam when the state is
            # offloaded, FusedAdam otherwise (both strata optimizers, adam_w_mode as given).
            from .ops.adam import DeepSpeedCPUAdam, FusedAdam

            device = _config.get(self._config, "zero_optimization.offload_optimizer.device")
            if device != "none":
                klass = self._dp_class(DeepSpeedCPUAdam)
                opt = self._new_optimizer(klass)
                klass.__init__(opt, params, adamw_mode=adamw, **hyper, **common)
            else:
                klass = self._dp_class(FusedAdam)
                opt = self._new_optimizer(klass)
                klass.__init__(opt, params, adam_w_mode=adamw, **hyper, **common)
            return opt
        if kind == "SGD":
            if p.get("lr") is None:
                raise _config._C.ConfigError("optimizer.params.lr: missing; SGD needs a "
                                             "learning rate (a number >= 0)")
            klass = self._dp_class(OffloadSGD)
            opt = self._new_optimizer(klass)
            klass.__init__(opt, params, lr=p["lr"], momentum=p["momentum"],
                           dampening=p["dampening"], weight_decay=p["weight_decay"],
                           nesterov=bool(p["nesterov"]), **common)
            return opt
        if kind == "Adagrad":
            klass = self._dp_class(OffloadAdagrad)
            opt = self._new_optimizer(klass)
            klass.__init__(opt, params, lr=p["lr"], lr_decay=p["lr_decay"],
                           weight_decay=p["weight_decay"],
                           initial_accumulator_value=p["initial_accumulator_value"],
                           eps=p["eps"], **common)
            return opt
        raise _config._C.ConfigError(f"optimizer.type: {kind!r} is not one of Adam, AdamW, SGD, "
                                     "Adagrad")

    def _convert_torch_optimizer(self, client):
        klass = _TORCH_TO_STRATA.get(type(client))
        if klass is OffloadAdam and client.defaults.get("decoupled_weight_decay"):
            klass = OffloadAdamW  # torch >= 2.6: Adam(decoupled_weight_decay=True) is AdamW
        if klass is None:
            _config.warn_once(
                f"client optimizer {type(client).__name__} is not one strata can offload (Adam, "
                "AdamW, SGD, Adagrad): it runs as given on the model's parameters, its state "
                "stays where torch keeps it and offload_optimizer does not apply to it")
            return _ClientOptimizer(client)
        for g in client.param_groups:
            if g.get("maximize"):
                raise ValueError(f"strata: {type(client).__name__}(maximize=True) is not "
                                 "supported by strata's kernels")
            if klass is OffloadAdagrad and g.get("initial_accumulator_value", 0) != \
                    client.defaults.get("initial_accumulator_value", 0):
                raise ValueError("strata: Adagrad's initial_accumulator_value must be the same "
                                 "for every param group")
        had_state = len(client.state) > 0
        saved = client.state_dict() if had_state else None
        d = client.defaults
        base_klass = klass
        klass = self._dp_class(klass)
        opt = self._new_optimizer(klass)
        common = dict(config=self._config, tag=self._tag, rank=self.global_rank)
        # The client's own group dicts become the strata optimizer's, so a scheduler built on
        # the client optimizer changes the learning rate strata uses.
        groups = client.param_groups
        if base_klass in (OffloadAdamW, OffloadAdam):
            klass.__init__(opt, groups, lr=d["lr"], betas=d["betas"], eps=d["eps"],
                           weight_decay=d["weight_decay"], amsgrad=d.get("amsgrad", False),
                           **common)
        elif base_klass is OffloadSGD:
            klass.__init__(opt, groups, lr=d["lr"], momentum=d.get("momentum", 0.0),
                           dampening=d.get("dampening", 0.0),
                           weight_decay=d.get("weight_decay", 0.0),
                           nesterov=d.get("nesterov", False), **common)
        else:
            klass.__init__(opt, groups, lr=d["lr"], lr_decay=d.get("lr_decay", 0.0),
                           weight_decay=d.get("weight_decay", 0.0),
                           initial_accumulator_value=d.get("initial_accumulator_value", 0.0),
                           eps=d.get("eps", 1e-10), **common)
        if saved is not None:
            opt.load_state_dict(saved)
        client.state.clear()  # the state now lives in strata's engine
        self._client_torch_optimizer = client
        _config.warn_once(f"client optimizer torch.optim.{type(client).__name__} is replaced by "
                          f"strata.optim.{base_klass.__name__} (the same update and the same "
                          "param groups, so schedulers built on it still act) so that its state "
                          "can live on strata's tiers; initialize returns the strata optimizer, "
                          "not the object passed (DeepSpeed returns that object at ZeRO-0)")
        return opt

    def _configure_lr_scheduler(self, client, client_optimizer=None):
        if client is not None:
            if self.optimizer is None:
                raise ValueError("strata.initialize: an lr_scheduler needs an optimizer")
            if callable(client) and not hasattr(client, "step"):
                return client(self.optimizer)
            bound = getattr(client, "optimizer", None)
            ours = [self.optimizer, getattr(self.optimizer, "optimizer", None), client_optimizer]
            if isinstance(bound, torch.optim.Optimizer) and not any(bound is o for o in ours):
                # DeepSpeed asserts too: stepping it would change another optimizer's lr.
                raise _config.DeepSpeedAssertion(
                    "strata.initialize: the client lr_scheduler is bound to another optimizer "
                    "than the one the engine runs; build it on the optimizer passed to "
                    "initialize (or pass a callable that takes the optimizer)")
            return client
        if self._config.get("scheduler"):
            if self.optimizer is None:
                raise _config._C.ConfigError("scheduler: a schedule needs an optimizer (give an "
                                             "optimizer section or pass one to initialize)")
            return lr_schedules.from_config(self.optimizer, self._config)
        return None

    def _configure_dataloader(self, training_data, collate_fn):
        if training_data is None:
            return None
        from torch.utils.data import DataLoader, RandomSampler

        sampler = None
        if self.world_size > 1:
            from torch.utils.data.distributed import DistributedSampler

            sampler = DistributedSampler(training_data, num_replicas=self.world_size,
                                         rank=self.global_rank)
        elif hasattr(training_data, "__len__"):
            sampler = RandomSampler(training_data)
        return DataLoader(training_data, batch_size=self.train_micro_batch_size_per_gpu(),
                          sampler=sampler, collate_fn=collate_fn)

    def _after_module_load(self, module, incompatible_keys):
        # module.load_state_dict after the optimizer was built: the masters follow the new
        # weights (the version check at the next step would catch it too; this is immediate).
        opt = self.__dict__.get("optimizer")
        if isinstance(opt, _OffloadOptimizer) and not opt.closed:
            opt.sync_masters()

    # ---- config accessors (DeepSpeed's names) --------------------------------
    @property
    def config(self):
        return self._config

    def train_batch_size(self):
        return int(self._config["train_batch_size"])

    def train_micro_batch_size_per_gpu(self):
        return int(self._config["train_micro_batch_size_per_gpu"])

    def gradient_accumulation_steps(self):
        return int(self._config["gradient_accumulation_steps"])

    def gradient_clipping(self):
        return float(_config.get(self._config, "gradient_clipping"))

    def steps_per_print(self):
        return int(_config.get(self._config, "steps_per_print"))

    def fp16_enabled(self):
        return bool(_config.get(self._config, "fp16.enabled"))

    def bfloat16_enabled(self):
        return bool(_config.get(self._config, "bf16.enabled"))

    bf16_enabled = bfloat16_enabled

    def zero_optimization_stage(self):
        return int(_config.get(self._config, "zero_optimization.stage"))

    def zero_offload_optimizer(self):
        return _config.get(self._config, "zero_optimization.offload_optimizer")

    def wall_clock_breakdown(self):
        return bool(_config.get(self._config, "wall_clock_breakdown"))

    def optimizer_name(self):
        return _config.get(self._config, "optimizer.type")

    def scheduler_name(self):
        return _config.get(self._config, "scheduler.type")

    def get_lr(self):
        if self.optimizer is None:
            return []
        return [g["lr"] for g in self.optimizer.param_groups]

    def get_global_grad_norm(self):
        return self._global_grad_norm

    @property
    def loss_scale(self):
        return self.loss_scaler.cur_scale if self.loss_scaler is not None else 1.0

    def get_loss_scale(self):
        return self.loss_scale

    def was_step_applied(self):
        return self._step_applied

    def is_gradient_accumulation_boundary(self):
        if self._boundary_override is not None:
            return self._boundary_override
        return (self.micro_steps + 1) % self.gradient_accumulation_steps() == 0

    def set_gradient_accumulation_boundary(self, is_boundary):
        self._boundary_override = is_boundary

    # ---- training -----------------------------------------------------------
    def forward(self, *inputs, **kwargs):
        kill_point("forward")
        t0 = time.monotonic_ns()  # the engine trace's clock
        if self.fp16_enabled() and _config.get(self._config, "fp16.auto_cast"):
            inputs, kwargs = _cast_inputs(inputs, torch.float16), \
                {k: _cast_inputs((v,), torch.float16)[0] for k, v in kwargs.items()}
        out = self.module(*inputs, **kwargs)
        t1 = time.monotonic_ns()
        self._timers["forward"] += (t1 - t0) * 1e-9
        self._phase_s["forward"] += (t1 - t0) * 1e-9
        record = getattr(self.optimizer, "record_forward", None)
        if record is not None:
            record(t0, t1)  # the trace's forward lane
        return out

    def backward(self, loss, retain_graph=False, scale_wrt_gas=True):
        """Backward of ``loss`` / gradient_accumulation_steps (x the fp16 loss scale).
        Returns the loss as scaled for accumulation (as DeepSpeed does)."""
        self._require_open()
        kill_point("backward")
        t0 = time.perf_counter()
        gas = self.gradient_accumulation_steps()
        if scale_wrt_gas and gas > 1:
            loss = loss / gas
        to_backward = loss
        if self.loss_scaler is not None:
            to_backward = self.loss_scaler.scale_loss(loss.float())
        self._restore_grads()
        if self.world_size > 1 and self._data_parallel_optimizer():
            # Data parallel: the optimizer reduces gradients bucket by bucket (during this
            # backward at stage 2, or with overlap_comm at the boundary; see strata.sharded).
            self.optimizer.backward(to_backward, retain_graph=retain_graph,
                                    boundary=self.is_gradient_accumulation_boundary())
        elif self._overlap_this_backward(retain_graph):
            # The last backward before the update: sub-groups enter the optimizer's pipeline
            # as their gradients become final. Clipping and fp16 need the global norm first,
            # so they prefetch during backward and update in step() (exact mode).
            exact = self.gradient_clipping() > 0 or self.loss_scaler is not None
            self.optimizer.backward(to_backward, exact=exact, retain_graph=retain_graph)
        else:
            to_backward.backward(retain_graph=retain_graph)
        self._timers["backward"] += time.perf_counter() - t0
        self._phase_s["backward"] += time.perf_counter() - t0
        return loss

    def _data_parallel_optimizer(self):
        """A strata optimizer that reduces gradients across ranks itself."""
        opt = self.optimizer
        return isinstance(opt, _OffloadOptimizer) and opt.data_parallel

    def _overlap_this_backward(self, retain_graph):
        return (self._overlap_backward and not self._overlap_plain and not retain_graph
                and self.world_size == 1 and isinstance(self.optimizer, _OffloadOptimizer)
                and self.is_gradient_accumulation_boundary())

    def _decide_overlap(self, step_s):
        """strata.overlap_mode auto: after the second step (the first is a warm-up), decide
        once from its measured phases whether overlapped backwards can win
        (strata.overlap_choice), and say which and why."""
        self._boundaries += 1
        phases = self._phase_s
        if (self._boundaries != 2 or self._overlap_mode != "auto" or not self._overlap_backward
                or self.world_size > 1 or not isinstance(self.optimizer, _OffloadOptimizer)
                or self.zero_optimization_stage() == 3):
            # Stage 3 keeps overlapping: its gradients are released as they are updated.
            return
        overlap, why = overlap_choice.decide(
            self.optimizer, forward_s=phases["forward"], backward_s=phases["backward"],
            step_s=step_s, exact=self.gradient_clipping() > 0 or self.loss_scaler is not None)
        self.overlap_decision = {"overlap": overlap, "why": why,
                                 "from_step": self.global_steps + 2}
        self._overlap_plain = not overlap
        what = ("overlapping backward with the step" if overlap else
                "a plain backward, then the step (strata.overlap_mode 'always' overlaps anyway)")
        msg = f"strata.overlap_mode auto: {what}, from step {self.global_steps + 2} on: {why}"
        _config.log.info(msg)
        if self.global_rank == 0 and self._progress != "off":
            print(f"[strata] {msg}", flush=True)

    def zero_grad(self, set_to_none=None):
        if self.optimizer is not None:
            self.optimizer.zero_grad()
            if set_to_none is not False:
                self._release_grads()

    def _release_grads(self):
        """``.grad`` None after a step (and after ``zero_grad()``), as DeepSpeed leaves it. A
        strata optimizer's gradient arena stays allocated and zeroed; the next
        ``engine.backward`` points ``.grad`` back at it before autograd runs, so gradients
        still accumulate in place (no allocation, no copy). Several ranks: the data-parallel
        optimizer keeps its own gradient views (docs/deepspeed.md)."""
        opt = self.optimizer
        if self._data_parallel_optimizer():
            return
        if isinstance(opt, _OffloadOptimizer):
            for p in opt._b.managed:
                p.grad = None
            self._grads_released = True
        elif isinstance(opt, _ClientOptimizer):
            for p in opt._params():
                p.grad = None

    def _restore_grads(self):
        if self._grads_released:
            self._grads_released = False
            if isinstance(self.optimizer, _OffloadOptimizer) and not self.optimizer.closed:
                self.optimizer._restore_grad_views()

    def step(self, lr_kwargs=None):
        """Count a micro step; at an accumulation boundary, update the parameters."""
        self._require_open()
        t0 = time.perf_counter()
        if self.is_gradient_accumulation_boundary():
            if self.optimizer is None:
                raise RuntimeError("strata: step() without an optimizer: give an optimizer "
                                   "section in the config or pass one to initialize()")
            self._take_model_step(lr_kwargs)
        self.micro_steps += 1
        self._timers["step"] += time.perf_counter() - t0

    def _take_model_step(self, lr_kwargs):
        opt = self.optimizer
        kill_point("step_begin")
        if self.world_size > 1:
            if self._data_parallel_optimizer():
                opt.reduce_gradients()  # buckets still pending; the shard's sums kept
            else:
                for arena in opt.grad_arenas():  # a client optimizer: whole gradients
                    comm.all_reduce(arena)
        # With several ranks the statistics are global: each rank's shard, all-reduced.
        sum_sq, nonfinite = opt.grad_stats()
        scale = self.loss_scaler.cur_scale if self.loss_scaler is not None else 1.0
        # gradient_allreduce_op "mean" (default) averages the ranks' summed gradients; "sum"
        # keeps the sum (DeepSpeed's gradient_average False).
        divisor = scale * (self.world_size if self._gradient_average else 1)
        overflow = bool(nonfinite) and self.loss_scaler is not None
        if overflow:
            self._global_grad_norm = float("inf")
            self.skipped_steps += 1
            self._step_applied = False
            if isinstance(opt, _OffloadOptimizer):
                opt.cancel_step()  # an overlapped backward prefetched state: drop that step
            opt.zero_grad()
            self._release_grads()
            self.loss_scaler.update_scale(True)
        else:
            norm = math.sqrt(sum_sq) / divisor if math.isfinite(sum_sq) else float("nan")
            self._global_grad_norm = norm
            grad_mul = 1.0 / divisor
            clip = self.gradient_clipping()
            if clip > 0 and math.isfinite(norm):
                coef = clip / (norm + 1e-6)
                if coef < 1.0:
                    grad_mul *= coef
            opt._pending_grad_mul = grad_mul
            t_step = time.perf_counter()
            with kill_during("update") as arm:
                opt._engine_step_hook = arm
                try:
                    opt.step()
                finally:
                    opt._engine_step_hook = None
            self._decide_overlap(time.perf_counter() - t_step)
            kill_point("step_end")
            if self._client_torch_optimizer is not None:
                note_optimizer_step(self._client_torch_optimizer)
            opt.zero_grad()
            self._release_grads()
            self._step_applied = True
            if self.loss_scaler is not None:
                self.loss_scaler.update_scale(False)
            if self.lr_scheduler is not None:
                try:
                    self.lr_scheduler.step(**(lr_kwargs or {}))
                except TypeError:
                    self.lr_scheduler.step(self.train_batch_size())
        self._phase_s = {"forward": 0.0, "backward": 0.0}
        self.global_steps += 1
        self.global_samples += self.train_batch_size()
        if self.global_rank == 0 and self.steps_per_print() > 0 \
                and self.global_steps % self.steps_per_print() == 0:
            self._report_progress()

    def _report_progress(self):
        if self._progress == "off":
            return
        lr = [float(x) for x in self.get_lr()]
        line = (f"[strata] step={self.global_steps}, skipped={self.skipped_steps}, "
                f"lr={[float(f'{x:.6g}') for x in lr]}")
        if self.loss_scaler is not None:
            line += f", loss_scale={self.loss_scale:g}"
        if self._global_grad_norm is not None:
            line += f", grad_norm={self._global_grad_norm:.6g}"
        print(line, flush=True)
        if self.wall_clock_breakdown():
            n = max(1, self.steps_per_print())
            t = self._timers
            extra = ""
            if isinstance(self.optimizer, _OffloadOptimizer):
                bd = self.optimizer.step_breakdown()
                extra = (f" | optimizer wall: {bd.get('wall_s', 0) * 1e3:.2f} compute: "
                         f"{bd.get('compute_busy_s', 0) * 1e3:.2f} io: "
                         f"{bd.get('io_busy_s', 0) * 1e3:.2f} stall: "
                         f"{bd.get('stall_s', 0) * 1e3:.2f}")
            print(f"[strata] time (ms, mean over {n} steps) | forward: "
                  f"{t['forward'] * 1e3 / n:.2f} | backward: {t['backward'] * 1e3 / n:.2f} | "
                  f"step: {t['step'] * 1e3 / n:.2f}{extra}", flush=True)
            self._timers = {k: 0.0 for k in t}

    # ---- checkpoints -----------------------------------------------------------
    def _param_names_in_engine_order(self):
        opt = self.optimizer
        names = _named_unique_params(self.module)
        out = []
        for i, p in enumerate(opt._b.managed):
            out.append(names.get(id(p), f"param{i}"))
        return out

    def save_checkpoint(self, save_dir, tag=None, client_state={}, save_latest=True,
                        exclude_frozen_parameters=False):
        """Write ``save_dir/tag`` (default ``global_step<N>``) atomically; returns True."""
        self._require_open()
        # Several ranks: a collective; each rank writes its shard of the optimizer state and
        # its RNG state, rank 0 the rest and the manifest (docs/checkpoints.md).
        return _ckpt.save(self, save_dir, tag=tag, client_state=client_state,
                          save_latest=save_latest,
                          exclude_frozen_parameters=exclude_frozen_parameters)

    def load_checkpoint(self, load_dir, tag=None, load_module_strict=True,
                        load_optimizer_states=True, load_lr_scheduler_states=True,
                        load_module_only=False, custom_load_fn=None):
        """Load ``load_dir/tag`` (default: the tag in ``load_dir/latest``). Returns
        ``(load_path, client_state)``, or ``(None, None)`` when there is nothing to load."""
        self._require_open()
        if custom_load_fn is not None:
            _config.warn_once("load_checkpoint(custom_load_fn=...): not supported by strata; "
                              "the checkpoint is loaded the usual way")
        return _ckpt.load(self, load_dir, tag=tag, load_module_strict=load_module_strict,
                          load_optimizer_states=load_optimizer_states,
                          load_lr_scheduler_states=load_lr_scheduler_states,
                          load_module_only=load_module_only)

    def module_state_dict(self, destination=None, prefix="", keep_vars=False,
                          exclude_frozen_parameters=False):
        sd = self.module.state_dict(destination=destination, prefix=prefix, keep_vars=keep_vars)
        tier = self.__dict__.get("param_tier")
        live = self.module.state_dict(prefix=prefix, keep_vars=True) \
            if tier is not None and tier.on_demand else {}
        for name, t in live.items():
            if _pt.fetched_on_demand(t):
                # Stage 3, weights on the cxl/nvme tier: each one read from it (the whole
                # dict is then in memory: the checkpoint's model file streams instead).
                # Partitioned (several ranks): each one all-gathered, so every rank calls
                # this.
                w = _pt.read_weights(t).detach()
                sd[name] = w if keep_vars else w.clone()
        if exclude_frozen_parameters:
            for name, p in self.module.named_parameters():
                if not p.requires_grad:
                    sd.pop(prefix + name, None)
        return sd

    def save_16bit_model(self, save_dir, save_filename="pytorch_model.bin",
                         exclude_frozen_parameters=False):
        """The module's weights as a plain torch state_dict file (DeepSpeed's name)."""
        tier = self.__dict__.get("param_tier")
        if tier is not None and tier.on_demand and not _config.get(
                self._config, "zero_optimization.stage3_gather_16bit_weights_on_model_save"):
            # DeepSpeed's rule: without the gather switch a stage-3 model's weights are not
            # assembled for a 16-bit file.
            _config.warn_once(
                "save_16bit_model: the weights are on the param tier and "
                "zero_optimization.stage3_gather_16bit_weights_on_model_save is false, so no "
                "file is written (as in DeepSpeed); set it to true, or use save_checkpoint")
            return False
        path = os.path.join(save_dir, save_filename)
        if tier is not None and tier.partitioned:
            # Partitioned weights: every rank takes part in the all-gathers, one parameter at
            # a time, and rank 0 streams them into the file (never the whole model at once).
            _ckpt.write_gathered_model(self, path,
                                       exclude_frozen_parameters=exclude_frozen_parameters)
            return True
        os.makedirs(save_dir, exist_ok=True)
        if self.global_rank == 0:
            torch.save(self.module_state_dict(
                exclude_frozen_parameters=exclude_frozen_parameters), path)
        return True

    save_fp16_model = save_16bit_model

    def sync_master_from_params(self):
        """Re-read every fp32 master from the model's weights (after changing weights through
        ``.data``; other changes are noticed automatically)."""
        if isinstance(self.optimizer, _OffloadOptimizer):
            self.optimizer.sync_masters()

    # ---- DeepSpeed's memory-management surface ----------------------------------------
    def empty_partition_cache(self):
        """DeepSpeed frees the ZeRO-3 parameters it gathered and cached. Stage 3 with the
        weights on cxl/nvme: every fetched weight is released; otherwise nothing is cached
        (docs/deepspeed.md)."""
        self._require_open()
        tier = self.__dict__.get("param_tier")
        if tier is not None and tier.window is not None:
            tier.window.release_all()

    _states_offloaded = False  # between offload_states() and reload_states()
    _OFFLOAD_TYPES = ("optim_states", "hp_params", "lp_params", "lp_grads",
                      "contiguous_grad_buffer")

    def _state_tiers(self):
        opt = self.optimizer
        if not isinstance(opt, _OffloadOptimizer):
            return set()
        return {sg.get("tier") for sg in opt._b.engine.subgroups()}

    def offload_states(self, include=None, device="cpu", pin_memory=True, non_blocking=False):
        """DeepSpeed moves the optimizer state, fp32 masters and gradients off the accelerator
        until ``reload_states()``. strata keeps the state and masters (``optim_states``,
        ``hp_params``) on host tiers already (DRAM, CXL, NVMe): for them there is nothing to
        move. What would have to move and cannot is refused, naming it: state on the ``gpu``
        tier, or the model's own weights and gradients (``lp_params``, ``lp_grads``) when the
        model lives on an accelerator."""
        self._require_open()
        dev = str(getattr(device, "value", device)).lower()
        if dev not in ("cpu", "offloaddeviceenum.cpu"):
            raise ValueError(f"strata: offload_states(device={device!r}): only 'cpu' is "
                             "supported (as in DeepSpeed)")
        kinds = [str(getattr(k, "name", getattr(k, "value", k))) for k in
                 (include if include is not None else self._OFFLOAD_TYPES)]
        unknown = [k for k in kinds if k not in self._OFFLOAD_TYPES]
        if unknown:
            raise ValueError(f"strata: offload_states(include=...): unknown {unknown} (known: "
                             f"{', '.join(self._OFFLOAD_TYPES)})")
        if ("optim_states" in kinds or "hp_params" in kinds) and "gpu" in self._state_tiers():
            raise NotImplementedError(
                "strata: offload_states: part of the optimizer state lives on the gpu tier and "
                "strata cannot move it at run time; place it on the host instead "
                "(zero_optimization.offload_optimizer.device: cpu)")
        on_accel = self.device.type != "cpu"
        if on_accel and any(k in kinds for k in ("lp_params", "lp_grads",
                                                 "contiguous_grad_buffer")):
            raise NotImplementedError(
                f"strata: offload_states: moving the model's own weights and gradients off "
                f"{self.device} is not implemented (include only optim_states/hp_params, which "
                "strata keeps on host tiers already)")
        self._states_offloaded = True

    def reload_states(self, non_blocking=False):
        """Counterpart of ``offload_states()``: nothing was moved, so nothing comes back."""
        self._require_open()
        self._states_offloaded = False

    # ---- strata extras and lifecycle ------------------------------------------------
    def stats(self):
        return self.optimizer.stats() if isinstance(self.optimizer, _OffloadOptimizer) else {}

    def plan(self):
        return self.optimizer.plan() if isinstance(self.optimizer, _OffloadOptimizer) else ""

    def _require_open(self):
        if self._closed:
            raise RuntimeError("strata: the engine is closed")

    def close(self):
        """Drain I/O and release the optimizer's pool and swap files. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self._load_hook is not None:
            self._load_hook.remove()
            self._load_hook = None
        opt = self.__dict__.get("optimizer")
        if opt is not None:
            opt.close()
        tier = self.__dict__.get("param_tier")
        if tier is not None and tier.window is not None:
            tier.window.close()  # the hooks go; the weights stay on the tier with the model

    destroy = close

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def __del__(self):
        try:
            self.close()
        except Exception:  # pragma: no cover - interpreter shutdown
            pass

    def __getattr__(self, name):
        # nn.Module keeps submodules in _modules; DeepSpeed's engine forwards unknown
        # attributes to the wrapped module.
        try:
            return super().__getattr__(name)
        except AttributeError:
            pass
        modules = self.__dict__.get("_modules", {})
        if "module" in modules and hasattr(modules["module"], name):
            return getattr(modules["module"], name)
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")


def _cast_inputs(values, dtype):
    out = []
    for v in values:
        if torch.is_tensor(v) and v.is_floating_point():
            out.append(v.to(dtype))
        elif isinstance(v, (list, tuple)):
            out.append(type(v)(_cast_inputs(v, dtype)))
        elif isinstance(v, dict):
            out.append({k: _cast_inputs((x,), dtype)[0] for k, x in v.items()})
        else:
            out.append(v)
    return tuple(out)

