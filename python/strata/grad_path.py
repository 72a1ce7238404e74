"""How gradients reach a strata optimizer's engine: the second strategy (beside the layout,
``strata.layout``) an ``_OffloadOptimizer`` is composed of.

``ArenaGrads`` (one process): every ``.grad`` is a view into the engine's flat gradient arena,
so backward accumulates straight into what the engine reads; hooks fold gradients of another
dtype into the arena and, during an overlapped ``backward(loss)``, tell the engine which
parameters are final (see ``strata.optim``'s module doc).

``ReducerGrads`` (data parallel, ZeRO stages 0-2; ``strata.sharded``'s module doc has the
story): gradients are summed across ranks in buckets on the way in — all-reduced in place in
the arena at stage 0, reduced into the owner's shard arena from a full flat buffer (or torch's
``.grad``) at stage 1, reduced from hooks in every backward at stage 2 — and the updated
parameters are all-gathered after the step.

Both answer the optimizer's same calls: ``build``/``carry``/``adopt`` (a new engine),
``attach`` (gradients into the engine's buffers), ``zero_grad``, ``backward``, ``prepare_step``
and ``default_grad_mul`` (before the engine's step), ``after_step``, ``grad_stats``,
``grad_arenas``, ``release`` and ``stats``. A strategy keeps a weak reference to its optimizer.
"""

import bisect
import functools
import math
import os
import weakref

import torch

from . import _C, comm
from . import config as _config
from ._torch_compat import dtype_from_name, dtype_name, has_post_accumulate_grad_hook, \
    tensor_from_buffer
from .layout import Space
from .param_tier import fetched_on_demand, full_shape, numel as _numel, shape as _shape, \
    tier_of
from .numa import bind_numa_node, numa_node_for

DEFAULT_BUCKET = 500_000_000  # elements: DeepSpeed's default for both bucket sizes
MAX_IN_FLIGHT = 2             # asynchronous reductions in flight (overlap_comm), as double buffers


def _add_grad_hooks(params, make_hook, hooks, refs):
    """A hook per parameter that runs when a backward has accumulated its gradient; appended
    to ``hooks`` (handles) and ``refs`` (nodes kept alive)."""
    for i, p in enumerate(params):
        h = make_hook(i, p)
        if has_post_accumulate_grad_hook():
            hooks.append(p.register_post_accumulate_grad_hook(h))
        else:
            # torch < 2.1: the parameter's AccumulateGrad node runs once per backward, after
            # every gradient contribution to it was summed (as DDP uses it).
            with full_shape(p):
                acc = p.expand_as(p).grad_fn.next_functions[0][0]
            refs.append(acc)
            hooks.append(acc.register_hook(h))


