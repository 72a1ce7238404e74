"""torch.optim drop-ins whose state lives in strata's C++ engine.

``OffloadAdamW``, ``OffloadAdam``, ``OffloadSGD`` and ``OffloadAdagrad`` behave like
``torch.optim.AdamW``, ``Adam``, ``SGD`` and ``Adagrad``: param groups with their own
hyper-parameters, LR schedulers, ``zero_grad``, ``state_dict``/``load_state_dict`` with torch's
state names (``exp_avg``/``exp_avg_sq``/``max_exp_avg_sq``, ``momentum_buffer``, ``sum``). The
difference is where the state lives: the fp32 master weights and the optimizer's slots sit on
the tier the config names (NVMe by default, under ``./strata_swap``) and are streamed through the
engine at every step; the model's parameters are written by the engine's fused copy-out after
each step.

Gradients: every trainable parameter's ``.grad`` is a view into the engine's flat gradient
arena, so backward accumulates straight into the buffer the engine reads. ``zero_grad`` zeroes
the arena and keeps the views (``set_to_none`` is ignored). If something replaces a ``.grad``
(for example ``model.zero_grad(set_to_none=True)`` followed by backward), the next ``step``
copies it into the arena and restores the view; a parameter whose ``.grad`` is None at ``step``
is updated with a zero gradient (torch would skip it). Sparse gradients are refused.

``data_types.grad_accum_dtype`` different from a parameter's dtype (say fp32 gradients for bf16
parameters): torch gives ``.grad`` its parameter's dtype, so it cannot be a view of the arena.
A hook that runs when each backward has accumulated the parameter's gradient adds ``.grad``
into the arena (in the arena's dtype) and sets ``.grad`` to None, as DeepSpeed's ZeRO does;
gradients accumulate across micro-steps in the arena's dtype, and the update reads them from
there. A ``.grad`` set by other means is added in at the next ``step``/``grad_stats``.

Parameters with ``requires_grad=False`` get no state and no gradient buffer. Parameters must be
contiguous tensors of float32, bfloat16 or float16, all on one device. Tied parameters (one
storage reached twice) are updated once.

Parameters on a GPU (ZeRO-Offload's data flow): the CPU update cannot write device memory, so
each such parameter gets a host copy in its dtype, allocated by the engine from its pinned pool
(counted by ``strata plan``), that the engine reads its masters from and writes its updated
values to; ``step`` copies the gradients from the
device into the engine's arena (where ``.grad`` stays a device tensor, set to None by
``zero_grad``), runs the update and copies the host copies back into the parameters (H2D, on
the current stream, so the next forward sees them). With ``backward(loss)`` (overlap) each
gradient is copied as its hook reports it final (non-blocking, on the current stream; a watcher
thread tells the engine when the copy's CUDA event has passed), so updates start during
backward as for CPU parameters. Setting ``STRATA_TEST_STAGE_PARAMS=1`` sends CPU parameters
through the same path, so tests exercise it without a GPU.

The model's weights are the source of truth for the fp32 masters:

- a parameter changed in place after the optimizer was built (``model.load_state_dict``, an
  in-place copy under ``torch.no_grad()``) bumps torch's version counter; the next ``step``
  sees it and re-reads that parameter's master from the model, so stale masters never
  overwrite loaded weights. Changes made through ``.data`` bypass the counter: call
  ``sync_masters()`` after them;
- a parameter whose memory was replaced (``model.half()``, ``p.data = ...``), a frozen
  parameter that was unfrozen (``requires_grad_(True)``), a trainable one that was frozen, and
  ``add_param_group`` rebuild the engine at the next ``step``: existing state is carried over
  parameter by parameter, new parameters start fresh with their own step count (as in torch),
  parameters whose memory changed take their master from the new weights.

Call ``close()`` (or use ``with``) to drain I/O and remove the swap file; it also runs at
garbage collection.
"""

import collections.abc
import json
import os
import weakref

import torch

from . import _C, comm
from . import config as _config
from .grad_path import ArenaGrads, PartitionGrads, ReducerGrads, Settings
from .layout import PartitionLayout, ShardLayout, WholeLayout, whole_tensors
from .param_tier import fetched_on_demand, numel as _numel, partitioned as _partitioned, \
    read_weights, shape as _shape, storage_key as _storage_key, tier_of
from .progress import EngineProgress
from .state_io import copy_slots, read_slots, write_slots
from ._torch_compat import dtype_from_name, dtype_name, tensor_from_buffer

DEFAULT_SWAP_DIR = "strata_swap"

# Every open strata optimizer, so that helpers (zero.GatheredParameters) can find the ones
# that manage a given parameter.
_live = weakref.WeakSet()


_cuda_pinning = None  # None: not tried; else (installed, why not)


def _use_cuda_pinning():
    """With CUDA parameters, pools created from now on register their slabs with CUDA
    (cudaHostRegister), so the gradient copies into the arena are DMA, not staged through
    a driver buffer. Tried once per process; without it copies still work, slower."""
    global _cuda_pinning
    if _cuda_pinning is not None:
        return
    try:
        ok, why = _C.cuda_available()
        if ok:
            _C.install_cuda_pin_backend()
        _cuda_pinning = (bool(ok), why)
    except Exception as exc:  # noqa: BLE001 - an optional speed-up
        _cuda_pinning = (False, str(exc))
    if not _cuda_pinning[0]:
        _config.log.info("strata: the pinned pool is not registered with CUDA (%s); "
                         "gradient copies from the GPU are staged by the driver",
                         _cuda_pinning[1])


def _default_config(config, default_device):
    cfg = _config._read(config) if config is not None else {}
    off = cfg.setdefault("zero_optimization", {}).setdefault("offload_optimizer", {})
    if "device" not in off and not cfg["zero_optimization"].get("cpu_offload"):
        off["device"] = default_device
    if off.get("device") == "nvme" and "nvme_path" not in off:
        os.makedirs(DEFAULT_SWAP_DIR, exist_ok=True)
        off["nvme_path"] = DEFAULT_SWAP_DIR
    return cfg


def _sixteen_bit_state(config, cls):
    """The config for DeepSpeed's ``fp32_optimizer_states=False`` (moments in the parameters'
    16-bit dtype): ``strata.optimizer_state_dtype`` bf16 (strata's 16-bit state slot; fp16
    parameters get bf16 moments too, which have fp32's range). A config that already names
    another state dtype is a clear error."""
    cfg = _config._read(config) if config is not None else {}
    st = cfg.setdefault("strata", {})
    given = st.get("optimizer_state_dtype")
    if given not in (None, "bf16"):
        raise ValueError(f"{cls}(fp32_optimizer_states=False) asks for 16-bit moments, but the "
                         f"config's strata.optimizer_state_dtype is {given!r}; drop one of them")
    st["optimizer_state_dtype"] = "bf16"
    return cfg


def _world_size():
    # The batch rule (train = micro x accumulation x world) needs the world size.
    dist = getattr(torch, "distributed", None)
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


