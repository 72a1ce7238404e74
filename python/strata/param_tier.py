"""ZeRO stage 3 in one process: the model's weights on the param tier, fetched per module.

``zero_optimization.stage: 3`` with ``offload_param.device`` cpu, cxl or nvme puts every
parameter of ``stage3_param_persistence_threshold`` elements or more on the param tier (the C++
``strata._C.ParamStore``: one record per parameter, in the model's dtype). Smaller parameters
(biases, LayerNorm weights) persist in the model's memory, as in DeepSpeed.

Where the weights are between uses:

- ``cpu``: in pinned DRAM records that *are* the parameters' memory (``.data`` views the
  record); nothing is fetched or released, and the optimizer writes each step's new weights
  straight into them.
- ``cxl`` and ``nvme``: on the tier only. ``.data`` is an empty tensor (``ds_status``
  ``NOT_AVAILABLE``) until a module that uses the parameter runs: the ``ParamWindow`` fetches a
  module's own parameters before its forward and before its backward, into staging buffers that
  become ``.data``, and releases them after (a parameter is kept when it is used again within
  ``stage3_max_reuse_distance`` elements of fetches, while the window has room). It prefetches
  ahead in the module order recorded in the first step, up to ``stage3_prefetch_bucket_size``
  elements in flight, and holds at most ``stage3_max_live_parameters`` elements (and, from
  NVMe/CXL, ``buffer_count x buffer_size``). The optimizer's update writes the new weights to
  the tier in the same pass; a later fetch waits for that write.

Gradients stream to the optimizer as they become final (the engine's ``release_grads``: a
sub-group's gradient pages are returned right after its update), so with
``strata.overlap_backward`` the whole model's gradients are never held at once. With
clipping or fp16 (the exact mode) or gradient accumulation, gradients are held until the step,
as at stage 2.

Parameters carry DeepSpeed's attributes: ``ds_id``, ``ds_numel``, ``ds_shape``, ``ds_status``
(``AVAILABLE`` / ``NOT_AVAILABLE`` / ``INFLIGHT``) and ``ds_persist``. ``numel(p)`` and
``shape(p)`` give a parameter's real size whatever its ``.data`` holds.

torch 1.13 has no module backward pre-hook, so the window wraps each module's output tensors
in an autograd function whose backward fetches the module's weights first (as DeepSpeed does).
While a window is open, ``torch.nn.functional.linear`` saves the weight parameter itself for
backward rather than a transposed view of the fetched memory (DeepSpeed's
``memory_efficient_linear``), so a released weight's memory is really freed; its forward and
backward run the same operations as torch's, so results are bit-identical.
"""

import collections
import contextlib
import weakref

import torch

from . import _C, comm
from . import config as _config
from ._torch_compat import tensor_from_buffer

AVAILABLE = "AVAILABLE"
NOT_AVAILABLE = "NOT_AVAILABLE"
INFLIGHT = "INFLIGHT"


def tier_of(p):
    """The ParamTier holding ``p``'s weights, or None."""
    return getattr(p, "_strata_tier", None)


def on_tier(p):
    """True when ``p``'s weights live on a param tier (not persistent)."""
    return tier_of(p) is not None and not getattr(p, "ds_persist", False)


def fetched_on_demand(p):
    """True when ``p``'s ``.data`` is empty between uses (cxl and nvme tiers, every
    partitioned parameter with several ranks, and every tier of a model on a GPU)."""
    t = tier_of(p)
    return t is not None and not p.ds_persist and t.on_demand


def _placeholder(p):
    """A released parameter's ``.data``: empty, on the device the model computes on."""
    t = tier_of(p)
    if t is not None and t.lanes is not None:
        return t.lanes.placeholder(p.dtype)
    return torch.empty(0, dtype=p.dtype)


def partitioned(p):
    """True when ``p`` is partitioned across ranks: this rank holds elements
    ``[r * ds_chunk, r * ds_chunk + ds_local)`` of it (ZeRO-3 with several ranks)."""
    return getattr(p, "ds_partitioned", False)


def numel(p):
    """Elements of ``p``, also while its weights are released."""
    return int(getattr(p, "ds_numel", None) or p.numel()) if on_tier(p) else p.numel()


def shape(p):
    return tuple(p.ds_shape) if on_tier(p) else tuple(p.shape)


def storage_key(p):
    """What identifies ``p``'s weights: its record on the tier, else its memory."""
    if on_tier(p):
        return ("tier", id(tier_of(p)), p.ds_id)
    return (p.data_ptr(), p.dtype, p.numel())


@contextlib.contextmanager
def full_shape(p):
    """While a released parameter's autograd node is made (torch < 2.1 grad hooks), its
    ``.data`` has its real shape (one broadcast element, no memory): the node records the
    shape it checks gradients against."""
    if fetched_on_demand(p) and p.ds_status == NOT_AVAILABLE:
        with torch.no_grad():
            p.data = _placeholder(p).new_empty(1).expand(p.ds_shape)
        try:
            yield
        finally:
            with torch.no_grad():
                p.data = _placeholder(p)
    else:
        yield


