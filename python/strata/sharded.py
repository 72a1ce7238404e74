"""Data-parallel optimizers on torch.distributed, with the state sharded across ranks (ZeRO 0-2).

``sharded_class(OffloadAdamW)`` (or ``ShardedOffloadAdamW`` and friends) is an optimizer with the
interface of strata's ``OffloadAdamW`` whose ranks split the work as
``zero_optimization.stage`` says (docs/distributed.md has the whole story):

- stage 0: every rank keeps the whole optimizer state; gradients are all-reduced in buckets
  of ``reduce_bucket_size`` elements; every rank updates everything.
- stage 1: every rank keeps the whole gradient (a flat buffer per dtype with
  ``contiguous_gradients``, torch's own ``.grad`` tensors without); at the accumulation
  boundary the gradients are all-reduced (``reduce_scatter: false``) or reduced to the rank
  that owns them (``reduce_scatter: true``: one ``reduce_scatter_tensor`` per round of buckets
  where the backend has it (NCCL), a reduce to the owner per bucket where it does not (Gloo));
  each rank updates its own shard of the state; the new parameters are all-gathered in rounds
  of ``allgather_bucket_size`` elements.
- stage 2 (and 3, which the config parser already said runs as 2): gradients are reduced as
  they become ready in every backward (gradient hooks), bucket by bucket; a bucket never spans
  two shards, so it is reduced to its one owner (``reduce``; ``all_reduce`` with
  ``reduce_scatter: false``), added into the owner's flat shard gradient buffer, and dropped
  (``.grad`` is None afterwards). Each rank keeps only its shard of the gradients. Parameters
  are all-gathered as at stage 1.

``overlap_comm``: reductions are launched asynchronously from the gradient hooks while backward
goes on (at stage 0 and 1 during the backward that ends an accumulation step, which
``Engine.backward`` / ``optimizer.backward(loss)`` tell apart), at most two in flight, and
waited for at the end of backward; without it they run synchronously (stage 2: in the hook
that completes the bucket; stage 0/1: at the boundary).

Sharding: per parameter dtype, the trainable parameters in gradient-ready order (the engine's
order) form a flat space; rank r owns the contiguous range ``[N*r/W, N*(r+1)/W)`` of it. A
parameter may be split between ranks: the C++ engine of each rank gets the owned slices as its
parameters (name, numel, address inside the parameter), so its pinned pool, swap file and
gradient arena hold only that shard, and its update writes the new values straight into the
model's memory; the other slices arrive with the all-gather.

``data_types.grad_accum_dtype`` different from the parameters' dtype: at stage 2 the shard's
arena has that dtype, so each backward's reduced buckets are added into it in that dtype; at
stages 0 and 1 the gradients accumulate in torch's ``.grad`` (the parameters' dtype), the engine
gets the config without the key, and one warning says so.

Global quantities: ``grad_stats()`` is the sum of squares and the inf/NaN flag over every shard
(all-reduced), so clipping and fp16 overflow act on the global gradient. ``step()`` divides the
summed gradients by the world size (an average, like DDP) unless the engine passes its own
multiplier (``Engine`` folds 1/world, the loss scale and the clip coefficient into one).

Every rank must make the same calls in the same order (backward, step, zero_grad,
state_dict, add_param_group, changes of ``requires_grad``): several of them communicate.
"""

import bisect
import ctypes
import math
import os
import platform

import torch

from . import comm
from . import config as _config
from ._torch_compat import (dtype_from_name, dtype_name, has_post_accumulate_grad_hook,
                            tensor_from_buffer)
from .layout import Space, shard_bounds  # noqa: F401 (shard_bounds: strata.sharded's name)
from .optim import (OffloadAdagrad, OffloadAdam, OffloadAdamW, OffloadSGD, _Built,
                    _OffloadOptimizer, _storage_key)

DEFAULT_BUCKET = 500_000_000  # elements: DeepSpeed's default for both bucket sizes
MAX_IN_FLIGHT = 2             # asynchronous reductions in flight (overlap_comm), as double buffers


def _bucket_size(value):
    if value is None or value == "auto":
        return DEFAULT_BUCKET
    n = int(float(value))
    return n if n > 0 else DEFAULT_BUCKET


class Settings:
    """The data-parallel settings of one optimizer, read from the filled config."""

    def __init__(self, cfg, world, rank, local_rank):
        z = _config.get(cfg, "zero_optimization", {}) or {}
        if not isinstance(z, dict):
            z = {}
        stage = int(z.get("stage") or 0)
        self.stage = min(stage, 2)  # 3: the config parser said once that it runs as 2
        self.world, self.rank, self.local_rank = int(world), int(rank), int(local_rank)
        self.reduce_bucket_size = _bucket_size(z.get("reduce_bucket_size"))
        self.allgather_bucket_size = _bucket_size(z.get("allgather_bucket_size"))
        self.overlap_comm = bool(z.get("overlap_comm") or False)
        rs = z.get("reduce_scatter")
        self.reduce_scatter = True if rs is None else bool(rs)
        cg = z.get("contiguous_gradients")
        self.contiguous_gradients = True if cg is None else bool(cg)


# ---------------------------------------------------------------------------------------
# gradient buckets


class _Bucket:
    __slots__ = ("index", "dtype", "start", "end", "owner", "members", "pending", "buf", "whole",
                 "work", "runs", "launched", "order")

    def __init__(self, dtype, start, end, owner):
        self.dtype, self.start, self.end, self.owner = dtype, start, end, owner
        self.members = []  # (param index, offset in param, offset in bucket, numel)
        self.runs = []     # (offset in bucket, arena tensor, offset in arena, numel): mine to keep
        self.pending = 0
        self.buf = None
        self.whole = None  # the buffer buf is the start of (buffers are reused across sizes)
        self.work = None
        self.launched = False
        self.order = 0

    @property
    def numel(self):
        return self.end - self.start