class _Built:
    """One C++ engine and the Python views that go with it."""

    def __init__(self):
        self.engine = None
        self.grads = None      # the gradient path that built it (strata.grad_path)
        self.layout = None     # WholeLayout / ShardLayout: engine param j -> (i, po, fo, n)
        self.managed = []      # parameters in gradient-ready order (model parameter index i)
        self.index = {}        # id(param) -> i
        self.cohort_of = []    # i -> engine group (cohort)
        self.cohort_group = []  # cohort -> torch param group index
        self.ptrs = []         # i -> (data_ptr, dtype, numel) at build time
        self.versions = []     # i -> param._version when masters last matched
        self.arenas = {}        # dtype -> flat arena tensor
        self.views = []         # i -> its range of the arena, shaped like it (whole layout)
        self.fold = []          # i -> True when .grad is added into the view
                                # (gradient dtype != parameter dtype) instead of being it
        self.shadows = []       # i -> host copy of a device parameter, or None
        self.pushed = None      # CUDA event after the last H2D copies of the host copies
        self.push = []          # i -> None (push all) or CPU-updated ranges
        self.copied = {}        # i -> (weakref, version) of the device .grad
                                # last copied into the arena (grad_stats then step: copy once)
        self.hooks = []         # per-parameter hooks: fold, and gradient-ready (overlap)
        self.hook_refs = []     # AccumulateGrad nodes kept alive (torch < 2.1)
        self.grad_wait_s = 0.0  # seconds gradient hooks waited for the updates (stage 3)
        self.lane_wait_s = 0.0  # the same, waited by the gradient lane's watcher (GPU model)
        # data parallel (strata.grad_path.ReducerGrads)
        self.reducer = None     # the gradient buckets (_GradComm)
        self.gather = None      # the updated parameters' all-gather (_ParamGather), a shard
        self.flats = {}         # stage 1 with contiguous_gradients: full gradients per dtype
        self.gviews = []        # i -> its view of flats
        self.arena_off = []     # j -> offset in the shard's arena
        self.dp_hooks = []      # gradient-ready hooks that reduce buckets
        self.dp_refs = []

    @property
    def slices(self):
        return self.layout.slices

    @property
    def slice_of(self):
        return self.layout.slice_of


def _fp32_host(t):
    return t.detach().to("cpu", torch.float32).contiguous()


def _batches(items, size_of, limit):
    """``items`` in consecutive lists of at most ``limit`` (by ``size_of``; at least one
    item each)."""
    batch, used = [], 0
    for it in items:
        n = size_of(it)
        if batch and used + n > limit:
            yield batch
            batch, used = [], 0
        batch.append(it)
        used += n
    if batch:
        yield batch


# A rebuild whose layout moved assembles parameters whole: at most this many bytes of them at
# once (one batch of state_io calls each).
_REBUILD_BATCH_BYTES = 256 << 20