def read_weights(p):
    """``p``'s weights as a CPU tensor: ``p`` itself when resident, else a copy fetched from
    its tier (the master-weight resync of a released parameter). A released partitioned
    parameter is all-gathered: a collective, every rank must read it. With a model on a GPU
    the weights are read from the tier's host side (a resident record, or a fetch)."""
    t = tier_of(p)
    if fetched_on_demand(p) and t.lanes is not None:
        if t.resident:
            return t.record_tensor(p).view(p.ds_shape)
    elif not fetched_on_demand(p) or p.ds_status == AVAILABLE:
        return p
    if partitioned(p):
        return _gather_whole(p)
    store = p._strata_tier.store
    buf = store.staging(store.record_bytes(p.ds_id))
    store.fetch(p.ds_id, buf)
    return tensor_from_buffer(buf, p.dtype)[:p.ds_numel].view(p.ds_shape)


def write_weights(p, src):
    """``p``'s weights := ``src`` (its shape): into its memory, and onto its tier when they
    live there (a released parameter is written through a staging buffer)."""
    with torch.no_grad():
        if not on_tier(p):
            p.copy_(src)
            return
        t = tier_of(p)
        if t.window is not None and p.ds_status == INFLIGHT:
            t.window._drop(p)  # a fetch in flight would bring the old bytes
        if t.lanes is not None:
            # A model on a GPU: the device copy (when resident) and the tier's host side.
            if p.ds_status == AVAILABLE:
                p.data.copy_(src.reshape(p.data.shape))
            if t.resident:
                t.record_tensor(p).copy_(src.reshape(-1))
                return
            _store_whole(t, p, src)
            return
        if partitioned(p):
            # Every rank passes the whole value and keeps its own piece (no collective).
            if p.ds_status == AVAILABLE:
                p.data.copy_(src.reshape(p.data.shape))
            write_local(p, own_piece(p, src))
            return
        if t.resident or p.ds_status == AVAILABLE:
            p.data.copy_(src.reshape(p.data.shape))
            if not t.resident:
                r = t.window._live[p.ds_id] if t.window is not None else None
                if r is not None:
                    t.store.store(p.ds_id, r.buf)
            return
        _store_whole(t, p, src)


def _store_whole(t, p, src):
    """``src`` onto ``p``'s record on tier ``t``, through a staging buffer (synchronous)."""
    buf = t.store.staging(t.store.record_bytes(p.ds_id))
    tensor_from_buffer(buf, p.dtype)[:p.ds_numel].copy_(src.reshape(-1))
    t.store.store(p.ds_id, buf)


def local_shard(p):
    """This rank's piece of partitioned parameter ``p`` (``ds_local`` elements) as a CPU
    tensor: its memory (offload_param none or cpu), or a copy read from its record."""
    if p.ds_tensor is not None:
        return p.ds_tensor
    store = p._strata_tier.store
    if p.ds_record is None:
        return torch.empty(0, dtype=p.dtype)
    buf = store.staging(store.record_bytes(p.ds_record))
    store.fetch(p.ds_record, buf)
    return tensor_from_buffer(buf, p.dtype)[:p.ds_local]


def own_piece(p, whole):
    """This rank's piece of ``whole`` (a tensor of ``p``'s size)."""
    return whole.reshape(-1)[p.ds_chunk * tier_of(p).rank:][:p.ds_local]


def write_local(p, src):
    """This rank's piece of partitioned ``p`` := ``src`` (``ds_local`` elements)."""
    if p.ds_local == 0:
        return
    if p.ds_tensor is not None:
        p.ds_tensor.copy_(src)
        return
    store = p._strata_tier.store
    buf = store.staging(store.record_bytes(p.ds_record))
    tensor_from_buffer(buf, p.dtype)[:p.ds_local].copy_(src)
    store.store(p.ds_record, buf)


def _padded(p, shard):
    """``shard`` padded with zeros to ``ds_chunk`` elements (what every rank sends)."""
    if shard.numel() == p.ds_chunk:
        return shard
    out = torch.zeros(p.ds_chunk, dtype=p.dtype)
    out[:shard.numel()].copy_(shard)
    return out


def _gather_whole(p, stats=None):
    """The whole of partitioned ``p`` (a new tensor of its shape), all-gathered from every
    rank's piece (a collective)."""
    t = tier_of(p)
    full = torch.empty(t.world * p.ds_chunk, dtype=p.dtype)
    comm.all_gather_into(full, _padded(p, local_shard(p)), stats=stats)
    return full[:p.ds_numel].view(p.ds_shape)


# Tests: builds the Lanes of every stage 3 engine initialised from now on (see
# strata.testing.emulated_device); None: lanes_for's rule.
_lanes_factory = None