class ArenaGrads:
    """``.grad`` views into the engine's gradient arena (one process)."""

    reduces = False
    default_grad_mul = 1.0
    comm_stats = None  # collectives counted by operation (data parallel)

    def __init__(self, opt):
        self._opt = weakref.ref(opt)

    @property
    def opt(self):
        return self._opt()

    # ---- a new engine ---------------------------------------------------------------
    def build(self, b):
        """The arena tensors and each parameter's view of them (engine parameter j == i)."""
        engine = b.engine
        gdt = [dtype_from_name(engine.grad_dtype(i)) for i in range(len(b.managed))]
        for dt in set(gdt):
            b.arenas[dt] = tensor_from_buffer(engine.grad_arena(dtype_name(dt)), dt)
        for i, p in enumerate(b.managed):
            off = engine.grad_offset(i)
            b.views.append(b.arenas[gdt[i]][off: off + _numel(p)].view(_shape(p)))
            # Folded: backward's .grad is added into the arena by a hook and dropped (another
            # gradient dtype, or weights fetched on demand at stage 3, whose .data is empty
            # between uses so .grad cannot stay a view of the arena).
            b.fold.append(gdt[i] != p.dtype or fetched_on_demand(p))

    def carry(self, prev, b):
        """Gradients accumulated in ``prev``'s arena for folded parameters (not reachable
        through ``.grad``) move to ``b``'s; ``attach`` carries the others."""
        if not prev.views:
            return
        for i, p in enumerate(b.managed):
            j = prev.index.get(id(p))
            if j is None or not prev.fold[j] or _numel(prev.managed[j]) != _numel(p):
                continue
            b.views[i].copy_(prev.views[j])
            if not b.fold[i]:
                p.grad = b.views[i]  # now a view parameter: attach keeps it

    def adopt(self, prev, b):
        """Point ``.grad`` at the new buffers (carrying what the old ones held) and install
        the hooks the gradient path needs."""
        self.attach(b, copy_existing=True)
        if any(b.fold):
            self.install_hooks(b)  # every backward adds .grad into the arena

    # ---- gradients into the engine ------------------------------------------------------
    def attach(self, b, copy_existing, skip_staged=False):
        """Make the arena hold the gradients: ``.grad`` becomes the arena view (a replaced
        ``.grad`` is copied in, a missing one zeroes the view); folded parameters add a
        ``.grad`` that was set by other means than backward and drop it. ``copy_existing``
        False (``zero_grad``): the arena was zeroed, nothing is carried."""
        opt = self.opt
        pending = None  # a CUDA device whose gradient copies are in flight (one sync at the end)
        for i, (p, view) in enumerate(zip(b.managed, b.views)):
            g = p.grad
            if b.fold[i]:
                if g is not None:
                    if copy_existing:
                        opt._check_dense(b, p, g)
                        view.add_(g.to(view.device))
                    p.grad = None
                continue
            if b.shadows[i] is not None:
                # A device parameter: .grad stays where autograd put it; the arena gets a copy
                # (once per change of .grad: accumulation bumps its version).
                if skip_staged:
                    continue
                if g is None or not copy_existing:
                    view.zero_()
                    b.copied.pop(i, None)
                    if not copy_existing:
                        p.grad = None
                else:
                    last = b.copied.get(i)
                    if last is None or last[0]() is not g or last[1] != g._version:
                        opt._check_dense(b, p, g)
                        view.copy_(g.to_dense() if g.is_sparse else g, non_blocking=g.is_cuda)
                        b.copied[i] = (weakref.ref(g), g._version)
                        pending = g.device if g.is_cuda else pending
                continue
            if g is not None and g.is_sparse:
                # Checked before anything touches its data pointer (a sparse tensor has none).
                opt._check_dense(b, p, g)
                if copy_existing:
                    view.copy_(g.to_dense())
                else:
                    view.zero_()
                p.grad = view
                continue
            if g is not None and g.data_ptr() == view.data_ptr():
                continue
            if g is None:
                view.zero_()
            elif copy_existing:
                opt._check_dense(b, p, g)
                view.copy_(g)
            p.grad = view
        if pending is not None:
            torch.cuda.current_stream(pending).synchronize()  # the arena is read next

    def restore_views(self, b):
        """After the Engine set ``.grad`` to None (DeepSpeed's state after a step), point it
        back at the arena views for the next backward. The arena was zeroed by
        ``zero_grad``; a ``.grad`` set meanwhile is kept (``attach`` copies it in)."""
        for i, (p, view) in enumerate(zip(b.managed, b.views)):
            if p.grad is None and not b.fold[i] and b.shadows[i] is None:
                p.grad = view

    def zero_grad(self, b):
        if self.opt._overlap is not None:
            raise RuntimeError("strata: zero_grad() between an overlapped backward() and step()")
        b.engine.zero_grads()
        self.attach(b, copy_existing=False)

    def grad_arenas(self, b):
        return list(b.arenas.values())

    # ---- overlap with backward ------------------------------------------------------
    def install_hooks(self, b):
        """One hook per managed parameter, run when a backward has accumulated its gradient:
        a folded parameter's ``.grad`` is added into the arena and dropped; then, during an
        overlapped backward, the engine hears that the gradient is final."""
        if b.hooks:
            return
        engine = b.engine
        opt = self._opt

        def ready(i, p):
            pref, view, fold = weakref.ref(p), b.views[i], b.fold[i]
            staged = b.shadows[i] is not None and not fold
            t = tier_of(p)
            lane = t.grad_lane if t is not None and fetched_on_demand(p) else None

            def land(host, i=i, view=view, overlap=False):
                """On the gradient lane's watcher: the D2H copy of a device parameter's
                gradient landed in ``host``; into the arena, then final for the engine."""
                if overlap:
                    b.lane_wait_s += engine.wait_grad_room()  # only this thread adds to it
                engine.populate_grad(i)
                with torch.no_grad():
                    view.add_(host)
                if overlap:
                    engine.mark_param_ready(i)

            def hook(*_):
                o = opt()
                overlap = o is not None and o._overlap_active
                if lane is not None:
                    # A model on a GPU: the gradient goes D2H on its own lane and lands in
                    # the arena from the lane's watcher; backward goes on.
                    q = pref()
                    g = None if q is None else q.grad
                    if g is not None:
                        lane.submit(g, functools.partial(land, overlap=overlap))
                        q.grad = None
                    elif overlap:
                        engine.mark_param_ready(i)
                    return
                if fold:
                    q = pref()
                    g = None if q is None else q.grad
                    if g is not None:
                        if overlap:
                            # Stage 3: hold backward while the updates lag (the arena's pages
                            # are written here and released only after their update).
                            b.grad_wait_s += engine.wait_grad_room()
                        # Stage 3's released pages: mapped in one call, not faulted twice
                        # per page by the add (a no-op for arenas that are never released).
                        engine.populate_grad(i)
                        with torch.no_grad():
                            view.add_(g.to(view.device))
                        q.grad = None
                if overlap:
                    if staged:
                        o._grads._stage_ready(b, i, pref())
                    else:
                        engine.mark_param_ready(i)
            return hook

        _add_grad_hooks(b.managed, ready, b.hooks, b.hook_refs)

    def backward(self, loss, *, exact=False, retain_graph=False, boundary=True):
        """``loss.backward()`` with this step's updates overlapped with it (see
        ``_OffloadOptimizer.backward``)."""
        opt = self.opt
        if opt._overlap is not None:
            raise RuntimeError("strata: backward() again before step(): one overlapped backward per step")
        if opt._poisoned:
            raise RuntimeError(f"strata: optimizer step refused: {opt._poisoned}")
        # Device parameters: their gradients are copied into the arena by the hooks as they
        # become final (not before: the earlier micro-steps' sums would be copied for nothing).
        opt._prepare(skip_staged=True)
        b = opt._b
        opt._set_hypers(b)
        self.install_hooks(b)
        threads = _C.backward_update_threads(torch.get_num_threads())
        opt._set_model_stream(b)
        b.engine.begin_backward(not exact, 1.0, threads)
        opt._overlap_active = True
        try:
            loss.backward(retain_graph=retain_graph)
            opt._drain_grad_lane()  # every D2H gradient copy landed (and was marked final)
            self._stage_drain()
            # Device parameters no hook reported (no gradient in this backward): their
            # .grad, if any, goes into the arena before end_backward marks them final.
            self.attach(b, copy_existing=True)
        except BaseException:
            opt._overlap_active = False
            try:
                opt._drain_grad_lane()
            except Exception:  # noqa: BLE001 - the backward's own error is the one raised
                pass
            self._stage_drain()
            b.engine.end_backward()
            try:
                b.engine.cancel_step()
            except Exception as exc:  # eager updates already ran: the state is part-stepped
                opt._poisoned = f"backward failed after some eager updates ran ({exc})"
            raise
        finally:
            opt._overlap_active = False
        b.engine.end_backward()
        opt._overlap = "exact" if exact else "eager"
        return loss

    def _stage_ready(self, b, i, p):
        """Hook of device parameter ``i`` during an overlapped backward: copy its final
        gradient into the arena, then tell the engine — at once for CPU memory, after the
        copy's CUDA event for a GPU gradient (a watcher thread waits for it, so backward is
        not held up)."""
        opt = self.opt
        g = None if p is None else p.grad
        view = b.views[i]
        if g is None:
            view.zero_()
            b.copied.pop(i, None)
            b.engine.mark_param_ready(i)
            return
        if not g.is_cuda:
            view.copy_(g)
            b.copied[i] = (weakref.ref(g), g._version)
            b.engine.mark_param_ready(i)
            return
        view.copy_(g, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        b.copied[i] = (weakref.ref(g), g._version)
        if opt._stage_queue is None:
            import queue
            import threading

            opt._stage_queue = queue.Queue()
            engine = b.engine

            def watch(q=opt._stage_queue):
                while True:
                    item = q.get()
                    if item is None:
                        return
                    item[1].synchronize()
                    engine.mark_param_ready(item[0])

            opt._stage_thread = threading.Thread(target=watch, name="strata-d2h", daemon=True)
            opt._stage_thread.start()
        opt._stage_queue.put((i, event))

    def _stage_drain(self):
        """Wait until every gradient copy the hooks started has reached the engine."""
        opt = self.opt
        if opt._stage_queue is not None:
            opt._stage_queue.put(None)
            opt._stage_thread.join()
            opt._stage_queue = opt._stage_thread = None

    # ---- around the engine's step -------------------------------------------------------
    def prepare_step(self):
        self.opt._prepare()

    def after_step(self, b):
        """Nothing: the engine wrote the new values into the parameters (or host copies)."""

    def reduce_gradients(self):
        """Nothing to reduce in one process."""

    def grad_stats(self):
        """(sum of squares, any inf/nan) over every gradient, in the engine's fixed order."""
        opt = self.opt
        if opt._overlap is not None:
            return opt._b.engine.grad_stats()  # gathered during backward
        opt._prepare()
        return opt._b.engine.grad_stats()

    # ---- lifecycle ----------------------------------------------------------------------
    def release(self, b, keep_grads=True):
        """Before ``b``'s engine closes: with ``keep_grads``, ``.grad`` that still point into
        its arena get their own memory; hooks are removed."""
        if keep_grads:
            for i, (p, view) in enumerate(zip(b.managed, b.views)):
                if b.fold[i]:
                    if p.grad is None and bool(view.any()):
                        # Only the arena held it: hand it back in the parameter's dtype.
                        p.grad = view.to(p.dtype)
                elif p.grad is not None and not p.grad.is_sparse \
                        and p.grad.data_ptr() == view.data_ptr():
                    # The arena is about to be freed: keep the values, drop the view.
                    p.grad = p.grad.clone()
        for h in b.hooks:
            h.remove()
        b.hooks, b.hook_refs = [], []
        b.arenas = {}
        b.views = []

    def stats(self, b):
        return {"grad_wait_s": b.grad_wait_s + b.lane_wait_s}


# ---------------------------------------------------------------------------------------
# data parallel


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
        self.requested_stage = stage
        # 3 only where the parameters are partitioned (the optimizer decides: PartitionGrads);
        # otherwise stage 3's state and gradients are sharded as at stage 2.
        self.stage = min(stage, 2)
        self.world, self.rank, self.local_rank = int(world), int(rank), int(local_rank)
        self.reduce_bucket_size = _bucket_size(z.get("reduce_bucket_size"))
        self.allgather_bucket_size = _bucket_size(z.get("allgather_bucket_size"))
        self.overlap_comm = bool(z.get("overlap_comm") or False)
        rs = z.get("reduce_scatter")
        self.reduce_scatter = True if rs is None else bool(rs)
        cg = z.get("contiguous_gradients")
        self.contiguous_gradients = True if cg is None else bool(cg)
        self.numa_node = None  # the NUMA node this rank is bound to (for_this_rank)

    @classmethod
    def for_this_rank(cls, cfg):
        """The settings of this process's rank (one rank without torch.distributed); the
        process is bound to its local rank's NUMA node where there are several
        (``STRATA_NUMA_BIND=0``: not)."""
        world, rank = comm.get_world_size(), comm.get_rank()
        s = cls(cfg, world, rank, comm.get_local_rank())
        node = numa_node_for(s.local_rank, comm.get_local_world_size()) \
            if os.environ.get("STRATA_NUMA_BIND", "1") not in ("0", "") else None
        if node is not None:
            s.numa_node = node
            _config.log.info("strata: rank %d: %s", rank, bind_numa_node(node))
        return s


class _Bucket:
    __slots__ = ("index", "dtype", "start", "end", "owner", "members", "pending", "buf", "whole",
                 "work", "runs", "launched", "order", "direct", "out", "seg")

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
        self.direct = False  # one member, reduced in place in its gradient (no copy)
        self.out = None  # collective "reduce_scatter": this rank's part of the sum
        self.seg = 0     # collective "reduce_scatter": elements per rank (the bucket is W x)

    @property
    def numel(self):
        return self.end - self.start


class _GradComm:
    """Reduces gradients bucket by bucket, in a fixed bucket order on every rank.

    ``source``: "flat" (the bucket is a view of ``flats[dtype]``, reduced in place) or "grad"
    (the bucket is a buffer filled from each parameter's ``.grad``). ``collective``: "all_reduce"
    or "reduce" (to the bucket's owner) or "reduce_scatter" (the bucket is ``world`` equal
    segments, ``seg`` elements each; this rank keeps the sum of its segment, in ``out``, which
    its runs index). ``keep``: after a bucket is reduced, its runs are
    copied ("copy") or added ("add") into the engine's arena, or nothing happens ("none": the
    buffer is the arena)."""

    def __init__(self, stats, space, buckets, *, source, collective, keep, flats=None):
        self.comm_stats = stats
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
        bk.out = None
        if bk.direct and bk.whole is None:
            bk.buf = None
            return
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
        pieces = self.by_param.get(i, ())
        for k, (bk, po, bo, n) in enumerate(pieces):
            if self.source == "grad":
                if bk.direct and grad is not None:
                    # Reduced where autograd put it (non-owners: scratch afterwards; the
                    # caller drops .grad).
                    if flat is None:
                        flat = grad.detach().reshape(-1)
                    bk.buf = flat[po:po + n]
                    if bk.buf.dtype != bk.dtype:
                        bk.buf = bk.buf.to(bk.dtype)
                else:
                    if bk.buf is None:
                        self._alloc(bk)
                    if grad is not None:
                        if flat is None:
                            flat = grad.detach().reshape(-1)
                        bk.buf[bo:bo + n].copy_(flat[po:po + n])
            if k + 1 < len(pieces) and pieces[k + 1][0] is bk:
                continue  # more pieces of i in this bucket (reduce_scatter: one per rank)
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
        st = self.comm_stats
        a = self.async_now
        if self.collective == "reduce_scatter":
            bk.out = torch.empty(bk.seg, dtype=bk.dtype)
            bk.work = comm.reduce_scatter_tensor(bk.out, bk.buf, async_op=a, stats=st)
        elif self.collective == "reduce" and bk.owner is not None:
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
            summed = bk.out if bk.out is not None else bk.buf
            for bo, arena, ao, n in bk.runs:
                src = summed[bo:bo + n]
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


def _rounds(bounds, world, bucket):
    """Chunks of every rank's shard moved together, per round: ``(c, [(lo, hi) per rank])``
    with ``c = bucket // world`` elements (no round larger than a shard)."""
    longest = max(bounds[r + 1] - bounds[r] for r in range(world))
    c = max(1, min(bucket // world, longest))
    out = []
    for k in range(math.ceil(longest / c)):
        out.append((c, [(bounds[r] + k * c, min(bounds[r] + (k + 1) * c, bounds[r + 1]))
                        for r in range(world)]))
    return out


class _ParamGather:
    """All-gathers the updated parameters: per dtype, round k moves chunk k (``c`` elements,
    ``c = allgather_bucket_size // world``) of every rank's shard, so one round carries at most
    ``allgather_bucket_size`` elements."""

    def __init__(self, stats, params, space, bounds, world, rank, bucket):
        self.comm_stats = stats
        self.world, self.rank = world, rank
        self.plan = []  # (dtype, chunk, [per rank: [(param index, offset in param, off, n)]])
        self.rounds = 0
        if world <= 1:
            return
        for d in space.dtypes:
            for c, ranges in _rounds(bounds[d], world, bucket):
                self.plan.append((d, c, [[(i, po, so - lo, n) for (i, po, so, n)
                                          in space.pieces(d, lo, hi)] if lo < hi else []
                                         for lo, hi in ranges]))
        self.rounds = len(self.plan)
        self.params = params

    def run(self):
        if not self.plan:
            return
        flat = [p.data.view(-1) for p in self.params]
        for d, c, per_rank in self.plan:
            send = torch.zeros(c, dtype=d)
            for i, po, off, n in per_rank[self.rank]:
                send[off:off + n].copy_(flat[i][po:po + n])
            out = torch.empty(self.world * c, dtype=d)
            comm.all_gather_into(out, send, stats=self.comm_stats)
            for r, pieces in enumerate(per_rank):
                if r == self.rank:
                    continue
                base = r * c
                for i, po, off, n in pieces:
                    flat[i][po:po + n].copy_(out[base + off: base + off + n])


class ReducerGrads(ArenaGrads):
    """Data parallel: gradients reduced across ranks in buckets (see the module doc). At
    stage 0 the engine holds whole parameters and ``.grad`` are arena views as in one process
    (the inherited part); at stages 1 and 2 the engine holds this rank's shard."""

    reduces = True

    def __init__(self, opt, settings):
        super().__init__(opt)
        self.dp = settings
        self.comm_stats = {}
        self.armed = False      # stage 0/1 with overlap_comm: this backward reduces from hooks
        self.cb_queued = False  # the end-of-backward callback is queued
        self.reduced = False    # this step's gradients are reduced (until zero_grad)

    @property
    def default_grad_mul(self):
        return 1.0 / self.dp.world  # an average, like DDP

    @property
    def _whole(self):
        return self.dp.stage == 0

    # ---- a new engine ---------------------------------------------------------------
    def build(self, b):
        dp = self.dp
        if self._whole:
            # The engine holds every parameter; gradients are all-reduced in place in its
            # arenas, bucket by bucket.
            super().build(b)
            entries = [(i, p.dtype, b.engine.grad_offset(i), p.numel())
                       for i, p in enumerate(b.managed)]
            space = Space(entries, {d: a.numel() for d, a in b.arenas.items()})
            b.reducer = _GradComm(self.comm_stats, space,
                                  _make_buckets(space, dp.reduce_bucket_size),
                                  source="flat", collective="all_reduce", keep="none",
                                  flats=b.arenas)
            return
        lay = b.layout
        _shard_arenas(b)
        space = lay.space
        if dp.stage == 1 and dp.contiguous_gradients:
            b.flats = {d: torch.zeros(space.total[d], dtype=d) for d in space.dtypes}
            for i, p in enumerate(b.managed):
                d, off, n = space.offset[i]
                b.gviews.append(b.flats[d][off:off + n].view_as(p))
        coll = "reduce" if dp.reduce_scatter else "all_reduce"
        if dp.stage == 2:
            b.reducer = _GradComm(self.comm_stats, space,
                                  _make_buckets(space, dp.reduce_bucket_size, lay.bounds),
                                  source="grad", collective=coll, keep="add")
        else:
            buckets = _make_buckets(space, dp.reduce_bucket_size,
                                    lay.bounds if dp.reduce_scatter else None)
            b.reducer = _GradComm(self.comm_stats, space, buckets,
                                  source="flat" if b.flats else "grad", collective=coll,
                                  keep="copy", flats=b.flats)
        for bk in b.reducer.buckets:
            bk.runs = self._runs(b, bk)
        b.gather = _ParamGather(self.comm_stats, b.managed, space, lay.bounds, dp.world,
                                dp.rank, dp.allgather_bucket_size)

    def _runs(self, b, bk):
        """The parts of bucket ``bk`` (flat coordinates) this rank keeps, as arena runs."""
        runs = []
        d = bk.dtype
        lay = b.layout
        lo, hi = lay.bounds[d][self.dp.rank], lay.bounds[d][self.dp.rank + 1]
        a, e = max(bk.start, lo), min(bk.end, hi)
        if a >= e:
            return runs
        arena = b.arenas[d]
        for (i, po, fo, n) in lay.space.pieces(d, a, e):
            j = lay.slice_of[i]
            ao = b.arena_off[j] + (fo - lay.slices[j][2])
            bo = fo - bk.start
            if runs and runs[-1][0] + runs[-1][3] == bo and runs[-1][2] + runs[-1][3] == ao:
                runs[-1] = (runs[-1][0], arena, runs[-1][2], runs[-1][3] + n)
            else:
                runs.append((bo, arena, ao, n))
        return runs

    def carry(self, prev, b):
        if self._whole:
            super().carry(prev, b)

    def adopt(self, prev, b):
        if self._whole:
            super().adopt(prev, b)
        else:
            if prev is not None and prev.arenas:
                # .grad views into the old engine's arena die with it: keep the values (stage
                # 1 copies them into the new buffers below; stage 2 keeps no whole gradient).
                old = [(a.data_ptr(), a.data_ptr() + a.numel() * a.element_size())
                       for a in prev.arenas.values()]
                for p in b.managed:
                    g = p.grad
                    if g is not None and any(lo <= g.data_ptr() < hi for lo, hi in old):
                        p.grad = None if self.dp.stage >= 2 else g.clone()
            self.attach(b, copy_existing=True)
        self._install_reduce_hooks(b)

    # ---- gradients into the engine ------------------------------------------------------
    def attach(self, b, copy_existing, skip_staged=False):
        # skip_staged: no device parameters here (data parallel takes CPU parameters only).
        if self._whole:  # views into the engine arena, as in one process
            return super().attach(b, copy_existing)
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

    def zero_grad(self, b):
        if b.reducer is not None:
            b.reducer.reset()
        self.reduced = False
        self.armed = False
        b.engine.zero_grads()
        if self._whole:
            self.attach(b, copy_existing=False)
        elif b.flats:
            for f in b.flats.values():
                f.zero_()
            self.attach(b, copy_existing=False)
        else:
            for p in b.managed:
                p.grad = None

    def grad_arenas(self, b):
        if b.flats:
            return list(b.flats.values())
        return list({a.data_ptr(): a for a in b.arenas.values()}.values())

    # ---- hooks ----------------------------------------------------------------------
    def _install_reduce_hooks(self, b):
        dp = self.dp
        needed = dp.stage >= 2 or (dp.world > 1 and dp.overlap_comm)
        if b.dp_hooks or not needed:
            return
        me = weakref.ref(self)

        def ready(i, _p):
            def hook(*_):
                grads = me()
                if grads is not None:
                    grads._on_ready(i)
            return hook

        _add_grad_hooks(b.managed, ready, b.dp_hooks, b.dp_refs)

    def _on_ready(self, i):
        opt = self.opt
        b = None if opt is None else opt._b
        if b is None or b.reducer is None:
            return
        if self.dp.stage >= 2:
            p = b.managed[i]
            self._queue_end()
            b.reducer.async_now = self.dp.overlap_comm
            b.reducer.in_hook = True
            try:
                b.reducer.grad_ready(i, p.grad)
            finally:
                b.reducer.in_hook = False
            p.grad = None  # the bucket holds it now: ZeRO-2 keeps only the shard
        elif self.armed:
            self._queue_end()
            b.reducer.async_now = True
            p = b.managed[i]
            b.reducer.in_hook = True
            try:
                b.reducer.grad_ready(i, p.grad if b.reducer.source == "grad" else None)
            finally:
                b.reducer.in_hook = False

    def _queue_end(self):
        if self.cb_queued:
            return
        engine = getattr(torch.autograd.Variable, "_execution_engine", None)
        if engine is not None and hasattr(engine, "queue_callback"):
            engine.queue_callback(self._backward_done)
            self.cb_queued = True

    def _backward_done(self):
        """End of a backward: every bucket of this cycle is reduced and waited for."""
        self.cb_queued = False
        opt = self.opt
        b = None if opt is None else opt._b
        if b is None or b.reducer is None:
            return
        if self.dp.stage >= 2:
            if b.reducer.active:
                b.reducer.flush()
        elif self.armed:
            self.armed = False
            self._flush_boundary(b, async_rest=True)  # overlapped: the rest async too

    def _flush_boundary(self, b, async_rest):
        b.reducer.async_now = async_rest
        if b.reducer.source == "grad":
            b.reducer.flush(lambda i: b.managed[i].grad)
        else:
            b.reducer.flush(lambda i: None)
        self.reduced = True

    # ---- the data-parallel steps ------------------------------------------------------
    def backward(self, loss, *, exact=False, retain_graph=False, boundary=True):
        """``loss.backward()`` with this rank's gradient communication: at stage 2 buckets are
        reduced as gradients become ready (every backward); at stage 0 and 1, with
        ``overlap_comm`` and ``boundary`` (the last backward before ``step()``), buckets are
        all-reduced / reduced while backward goes on. ``exact`` is accepted for the
        single-process signature (the update itself never overlaps backward here)."""
        opt = self.opt
        if opt._poisoned:
            raise RuntimeError(f"strata: optimizer step refused: {opt._poisoned}")
        opt._prepare()
        dp = self.dp
        b = opt._b
        self.armed = (dp.world > 1 and dp.stage < 2 and dp.overlap_comm and boundary
                      and not retain_graph and not self.reduced)
        try:
            loss.backward(retain_graph=retain_graph)
        except BaseException:
            self.armed = False
            self.cb_queued = False  # the end-of-backward callback may never have run
            if b.reducer is not None:
                b.reducer.reset()
            raise
        self._backward_done()  # when no hook ran (no gradients): the same end of cycle
        return loss

    def reduce_gradients(self):
        """Finish this step's gradient communication (idempotent until ``zero_grad``)."""
        opt = self.opt
        b = opt._b
        dp = self.dp
        if dp.stage >= 2:
            if b.reducer.active:
                b.reducer.flush()
            return
        if self.reduced:
            return
        opt._prepare()
        b = opt._b
        b.reducer.async_now = False
        if dp.stage == 1 and dp.reduce_scatter and comm.has_reduce_scatter() and dp.world > 1:
            self._reduce_scatter_rounds(b)
            b.reducer.reset()
        else:
            self._flush_boundary(b, async_rest=False)
        self.reduced = True

    def _reduce_scatter_rounds(self, b):
        """Stage 1 where the backend has reduce-scatter: per dtype, round k takes chunk k of
        every rank's shard (``reduce_bucket_size // world`` elements each) and one
        ``reduce_scatter_tensor`` leaves each rank the sum of its own chunk."""
        dp = self.dp
        lay = b.layout
        space = lay.space
        for d in space.dtypes:
            arena = b.arenas.get(d)
            for c, ranges in _rounds(lay.bounds[d], dp.world, dp.reduce_bucket_size):
                inp = torch.zeros(dp.world * c, dtype=d)
                for r, (lo, hi) in enumerate(ranges):
                    if lo >= hi:
                        continue
                    if b.flats:
                        inp[r * c: r * c + hi - lo].copy_(b.flats[d][lo:hi])
                    else:
                        for (i, po, so, n) in space.pieces(d, lo, hi):
                            g = b.managed[i].grad
                            if g is not None:
                                inp[r * c + so - lo: r * c + so - lo + n].copy_(
                                    g.detach().reshape(-1)[po:po + n])
                out = torch.empty(c, dtype=d)
                comm.reduce_scatter_tensor(out, inp, stats=self.comm_stats)
                lo, hi = ranges[dp.rank]
                for (i, po, so, n) in space.pieces(d, lo, hi):
                    j = lay.slice_of[i]
                    ao = b.arena_off[j] + (so - lay.slices[j][2])
                    arena[ao:ao + n].copy_(out[so - lo: so - lo + n])

    def prepare_step(self):
        self.reduce_gradients()

    def after_step(self, b):
        if b.gather is not None:
            b.gather.run()
        self.opt._mark_synced()  # the gathered values are the masters' (no re-sync next step)

    def grad_stats(self):
        """(sum of squares, any inf/nan) over the global (summed) gradient: each rank's shard,
        all-reduced. Finishes the gradient communication first."""
        self.reduce_gradients()
        sum_sq, nonfinite = self.opt._b.engine.grad_stats()
        if self.dp.world > 1 and self.dp.stage >= 1:
            t = torch.tensor([float(sum_sq), 1.0 if nonfinite else 0.0], dtype=torch.float64)
            comm.all_reduce(t, stats=self.comm_stats)
            return float(t[0]), bool(t[1] > 0)
        return sum_sq, nonfinite

    # ---- lifecycle ----------------------------------------------------------------------
    def release(self, b, keep_grads=True):
        if b.reducer is not None:
            try:
                b.reducer.reset()
            except Exception:  # pragma: no cover - a broken process group at close
                pass
        for h in b.dp_hooks:
            h.remove()
        b.dp_hooks, b.dp_refs = [], []
        super().release(b, keep_grads)

    def stats(self, b):
        dp = self.dp
        total = sum(_numel(p) for p in b.managed)
        return {
            "stage": dp.stage,
            "world_size": dp.world,
            "rank": dp.rank,
            "total_numel": total,
            "shard_numel": b.layout.numel,
            "grad_arena_bytes": sum(a.numel() * a.element_size()
                                    for a in {t.data_ptr(): t for t in b.arenas.values()}.values()),
            "grad_flat_bytes": sum(f.numel() * f.element_size() for f in b.flats.values()),
            "grad_bucket_peak_bytes": b.reducer.bucket_bytes_peak if b.reducer else 0,
            "reduce_buckets": len(b.reducer.buckets) if b.reducer else 0,
            "buckets_reduced": b.reducer.launched if b.reducer else 0,
            "buckets_reduced_during_backward": b.reducer.launched_in_backward if b.reducer
            else 0,
            "allgather_rounds": b.gather.rounds if b.gather else 0,
            "comm": {k: dict(v) for k, v in self.comm_stats.items()},
            "numa_node": dp.numa_node,
        }


def _shard_arenas(b):
    """``b.arenas`` (the engine's gradient arena of each parameter dtype) and ``b.arena_off``
    (each shard slice's offset in it). Keyed by parameter dtype; the tensor has the gradient
    dtype (with data_types.grad_accum_dtype reduced buckets are added into it in that dtype)."""
    by_grad = {}
    for j, sl in enumerate(b.layout.slices):
        dt = b.managed[sl[0]].dtype
        if dt not in b.arenas:
            gdt = dtype_from_name(b.engine.grad_dtype(j))
            if gdt not in by_grad:
                by_grad[gdt] = tensor_from_buffer(b.engine.grad_arena(dtype_name(gdt)), gdt)
            b.arenas[dt] = by_grad[gdt]
    b.arena_off = [b.engine.grad_offset(j) for j in range(len(b.layout.slices))]


class _Dtypes:
    """The one attribute of a ``Space`` that ``_GradComm`` reads."""

    def __init__(self, dtypes):
        self.dtypes = dtypes


class PartitionGrads(ReducerGrads):
    """ZeRO-3 across ranks (``strata.layout.PartitionLayout``): in every backward, as a
    parameter's gradient is final, its chunks go into the buckets of their owners and
    ``.grad`` is dropped; a bucket is reduced to its owner (``torch.distributed.reduce``) and
    added into the owner's shard arena. Where the backend has a reduce-scatter (NCCL) and
    ``reduce_scatter`` is on, a group is one bucket of ``world`` equal segments (each member's
    chunk padded to ``ceil(numel / world)``) and one ``reduce_scatter_tensor`` leaves each rank
    the sum of its segment.

    Buckets are fixed groups of consecutive parameters in gradient-ready order, of at most
    ``reduce_bucket_size`` elements counted padded (``world x chunk`` per parameter); a group
    has one bucket per rank, holding every member's chunk for that rank back to back, so the
    group's reductions move as many bytes as one reduce-scatter of the group. They are launched
    in the same order on every rank (``_GradComm``), asynchronously with ``overlap_comm``.
    After the step the parameters need no all-gather (the window gathers them before use);
    persistent parameters, whole on every rank, get their updated chunks broadcast by their
    owners."""

    def build(self, b):
        dp = self.dp
        lay = b.layout
        _shard_arenas(b)
        world = dp.world
        numel = [_numel(p) for p in b.managed]
        # Groups of consecutive parameters of one dtype, up to reduce_bucket_size elements; a
        # parameter larger than that is a group of its own, reduced in place in its .grad.
        dtypes, groups = [], {}
        for i, p in enumerate(b.managed):
            if p.dtype not in groups:
                dtypes.append(p.dtype)
                groups[p.dtype] = [[]]
            cur = groups[p.dtype][-1]
            if cur and sum(numel[k] for k in cur) + numel[i] > dp.reduce_bucket_size:
                cur = []
                groups[p.dtype].append(cur)
            cur.append(i)
        buckets = []
        scatter = dp.reduce_scatter and comm.has_reduce_scatter()
        for d in dtypes:
            base = 0
            for members in groups[d]:
                if scatter:
                    bk = self._scatter_bucket(b, d, base, members)
                    base = bk.end
                    buckets.append(bk)
                    continue
                direct = len(members) == 1 and numel[members[0]] > dp.reduce_bucket_size
                for r in range(world):
                    bk = _Bucket(d, base, base, r)
                    bk.direct = direct
                    for i in members:
                        c = lay.chunk[i]
                        n = min((r + 1) * c, numel[i]) - r * c
                        if n > 0:
                            bk.members.append((i, r * c, bk.end - bk.start, n))
                            bk.end += n
                    base = bk.end
                    if r == dp.rank:
                        arena = b.arenas[d]
                        bk.runs = [(bo, arena, b.arena_off[lay.slice_of[i]], n)
                                   for (i, _, bo, n) in bk.members]
                    buckets.append(bk)
        b.reducer = _GradComm(self.comm_stats, _Dtypes(dtypes), buckets, source="grad",
                              collective="reduce_scatter" if scatter else "reduce", keep="add")
        b.gather = None

    def _scatter_bucket(self, b, d, base, members):
        """One bucket of ``world`` segments for the group ``members``: segment ``r`` holds
        every member's chunk ``r`` back to back, each padded to its chunk size (the padding
        stays zero), so that every segment has the same size."""
        lay, world, rank = b.layout, self.dp.world, self.dp.rank
        seg = sum(lay.chunk[i] for i in members)
        bk = _Bucket(d, base, base + world * seg, None)
        bk.seg = seg
        arena = b.arenas[d]
        for r in range(world):
            at = r * seg
            for i in members:
                c = lay.chunk[i]
                n = min((r + 1) * c, _numel(b.managed[i])) - r * c
                if n > 0:
                    bk.members.append((i, r * c, at, n))
                    if r == rank:
                        bk.runs.append((at - r * seg, arena, b.arena_off[lay.slice_of[i]], n))
                at += c
        return bk

    def after_step(self, b):
        lay = b.layout
        with torch.no_grad():
            for i, p in enumerate(b.managed):
                if fetched_on_demand(p):
                    continue  # partitioned: the update wrote this rank's chunk on the tier
                flat = p.data.view(-1)
                for r, a, k in lay.pieces(i):
                    comm.broadcast(flat[a:a + k], r, stats=self.comm_stats)
        self.opt._mark_synced()