class _OffloadOptimizer(torch.optim.Optimizer):
    """Common machinery of strata's optimizers; subclasses name the kind and hyper keys.

    Composed of a layout (``strata.layout``: whole parameters, or this rank's shard) and a
    gradient path (``strata.grad_path``: arena views, or data-parallel reducer buckets), so
    step, state_dict, state access, rebuild and checkpoints are written once. Data parallel
    (``data_parallel``): set by the class (``strata.sharded``'s ``Sharded*`` classes) or by
    ``_set_data_parallel``; ZeRO stage 0 keeps whole parameters, stages 1-2 a shard."""

    _kind = None
    _data_parallel = False  # the class's choice; an instance changes it with _set_data_parallel

    def __init__(self, params, defaults, *, config=None, default_device="nvme", tag="", rank=0):
        self._b = None
        self._pending_grad_mul = None
        self._overlap = None  # "eager" / "exact" while a backward-overlapped step is pending
        self._overlap_active = False
        self._stage_queue = None  # (param, CUDA event) of gradient copies in flight (backward)
        self._stage_thread = None
        self._poisoned = None  # why steps are refused (an incomplete checkpoint load)
        self._forced_steps = None
        self._dp = None  # data-parallel settings (strata.grad_path.Settings), or None
        self._grads = None
        super().__init__(params, defaults)
        self._user_config = _default_config(config, default_device)
        self.config = _config.load_config(self._user_config, world_size=_world_size())
        self._tag = tag
        self._rank = rank
        if not hasattr(self, "_param_names"):
            self._param_names = {}  # id(param) -> name (error messages); the Engine sets it
        # The Engine sets it when every rank already has rank 0's weights.
        self._dp_synced_init = bool(getattr(self, "_dp_synced_init", False))
        self._choose_grad_path()
        self._b = self._build(None)
        _live.add(self)

    @property
    def state(self):
        """``state[p]``: a mapping of parameter ``p``'s state by torch's names ("step",
        "exp_avg", ...), read from its tier on each access (a new fp32 tensor each time: from
        NVMe a read of that slot, so costly in a loop) and written to it on assignment
        (``state[p]["exp_avg"] = t``). Parameters strata does not manage read as an empty
        dict. See ``_StateView``."""
        return _StateView(self)

    @state.setter
    def state(self, value):
        # torch.optim.Optimizer.__init__ assigns an empty defaultdict: the state is the engine's.
        if value:
            raise TypeError("strata: optimizer.state is the engine's; assign state[p][name] "
                            "or use load_state_dict")

    @property
    def optimizer(self):
        """DeepSpeed's ``engine.optimizer`` wraps the base optimizer (``.optimizer``); a strata
        optimizer is both the wrapper and the base, so this is the optimizer itself."""
        return self

    # ---- subclass hooks -------------------------------------------------
    def _hyper(self, group):
        raise NotImplementedError  # subclasses

    def _state_names(self, group):
        """torch's names of the state slots after the master (slot 1, 2, ...)."""
        raise NotImplementedError  # subclasses

    def _has_step_in_state(self):
        return True

    # ---- data parallel ------------------------------------------------
    @property
    def data_parallel(self):
        """True when gradients are summed across ranks (strata.sharded's module doc)."""
        return self._dp is not None

    @property
    def zero_stage(self):
        """The ZeRO stage the data-parallel optimizer runs (0, 1 or 2); None in one process."""
        return self._dp.stage if self._dp is not None else None

    @property
    def layout(self):
        """Which engine parameters this rank's engine holds (``strata.layout``)."""
        return None if self._b is None else self._b.layout

    @property
    def class_name(self):
        """The class checkpoints record: the optimizer's, not its data-parallel alias
        (``strata.sharded.ShardedOffloadAdamW`` records ``OffloadAdamW``)."""
        klass = type(self)
        while klass.__dict__.get("_data_parallel_alias", False):
            klass = klass.__mro__[1]
        return klass.__name__

    def _choose_grad_path(self):
        if self._data_parallel:
            self._dp = Settings.for_this_rank(self.config)
            if self._dp.world > 1:
                self._rank = self._dp.rank
            if self._dp.requested_stage == 3 and self._dp.world > 1:
                if any(getattr(tier_of(p), "partitioned", False)
                       for g in self.param_groups for p in g["params"]):
                    self._dp.stage = 3
                    self._grads = PartitionGrads(self, self._dp)
                    return
                _config.warn_once(
                    f"zero_optimization.stage 3 with {self._dp.world} ranks: the parameters "
                    "given to this optimizer are not partitioned (build the model under "
                    "strata.zero.Init, or pass it to strata.initialize); the optimizer shards "
                    "its state and gradients as at stage 2")
            self._grads = ReducerGrads(self, self._dp)
        else:
            self._dp = None
            self._grads = ArenaGrads(self)

    def _set_data_parallel(self, on=True):
        """From now on reduce gradients across ranks and keep this rank's shard (``on``), or
        run as one process: the engine is rebuilt, the state carried over piece by piece."""
        if bool(on) == self.data_parallel:
            return self
        self._data_parallel = bool(on)
        self._choose_grad_path()
        self._rebuild()
        return self

    def _broadcast_params(self):
        """Every rank starts from rank 0's weights, as DDP and DeepSpeed do."""
        seen = set()
        with torch.no_grad():
            for group in self.param_groups:
                for p in group["params"]:
                    key = _storage_key(p)
                    if key in seen:
                        continue
                    seen.add(key)
                    comm.broadcast(p.data, 0, stats=self._grads.comm_stats)

    # ---- construction -------------------------------------------------
    def _trainable(self):
        """(param, group index) of every trainable parameter, deduplicated by storage."""
        seen = set()
        out = []
        devices = {}
        for gi, group in enumerate(self.param_groups):
            for p in group["params"]:
                if not p.requires_grad:
                    continue
                key = _storage_key(p)
                if key in seen:
                    continue  # tied parameter: updated once
                seen.add(key)
                devices.setdefault(str(p.device), p)
                out.append((p, gi))
        if len(devices) > 1:
            raise ValueError(
                "strata: the parameters live on several devices "
                f"({', '.join(sorted(devices))}); one optimizer needs them all on one device "
                "(move the model with .to(device) before building it)")
        for p, _ in out:
            self._check_param(p)
        return out

    def _staged(self, p):
        """True when ``p`` is updated through a host copy (not CPU memory, or the test hook);
        a stage 3 parameter fetched on demand is updated on its tier instead."""
        if fetched_on_demand(p):
            return False
        return p.device.type != "cpu" or os.environ.get("STRATA_TEST_STAGE_PARAMS") == "1"

    def _check_param(self, p):
        if p.device.type == "meta":
            raise ValueError(
                "strata: a parameter is on the meta device (shape only, no memory); materialise "
                "the model first (for example model.to_empty(device='cpu') and load its weights) "
                "— strata.zero.Init does not defer parameter creation")
        if p.device.type != "cpu" and self.data_parallel:
            # Device parameters go through host copies (see the module doc); the data-parallel
            # optimizer shards parameters by address and does not take them yet.
            raise ValueError(
                f"strata: parameter on {p.device} — {type(self).__name__} updates CPU "
                "parameters only (with several ranks, keep the model on the CPU for now)")
        if p.is_sparse:
            raise ValueError("strata: sparse parameters are not supported")
        if not p.is_contiguous():
            raise ValueError("strata: parameters must be contiguous")
        dtype_name(p.dtype)

    def _layout_for(self, managed):
        if self._dp is not None and self._dp.stage == 3:
            return PartitionLayout(managed, self._dp.world, self._dp.rank)
        if self._dp is not None and self._dp.stage >= 1:
            return ShardLayout(managed, self._dp.world, self._dp.rank)
        return WholeLayout(managed)

    def _build(self, prev, resync=()):
        """A new engine for the current trainable parameters.

        With ``prev``, state is carried over from the previous engine (``_copy_state``);
        parameters in ``resync`` (ids) take their master from the model instead.
        """
        if self._dp is not None and self._dp.world > 1 and not self._dp_synced_init \
                and prev is None:
            self._broadcast_params()
            self._dp_synced_init = True
        trainable = self._trainable()
        # Gradients become ready roughly in reverse registration order.
        trainable.reverse()
        b = _Built()
        b.grads = self._grads
        b.managed = [p for p, _ in trainable]
        b.index = {id(p): i for i, p in enumerate(b.managed)}
        b.cohort_of, b.cohort_group, cohort_steps = self._cohorts(trainable, prev)
        b.layout = self._layout_for(b.managed)

        # Parameters updated through host copies: the engine allocates them from its pool.
        staged = [self._staged(p) and not b.layout.sharded for p in b.managed]
        if any(p.is_cuda for p in b.managed):
            _use_cuda_pinning()
        specs = [self._spec(b, j, staged) for j in range(len(b.layout.slices))]

        def fill(j, buf):  # a host copy's first values: the parameter's
            p = b.managed[b.layout.slices[j][0]]
            tensor_from_buffer(buf, p.dtype).view(p.shape).copy_(p.detach())

        b.engine = self._start_engine(specs, b.cohort_group, cohort_steps,
                                      fill if any(staged) else None)
        try:
            b.shadows = [tensor_from_buffer(b.engine.host_copy(i), p.dtype).view(p.shape)
                         if s else None for i, (p, s) in enumerate(zip(b.managed, staged))]
            b.grads.build(b)
            b.ptrs = [_storage_key(p) for p in b.managed]
            b.versions = [p._version for p in b.managed]
            b.push = self._push_ranges(b)
            if prev is not None and prev.engine is not None and not prev.engine.closed:
                self._copy_state(prev, b, resync)
                b.grads.carry(prev, b)
        except BaseException:
            b.engine.close()
            raise
        b.grads.adopt(prev, b)
        return b

    def _spec(self, b, j, staged):
        """What the C++ engine gets for engine parameter ``j``: its name, numel, dtype,
        cohort and host memory (None: a host copy from the engine's pool, for a parameter
        updated through one) — and, for a GPU parameter, its device memory (where a GPU
        update writes instead of the host copy)."""
        i, po, _, n = b.layout.slices[j]
        p = b.managed[i]
        name = self._name_of(p, i)
        if n != _numel(p):
            name = f"{name}[{po}:{po + n}]"
        if _partitioned(p):
            # ZeRO-3 across ranks: this rank's chunk, in memory (offload_param none, cpu) or
            # as the record p.ds_record on the tier (cxl, nvme).
            if p.ds_tensor is not None:
                return (name, n, dtype_name(p.dtype), b.cohort_of[i], p.ds_tensor.data_ptr(),
                        None, 0)
            return (name, n, dtype_name(p.dtype), b.cohort_of[i], None, None, 0, p.ds_record)
        if fetched_on_demand(p):
            # ZeRO stage 3, weights on the cxl/nvme param tier: the engine reads and writes
            # them through the store (record p.ds_id).
            return (name, n, dtype_name(p.dtype), b.cohort_of[i], None, None, 0, p.ds_id)
        return (name, n, dtype_name(p.dtype), b.cohort_of[i],
                None if staged[i] else p.data_ptr() + po * p.element_size(),
                p.data_ptr() if staged[i] and p.is_cuda else None,
                (p.device.index or 0) if p.is_cuda else 0)

    def _cohorts(self, trainable, prev):
        """(cohort_of, cohort_group, cohort_steps) for ``trainable`` (param, group index) in
        engine order. Cohorts (engine groups) are parameters of one torch group that share a
        step count; a parameter that joins a group whose members have already stepped gets a
        cohort of its own starting at step 0, as torch keeps a step count per parameter."""
        old_steps = {}
        if prev is not None and prev.engine is not None and not prev.engine.closed:
            old_steps = {c: prev.engine.step_count(c) for c in range(len(prev.cohort_group))}
        key_to_index, cohort_group, cohort_steps, cohort_of = {}, [], [], []
        for p, gi in trainable:
            if self._forced_steps is not None:
                steps = int(self._forced_steps.get(id(p), 0))
                key = ("step", gi, steps)
            elif prev is not None and id(p) in prev.index:
                old_c = prev.cohort_of[prev.index[id(p)]]
                key = ("old", old_c)
                steps = old_steps.get(old_c, 0)
                if steps == 0:
                    key = ("new", gi)
            else:
                key = ("new", gi)
                steps = 0
            if key not in key_to_index:
                key_to_index[key] = len(cohort_group)
                cohort_group.append(gi)
                cohort_steps.append(steps)
            cohort_of.append(key_to_index[key])
        if not cohort_group:
            cohort_group, cohort_steps = [0], [0]
        return cohort_of, cohort_group, cohort_steps

    def _start_engine(self, specs, cohort_group, cohort_steps, fill_host_copy=None):
        """A C++ engine for ``specs`` (one hyper-parameter set per cohort) with its step
        counts set and its plan notes said: expected ones logged, the others warned once.
        ``fill_host_copy(j, buffer)`` fills the host copies the engine allocates."""
        hypers = [self._hyper(self.param_groups[g]) for g in cohort_group]
        progress = EngineProgress(_config.get(self.config, "strata.progress"))
        try:
            # The engine gets the parsed handle: no JSON is serialised or parsed again.
            tier = self._param_tier()
            engine = _C.Engine(self._engine_config(), specs, hypers, self._rank, self._tag,
                               progress=progress, fill_host_copy=fill_host_copy,
                               param_store=None if tier is None else tier.store,
                               release_grads=self._stage3())
        finally:
            progress.close()
        try:
            for c, steps in enumerate(cohort_steps):
                engine.set_step_count(c, steps)
            for note in json.loads(engine.plan_json()).get("notes", []):
                if note.startswith(("sub_group_size", "schedule: ")):
                    # DeepSpeed's default sub_group_size (1e9) is meant as "large", and the
                    # schedule's choice is information: expected, not a problem.
                    _config.log.info("strata: %s", note)
                else:
                    _config.warn_once(note)
        except BaseException:
            engine.close()
            raise
        return engine

    def _stage3(self):
        """ZeRO stage 3 in one process: gradients live only until their update."""
        return self._dp is None and \
            int(_config.get(self.config, "zero_optimization.stage")) == 3

    def _param_tier(self):
        """The param tier the managed parameters' weights are on (one at most), or None."""
        tiers = {id(t): t for group in self.param_groups for p in group["params"]
                 if fetched_on_demand(p) for t in [tier_of(p)]}
        if len(tiers) > 1:
            raise ValueError("strata: the parameters are on several param tiers (built under "
                             "different strata.zero.Init configs); one optimizer takes one")
        return next(iter(tiers.values()), None)

    def _set_hypers(self, b):
        for c, gi in enumerate(b.cohort_group):
            b.engine.set_hyper(c, self._hyper(self.param_groups[gi]))

    def _pull_shadows(self, b):
        """Host copies := the device parameters (before the engine reads them as masters)."""
        for p, h in zip(b.managed, b.shadows):
            if h is not None:
                h.copy_(p.detach())

    @staticmethod
    def _push_ranges(b):
        """Per parameter with a host copy: None (the CPU updates all of it) or the element
        ranges ``(offset, n)`` the CPU updates — the GPU writes the rest into the parameter
        itself (offload_optimizer.ratio < 1)."""
        if not any(h is not None for h in b.shadows):
            return []
        cpu = [[] for _ in b.managed]
        gpu_any = [False] * len(b.managed)
        for sg in b.engine.subgroups():
            for (i, po, _, n) in sg["segments"]:
                if sg.get("update") == "gpu":
                    gpu_any[i] = True
                else:
                    cpu[i].append((po, n))
        return [None if not gpu_any[i] else sorted(cpu[i]) for i in range(len(b.managed))]

    def _set_model_stream(self, b):
        """GPU updates wait for, and are waited for by, the current stream of the model."""
        dev = next((p.device for p, h in zip(b.managed, b.shadows) if h is not None and p.is_cuda),
                   None)
        if dev is not None:
            b.engine.set_model_stream(torch.cuda.current_stream(dev).cuda_stream)

    def _push_shadows(self, b):
        """Device parameters := the host copies the update wrote (H2D on the current stream;
        through ``.data``, so the version counter does not call for a master re-sync), only
        the ranges the CPU updated. An event after the copies tells the next update when it
        may write the host copies."""
        cuda = None
        for i, (p, h) in enumerate(zip(b.managed, b.shadows)):
            if h is None:
                continue
            ranges = b.push[i] if b.push else None
            if ranges is None:
                p.data.copy_(h, non_blocking=True)
            else:
                flat, src = p.data.view(-1), h.view(-1)
                for po, n in ranges:
                    flat[po:po + n].copy_(src[po:po + n], non_blocking=True)
            cuda = cuda or (p.device if p.is_cuda else None)
        if cuda is not None:
            b.pushed = torch.cuda.Event()
            b.pushed.record(torch.cuda.current_stream(cuda))

    def _engine_config(self):
        """The parsed configuration (``strata._C.Config``) the C++ engine reads: the handle
        ``self.config`` was parsed into (a plain dict assigned to ``config`` is parsed here)."""
        cfg = _config.handle_of(self.config, world_size=_world_size())
        dp = self._dp
        want = _config.get(self.config, "data_types.grad_accum_dtype")
        if dp is not None and want and dp.world > 1 and dp.stage < 2:
            if any(p.dtype != dtype_from_name(want) for p, _ in self._trainable()):
                _config.warn_once(
                    f"data_types.grad_accum_dtype {want!r} with several ranks is honoured at "
                    f"ZeRO stage 2 only; at stage {dp.stage} gradients accumulate in "
                    "the parameters' dtype (torch's .grad) and are converted when reduced")
            cfg = cfg.with_default("data_types.grad_accum_dtype")
        return cfg

    def _name_of(self, p, i):
        name = self._param_names.get(id(p))
        if name:
            return name
        return f"param{i}"

    # Whether a sparse gradient may be densified into the arena with the same result as
    # torch's sparse update (Adagrad without weight decay: zero rows change neither the sum
    # nor the parameter).
    _sparse_grads_ok = False

    def _check_dense(self, b, p, g):
        if g.is_sparse and self._sparse_grads_ok:
            group = next(gr for gr in self.param_groups if any(q is p for q in gr["params"]))
            if float(group.get("weight_decay", 0.0)) != 0.0:
                raise ValueError(
                    f"strata: parameter {self._name_of(p, b.index[id(p)])} has a sparse "
                    "gradient and weight_decay is not 0; weight decay is not compatible with "
                    "sparse gradients (as in torch.optim.Adagrad)")
            return
        if g.is_sparse:
            raise ValueError(
                f"strata: parameter {self._name_of(p, b.index[id(p)])} has a sparse "
                "gradient (for example nn.Embedding(sparse=True)); strata needs dense "
                "gradients — construct the layer with sparse=False")

    # ---- keeping the engine up to date with the model ------------------------
    def _refresh(self):
        """Notice changes made to the parameters since the last step (see the module doc)."""
        b = self._b
        changed_storage = set()
        rebuild = False
        trainable_ids = set()
        seen = set()
        for group in self.param_groups:
            for p in group["params"]:
                if p.requires_grad:
                    key = _storage_key(p)
                    if key in seen:
                        continue
                    seen.add(key)
                    trainable_ids.add(id(p))
        if trainable_ids != set(b.index):
            rebuild = True
        for i, p in enumerate(b.managed):
            if _storage_key(p) != b.ptrs[i]:
                changed_storage.add(id(p))
                rebuild = True
        if rebuild:
            self._rebuild(resync=changed_storage)
            return
        stale = [i for i, p in enumerate(b.managed) if p._version != b.versions[i]]
        if stale:
            self._sync_masters_of(b, stale)

    def _sync_masters_of(self, b, indices):
        """The masters of managed parameters ``indices`` := the model's weights."""
        self._write_whole(b, {i: [read_weights(b.managed[i])] for i in indices})
        for i in indices:
            b.versions[i] = b.managed[i]._version

    def _set_steps(self, steps):
        """Set each parameter's step count (``{id(param): step}``), splitting cohorts when
        parameters of one cohort need different counts (rebuilds the engine; the state is
        then overwritten by the caller)."""
        b = self._b
        cohort_step = {}
        consistent = True
        for i, p in enumerate(b.managed):
            s = int(steps.get(id(p), 0))
            if cohort_step.setdefault(b.cohort_of[i], s) != s:
                consistent = False
        if consistent:
            for c, s in cohort_step.items():
                b.engine.set_step_count(c, s)
            return
        self._forced_steps = steps
        try:
            self._rebuild()
        finally:
            self._forced_steps = None

    def _mark_synced(self):
        """The masters match the model now (after a checkpoint load)."""
        b = self._b
        b.versions = [p._version for p in b.managed]

    def _rebuild(self, resync=()):
        old = self._b
        # _build attaches the new views, copying the gradients from the old arena (still alive).
        new = self._build(old, resync=set(resync))
        self._b = new
        self._release(old, keep_grads=False)

    def _copy_state(self, prev, b, resync):
        """Carry state over from ``prev`` to ``b``: a parameter in both with the same numel
        keeps its state (one in ``resync`` all but its master, which the new engine took from
        the model). Where every rank keeps the same pieces, engine parameter to engine
        parameter; otherwise (the layout moved) parameters are assembled whole from their old
        pieces, in batches, and the new pieces written."""
        kept = []
        for i, p in enumerate(b.managed):
            k = prev.index.get(id(p))
            if k is None or _numel(prev.managed[k]) != _numel(p):
                continue  # new parameter: fresh state, master from the model
            kept.append((i, k, 1 if id(p) in resync else 0, len(self._slot_names(i, b))))
        if b.layout.keeps_pieces_of(prev.layout):
            pairs = []
            for i, k, first, nslots in kept:
                j = b.layout.slice_of.get(i)
                if j is not None:
                    pairs.append((j, prev.layout.slice_of[k], first, b.layout.slices[j][3],
                                  nslots))
            copy_slots(prev.engine, b.engine, pairs)
            return
        for batch in _batches(kept, lambda t: 4 * _numel(b.managed[t[0]]) * t[3],
                              _REBUILD_BATCH_BYTES):
            whole = self._read_whole(prev, {k: [s >= first for s in range(nslots)]
                                            for _, k, first, nslots in batch})
            self._write_whole(b, {i: whole[k] for i, k, _, _ in batch})

    # ---- moving state: every call goes through strata.state_io, all parameters at once ----
    def _read_whole(self, b, wanted):
        """{i: [whole fp32 tensor, or None, per slot]} for ``wanted`` = {i: [bool per slot]}:
        this rank's pieces read from ``b``'s engine in one pass, the others gathered from
        their owners (a collective when sharded)."""
        whole, local = whole_tensors(b.layout, b.managed, wanted)
        read_slots(b.engine, local)
        b.layout.gather(whole, self._grads.comm_stats)
        return whole

    def _write_whole(self, b, sources):
        """Write ``sources`` = {i: [tensor of the whole parameter's numel, or None, per
        slot]}: each rank keeps its pieces, in one pass over ``b``'s engine."""
        local = {}
        for i, srcs in sources.items():
            j = b.layout.slice_of.get(i)
            if j is None or all(t is None for t in srcs):
                continue
            _, po, _, n = b.layout.slices[j]
            local[j] = [None if t is None else _fp32_host(t.detach().reshape(-1)[po:po + n])
                        for t in srcs]
        write_slots(b.engine, local)

    def _write_masters(self, sources):
        """The masters of managed parameters := ``sources`` ({i: tensor of the parameter's
        numel}); the model counts as in sync with them."""
        self._write_whole(self._b, {i: [t] for i, t in sources.items()})
        self._mark_synced()

    # ---- backward and step ----------------------------------------------
    def backward(self, loss, *, exact=False, retain_graph=False, boundary=True):
        """``loss.backward()`` with this step's work overlapped with it.

        One process: call it for the last backward before ``step()`` (at the accumulation
        boundary). Eager (default): a sub-group is updated as soon as all its gradients are
        final, while backward goes on; the model's parameters are written once every use of
        them in this backward is over. Exact (``exact=True``, needed with gradient clipping or
        fp16 loss scaling): state is prefetched and gradient statistics computed during
        backward; the updates run in ``step()`` once the clip/scale factor is known. Either way
        the result is bit-identical to ``loss.backward(); step()``. Update threads during
        backward: the cores torch leaves free, at least one.

        Data parallel: this rank's gradient communication — at stage 2 buckets are reduced as
        gradients become ready (every backward); at stage 0 and 1, with ``overlap_comm`` and
        ``boundary`` (the last backward before ``step()``), while backward goes on. ``exact``
        is accepted for the one-process signature (the update itself never overlaps
        backward there)."""
        self._require_open()
        return self._grads.backward(loss, exact=exact, retain_graph=retain_graph,
                                    boundary=boundary)

    def cancel_step(self):
        """Drop the step begun by an exact ``backward()`` (fp16 overflow): no state changes."""
        if self._overlap is None:
            return
        self._overlap = None
        self._b.engine.cancel_step()

    @torch.no_grad()
    def step(self, closure=None):
        """One optimizer step. The DeepSpeed-style Engine passes its gradient multiplier
        (loss scale and clip coefficient) through ``_pending_grad_mul``; without it the
        gradients are used as summed (one process) or averaged over the ranks (data parallel,
        like DDP). Data parallel: the gradient communication is finished first, and the new
        parameters are all-gathered after the update of this rank's shard."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_mul = self._pending_grad_mul
        self._pending_grad_mul = None
        self._require_open()
        tier = self._param_tier()
        if tier is not None and tier.window is not None:
            # Fetched weights go before the update writes new ones to the tier; the module
            # order of the first step is known from now on (prefetch).
            tier.window.release_all()
            tier.window.end_step()
        if self._overlap is not None:
            # Completes the step begun by backward(): hyper-parameters were set then.
            mode, self._overlap = self._overlap, None
            if mode == "eager" and grad_mul not in (None, 1.0):
                raise RuntimeError("strata: an eager overlapped step cannot apply a gradient "
                                   "multiplier (clipping, loss scale): use backward(exact=True)")
            self._engine_step(self._b, grad_mul)
            return loss
        if self._poisoned:
            raise RuntimeError(f"strata: optimizer step refused: {self._poisoned}; load a "
                               "checkpoint (or state dict) successfully before stepping again")
        self._grads.prepare_step()
        b = self._b
        self._set_hypers(b)
        self._set_model_stream(b)
        self._engine_step(b, grad_mul)
        return loss

    def _engine_step(self, b, grad_mul):
        hook = getattr(self, "_engine_step_hook", None)
        if hook is not None:
            hook()  # test hook: arms a kill that lands inside the C++ step
        b.engine.step(self._grads.default_grad_mul if grad_mul is None else float(grad_mul))
        self._push_shadows(b)
        self._grads.after_step(b)

    def _prepare(self, skip_staged=False):
        """Bring the engine up to date with the model and gather the gradients."""
        self._require_open()
        self._drain_grad_lane()
        self._refresh()
        self._grads.attach(self._b, copy_existing=True, skip_staged=skip_staged)
        b = self._b
        if b.pushed is not None:
            # The previous step's H2D copies read the host copies the update will write.
            b.pushed.synchronize()
            b.pushed = None

    def _drain_grad_lane(self):
        """A model on a GPU at stage 3: every gradient copy started has landed in the arena."""
        tier = self._param_tier() if self._stage3() else None
        if tier is not None and tier.grad_lane is not None:
            tier.grad_lane.drain()

    def reduce_gradients(self):
        """Data parallel: finish this step's gradient communication (idempotent until
        ``zero_grad``); one process: nothing to do."""
        self._require_open()
        self._grads.reduce_gradients()

    def grad_stats(self):
        """(sum of squares, any inf/nan) over every gradient, in the engine's fixed order
        (data parallel: over the global gradient, each rank's shard all-reduced)."""
        return self._grads.grad_stats()

    def grad_arenas(self):
        """The flat gradient buffers (one tensor per dtype), for collective operations."""
        self._require_open()
        return self._grads.grad_arenas(self._b)

    def _restore_grad_views(self):
        self._grads.restore_views(self._b)

    def zero_grad(self, set_to_none=None):
        self._require_open()
        self._drain_grad_lane()  # no copy lands in the arena after it was zeroed
        self._grads.zero_grad(self._b)

    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        if self._b is not None:  # after __init__: rebuild now, keeping state
            self._require_open()
            self._rebuild()

    def sync_masters(self, params=None):
        """Re-read the fp32 masters of ``params`` (default: all) from the model's weights."""
        self._require_open()
        self._refresh()
        b = self._b
        targets = b.managed if params is None else list(params)
        indices = sorted({b.index[id(p)] for p in targets if id(p) in b.index})
        if indices:
            self._sync_masters_of(b, indices)

    def manages(self, p):
        return self._b is not None and id(p) in self._b.index

    # ---- torch's state_dict ---------------------------------------------
    def state_dict(self):
        """torch-compatible and whole on every rank (with a shard, a collective: each piece is
        broadcast by its owner); tensors in memory (costs RAM equal to the state; large runs
        should use the engine's streaming checkpoints, ``Engine.save_checkpoint``)."""
        self._require_open()
        self._refresh()
        b = self._b
        rows, wanted, groups, index = [], {}, [], 0
        for group in self.param_groups:
            g = {k: v for k, v in group.items() if k != "params"}
            g["params"] = []
            names = self._state_names(group)
            for p in group["params"]:
                g["params"].append(index)
                i = b.index.get(id(p))
                if i is not None and i not in wanted:
                    wanted[i] = [p.dtype != torch.float32] + [True] * len(names)
                    rows.append((index, i, p, names))
                index += 1
            groups.append(g)
        whole = self._read_whole(b, wanted)
        packed = {}
        for index, i, p, names in rows:
            entry = {}
            step = b.engine.step_count(b.cohort_of[i])
            if self._has_step_in_state():
                entry["step"] = torch.tensor(float(step))
            for slot, name in enumerate(names, start=1):
                entry[name] = whole[i][slot].view(_shape(p))
            if not self._has_step_in_state():
                entry["strata_step"] = step
                if not names:
                    entry["momentum_buffer"] = None  # torch's SGD without momentum
            if p.dtype != torch.float32:
                entry["master"] = whole[i][0].view(_shape(p))
            packed[index] = entry
        return {"state": packed, "param_groups": groups}

    def load_state_dict(self, state_dict):
        """torch-compatible: every rank passes the whole state dict (a shard keeps its
        pieces)."""
        self._require_open()
        self._refresh()
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups):
            raise ValueError(
                f"loaded state dict has {len(groups)} parameter groups, the optimizer has "
                f"{len(self.param_groups)}"
            )
        for gi, (saved, group) in enumerate(zip(groups, self.param_groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(
                    f"param group {gi}: loaded state has {len(saved['params'])} parameters, "
                    f"the optimizer has {len(group['params'])}"
                )
        self._load_saved_state(groups, state_dict["state"])

    def _load_saved_state(self, groups, state):
        """Write a torch-format state (``groups`` and ``state`` of a state_dict, already
        checked against this optimizer's groups) into the engine in one pass."""
        b = self._b
        # Model weights are the source of truth for the masters: re-sync first,
        # then overwrite with saved masters where present (non-fp32 models).
        self._pull_shadows(b)
        b.engine.sync_master_from_params()
        cohort_step = {}
        sources = {}
        for gi, (saved, group) in enumerate(zip(groups, self.param_groups)):
            for k, v in saved.items():
                if k != "params":
                    group[k] = v
            names = self._state_names(group)
            for saved_idx, p in zip(saved["params"], group["params"]):
                i = b.index.get(id(p))
                entry = state.get(saved_idx, state.get(str(saved_idx)))
                if i is None or entry is None:
                    continue
                srcs = [None] * (1 + len(names))
                for slot, name in enumerate(names, start=1):
                    if name not in entry or entry[name] is None:
                        continue
                    t = entry[name].detach().to(torch.float32).contiguous().view(-1)
                    if t.numel() != _numel(p):
                        raise ValueError(f"state {name} of parameter {saved_idx} has "
                                         f"{t.numel()} elements, expected {_numel(p)}")
                    srcs[slot] = t
                if "master" in entry:
                    srcs[0] = entry["master"].detach().to(torch.float32).contiguous().view(-1)
                sources[i] = srcs
                if "step" in entry:
                    step = int(float(entry["step"]))
                elif "strata_step" in entry:
                    step = int(entry["strata_step"])
                else:
                    # torch's SGD keeps no step: a saved momentum buffer means it has stepped.
                    step = 1 if any(entry.get(n) is not None for n in names) else 0
                c = b.cohort_of[i]
                cohort_step[c] = max(cohort_step.get(c, 0), step)
        self._write_whole(b, sources)
        for c, step in cohort_step.items():
            b.engine.set_step_count(c, step)
        self._set_hypers(b)
        self._mark_synced()
        b.engine.clear_error()
        self._poisoned = None

    # ---- one parameter's state (checkpoints, strata.utils.safe_*, optimizer.state[p]) ----
    def _slot_names(self, i, b=None):
        b = self._b if b is None else b
        return ["master"] + self._state_names(self.param_groups[b.cohort_group[b.cohort_of[i]]])

    def _read_slot(self, i, slot, out):
        """Copy slot ``slot`` of managed parameter ``i`` into the contiguous fp32 CPU tensor
        ``out`` (of the parameter's numel): only this rank's piece of it is filled
        (``state_dict()`` and ``read_state`` gather the whole)."""
        if out.device.type != "cpu" or not out.is_contiguous():
            raise ValueError("strata: _read_slot needs a contiguous CPU tensor")
        b = self._b
        j = b.layout.slice_of.get(i)
        if j is None:
            return
        _, po, _, n = b.layout.slices[j]
        read_slots(b.engine, {j: [None] * slot + [out.view(-1)[po:po + n]]})

    def _write_slot(self, i, slot, src):
        """Write slot ``slot`` of managed parameter ``i`` from ``src``: the whole parameter
        (this rank takes its piece) or exactly this rank's piece."""
        b = self._b
        j = b.layout.slice_of.get(i)
        if j is None:
            return
        _, po, _, n = b.layout.slices[j]
        flat = src.reshape(-1)
        if flat.numel() != n:
            flat = flat[po:po + n]
        write_slots(b.engine, {j: [None] * slot + [_fp32_host(flat)]})

    def _slot_of(self, p, key):
        """(managed index, slot) of state ``key`` ("fp32"/"master" for the master weights,
        else a torch state name such as "exp_avg") of parameter ``p``."""
        self._require_open()
        self._refresh()
        b = self._b
        i = b.index.get(id(p))
        if i is None:
            raise KeyError("strata: this parameter is not managed by the optimizer (frozen, "
                           "or of another optimizer)")
        if key in ("fp32", "master"):
            return i, 0
        group = next(g for g in self.param_groups if any(q is p for q in g["params"]))
        names = self._state_names(group)
        if key not in names:
            raise KeyError(f"strata: {type(self).__name__} has no state {key!r} (it has "
                           f"{', '.join(names) or 'none'})")
        return i, names.index(key) + 1

    def read_state(self, p, key):
        """A new fp32 tensor shaped like ``p`` holding state ``key`` of ``p``, read from its
        tier (one read of that slot: costly when the state lives on NVMe); whole on every
        rank (with a shard, a collective: each piece is broadcast by its owner)."""
        i, slot = self._slot_of(p, key)
        whole = self._read_whole(self._b, {i: [s == slot for s in range(slot + 1)]})
        return whole[i][slot].view(_shape(p))

    def write_state(self, p, key, value):
        """Write state ``key`` of ``p`` (a tensor of p's numel) to its tier."""
        i, slot = self._slot_of(p, key)
        value = torch.as_tensor(value)
        if value.numel() != _numel(p):
            raise ValueError(f"strata: state {key!r} needs {_numel(p)} elements, got "
                             f"{value.numel()}")
        self._write_whole(self._b, {i: [None] * slot + [value]})

    def read_local_state(self, p, key):
        """This rank's piece of state ``key`` of ``p``, flat (one process: all of it; empty
        where the rank owns none)."""
        i, slot = self._slot_of(p, key)
        b = self._b
        _, n = b.layout.local_range(i)
        t = torch.empty(n, dtype=torch.float32)
        if n:
            read_slots(b.engine, {b.layout.slice_of[i]: [None] * slot + [t]})
        return t

    def write_local_state(self, p, key, value):
        """Write this rank's piece of state ``key`` of ``p`` (``value`` has its numel)."""
        i, slot = self._slot_of(p, key)
        b = self._b
        _, n = b.layout.local_range(i)
        value = torch.as_tensor(value).reshape(-1)
        if value.numel() != n:
            raise ValueError(f"strata: this rank's piece of {key!r} has {n} elements, got "
                             f"{value.numel()}")
        if n:
            write_slots(b.engine, {b.layout.slice_of[i]: [None] * slot + [_fp32_host(value)]})

    # ---- strata extras --------------------------------------------------
    def stats(self):
        """Engine counters: bytes moved, pool, swap file, backend. Data parallel adds: stage,
        world_size, rank, total_numel and shard_numel (elements of trainable parameters, all /
        this rank's state), grad_arena_bytes (the engine's gradient buffers: the shard at
        stage 1 and 2), grad_flat_bytes (stage 1's full gradient buffers),
        grad_bucket_peak_bytes (bucket buffers held at once, in use or kept for reuse),
        reduce_buckets, allgather_rounds, comm (this optimizer's collectives: calls, bytes,
        async launches per operation), buckets_reduced and buckets_reduced_during_backward
        (launched from a gradient hook while backward went on: overlap) and numa_node (bound,
        or None). One process adds grad_wait_s: seconds gradient hooks waited at stage 3 for
        the updates to catch up (the bound on gradients held, EngineOptions'
        max_pending_subgroups)."""
        self._require_open()
        s = self._b.engine.stats()
        s.update(self._grads.stats(self._b))
        return s

    def plan(self):
        self._require_open()
        return self._b.engine.plan_text()

    def step_breakdown(self):
        self._require_open()
        return json.loads(self._b.engine.breakdown())

    def write_trace(self, path):
        self._require_open()
        self._b.engine.write_trace(os.fspath(path))

    def record_forward(self, start_ns, end_ns):
        """The model's forward (``time.monotonic_ns()`` times) as a lane of the trace; nothing
        before the engine exists."""
        if not self.closed:
            self._b.engine.record_forward(start_ns, end_ns)

    @property
    def closed(self):
        return self._b is None or self._b.engine is None or self._b.engine.closed

    def _require_open(self):
        if self.closed:
            raise RuntimeError("strata: the optimizer is closed")

    def _release(self, b, keep_grads=True):
        if b is None or b.engine is None or b.engine.closed:
            return
        b.grads.release(b, keep_grads)
        b.shadows = [None] * len(b.shadows)  # views of the engine's pool, freed with it
        b.engine.close()

    def _trace_path(self):
        """strata.trace.path; with several ranks, rank r > 0 writes path.rank<r>.json."""
        path = _config.get(self.config, "strata.trace.path")
        dp = self._dp
        if path and dp is not None and dp.world > 1 and dp.rank != 0:
            root, ext = os.path.splitext(path)
            path = f"{root}.rank{dp.rank}{ext}"
        return path

    def _close_engine(self):
        b = self._b
        if b is not None and b.engine is not None and not b.engine.closed:
            trace_path = self._trace_path()
            if trace_path:
                os.makedirs(os.path.dirname(os.path.abspath(trace_path)), exist_ok=True)
                b.engine.write_trace(trace_path)
            self._release(b, keep_grads=True)

    def close(self):
        """Drain in-flight I/O, remove the swap file, release the pinned pool."""
        self._close_engine()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def __del__(self):
        try:
            self._close_engine()
        except Exception:  # pragma: no cover - interpreter shutdown
            pass

    def __getstate__(self):
        raise TypeError("strata optimizers cannot be pickled; use state_dict()")


class _StateView(collections.abc.Mapping):
    """``optimizer.state`` of a strata optimizer: parameter -> ``_ParamState`` for every
    parameter the engine manages (iteration and ``len`` over those); any other key reads as an
    empty dict, as torch's defaultdict does (without inserting it)."""

    def __init__(self, opt):
        self._opt = opt

    def _managed(self):
        if self._opt.closed:
            return []
        self._opt._refresh()
        return list(self._opt._b.managed)

    def __getitem__(self, p):
        if isinstance(p, torch.Tensor) and not self._opt.closed and self._opt.manages(p):
            return _ParamState(self._opt, p)
        return {}

    def __contains__(self, p):
        return isinstance(p, torch.Tensor) and not self._opt.closed and self._opt.manages(p)

    def __iter__(self):
        return iter(self._managed())

    def __len__(self):
        return len(self._managed())

    def __repr__(self):
        return f"<strata optimizer state of {len(self)} parameters (read from the tiers)>"


class _ParamState(collections.abc.MutableMapping):
    """One parameter's state: its slots by torch's name, and "step" (the step count of the
    sub-groups' cohort). Each read is a read of that slot from its tier; each assignment a
    write; with several ranks both are collectives. Slots cannot be deleted."""

    def __init__(self, opt, p):
        self._opt, self._p = opt, p

    def _names(self):
        group = next(g for g in self._opt.param_groups if any(q is self._p for q in g["params"]))
        names = list(self._opt._state_names(group))
        return (["step"] if self._opt._has_step_in_state() else []) + names

    def __getitem__(self, key):
        if key not in self._names():
            raise KeyError(key)
        if key == "step":
            i, _ = self._opt._slot_of(self._p, "fp32")
            b = self._opt._b
            return torch.tensor(float(b.engine.step_count(b.cohort_of[i])))
        return self._opt.read_state(self._p, key)

    def __setitem__(self, key, value):
        if key not in self._names():
            raise KeyError(f"strata: {type(self._opt).__name__} keeps no state {key!r} (it keeps "
                           f"{', '.join(self._names())})")
        if key == "step":
            i, _ = self._opt._slot_of(self._p, "fp32")
            b = self._opt._b
            b.engine.set_step_count(b.cohort_of[i], int(float(value)))
            return
        self._opt.write_state(self._p, key, value)

    def __delitem__(self, key):
        raise TypeError("strata: a parameter's state slots cannot be deleted")

    def __iter__(self):
        return iter(self._names())

    def __len__(self):
        return len(self._names())

    def __repr__(self):
        return f"<strata state of a parameter: {', '.join(self._names())} (read on access)>"


def _check_adam_args(lr, betas, eps, weight_decay):
    if lr < 0.0:
        raise ValueError(f"Invalid learning rate: {lr}")
    if eps < 0.0:
        raise ValueError(f"Invalid epsilon value: {eps}")
    for b in betas:
        if not 0.0 <= b < 1.0:
            raise ValueError(f"Invalid beta parameter: {b}")
    if weight_decay < 0.0:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")


class OffloadAdamW(_OffloadOptimizer):
    """AdamW (decoupled weight decay) with the state on strata's tiers.

    ``bias_correction=False`` is DeepSpeed's switch (no bias correction); it may also be set
    per param group.
    """

    _kind = "adamw"
    adam_w_mode = True  # DeepSpeed's attribute (FusedAdam, DeepSpeedCPUAdam)

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 amsgrad=False, *, bias_correction=True, config=None, default_device="nvme",
                 tag="", rank=0):
        _check_adam_args(lr, betas, eps, weight_decay)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        amsgrad=amsgrad, bias_correction=bias_correction)
        super().__init__(params, defaults, config=config, default_device=default_device, tag=tag,
                         rank=rank)

    def _hyper(self, group):
        return {
            "kind": self._kind,
            "lr": float(group["lr"]),
            "betas": tuple(float(b) for b in group["betas"]),
            "eps": float(group["eps"]),
            "weight_decay": float(group["weight_decay"]),
            "amsgrad": bool(group.get("amsgrad", False)),
            "bias_correction": bool(group.get("bias_correction", True)),
        }

    def _state_names(self, group):
        names = ["exp_avg", "exp_avg_sq"]
        if group.get("amsgrad"):
            names.append("max_exp_avg_sq")
        return names