class _GradComm:
    """Reduces gradients bucket by bucket, in a fixed bucket order on every rank.

    ``source``: "flat" (the bucket is a view of ``flats[dtype]``, reduced in place) or "grad"
    (the bucket is a buffer filled from each parameter's ``.grad``). ``collective``: "all_reduce"
    or "reduce" (to the bucket's owner). ``keep``: after a bucket is reduced, its runs are
    copied ("copy") or added ("add") into the engine's arena, or nothing happens ("none": the
    buffer is the arena)."""

    def __init__(self, opt, space, buckets, *, source, collective, keep, flats=None):
        self.opt = opt
        self.space = space
        self.buckets = buckets
        self.source, self.collective, self.keep = source, collective, keep
        self.flats = flats or {}
        self.by_param = {}  # param index -> [(bucket, offset in param, offset in bucket, numel)]
        for bk in buckets:
            seen = set()
            for (i, po, bo, n) in bk.members:
                self.by_param.setdefault(i, []).append((bk, po, bo, n))
                seen.add(i)
            bk.pending = len(seen)
            bk.order = min(seen) if seen else -1
        # Launch order: by the first parameter that is ready (gradient-ready order), then
        # dtype and position; the same on every rank.
        dt_rank = {d: k for k, d in enumerate(space.dtypes)}
        self.buckets.sort(key=lambda b: (b.order if b.order >= 0 else 1 << 62,
                                         dt_rank.get(b.dtype, 0), b.start))
        for k, bk in enumerate(self.buckets):
            bk.index = k
        self._initial = [bk.pending for bk in self.buckets]
        self._ready = {}  # param index -> seen in this cycle
        self.next = 0
        self.in_flight = []
        self.async_now = False
        self._free = {}
        self.bucket_bytes = 0
        self.bucket_bytes_peak = 0
        self.in_hook = False          # grad_ready called from a gradient hook (backward runs)
        self.launched_in_backward = 0  # buckets launched from hooks, while backward went on
        self.launched = 0

    # -- buffers: bucket_bytes counts those in use and those kept for reuse
    def _alloc(self, bk):
        if self.source == "flat":
            bk.buf = self.flats[bk.dtype][bk.start:bk.end]
            return
        free = self._free.setdefault(bk.dtype, [])
        fit = next((k for k, t in enumerate(free) if t.numel() >= bk.numel), None)
        if fit is not None:
            whole = free.pop(fit)
        else:
            whole = torch.empty(bk.numel, dtype=bk.dtype)
            self.bucket_bytes += whole.numel() * whole.element_size()
            self.bucket_bytes_peak = max(self.bucket_bytes_peak, self.bucket_bytes)
        bk.buf = whole[:bk.numel]
        bk.buf.zero_()
        bk.whole = whole

    def _release(self, bk):
        if bk.buf is not None and self.source != "flat":
            free = self._free.setdefault(bk.dtype, [])
            if len(free) < MAX_IN_FLIGHT:
                free.append(bk.whole)
            else:
                self.bucket_bytes -= bk.whole.numel() * bk.whole.element_size()
            bk.whole = None
        bk.buf = None

    # -- one cycle (a backward at stage 2, an accumulation step at stage 0/1)
    def grad_ready(self, i, grad=None):
        """Parameter i's gradient is final for this cycle (``grad``: its values, for
        source "grad")."""
        if self._ready.get(i):
            return  # already counted in this cycle
        self._ready[i] = True
        flat = None
        for bk, po, bo, n in self.by_param.get(i, ()):
            if self.source == "grad":
                if bk.buf is None:
                    self._alloc(bk)
                if grad is not None:
                    if flat is None:
                        flat = grad.detach().reshape(-1)
                    bk.buf[bo:bo + n].copy_(flat[po:po + n])
            bk.pending -= 1
            # A large parameter spans several buckets: reduce each as soon as it is full, so
            # that at most MAX_IN_FLIGHT (+ the one being filled) exist at once.
            self._launch_ready()
        self._launch_ready()

    def _launch_ready(self):
        while self.next < len(self.buckets) and self.buckets[self.next].pending <= 0:
            self._launch(self.buckets[self.next])
            self.next += 1

    def _launch(self, bk):
        if bk.buf is None:
            self._alloc(bk)  # no parameter of it had a gradient: zeros
        st = self.opt._dp_comm_stats
        a = self.async_now
        if self.collective == "reduce" and bk.owner is not None:
            bk.work = comm.reduce(bk.buf, bk.owner, async_op=a, stats=st)
        else:
            bk.work = comm.all_reduce(bk.buf, async_op=a, stats=st)
        bk.launched = True
        self.launched += 1
        if self.in_hook:
            self.launched_in_backward += 1
        if a:
            self.in_flight.append(bk)
            while len(self.in_flight) > MAX_IN_FLIGHT:
                self._finish(self.in_flight.pop(0))
        else:
            self._finish(bk)

    def _finish(self, bk):
        if bk.work is not None:
            bk.work.wait()
            bk.work = None
        if self.keep != "none" and bk.runs:
            for bo, arena, ao, n in bk.runs:
                src = bk.buf[bo:bo + n]
                if self.keep == "add":
                    arena[ao:ao + n].add_(src)
                else:
                    arena[ao:ao + n].copy_(src)
        self._release(bk)

    def flush(self, fill=None):
        """Launch every bucket not launched yet (missing gradients count as zeros; ``fill(i)``
        returns parameter i's gradient for source "grad" when it was not delivered by a hook),
        wait for all, and start a new cycle."""
        try:
            if fill is not None:
                for i in sorted(self.by_param):
                    if not self._ready.get(i):
                        self.grad_ready(i, fill(i))
            while self.next < len(self.buckets):
                self._launch(self.buckets[self.next])
                self.next += 1
            while self.in_flight:
                self._finish(self.in_flight.pop(0))
        finally:
            self.reset()

    def reset(self):
        for bk in self.in_flight:
            if bk.work is not None:
                bk.work.wait()
                bk.work = None
        self.in_flight = []
        for bk, n in zip(self.buckets, self._initial):
            if bk.buf is not None:
                self._release(bk)
            bk.pending = n
            bk.launched = False
        self._ready = {}
        self.next = 0

    @property
    def active(self):
        return self.next > 0 or bool(self._ready)