def lanes_for(device):
    """The copy lanes of a model computing on ``device``: ``CudaLanes`` on a GPU; None on the
    CPU, where the window's staging memory is the weights' memory."""
    if _lanes_factory is not None:
        return _lanes_factory(device)
    if device.type == "cuda":
        from .device_lanes import CudaLanes

        return CudaLanes(device)
    if device.type != "cpu":
        raise NotImplementedError(
            f"strata: ZeRO stage 3 with the model on {device} is not supported (CPU or CUDA)")
    return None


class ParamTier:
    """The param tier of one process: a ``_C.ParamStore`` and the parameters on it.

    With several ranks (``world`` > 1, ZeRO-3 across ranks) every parameter that does not
    persist is partitioned DeepSpeed's way: flat, padded to a multiple of the world size, rank
    ``r`` holding chunk ``r`` of ``ceil(numel / world)`` elements (less for the last ranks;
    none where the parameter ends before its chunk). The tier holds this rank's chunks only:
    ``ds_tensor`` is the chunk's memory (device none: the process's memory; cpu: a pinned
    record) or None (cxl, nvme: the record ``ds_record`` on the tier). The parameter's ``.data``
    is empty between uses; the window all-gathers it before a module runs."""

    def __init__(self, config, tag="param", world=None, rank=None):
        self.config = config
        if world is None:
            world = comm.get_world_size() if comm.is_initialized() else 1
            rank = comm.get_rank() if comm.is_initialized() else 0
        self.world, self.rank = int(world), int(rank or 0)
        self.partitioned = self.world > 1
        self.comm_stats = {}  # the window's all-gathers (by operation)
        self.device = _config.get(config, "zero_optimization.offload_param.device")
        self.persist_threshold = int(_config.get(
            config, "zero_optimization.stage3_param_persistence_threshold"))
        budget = _config.get(config, "zero_optimization.stage3_model_persistence_threshold",
                             None)
        self.persist_budget = None if budget is None else int(budget)
        self.persisted = 0
        self.max_live = int(_config.get(config, "zero_optimization.stage3_max_live_parameters"))
        self.prefetch = int(_config.get(config, "zero_optimization.stage3_prefetch_bucket_size"))
        self.reuse = int(_config.get(config, "zero_optimization.stage3_max_reuse_distance"))
        # Several ranks: partitioned parameters fetched together are all-gathered in one
        # collective of at most this many elements (gathered, all ranks).
        from .grad_path import _bucket_size  # the data-parallel bucket rule (and default)

        self.allgather_bucket = _bucket_size(
            _config.get(config, "zero_optimization.allgather_bucket_size"))
        self.buffer_size = int(_config.get(config, "zero_optimization.offload_param.buffer_size"))
        self.buffer_count = int(_config.get(config,
                                            "zero_optimization.offload_param.buffer_count"))
        self.store = None
        if self.device != "none":
            self.store = _C.ParamStore(_config.handle_of(config), tag)
        self.resident = self.store is None or self.store.resident
        self.local_bytes = 0  # this rank's chunks of partitioned parameters (bytes)
        if not self.resident:
            self.max_live = min(self.max_live, self.buffer_count * self.buffer_size)
        self._params = {}  # ds_id -> weakref(param)
        self._next_id = 0
        self.window = None
        self.lanes = None       # strata.device_lanes.Lanes: the model computes on a device
        self.grad_lane = None   # its GradLane (gradients D2H into the optimizer's arena)
        self._records = {}      # ds_id -> the resident record as a tensor (with lanes)

    @property
    def on_demand(self):
        """True when parameters' ``.data`` is empty between uses and a window fetches them."""
        return not self.resident or self.partitioned or self.lanes is not None

    def attach_lanes(self, lanes):
        """The model computes on ``lanes.device`` (a GPU): every parameter on the tier is
        fetched to the device by the window (H2D on the weight lane) and its gradient goes
        back on the gradient lane; ``.data`` is an empty device tensor between uses."""
        if self.partitioned:
            raise NotImplementedError(
                "strata: ZeRO stage 3 across several ranks with a model on a GPU is not "
                "written yet (the all-gathers run on host memory); run one process per GPU "
                "with stage 2, or stage 3 with one process")
        from .device_lanes import GradLane

        self.lanes = lanes
        self.grad_lane = GradLane(lanes, buffers=max(2, self.buffer_count))
        for p in self.params():
            if p.ds_persist:
                continue
            with torch.no_grad():
                p.data = lanes.placeholder(p.dtype)
            p.ds_status = NOT_AVAILABLE

    def record_tensor(self, p):
        """A resident store's record of ``p`` as a flat tensor of ``ds_numel`` elements."""
        t = self._records.get(p.ds_id)
        if t is None:
            t = tensor_from_buffer(self.store.record(p.ds_id), p.dtype)[:p.ds_numel]
            self._records[p.ds_id] = t
        return t

    def __repr__(self):
        return f"ParamTier({self.describe()})"

    def describe(self):
        return "none (weights in the model's memory)" if self.store is None else \
            self.store.describe()

    # ---- putting parameters on the tier ---------------------------------------------
    def offload(self, p, name=None):
        """Moves ``p``'s weights onto the tier (a persistent parameter stays as it is).
        True when it moved them."""
        if tier_of(p) is not None:
            return False
        n = p.numel()
        shape_ = tuple(p.shape)
        persist = n < self.persist_threshold and (
            self.persist_budget is None or self.persisted + n <= self.persist_budget)
        p._strata_tier = self
        p.ds_numel = n
        p.ds_shape = torch.Size(shape_)
        p.ds_persist = persist or (self.store is None and not self.partitioned)
        p.ds_status = AVAILABLE
        if p.ds_persist:
            if persist:
                self.persisted += n
            p.ds_id = None
            return False
        if self.partitioned:
            self._partition(p, n, shape_)
            return True
        if not self.resident and n > self.buffer_size:
            raise ValueError(
                f"strata: parameter {name or tuple(shape_)} has {n} elements, more than "
                f"zero_optimization.offload_param.buffer_size ({self.buffer_size}); set "
                f"buffer_size to at least {n}")
        src = p.detach()
        if src.device.type != "cpu" or not src.is_contiguous():
            src = src.to("cpu").contiguous()
        rid = self.store.add(src.data_ptr(), n * src.element_size())
        p.ds_id = rid
        self._params[rid] = weakref.ref(p)
        with torch.no_grad():
            if self.lanes is not None:
                p.data = self.lanes.placeholder(p.dtype)
                p.ds_status = NOT_AVAILABLE
            elif self.resident:
                p.data = tensor_from_buffer(self.store.record(rid), p.dtype).view(shape_)
            else:
                p.data = torch.empty(0, dtype=p.dtype)
                p.ds_status = NOT_AVAILABLE
        return True

    def _partition(self, p, n, shape_):
        """Keeps this rank's chunk of ``p`` on the tier; ``.data`` becomes empty."""
        c = -(-n // self.world)
        a = min(self.rank * c, n)
        local = min(a + c, n) - a
        src = p.detach()
        if src.device.type != "cpu" or not src.is_contiguous():
            src = src.to("cpu").contiguous()
        flat = src.reshape(-1)
        p.ds_partitioned = True
        p.ds_chunk = c
        p.ds_local = local
        p.ds_record = None
        p.ds_tensor = None
        es = src.element_size()
        if not self.resident and local > self.buffer_size:
            raise ValueError(
                f"strata: parameter {tuple(shape_)} has {local} elements on this rank, more "
                f"than zero_optimization.offload_param.buffer_size ({self.buffer_size}); set "
                f"buffer_size to at least {local}")
        if self.store is None:
            p.ds_tensor = flat[a:a + local].clone()
        elif local > 0:
            p.ds_record = self.store.add(flat.data_ptr() + a * es, local * es)
            if self.resident:
                p.ds_tensor = tensor_from_buffer(self.store.record(p.ds_record),
                                                 p.dtype)[:local]
        else:
            p.ds_tensor = torch.empty(0, dtype=p.dtype)
        self.local_bytes += local * es
        p.ds_id = self._next_id
        self._next_id += 1
        self._params[p.ds_id] = weakref.ref(p)
        with torch.no_grad():
            p.data = torch.empty(0, dtype=p.dtype)
        p.ds_status = NOT_AVAILABLE

    def offload_module(self, module, names=None):
        """Every parameter of ``module`` onto the tier (shared ones once)."""
        names = names or {}
        for p in module.parameters():
            self.offload(p, names.get(id(p)))

    def params(self):
        out = []
        for rid in sorted(self._params):
            p = self._params[rid]()
            if p is not None:
                out.append(p)
        return out

    def stats(self):
        s = self.store.stats() if self.store is not None else {}
        s["device"] = self.device
        s["persistent_elements"] = self.persisted
        s["world_size"] = self.world
        if self.partitioned:
            s["partition_bytes"] = self.local_bytes
            s["comm"] = {k: dict(v) for k, v in self.comm_stats.items()}
        if self.window is not None:
            s.update(self.window.stats())
        if self.lanes is not None:
            s.update(self.lanes.stats())
            s["grad_lane_landed"] = self.grad_lane.landed
            s["grad_lane_submit_wait_s"] = self.grad_lane.submit_wait_s
        return s

    def close(self):
        if self.window is not None:
            self.window.close()
        if self.grad_lane is not None:
            self.grad_lane.close()
            self.grad_lane = None
        if self.lanes is not None:
            self.lanes.close()
        self._records = {}
        if self.store is not None and not self.store.closed:
            self.store.close()


class _Gathering:
    """One all-gather for several partitioned parameters fetched together (their chunks
    back to back, at most ``allgather_bucket_size`` elements gathered): each member's whole
    is copied out of ``flat`` once the collective completed."""
    __slots__ = ("members", "seg", "flat", "send", "work")

    def __init__(self):
        self.members = []  # (_Resident, offset in a rank's segment, chunk size)
        self.seg = 0
        self.flat = self.send = self.work = None

    def finish(self, world):
        if self.work is None:
            return
        self.work.wait()
        self.work = None
        rows = self.flat.view(world, self.seg)
        for r, off, c in self.members:
            r.full.view(world, c).copy_(rows[:, off:off + c])
        self.flat = self.send = None


class _Resident:
    __slots__ = ("buf", "ticket", "numel", "full", "work", "send", "done", "group", "inflight",
                 "dev", "ev", "src")

    def __init__(self, buf, ticket, n):
        self.buf, self.ticket, self.numel = buf, ticket, n
        self.inflight = True  # counted in the window's elements in flight
        self.dev = None   # a model on a GPU: the weights' device memory (H2D issued)
        self.ev = None    # the H2D copy's event
        self.src = None   # the host memory the H2D reads (kept until ev completed)
        self.full = None  # partitioned: the whole (padded) parameter being gathered
        self.work = None  # partitioned: the all-gather in flight
        self.send = None  # partitioned: this rank's padded chunk (alive until the gather ends)
        self.done = False  # partitioned: the gather completed
        self.group = None  # partitioned: the coalesced all-gather it is part of


class ParamWindow:
    """Fetches a module's weights before it runs and releases them after (cxl/nvme tiers).

    ``gather(params)`` / ``release(params)`` are the primitives (GatheredParameters uses
    them); the module hooks call them in forward and backward, and the prefetcher issues
    fetches ahead along the recorded module order."""

    def __init__(self, tier, module):
        self.tier = tier
        self.store = tier.store
        self._live = {}  # ds_id -> _Resident (fetched or in flight)
        self._live_elems = 0
        self._in_flight = 0
        self._batch = None  # partitioned parameters whose all-gathers are launched together
        self._pinned = collections.Counter()  # ds_id -> active users (modules running)
        self._trace = []          # module order of the first step (forward, then backward)
        self._recording = True
        self._pos = 0
        self._modules = {}        # id(module) -> (weakref(module), [params on demand])
        self._hooks = []
        self.stats_fetched = 0
        self.stats_prefetched = 0
        self.peak_live = 0
        self.lanes = tier.lanes
        self._retiring = collections.deque()  # (H2D event, host memory it reads)
        self.h2d_at_prefetch = 0  # H2D copies started before their module asked
        tier.window = self
        self._install(module)
        _patch_linear(self)

    # ---- residency ------------------------------------------------------------------
    def _submit(self, p, prefetch=False):
        rid = p.ds_id
        if rid in self._live:
            return
        n = p.ds_numel
        self._make_room(n)
        if partitioned(p):
            r = self._submit_gather(p, n)
        elif self.lanes is not None and self.tier.resident:
            r = _Resident(None, 0, n)  # the pinned record is the H2D's source
        else:
            buf = self.store.staging(self.store.record_bytes(rid))
            r = _Resident(buf, self.store.submit_fetch(rid, buf), n)
        self._live[rid] = r
        self._live_elems += n
        self._in_flight += n
        self.peak_live = max(self.peak_live, self._live_elems)
        p.ds_status = INFLIGHT
        self.stats_fetched += 1
        self.stats_prefetched += bool(prefetch)
        if self.lanes is not None and not r.ticket:
            self._host_done(r)
            self._to_device(p, r, early=prefetch)

    # ---- a model on a GPU: host -> device on the weight lane ------------------------------
    def _host_done(self, r):
        """The host side of ``r`` is complete (its read from the tier waited, once)."""
        if r.ticket:
            self.store.wait(r.ticket)
            r.ticket = 0
        if r.inflight:
            r.inflight = False
            self._in_flight -= r.numel

    def _to_device(self, p, r, early=False):
        """Starts the H2D copy of ``p``'s weights (host side complete) on the weight lane."""
        if r.dev is not None:
            return
        if self.tier.resident:
            r.src = self.tier.record_tensor(p)
        else:
            r.src = tensor_from_buffer(r.buf, p.dtype)[:p.ds_numel]
        r.dev = self.lanes.empty(p.ds_numel, p.dtype)
        r.ev = self.lanes.h2d(r.dev, r.src)
        self.h2d_at_prefetch += bool(early)

    def _pump(self):
        """H2D copies for the prefetched reads that completed since (never blocks)."""
        if self.lanes is None:
            return
        while self._retiring and self.lanes.query(self._retiring[0][0]):
            self._retiring.popleft()
        for rid, r in self._live.items():
            if r.dev is None and r.full is None and r.ticket and self.store.poll(r.ticket):
                p = self.tier._params[rid]()
                if p is not None:
                    self._host_done(r)
                    self._to_device(p, r, early=True)

    def _settle(self):
        """Every H2D copy issued has completed (before the update writes the records)."""
        while self._retiring:
            ev, _ = self._retiring.popleft()
            self.lanes.synchronize(ev)

    def _submit_gather(self, p, n):
        """A partitioned parameter: its chunk is in memory (none, cpu) and the all-gather is
        launched, asynchronously, with the batch this submit is part of; or its chunk is read from the tier (cxl, nvme) and the
        all-gather starts once the read is done (``_ready``). Every rank submits the same
        parameters in the same order (the module order), so the collectives match."""
        r = _Resident(None, 0, n)
        r.full = torch.empty(self.tier.world * p.ds_chunk, dtype=p.dtype)
        if p.ds_tensor is not None:
            self._batch.append((p, r))  # launched by _launch_batch (gather, prefetch)
        elif p.ds_record is not None:
            r.buf = self.store.staging(self.store.record_bytes(p.ds_record))
            r.ticket = self.store.submit_fetch(p.ds_record, r.buf)
        return r

    def _start_batch(self):
        if self.tier.partitioned and self._batch is None:
            self._batch = []

    def _launch_batch(self):
        """The all-gathers of the parameters submitted since ``_start_batch``, in submit order:
        consecutive ones coalesced up to ``allgather_bucket_size`` gathered elements (every
        rank submits the same parameters in the same order, so the groups match)."""
        batch, self._batch = self._batch, None
        if not batch:
            return
        world, limit = self.tier.world, self.tier.allgather_bucket
        groups, cur, size = [], [], 0
        for p, r in batch:
            if cur and size + world * p.ds_chunk > limit:
                groups.append(cur)
                cur, size = [], 0
            cur.append((p, r))
            size += world * p.ds_chunk
        groups.append(cur)
        for members in groups:
            if len(members) == 1:
                self._launch_one(*members[0], members[0][0].ds_tensor)
                continue
            g = _Gathering()
            g.seg = sum(p.ds_chunk for p, _ in members)
            g.send = torch.zeros(g.seg, dtype=members[0][0].dtype)
            off = 0
            for p, r in members:
                g.send[off:off + p.ds_local].copy_(p.ds_tensor)
                g.members.append((r, off, p.ds_chunk))
                r.group = g
                off += p.ds_chunk
            g.flat = torch.empty(world * g.seg, dtype=g.send.dtype)
            g.work = comm.all_gather_into(g.flat, g.send, async_op=True,
                                          stats=self.tier.comm_stats)

    def _launch_one(self, p, r, local):
        """The all-gather of ``p`` alone, straight into ``r.full`` (``local``: this rank's
        chunk)."""
        r.send = _padded(p, local)
        r.work = comm.all_gather_into(r.full, r.send, async_op=True, stats=self.tier.comm_stats)

    def _finish_gather(self, p, r):
        if r.full is None:
            return
        if r.group is not None:
            r.group.finish(self.tier.world)
            r.group = None
            return
        if r.work is None:
            # The chunk came from the tier (or this rank holds none of the parameter).
            local = tensor_from_buffer(r.buf, p.dtype)[:p.ds_local] if r.buf is not None \
                else torch.empty(0, dtype=p.dtype)
            self._launch_one(p, r, local)
        r.work.wait()
        r.work = None
        r.send = None
        r.buf = None

    def _make_room(self, n):
        """Releases parameters nobody uses (oldest first) until ``n`` more elements fit."""
        if self._live_elems + n <= self.tier.max_live:
            return
        for rid in list(self._live):
            if self._live_elems + n <= self.tier.max_live:
                return
            if self._pinned[rid] == 0:
                p = self.tier._params[rid]()
                if p is not None:
                    self._drop(p)

    def _ready(self, p):
        r = self._live[p.ds_id]
        if self.lanes is not None:
            self._host_done(r)
            self._to_device(p, r)
            if p.ds_status != AVAILABLE:
                self.lanes.use_on_compute(r.dev, r.ev)
                with torch.no_grad():
                    p.data = r.dev.view(p.ds_shape)
                p.ds_status = AVAILABLE
            return
        if r.full is not None:
            if not r.done:
                if r.ticket:
                    self.store.wait(r.ticket)
                    r.ticket = 0
                self._finish_gather(p, r)
                r.done = True
                self._in_flight -= r.numel
        else:
            self._host_done(r)
        if p.ds_status != AVAILABLE:
            with torch.no_grad():
                src = r.full if r.full is not None else tensor_from_buffer(r.buf, p.dtype)
                p.data = src[:p.ds_numel].view(p.ds_shape)
            p.ds_status = AVAILABLE

    def _drop(self, p):
        r = self._live.pop(p.ds_id, None)
        if r is None:
            return
        if r.full is not None:
            if not r.done:
                # Every rank drops the same parameters at the same point: a gather in flight
                # completes, one not started yet is never started.
                if r.ticket:
                    self.store.wait(r.ticket)
                if r.group is not None:
                    r.group.finish(self.tier.world)  # the other members keep their copies
                    r.group = None
                if r.work is not None:
                    r.work.wait()
                self._in_flight -= r.numel
        else:
            self._host_done(r)
        if r.ev is not None:
            # The host memory the copy reads stays until the copy is done; the device
            # memory goes with its last user (record_stream on a GPU).
            self._retiring.append((r.ev, (r.src, r.buf)))
        self._live_elems -= r.numel
        with torch.no_grad():
            p.data = _placeholder(p)
        p.ds_status = NOT_AVAILABLE

    def gather(self, params):
        """Makes ``params`` resident (fetching what is not) and holds them until
        ``release``."""
        params = [p for p in params if fetched_on_demand(p)]
        need = sum(p.ds_numel for p in params if p.ds_id not in self._live)
        if need + sum(self._live[p.ds_id].numel for p in params if p.ds_id in self._live) \
                > self.tier.max_live:
            return False
        self._start_batch()
        try:
            for p in params:
                self._pinned[p.ds_id] += 1
                self._submit(p)
        finally:
            self._launch_batch()
        for p in params:
            self._ready(p)
        return True

    def release(self, params, keep=()):
        for p in params:
            if not fetched_on_demand(p):
                continue
            if self._pinned[p.ds_id] > 0:
                self._pinned[p.ds_id] -= 1
            if self._pinned[p.ds_id] == 0 and p.ds_id not in keep:
                self._drop(p)

    def release_all(self):
        """Every fetched parameter goes (before an optimizer step: the update writes new
        weights to the tier)."""
        for rid in list(self._live):
            p = self.tier._params[rid]()
            if p is not None:
                self._pinned[rid] = 0
                self._drop(p)
        if self.lanes is not None:
            self._settle()

    def write_back(self, p):
        """A gathered parameter changed in place: its new values go to the tier (from the
        device first, with a model on a GPU)."""
        r = self._live[p.ds_id]
        if self.lanes is not None:
            self.lanes.to_host(r.src, p.data.reshape(-1))
            if self.tier.resident:
                return
        self.store.store(p.ds_id, r.buf)

    # ---- module hooks -----------------------------------------------------------------
    def _install(self, module):
        names = {}
        for mname, m in module.named_modules():
            own = [p for p in m.parameters(recurse=False) if fetched_on_demand(p)]
            if not own:
                continue
            names[id(m)] = mname
            self._modules[id(m)] = (weakref.ref(m), own)
            self._hooks.append(m.register_forward_pre_hook(self._pre_forward))
            self._hooks.append(m.register_forward_hook(self._post_forward))
        self._names = names
        # A parameter's gradient is final once its AccumulateGrad ran: release it then.
        from .grad_path import _add_grad_hooks

        self._grad_refs = []
        seen = {}
        for _, own in self._modules.values():
            for p in own:
                seen[p.ds_id] = p
        _add_grad_hooks(list(seen.values()), self._grad_hook, self._hooks, self._grad_refs)

    def _own(self, module):
        entry = self._modules.get(id(module))
        return entry[1] if entry is not None else []

    def _fetch_module(self, module, phase):
        own = self._own(module)
        if not own:
            return
        self._pump()
        if self._recording:
            self._trace.append(id(module))
        else:
            self._advance(id(module))
        if not self.gather(own):
            total = sum(p.ds_numel for p in own)
            raise ValueError(
                f"strata: module {self._names.get(id(module)) or type(module).__name__} needs "
                f"{total} elements of weights at once ({phase}), more than the parameter window "
                f"holds ({self.tier.max_live}: zero_optimization.stage3_max_live_parameters"
                + ("" if self.tier.resident else
                   ", and offload_param.buffer_count x buffer_size") +
                f"); raise it to at least {total}")
        self._prefetch_ahead()

    def _advance(self, mid):
        """Moves the trace position to this module's next occurrence (recorded order)."""
        t = self._trace
        for k in range(self._pos, min(len(t), self._pos + 64)):
            if t[k] == mid:
                self._pos = k + 1
                return
        self._pos = len(t)  # off the recorded path: no prefetch until the next step

    def _prefetch_ahead(self):
        if self._recording or self.tier.prefetch <= 0:
            return
        self._start_batch()
        try:
            budget = self.tier.prefetch - self._in_flight
            k = self._pos
            while budget > 0 and k < len(self._trace):
                for p in self._own_by_id(self._trace[k]):
                    if p.ds_id in self._live:
                        continue
                    if self._live_elems + p.ds_numel > self.tier.max_live:
                        return
                    self._submit(p, prefetch=True)
                    budget -= p.ds_numel
                k += 1
        finally:
            self._launch_batch()

    def _own_by_id(self, mid):
        entry = self._modules.get(mid)
        return entry[1] if entry is not None else []

    def _reused_soon(self, mid):
        """Weights of module ``mid`` used again within max_reuse_distance elements of
        fetches (recorded order) stay resident."""
        if self._recording or self.tier.reuse <= 0:
            return set()
        dist = 0
        for k in range(self._pos, len(self._trace)):
            m = self._trace[k]
            if m == mid:
                return {p.ds_id for p in self._own_by_id(mid)}
            dist += sum(p.ds_numel for p in self._own_by_id(m))
            if dist > self.tier.reuse:
                break
        return set()

    def _pre_forward(self, module, inputs):
        self._fetch_module(module, "forward")

    def _post_forward(self, module, inputs, output):
        own = self._own(module)
        keep = self._reused_soon(id(module))
        self.release(own, keep=keep)
        if torch.is_grad_enabled():
            return _wrap_outputs(self, module, output)
        return output

    def _pre_backward(self, module):
        self._fetch_module(module, "backward")

    def _grad_hook(self, i, p):
        pref = weakref.ref(p)

        def hook(*_):
            q = pref()
            if q is not None and q.ds_id in self._live:
                self._pinned[q.ds_id] = 0
                self._drop(q)
        return hook

    def end_step(self):
        """After the first full step the recorded order is used for prefetching."""
        if self._trace:
            self._recording = False
        self._pos = 0

    def stats(self):
        return {"window_elements": self._live_elems, "window_peak_elements": self.peak_live,
                "fetches": self.stats_fetched, "prefetches": self.stats_prefetched,
                "window_limit_elements": self.tier.max_live,
                "trace_modules": len(self._trace), "h2d_at_prefetch": self.h2d_at_prefetch}

    def close(self):
        for h in self._hooks:
            h.remove()
        self._hooks = []
        _unpatch_linear(self)
        self.tier.window = None


class _PreBackward(torch.autograd.Function):
    """Identity on a module's outputs whose backward fetches the module's weights first."""

    @staticmethod
    def forward(ctx, window, module, *outs):
        ctx.window = window
        ctx.module = weakref.ref(module)
        # detach (not view_as): an output the model then changes in place (ReLU(inplace=True))
        # must not be a view created inside a custom Function.
        return tuple(o.detach() for o in outs)

    @staticmethod
    def backward(ctx, *grads):
        m = ctx.module()
        if m is not None:
            ctx.window._pre_backward(m)
        return (None, None) + grads


def _wrap_outputs(window, module, output):
    if isinstance(output, torch.Tensor):
        if output.requires_grad:
            return _PreBackward.apply(window, module, output)[0]
        return output
    if isinstance(output, (tuple, list)):
        idx = [k for k, o in enumerate(output) if isinstance(o, torch.Tensor) and o.requires_grad]
        if not idx:
            return output
        wrapped = _PreBackward.apply(window, module, *[output[k] for k in idx])
        out = list(output)
        for k, w in zip(idx, wrapped):
            out[k] = w
        if type(output) in (tuple, list):
            return type(output)(out)
        return type(output)(*out)  # a namedtuple
    if isinstance(output, dict):
        keys = [k for k, o in output.items() if isinstance(o, torch.Tensor) and o.requires_grad]
        if not keys:
            return output
        wrapped = _PreBackward.apply(window, module, *[output[k] for k in keys])
        out = type(output)(output)
        for k, w in zip(keys, wrapped):
            out[k] = w
        return out
    return output


# ---- torch.nn.functional.linear that saves the weight parameter ------------------------
_torch_linear = torch.nn.functional.linear
_windows = []


class _Linear(torch.autograd.Function):
    """torch's linear, saving the weight (a parameter) rather than a view of its fetched
    memory. Forward is torch's own op; backward runs the operations torch's addmm/mm backward
    runs, on the same operands, so gradients are bit-identical."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight, bias)
        return _torch_linear(x, weight, bias)

    @staticmethod
    def backward(ctx, g):
        x, weight, bias = ctx.saved_tensors
        out_f, in_f = weight.shape
        g2 = g.reshape(-1, out_f)
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = g2.mm(weight).view(x.shape)
        if ctx.needs_input_grad[1]:
            # mm's backward for a column-major mat2 (weight.t()): grad.t().mm(mat1), then
            # the t() view's backward; x.t().mm(g).t() rounds differently on some BLAS.
            gw = g2.t().mm(x.reshape(-1, in_f))
        if bias is not None and ctx.needs_input_grad[2]:
            gb = g2.sum(0, keepdim=True).view(bias.shape)
        return gx, gw, gb


def _linear(x, weight, bias=None):
    if _windows and isinstance(weight, torch.nn.Parameter) and fetched_on_demand(weight) \
            and torch.is_grad_enabled() and weight.requires_grad:
        return _Linear.apply(x, weight, bias)
    return _torch_linear(x, weight, bias)


def _patch_linear(window):
    _windows.append(window)
    torch.nn.functional.linear = _linear


def _unpatch_linear(window):
    if window in _windows:
        _windows.remove(window)
    if not _windows:
        torch.nn.functional.linear = _torch_linear