class OffloadAdam(OffloadAdamW):
    """Adam (L2 weight decay added to the gradient) with the state on strata's tiers."""

    _kind = "adam"
    adam_w_mode = False

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 amsgrad=False, *, bias_correction=True, config=None, default_device="nvme",
                 tag="", rank=0):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad,
                         bias_correction=bias_correction, config=config,
                         default_device=default_device, tag=tag, rank=rank)


class OffloadSGD(_OffloadOptimizer):
    """SGD (momentum, dampening, Nesterov, L2 weight decay) with the state on strata's tiers.

    State: the fp32 master and, with momentum, ``momentum_buffer`` (torch's name). The momentum
    of a group cannot change between 0 and non-zero after construction (the state layout is
    fixed).
    """

    _kind = "sgd"

    def __init__(self, params, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0,
                 nesterov=False, *, config=None, default_device="nvme", tag="", rank=0):
        if lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if momentum < 0.0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov)
        super().__init__(params, defaults, config=config, default_device=default_device, tag=tag,
                         rank=rank)

    def _hyper(self, group):
        return {
            "kind": "sgd",
            "lr": float(group["lr"]),
            "momentum": float(group["momentum"]),
            "dampening": float(group["dampening"]),
            "weight_decay": float(group["weight_decay"]),
            "nesterov": bool(group["nesterov"]),
        }

    def _state_names(self, group):
        return ["momentum_buffer"] if group["momentum"] != 0 else []

    def _has_step_in_state(self):
        return False  # torch's SGD keeps no step count