def _make_buckets(space, size, bounds=None):
    """Buckets of at most ``size`` elements over each dtype's space; with ``bounds``
    ({dtype: shard bounds}) cut at shard boundaries too, each bucket getting its owner."""
    out = []
    for d in space.dtypes:
        total = space.total[d]
        cuts = set(range(0, total, size))
        if bounds is not None:
            cuts |= {b for b in bounds[d] if 0 <= b < total}
        cuts = sorted(cuts) + [total]
        for a, e in zip(cuts[:-1], cuts[1:]):
            if a >= e:
                continue
            owner = None
            if bounds is not None:
                # the last rank whose range starts at or before a (empty ranges are skipped)
                owner = bisect.bisect_right(bounds[d], a) - 1
            bk = _Bucket(d, a, e, owner)
            bk.members = [(i, po, so - a, n) for (i, po, so, n) in space.pieces(d, a, e)]
            out.append(bk)
    return out


# ---------------------------------------------------------------------------------------
# parameter all-gather


class _ParamGather:
    """All-gathers the updated parameters: per dtype, round k moves chunk k (``c`` elements,
    ``c = allgather_bucket_size // world``) of every rank's shard, so one round carries at most
    ``allgather_bucket_size`` elements."""

    def __init__(self, opt, params, space, bounds, world, rank, bucket):
        self.opt = opt
        self.world, self.rank = world, rank
        self.plan = []  # (dtype, chunk, [per rank: [(param index, offset in param, off, n)]])
        self.rounds = 0
        if world <= 1:
            return
        for d in space.dtypes:
            b = bounds[d]
            longest = max(b[r + 1] - b[r] for r in range(world))
            c = max(1, min(bucket // world, longest))  # no round larger than a shard
            for k in range(math.ceil(longest / c)):
                per_rank = []
                for r in range(world):
                    lo = b[r] + k * c
                    hi = min(b[r] + (k + 1) * c, b[r + 1])
                    per_rank.append([(i, po, so - lo, n) for (i, po, so, n)
                                     in space.pieces(d, lo, hi)] if lo < hi else [])
                self.plan.append((d, c, per_rank))
        self.rounds = len(self.plan)
        self.params = params

    def run(self):
        if not self.plan:
            return
        st = self.opt._dp_comm_stats
        flat = [p.data.view(-1) for p in self.params]
        for d, c, per_rank in self.plan:
            send = torch.zeros(c, dtype=d)
            for i, po, off, n in per_rank[self.rank]:
                send[off:off + n].copy_(flat[i][po:po + n])
            out = torch.empty(self.world * c, dtype=d)
            comm.all_gather_into(out, send, stats=st)
            for r, pieces in enumerate(per_rank):
                if r == self.rank:
                    continue
                base = r * c
                for i, po, off, n in pieces:
                    flat[i][po:po + n].copy_(out[base + off: base + off + n])


# ---------------------------------------------------------------------------------------
# NUMA: one node per local rank


def _node_cpus(sysfs_root="/sys/devices/system/node"):
    """{node: [cpus]} for the NUMA nodes that have CPUs."""
    out = {}
    try:
        names = os.listdir(sysfs_root)
    except OSError:
        return out
    for name in names:
        if not (name.startswith("node") and name[4:].isdigit()):
            continue
        try:
            with open(os.path.join(sysfs_root, name, "cpulist")) as f:
                text = f.read().strip()
        except OSError:
            continue
        cpus = []
        for part in filter(None, text.split(",")):
            lo, _, hi = part.partition("-")
            cpus.extend(range(int(lo), int(hi or lo) + 1))
        if cpus:
            out[int(name[4:])] = cpus
    return out


def numa_node_for(local_rank, local_world, sysfs_root="/sys/devices/system/node"):
    """The NUMA node local rank ``local_rank`` of ``local_world`` binds to, or None (one node,
    or one process per machine). Ranks go round-robin over the nodes that have CPUs."""
    nodes = _node_cpus(sysfs_root)
    if len(nodes) < 2 or local_world < 2:
        return None
    order = sorted(nodes)
    return order[local_rank % len(order)]


_MPOL_PREFERRED = 1
_SYS_SET_MEMPOLICY = {"x86_64": 238, "aarch64": 237, "ppc64le": 261}


def bind_numa_node(node, sysfs_root="/sys/devices/system/node"):
    """Run this thread (and the threads it starts later: the engine's update threads) on the
    CPUs of ``node``, and prefer that node for new memory (the pinned pool is pre-faulted by
    this thread). Returns a note saying what was done."""
    cpus = _node_cpus(sysfs_root).get(node)
    if not cpus:
        return f"NUMA node {node} has no CPUs: not bound"
    try:
        os.sched_setaffinity(0, cpus)
    except OSError as exc:
        return f"NUMA node {node}: CPU affinity refused ({exc.strerror})"
    nr = _SYS_SET_MEMPOLICY.get(platform.machine())
    if nr is None:
        return f"NUMA node {node}: CPUs bound, memory policy not set on {platform.machine()}"
    mask = ctypes.c_ulong * ((node // 64) + 1)
    m = mask()
    m[node // 64] = 1 << (node % 64)
    libc = ctypes.CDLL(None, use_errno=True)
    # maxnode: the kernel reads maxnode - 1 bits of the mask
    rc = libc.syscall(nr, _MPOL_PREFERRED, ctypes.byref(m), ctypes.c_ulong(64 * len(m) + 1))
    if rc != 0:
        return (f"NUMA node {node}: CPUs bound, set_mempolicy failed "
                f"({os.strerror(ctypes.get_errno())})")
    return f"NUMA node {node}: CPUs and memory bound for local rank"


# ---------------------------------------------------------------------------------------
# the optimizer mixin


class _ShardBuilt(_Built):
    def __init__(self):
        super().__init__()
        self.space = None      # flat space (stage 1/2) or arena space (stage 0)
        self.bounds = None     # {dtype: shard bounds}
        self.slices = []       # engine param j -> (param index, offset in param, flat off, n)
        self.slice_of = {}     # param index -> engine param j
        self.flats = {}        # stage 1 with contiguous_gradients: full gradients per dtype
        self.gviews = []       # param index -> view of flats (stage 1 contiguous)
        self.reducer = None
        self.gather = None
        self.dp_hooks = []
        self.dp_refs = []
        self.full = False      # the engine holds every parameter whole (stage 0)


class ShardedMixin:
    """Data-parallel behaviour for a strata optimizer class (see the module doc)."""

    _device_params_ok = False  # slices are addressed in host memory

    # ---- set-up ---------------------------------------------------------------------
    def _dp_setup(self):
        if getattr(self, "_dp", None) is not None:
            return
        world, rank = comm.get_world_size(), comm.get_rank()
        self._dp = Settings(self.config, world, rank, comm.get_local_rank())
        if world > 1:
            self._rank = rank
        self._dp_comm_stats = {}
        self._dp_armed = False
        self._dp_cb_queued = False
        self._dp_reduced = False
        self._dp_synced_init = bool(getattr(self, "_dp_synced_init", False))
        self._dp_numa = None
        node = numa_node_for(self._dp.local_rank, comm.get_local_world_size()) \
            if os.environ.get("STRATA_NUMA_BIND", "1") not in ("0", "") else None
        if node is not None:
            self._dp_numa = node
            _config.log.info("strata: rank %d: %s", rank, bind_numa_node(node))

    @property
    def zero_stage(self):
        return self._dp.stage

    def _engine_config(self):
        cfg = super()._engine_config()
        want = _config.get(self.config, "data_types.grad_accum_dtype")
        if want and self._dp.world > 1 and self._dp.stage < 2:
            if any(p.dtype != dtype_from_name(want) for p, _ in self._trainable()):
                _config.warn_once(
                    f"data_types.grad_accum_dtype {want!r} with several ranks is honoured at "
                    f"ZeRO stage 2 only; at stage {self._dp.stage} gradients accumulate in "
                    "the parameters' dtype (torch's .grad) and are converted when reduced")
            cfg = cfg.with_default("data_types.grad_accum_dtype")
        return cfg

    def _build(self, prev, resync=()):
        self._dp_setup()
        if self._dp.world > 1 and not self._dp_synced_init and prev is None:
            # Start from rank 0's weights, as DDP and DeepSpeed do.
            self._dp_broadcast_params()
            self._dp_synced_init = True
        if self._dp.stage == 0:
            b = super()._build(prev, resync)
            return self._dp_decorate_full(b)
        return self._build_shard(prev, resync)

    def _dp_broadcast_params(self):
        seen = set()
        with torch.no_grad():
            for group in self.param_groups:
                for p in group["params"]:
                    key = _storage_key(p)
                    if key in seen:
                        continue
                    seen.add(key)
                    comm.broadcast(p.data, 0, stats=self._dp_comm_stats)

    def _build_shard(self, prev, resync):
        dp = self._dp
        trainable = self._trainable()
        trainable.reverse()  # gradient-ready order, as the base class
        b = _ShardBuilt()
        b.managed = [p for p, _ in trainable]
        b.index = {id(p): i for i, p in enumerate(b.managed)}
        b.cohort_of, b.cohort_group, cohort_steps = self._cohorts(trainable, prev)
        b.space = Space.flat(b.managed)
        b.bounds = b.space.bounds(dp.world)
        b.slices = b.space.shard_slices(dp.world, dp.rank)
        b.slice_of = {s[0]: j for j, s in enumerate(b.slices)}
        specs = []
        for j, (i, po, fo, n) in enumerate(b.slices):
            p = b.managed[i]
            name = self._name_of(p, i)
            if n != p.numel():
                name = f"{name}[{po}:{po + n}]"
            specs.append((name, n, dtype_name(p.dtype), b.cohort_of[i],
                          p.data_ptr() + po * p.element_size()))
        b.engine = self._start_engine(specs, b.cohort_group, cohort_steps)
        try:
            # Keyed by parameter dtype; the tensor has the gradient dtype (stage 2 with
            # data_types.grad_accum_dtype: reduced buckets are added into it in that dtype).
            by_grad = {}
            for j, sl in enumerate(b.slices):
                dt = b.managed[sl[0]].dtype
                if dt not in b.arenas:
                    gdt = dtype_from_name(b.engine.grad_dtype(j))
                    if gdt not in by_grad:
                        by_grad[gdt] = tensor_from_buffer(b.engine.grad_arena(dtype_name(gdt)),
                                                          gdt)
                    b.arenas[dt] = by_grad[gdt]
            b.arena_off = [b.engine.grad_offset(j) for j in range(len(b.slices))]
            b.ptrs = [_storage_key(p) for p in b.managed]
            b.versions = [p._version for p in b.managed]
            if dp.stage == 1 and dp.contiguous_gradients:
                b.flats = {d: torch.zeros(b.space.total[d], dtype=d) for d in b.space.dtypes}
                for i, p in enumerate(b.managed):
                    d, off, n = b.space.offset[i]
                    b.gviews.append(b.flats[d][off:off + n].view_as(p))
            self._dp_make_comm(b)
            if prev is not None and prev.engine is not None and not prev.engine.closed:
                self._copy_state(prev, b, resync)
        except BaseException:
            b.engine.close()
            raise
        if prev is not None and prev.arenas:
            # .grad views into the old engine's arena die with it: keep the values (stage 1
            # copies them into the new buffers below; stage 2 keeps no whole gradient).
            old = [(a.data_ptr(), a.data_ptr() + a.numel() * a.element_size())
                   for a in prev.arenas.values()]
            for p in b.managed:
                g = p.grad
                if g is not None and any(lo <= g.data_ptr() < hi for lo, hi in old):
                    p.grad = None if dp.stage == 2 else g.clone()
        self._attach_grads(b, copy_existing=True)
        self._dp_install_hooks(b)
        return b

    def _dp_runs(self, b, bk):
        """The parts of bucket ``bk`` (flat coordinates) this rank keeps, as arena runs."""
        runs = []
        d = bk.dtype
        lo, hi = b.bounds[d][self._dp.rank], b.bounds[d][self._dp.rank + 1]
        a, e = max(bk.start, lo), min(bk.end, hi)
        if a >= e:
            return runs
        arena = b.arenas[d]
        for (i, po, fo, n) in b.space.pieces(d, a, e):
            j = b.slice_of[i]
            _, spo, sfo, sn = b.slices[j]
            ao = b.arena_off[j] + (fo - sfo)
            bo = fo - bk.start
            if runs and runs[-1][0] + runs[-1][3] == bo and runs[-1][2] + runs[-1][3] == ao:
                runs[-1] = (runs[-1][0], arena, runs[-1][2], runs[-1][3] + n)
            else:
                runs.append((bo, arena, ao, n))
        return runs

    def _dp_make_comm(self, b):
        dp = self._dp
        if dp.stage == 2:
            buckets = _make_buckets(b.space, dp.reduce_bucket_size, b.bounds)
            coll = "reduce" if dp.reduce_scatter else "all_reduce"
            b.reducer = _GradComm(self, b.space, buckets, source="grad", collective=coll,
                                  keep="add")
        else:  # stage 1
            owner_cut = b.bounds if dp.reduce_scatter else None
            buckets = _make_buckets(b.space, dp.reduce_bucket_size, owner_cut)
            coll = "reduce" if dp.reduce_scatter else "all_reduce"
            if b.flats:
                b.reducer = _GradComm(self, b.space, buckets, source="flat", collective=coll,
                                      keep="copy", flats=b.flats)
            else:
                b.reducer = _GradComm(self, b.space, buckets, source="grad", collective=coll,
                                      keep="copy")
        for bk in b.reducer.buckets:
            bk.runs = self._dp_runs(b, bk)
        b.gather = _ParamGather(self, b.managed, b.space, b.bounds, dp.world, dp.rank,
                                dp.allgather_bucket_size)

    def _dp_decorate_full(self, b):
        """Stage 0: the base engine holds every parameter; gradients are all-reduced in place
        in its arenas, bucket by bucket."""
        full = _ShardBuilt()
        full.__dict__.update(b.__dict__)
        full.full = True
        entries = []
        for i, p in enumerate(full.managed):
            entries.append((i, p.dtype, full.engine.grad_offset(i), p.numel()))
        totals = {d: a.numel() for d, a in full.arenas.items()}
        full.space = Space(entries, totals)
        full.slices = [(i, 0, None, p.numel()) for i, p in enumerate(full.managed)]
        full.slice_of = {i: i for i in range(len(full.managed))}
        buckets = _make_buckets(full.space, self._dp.reduce_bucket_size)
        full.reducer = _GradComm(self, full.space, buckets, source="flat",
                                 collective="all_reduce", keep="none", flats=full.arenas)
        self._dp_install_hooks(full)
        return full

    # ---- hooks --------------------------------------------------------------------
    def _dp_install_hooks(self, b):
        dp = self._dp
        needed = dp.stage == 2 or (dp.world > 1 and dp.overlap_comm)
        if b.dp_hooks or not needed:
            return

        def ready(i):
            def hook(*_):
                self._dp_on_ready(i)
            return hook

        for i, p in enumerate(b.managed):
            if has_post_accumulate_grad_hook():
                b.dp_hooks.append(p.register_post_accumulate_grad_hook(ready(i)))
            else:
                # torch < 2.1: the AccumulateGrad node runs once per backward, after every
                # contribution to the parameter's gradient was summed (as DDP uses it).
                acc = p.expand_as(p).grad_fn.next_functions[0][0]
                b.dp_refs.append(acc)
                b.dp_hooks.append(acc.register_hook(ready(i)))

    def _dp_on_ready(self, i):
        b = self._b
        if b is None or b.reducer is None:
            return
        dp = self._dp
        if dp.stage == 2:
            p = b.managed[i]
            self._dp_queue_end()
            b.reducer.async_now = dp.overlap_comm
            b.reducer.in_hook = True
            try:
                b.reducer.grad_ready(i, p.grad)
            finally:
                b.reducer.in_hook = False
            p.grad = None  # the bucket holds it now: ZeRO-2 keeps only the shard
        elif self._dp_armed:
            self._dp_queue_end()
            b.reducer.async_now = True
            p = b.managed[i]
            b.reducer.in_hook = True
            try:
                b.reducer.grad_ready(i, p.grad if b.reducer.source == "grad" else None)
            finally:
                b.reducer.in_hook = False

    def _dp_queue_end(self):
        if self._dp_cb_queued:
            return
        engine = getattr(torch.autograd.Variable, "_execution_engine", None)
        if engine is not None and hasattr(engine, "queue_callback"):
            engine.queue_callback(self._dp_backward_done)
            self._dp_cb_queued = True

    def _dp_backward_done(self):
        """End of a backward: every bucket of this cycle is reduced and waited for."""
        self._dp_cb_queued = False
        b = self._b
        if b is None or b.reducer is None:
            return
        if self._dp.stage == 2:
            if b.reducer.active:
                b.reducer.flush()
        elif self._dp_armed:
            self._dp_armed = False
            self._dp_flush_boundary(b, async_rest=True)  # overlapped: the rest async too

    def _dp_fill(self, b):
        def fill(i):
            return b.managed[i].grad
        return fill

    def _dp_flush_boundary(self, b, async_rest):
        b.reducer.async_now = async_rest
        b.reducer.flush(self._dp_fill(b) if b.reducer.source == "grad" else
                        (lambda i: None))
        self._dp_reduced = True

    # ---- the data-parallel steps ------------------------------------------------------
    def backward(self, loss, *, exact=False, retain_graph=False, boundary=True):
        """``loss.backward()`` with this rank's gradient communication: at stage 2 buckets are
        reduced as gradients become ready (every backward); at stage 0 and 1, with
        ``overlap_comm`` and ``boundary`` (the last backward before ``step()``), buckets are
        all-reduced / reduced while backward goes on. ``exact`` is accepted for the
        single-process signature (the update itself never overlaps backward here)."""
        self._require_open()
        if self._poisoned:
            raise RuntimeError(f"strata: optimizer step refused: {self._poisoned}")
        self._prepare()
        dp = self._dp
        b = self._b
        armed = (dp.world > 1 and dp.stage < 2 and dp.overlap_comm and boundary
                 and not retain_graph and not self._dp_reduced)
        self._dp_armed = armed
        try:
            loss.backward(retain_graph=retain_graph)
        except BaseException:
            self._dp_armed = False
            self._dp_cb_queued = False  # the end-of-backward callback may never have run
            if b.reducer is not None:
                b.reducer.reset()
            raise
        self._dp_backward_done()  # when no hook ran (no gradients): the same end of cycle
        return loss

    def reduce_gradients(self):
        """Finish this step's gradient communication (idempotent until ``zero_grad``)."""
        self._require_open()
        b = self._b
        if self._dp.stage == 2:
            if b.reducer.active:
                b.reducer.flush()
            return
        if self._dp_reduced:
            return
        self._prepare()
        b = self._b
        b.reducer.async_now = False
        if (self._dp.stage == 1 and self._dp.reduce_scatter and comm.has_reduce_scatter()
                and self._dp.world > 1):
            self._dp_reduce_scatter_rounds(b)
            b.reducer.reset()
        else:
            self._dp_flush_boundary(b, async_rest=False)
        self._dp_reduced = True

    def _dp_reduce_scatter_rounds(self, b):
        """Stage 1 where the backend has reduce-scatter: per dtype, round k takes chunk k of
        every rank's shard (``reduce_bucket_size // world`` elements each) and one
        ``reduce_scatter_tensor`` leaves each rank the sum of its own chunk."""
        dp = self._dp
        for d in b.space.dtypes:
            bounds = b.bounds[d]
            longest = max(bounds[r + 1] - bounds[r] for r in range(dp.world))
            c = max(1, min(dp.reduce_bucket_size // dp.world, longest))
            arena = b.arenas.get(d)
            for k in range(math.ceil(longest / c)):
                inp = torch.zeros(dp.world * c, dtype=d)
                for r in range(dp.world):
                    lo = bounds[r] + k * c
                    hi = min(bounds[r] + (k + 1) * c, bounds[r + 1])
                    if lo >= hi:
                        continue
                    if b.flats:
                        inp[r * c: r * c + hi - lo].copy_(b.flats[d][lo:hi])
                    else:
                        for (i, po, so, n) in b.space.pieces(d, lo, hi):
                            g = b.managed[i].grad
                            if g is not None:
                                inp[r * c + so - lo: r * c + so - lo + n].copy_(
                                    g.detach().reshape(-1)[po:po + n])
                out = torch.empty(c, dtype=d)
                comm.reduce_scatter_tensor(out, inp, stats=self._dp_comm_stats)
                lo = bounds[dp.rank] + k * c
                hi = min(bounds[dp.rank] + (k + 1) * c, bounds[dp.rank + 1])
                for (i, po, so, n) in b.space.pieces(d, lo, hi):
                    j = b.slice_of[i]
                    ao = b.arena_off[j] + (so - b.slices[j][2])
                    arena[ao:ao + n].copy_(out[so - lo: so - lo + n])

    def grad_stats(self):
        """(sum of squares, any inf/nan) over the global (summed) gradient: each rank's shard,
        all-reduced. Finishes the gradient communication first."""
        self.reduce_gradients()
        sum_sq, nonfinite = self._b.engine.grad_stats()
        if self._dp.world > 1 and self._dp.stage >= 1:
            t = torch.tensor([float(sum_sq), 1.0 if nonfinite else 0.0], dtype=torch.float64)
            comm.all_reduce(t, stats=self._dp_comm_stats)
            return float(t[0]), bool(t[1] > 0)
        return sum_sq, nonfinite

    @torch.no_grad()
    def step(self, closure=None):
        """One data-parallel step: the gradient communication is finished, the engine updates
        this rank's shard with ``grad_mul`` (default 1/world: the average), the new parameters
        are all-gathered."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_mul = self._pending_grad_mul
        self._pending_grad_mul = None
        self._require_open()
        if self._poisoned:
            raise RuntimeError(f"strata: optimizer step refused: {self._poisoned}; load a "
                               "checkpoint (or state dict) successfully before stepping again")
        self.reduce_gradients()
        b = self._b
        for c, gi in enumerate(b.cohort_group):
            b.engine.set_hyper(c, self._hyper(self.param_groups[gi]))
        mul = (1.0 / self._dp.world) if grad_mul is None else float(grad_mul)
        hook = getattr(self, "_engine_step_hook", None)
        if hook is not None:
            hook()  # test hook: arms a kill that lands inside the C++ step
        b.engine.step(mul)
        if b.gather is not None:
            b.gather.run()
        self._mark_synced()  # the gathered values are the masters' (no re-sync next step)
        return loss

    def zero_grad(self, set_to_none=None):
        self._require_open()
        b = self._b
        if b.reducer is not None:
            b.reducer.reset()
        self._dp_reduced = False
        self._dp_armed = False
        b.engine.zero_grads()
        if b.full:
            self._attach_grads(b, copy_existing=False)
        elif b.flats:
            for f in b.flats.values():
                f.zero_()
            self._attach_grads(b, copy_existing=False)
        else:
            for p in b.managed:
                p.grad = None

    def _attach_grads(self, b, copy_existing, skip_staged=False):
        # skip_staged: no device parameters here (_device_params_ok is False).
        if getattr(b, "full", True):  # base _Built (or stage 0): views into the engine arena
            return super()._attach_grads(b, copy_existing)
        if not b.flats:
            return  # stage 2 / no contiguous gradients: .grad belongs to torch (or is dropped)
        for p, view in zip(b.managed, b.gviews):
            g = p.grad
            if g is not None and g.data_ptr() == view.data_ptr():
                continue
            if g is None:
                view.zero_()
            elif copy_existing:
                view.copy_(g)
            p.grad = view

    def cancel_step(self):
        return None  # nothing is prefetched during a data-parallel backward

    def grad_arenas(self):
        self._require_open()
        b = self._b
        if b.flats:
            return list(b.flats.values())
        return list({a.data_ptr(): a for a in b.arenas.values()}.values())

    # ---- state ------------------------------------------------------------------------
    def _sync_master(self, b, i, p):
        j = b.slice_of.get(i) if hasattr(b, "slice_of") else i
        if j is not None:
            _, po, _, n = b.slices[j] if hasattr(b, "slices") else (i, 0, 0, p.numel())
            t = p.detach().reshape(-1)[po:po + n].to(torch.float32).contiguous()
            b.engine.write_param_state(j, 0, t.data_ptr())
        b.versions[i] = p._version

    def _nslots(self, b, i):
        return 1 + len(self._state_names(self.param_groups[b.cohort_group[b.cohort_of[i]]]))

    def _copy_state(self, prev, b, resync):
        """Carry state over to a rebuilt engine. Both whole: the base class's copy. Otherwise
        each parameter's state is assembled from its slices (broadcast by their owners when
        the old engine was sharded too and the layout moved) and the new slice written."""
        prev_sharded = not getattr(prev, "full", True)
        new_sharded = not getattr(b, "full", True)
        if not prev_sharded and not new_sharded:
            return super()._copy_state(prev, b, resync)
        same = prev_sharded and [id(p) for p in prev.managed] == [id(p) for p in b.managed] \
            and [p.numel() for p in prev.managed] == [p.numel() for p in b.managed]
        buf = None
        for i, p in enumerate(b.managed):
            k = prev.index.get(id(p))
            if k is None or prev.managed[k].numel() != p.numel():
                continue
            j = b.slice_of.get(i) if new_sharded else i
            nslots = self._nslots(b, i)
            first = 1 if id(p) in resync else 0
            if same:
                if j is None:
                    continue
                jp = prev.slice_of[k]
                n = b.slices[j][3]
                if buf is None or buf.numel() < n:
                    buf = torch.empty(n, dtype=torch.float32)
                for slot in range(first, nslots):
                    prev.engine.read_param_state(jp, slot, buf.data_ptr())
                    b.engine.write_param_state(j, slot, buf.data_ptr())
                continue
            full = torch.zeros(p.numel(), dtype=torch.float32)
            for slot in range(first, nslots):
                if prev_sharded:
                    jp = prev.slice_of.get(k)
                    if jp is not None:
                        _, po, _, n = prev.slices[jp]
                        prev.engine.read_param_state(jp, slot, full.data_ptr() + 4 * po)
                    # the owners of the old slices send them (the same order on every rank)
                    d, off, n_all = prev.space.offset[k]
                    for r in range(self._dp.world):
                        lo, hi = prev.bounds[d][r], prev.bounds[d][r + 1]
                        a, e = max(lo, off), min(hi, off + n_all)
                        if a < e:
                            comm.broadcast(full[a - off:e - off], r, stats=self._dp_comm_stats)
                else:
                    prev.engine.read_param_state(k, slot, full.data_ptr())
                if j is not None:
                    _, po, _, n = b.slices[j] if new_sharded else (i, 0, 0, p.numel())
                    b.engine.write_param_state(j, slot, full.data_ptr() + 4 * po)

    def _read_slot(self, i, slot, out):
        """Slot ``slot`` of parameter ``i`` into ``out`` (numel of the parameter): only this
        rank's slice is filled (``state_dict()`` gathers the whole state)."""
        b = self._b
        j = b.slice_of.get(i)
        if j is None:
            return
        _, po, _, n = b.slices[j]
        flat = out.view(-1)
        if n == flat.numel():
            b.engine.read_param_state(j, slot, flat.data_ptr())
        else:
            b.engine.read_param_state(j, slot, flat[po:po + n].data_ptr())

    def _write_slot(self, i, slot, src):
        """Write slot ``slot`` of parameter ``i`` from ``src``: the whole parameter (this rank
        takes its slice) or exactly this rank's slice."""
        b = self._b
        j = b.slice_of.get(i)
        if j is None:
            return
        _, po, _, n = b.slices[j]
        flat = src.reshape(-1)
        if flat.numel() != n:
            flat = flat[po:po + n]
        flat = flat.to(torch.float32).contiguous()
        b.engine.write_param_state(j, slot, flat.data_ptr())

    def state_dict(self):
        """torch-compatible and whole on every rank (a collective: each slice is broadcast by
        its owner)."""
        self._require_open()
        self._refresh()
        b = self._b
        packed, groups, index, seen = {}, [], 0, set()
        for group in self.param_groups:
            g = {k: v for k, v in group.items() if k != "params"}
            g["params"] = []
            names = self._state_names(group)
            for p in group["params"]:
                g["params"].append(index)
                i = b.index.get(id(p))
                if i is not None and i not in seen:
                    seen.add(i)
                    entry = {}
                    step = b.engine.step_count(b.cohort_of[i])
                    if self._has_step_in_state():
                        entry["step"] = torch.tensor(float(step))
                    for slot, name in enumerate(names, start=1):
                        entry[name] = self._gather_slot(b, i, slot).view(p.shape)
                    if not self._has_step_in_state():
                        entry["strata_step"] = step
                        if not names:
                            entry["momentum_buffer"] = None
                    if p.dtype != torch.float32:
                        entry["master"] = self._gather_slot(b, i, 0).view(p.shape)
                    packed[index] = entry
                index += 1
            groups.append(g)
        return {"state": packed, "param_groups": groups}

    def read_state(self, p, key):
        """The whole state ``key`` of ``p`` on every rank (a collective: each slice is
        broadcast by its owner)."""
        i, slot = self._slot_of(p, key)
        return self._gather_slot(self._b, i, slot).view(p.shape)

    def _local_range(self, i):
        b = self._b
        if b.full:
            return 0, b.managed[i].numel()
        j = b.slice_of.get(i)
        if j is None:
            return 0, 0
        _, po, _, n = b.slices[j]
        return po, n

    def read_local_state(self, p, key):
        """This rank's slice of state ``key`` of ``p``, flat (empty where it owns none)."""
        i, slot = self._slot_of(p, key)
        t = torch.zeros(p.numel(), dtype=torch.float32)
        if self._b.full:
            self._b.engine.read_param_state(i, slot, t.data_ptr())
        else:
            self._read_slot(i, slot, t)
        po, n = self._local_range(i)
        return t[po:po + n].clone()

    def write_local_state(self, p, key, value):
        """Write this rank's slice of state ``key`` of ``p`` (``value`` has the slice's
        numel)."""
        i, slot = self._slot_of(p, key)
        po, n = self._local_range(i)
        value = torch.as_tensor(value).reshape(-1)
        if value.numel() != n:
            raise ValueError(f"strata: this rank's slice of {key!r} has {n} elements, got "
                             f"{value.numel()}")
        if self._b.full:  # stage 0: the engine holds p whole; the slice is all of it
            self._b.engine.write_param_state(i, slot, value.to(torch.float32).contiguous()
                                             .data_ptr())
        elif n:
            self._write_slot(i, slot, value)

    def _gather_slot(self, b, i, slot):
        p = b.managed[i]
        t = torch.zeros(p.numel(), dtype=torch.float32)
        if b.full:
            b.engine.read_param_state(i, slot, t.data_ptr())
            return t
        self._read_slot(i, slot, t)
        d, off, n = b.space.offset[i]
        for r in range(self._dp.world):
            lo, hi = b.bounds[d][r], b.bounds[d][r + 1]
            a, e = max(lo, off), min(hi, off + n)
            if a < e:
                comm.broadcast(t[a - off:e - off], r, stats=self._dp_comm_stats)
        return t

    def load_state_dict(self, state_dict):
        """torch-compatible: every rank passes the whole state dict and keeps its slices."""
        self._require_open()
        self._refresh()
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups):
            raise ValueError(f"loaded state dict has {len(groups)} parameter groups, the "
                             f"optimizer has {len(self.param_groups)}")
        for gi, (saved, group) in enumerate(zip(groups, self.param_groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(f"param group {gi}: loaded state has {len(saved['params'])} "
                                 f"parameters, the optimizer has {len(group['params'])}")
        self._load_saved_state(groups, state_dict["state"])

    # ---- lifecycle and stats ----------------------------------------------------------
    def _release(self, b, keep_grads=True):
        if b is None or b.engine is None or b.engine.closed:
            return
        if getattr(b, "reducer", None) is not None:
            try:
                b.reducer.reset()
            except Exception:  # pragma: no cover - a broken process group at close
                pass
        for h in getattr(b, "dp_hooks", []):
            h.remove()
        if hasattr(b, "dp_hooks"):
            b.dp_hooks, b.dp_refs = [], []
        super()._release(b, keep_grads)

    def _close_engine(self):
        b = self._b
        if b is not None and b.engine is not None and not b.engine.closed:
            trace_path = _config.get(self.config, "strata.trace.path")
            if trace_path and self._dp.world > 1 and self._dp.rank != 0:
                # every rank has its own trace: path.rank<r>.json beside rank 0's
                root, ext = os.path.splitext(trace_path)
                path = f"{root}.rank{self._dp.rank}{ext}"
                os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
                b.engine.write_trace(path)
                self._release(b, keep_grads=True)
                return
        super()._close_engine()

    def stats(self):
        """The engine's counters (this rank's pool, swap file, I/O) plus the data-parallel
        ones: stage, world_size, rank, total_numel and shard_numel (elements of trainable
        parameters, all / this rank's state), grad_arena_bytes (the engine's gradient buffers:
        the shard at stage 1 and 2), grad_flat_bytes (stage 1's full gradient buffers),
        grad_bucket_peak_bytes (bucket buffers held at once, in use or kept for reuse),
        reduce_buckets,
        allgather_rounds, comm (this optimizer's collectives: calls, bytes, async launches per
        operation), buckets_reduced and buckets_reduced_during_backward (launched from a
        gradient hook while backward went on: overlap) and numa_node (bound, or None)."""
        s = super().stats()
        b = self._b
        dp = self._dp
        total = sum(p.numel() for p in b.managed)
        s.update({
            "stage": dp.stage,
            "world_size": dp.world,
            "rank": dp.rank,
            "total_numel": total,
            "shard_numel": total if b.full else sum(sl[3] for sl in b.slices),
            "grad_arena_bytes": sum(a.numel() * a.element_size()
                                    for a in {t.data_ptr(): t for t in b.arenas.values()}.values()),
            "grad_flat_bytes": sum(f.numel() * f.element_size() for f in b.flats.values()),
            "grad_bucket_peak_bytes": b.reducer.bucket_bytes_peak if b.reducer else 0,
            "reduce_buckets": len(b.reducer.buckets) if b.reducer else 0,
            "buckets_reduced": b.reducer.launched if b.reducer else 0,
            "buckets_reduced_during_backward": b.reducer.launched_in_backward if b.reducer
            else 0,
            "allgather_rounds": b.gather.rounds if b.gather else 0,
            "comm": {k: dict(v) for k, v in self._dp_comm_stats.items()},
            "numa_node": self._dp_numa,
        })
        return s


_CLASSES = {}


def sharded_class(klass):
    """The data-parallel version of a strata optimizer class (cached)."""
    if issubclass(klass, ShardedMixin):
        return klass
    if not issubclass(klass, _OffloadOptimizer):
        raise TypeError(f"sharded_class: {klass.__name__} is not a strata optimizer")
    made = _CLASSES.get(klass)
    if made is None:
        made = type(f"Sharded{klass.__name__}", (ShardedMixin, klass),
                    {"__doc__": f"{klass.__name__} with data-parallel sharding "
                                "(strata.sharded).", "__module__": __name__})
        _CLASSES[klass] = made
    return made


def shard(opt):
    """Turn an existing strata optimizer into its data-parallel version in place (its state is
    carried over slice by slice; the full engine it had is released)."""
    if isinstance(opt, ShardedMixin):
        return opt
    opt.__class__ = sharded_class(type(opt))
    opt._dp = None
    opt._rebuild()
    return opt


ShardedOffloadAdamW = sharded_class(OffloadAdamW)
ShardedOffloadAdam = sharded_class(OffloadAdam)
ShardedOffloadSGD = sharded_class(OffloadSGD)
ShardedOffloadAdagrad = sharded_class(OffloadAdagrad)