class OffloadAdagrad(_OffloadOptimizer):
    """Adagrad (lr_decay, initial_accumulator_value, L2 weight decay) with the state on
    strata's tiers. State: the fp32 master and ``sum`` (torch's name)."""

    _kind = "adagrad"
    _sparse_grads_ok = True  # densified: the same update as torch's sparse Adagrad

    def __init__(self, params, lr=1e-2, lr_decay=0.0, weight_decay=0.0,
                 initial_accumulator_value=0.0, eps=1e-10, *, config=None,
                 default_device="nvme", tag="", rank=0):
        if lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if lr_decay < 0.0:
            raise ValueError(f"Invalid lr_decay value: {lr_decay}")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if initial_accumulator_value < 0.0:
            raise ValueError(f"Invalid initial_accumulator_value value: {initial_accumulator_value}")
        if eps < 0.0:
            raise ValueError(f"Invalid epsilon value: {eps}")
        defaults = dict(lr=lr, lr_decay=lr_decay, eps=eps, weight_decay=weight_decay,
                        initial_accumulator_value=initial_accumulator_value)
        super().__init__(params, defaults, config=config, default_device=default_device, tag=tag,
                         rank=rank)

    def _hyper(self, group):
        return {
            "kind": "adagrad",
            "lr": float(group["lr"]),
            "lr_decay": float(group["lr_decay"]),
            "eps": float(group["eps"]),
            "weight_decay": float(group["weight_decay"]),
            "initial_accumulator_value": float(group["initial_accumulator_value"]),
        }

    def _state_names(self, group):
        return ["sum"]


def sync_params(params):
    """Re-read the masters of ``params`` from the model in every open strata optimizer that
    manages them (after changing weights through ``.data``)."""
    params = list(params)
    for opt in list(_live):
        if opt.closed:
            continue
        mine = [p for p in params if opt.manages(p)]
        if mine:
            opt.sync_masters(mine)
