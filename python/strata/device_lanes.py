"""The compute device as ZeRO stage 3 sees it: copy lanes for weights (H2D) and gradients (D2H).

With a model on a GPU, the param window (``strata.param_tier``) brings each module's weights
from the param tier into host staging memory (a pinned record with ``offload_param: cpu``, a
staging buffer read from NVMe or CXL) and from there to the device on a **weight stream** of
its own; the compute stream waits for that copy's event before the module runs. A gradient,
once final, goes back on a **gradient stream** of its own, after an event recorded on the
compute stream when autograd produced it, into a pinned host buffer; a watcher thread waits
for the copy's event and adds the gradient into the optimizer's arena (and, during an
overlapped backward, tells the engine it is final). Backward never waits for a D2H copy
except when every host buffer of the gradient lane is in flight.

``Lanes`` is that interface; ``CudaLanes`` implements it with torch.cuda streams and events;
``HostEmulatedLanes`` implements it on the host for machines without a GPU (the tests): its
"device memory" is host tensors filled with NaN when allocated, and each lane is a thread
that runs its copies in order, each after a delay, so that a module that ran before its
weights' copy completed, a host buffer reused before its copy read it, or a gradient read
before its D2H copy landed all give wrong numbers (NaN or another parameter's bytes) instead
of passing by luck. What it cannot check: the CUDA caching allocator's stream bookkeeping
(``record_stream``), because Python references keep emulated memory alive.

Thread-safety: one compute thread calls every method except ``synchronize``/``query``, which
the gradient watcher also calls. Units: elements and bytes; times in seconds.
"""

import abc
import collections
import queue
import threading
import time
import weakref

import torch


class Lanes(abc.ABC):
    """What the window and the gradient path need from the compute device (an interface:
    ``CudaLanes`` and ``HostEmulatedLanes`` implement every abstract method)."""

    name = "?"
    device = torch.device("cpu")  # where the model computes (its tensors' device)

    @abc.abstractmethod
    def empty(self, numel, dtype):
        """Flat device memory for a parameter's weights (allocated for the weight lane)."""

    def placeholder(self, dtype):
        """An empty tensor on the device: a released parameter's ``.data``."""
        return torch.empty(0, dtype=dtype, device=self.device)

    @abc.abstractmethod
    def host_buffer(self, numel, dtype):
        """Host memory the device copies to and from at full speed (pinned)."""

    @abc.abstractmethod
    def h2d(self, dst, src):
        """Copies host ``src`` into device ``dst`` on the weight lane; returns its event.
        ``src`` must stay unchanged until the event completed."""

    @abc.abstractmethod
    def use_on_compute(self, t, event):
        """The compute stream waits for ``event`` before it uses device tensor ``t``."""

    @abc.abstractmethod
    def record_compute(self):
        """An event on the compute stream now (after the work enqueued so far)."""

    @abc.abstractmethod
    def d2h(self, dst, src, after):
        """Copies device ``src`` into host ``dst`` on the gradient lane once ``after`` (a
        compute event) completed; returns its event. ``src`` may be dropped at once."""

    @abc.abstractmethod
    def to_host(self, dst, src):
        """Synchronous copy of device ``src`` into host ``dst`` (after the compute stream's
        work so far): a gathered parameter a user changed."""

    @abc.abstractmethod
    def synchronize(self, event):
        """The calling host thread waits for ``event``."""

    @abc.abstractmethod
    def query(self, event):
        """True when ``event`` completed (never blocks)."""

    def stats(self):
        return {}

    def close(self):
        """Stops what the lanes run (threads); in-flight copies complete first."""


class CudaLanes(Lanes):
    """torch.cuda streams and events: weights H2D on one stream, gradients D2H on another,
    both ordered against the model's current stream by events."""

    name = "cuda"

    def __init__(self, device):
        self.device = torch.device(device)
        self.weights = torch.cuda.Stream(self.device)
        self.grads = torch.cuda.Stream(self.device)
        self.h2d_bytes = self.d2h_bytes = self.h2d_copies = self.d2h_copies = 0

    def empty(self, numel, dtype):
        with torch.cuda.stream(self.weights):
            return torch.empty(numel, dtype=dtype, device=self.device)

    def host_buffer(self, numel, dtype):
        return torch.empty(numel, dtype=dtype, pin_memory=True)

    def h2d(self, dst, src):
        ev = torch.cuda.Event()
        with torch.cuda.stream(self.weights):
            dst.copy_(src, non_blocking=True)
            ev.record(self.weights)
        self.h2d_bytes += src.numel() * src.element_size()
        self.h2d_copies += 1
        return ev

    def use_on_compute(self, t, event):
        cur = torch.cuda.current_stream(self.device)
        cur.wait_event(event)
        t.record_stream(cur)  # the allocator keeps t's memory until the compute used it

    def record_compute(self):
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(self.device))
        return ev

    def d2h(self, dst, src, after):
        self.grads.wait_event(after)
        ev = torch.cuda.Event()
        with torch.cuda.stream(self.grads):
            dst.copy_(src, non_blocking=True)
            ev.record(self.grads)
        src.record_stream(self.grads)  # src's memory is not reused before the copy read it
        self.d2h_bytes += src.numel() * src.element_size()
        self.d2h_copies += 1
        return ev

    def to_host(self, dst, src):
        dst.copy_(src)  # on the current stream, synchronous for pageable or pinned dst

    def synchronize(self, event):
        event.synchronize()

    def query(self, event):
        return event.query()

    def stats(self):
        return {"lanes": self.name, "h2d_bytes": self.h2d_bytes, "h2d_copies": self.h2d_copies,
                "d2h_bytes": self.d2h_bytes, "d2h_copies": self.d2h_copies}


class _EmuEvent:
    __slots__ = ("flag", "done_ns")

    def __init__(self, done=False):
        self.flag = threading.Event()
        self.done_ns = None
        if done:
            self.flag.set()


class _EmuLane:
    """One emulated stream: a thread running its operations in submit order."""

    def __init__(self, name, delay_s):
        self.name = name
        self.delay_s = delay_s
        self.q = queue.Queue()
        self.error = None
        self.busy_s = 0.0
        self.log = []  # (what, start_ns, end_ns)
        self.thread = threading.Thread(target=self._run, name=f"strata-emu-{name}", daemon=True)
        self.thread.start()

    def _run(self):
        while True:
            item = self.q.get()
            if item is None:
                return
            what, fn, ev = item
            t0 = time.monotonic_ns()
            try:
                if self.delay_s:
                    time.sleep(self.delay_s)
                fn()
            except BaseException as exc:  # reported by the next synchronize
                self.error = exc
            t1 = time.monotonic_ns()
            self.busy_s += (t1 - t0) / 1e9
            self.log.append((what, t0, t1))
            ev.done_ns = t1
            # The copy's tensors go now, not when the next item arrives: a device tensor a
            # finished copy held would count as live device memory.
            del item, fn
            ev.flag.set()

    def submit(self, what, fn):
        ev = _EmuEvent()
        self.q.put((what, fn, ev))
        return ev

    def close(self):
        self.q.put(None)
        self.thread.join()


class HostEmulatedLanes(Lanes):
    """The device emulated on the host (tests on machines without a GPU): see the module
    doc. ``delay_s`` is how long each copy waits before it runs."""

    name = "host-emulated"

    def __init__(self, delay_s=0.001):
        self.device = torch.device("cpu")
        self.weights = _EmuLane("weights", delay_s)
        self.grads = _EmuLane("grads", delay_s)
        self.h2d_bytes = self.d2h_bytes = self.h2d_copies = self.d2h_copies = 0
        self.compute_waits = 0
        self.compute_wait_s = 0.0
        self.waits_already_done = 0  # events complete when the compute asked (overlapped)
        self.device_bytes = 0
        self.device_peak_bytes = 0
        self._lock = threading.Lock()

    def _freed(self, nbytes):
        with self._lock:
            self.device_bytes -= nbytes

    def empty(self, numel, dtype):
        t = torch.empty(numel, dtype=dtype)
        if t.is_floating_point():
            t.fill_(float("nan"))  # what a module reading it too early computes with
        else:
            t.fill_(-1)
        nbytes = numel * t.element_size()
        with self._lock:
            self.device_bytes += nbytes
            self.device_peak_bytes = max(self.device_peak_bytes, self.device_bytes)
        weakref.finalize(t, self._freed, nbytes)
        return t

    def host_buffer(self, numel, dtype):
        t = torch.empty(numel, dtype=dtype)
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    def h2d(self, dst, src):
        self.h2d_bytes += src.numel() * src.element_size()
        self.h2d_copies += 1
        # Only a weak reference: on a GPU the copy holds no reference either, so the caller
        # must keep the host memory until the event completed; here a copy whose source was
        # let go fails instead of reading memory reused meanwhile.
        ref = weakref.ref(src)

        def copy():
            s = ref()
            if s is None:
                raise RuntimeError("emulated device: the host memory of an H2D copy was let "
                                   "go before the copy ran")
            dst.copy_(s)
        return self.weights.submit("h2d", copy)

    def use_on_compute(self, t, event):
        self.compute_waits += 1
        if event.flag.is_set():
            self.waits_already_done += 1
        else:
            t0 = time.monotonic()
            event.flag.wait()
            self.compute_wait_s += time.monotonic() - t0
        if self.weights.error is not None:
            raise self.weights.error

    def record_compute(self):
        return _EmuEvent(done=True)  # the emulated compute runs on the calling thread

    def d2h(self, dst, src, after):
        self.d2h_bytes += src.numel() * src.element_size()
        self.d2h_copies += 1

        def copy():
            after.flag.wait()
            dst.copy_(src)
        return self.grads.submit("d2h", copy)

    def to_host(self, dst, src):
        dst.copy_(src)

    def synchronize(self, event):
        event.flag.wait()
        for lane in (self.weights, self.grads):
            if lane.error is not None:
                raise lane.error

    def query(self, event):
        return event.flag.is_set()

    def stats(self):
        return {"lanes": self.name, "h2d_bytes": self.h2d_bytes, "h2d_copies": self.h2d_copies,
                "d2h_bytes": self.d2h_bytes, "d2h_copies": self.d2h_copies,
                "compute_waits": self.compute_waits,
                "waits_already_done": self.waits_already_done,
                "compute_wait_s": self.compute_wait_s,
                "device_weight_bytes": self.device_bytes,
                "device_weight_peak_bytes": self.device_peak_bytes,
                "weight_lane_busy_s": self.weights.busy_s, "grad_lane_busy_s": self.grads.busy_s}

    def close(self):
        self.weights.close()
        self.grads.close()


class GradLane:
    """Final gradients of device parameters from the device into the optimizer's arena.

    ``submit`` (a gradient hook, on the compute thread) starts the D2H copy of ``g`` into one
    of ``buffers`` host buffers and returns; a watcher thread waits for the copy, then calls
    ``land(host_view)`` — the add into the arena and, in an overlapped backward, the engine's
    "final" mark. ``drain`` waits until everything submitted has landed and raises the first
    error of a ``land``. Backward waits only when all buffers are in flight."""

    def __init__(self, lanes, buffers=4):
        self.lanes = lanes
        self.buffers = max(1, int(buffers))
        self._free = collections.defaultdict(list)  # dtype -> host buffers (largest first)
        self._count = 0
        self._avail = threading.Condition()
        self._q = queue.Queue()
        self._pending = 0
        self._error = None
        self._thread = None
        self.submit_wait_s = 0.0
        self.landed = 0

    def _take(self, numel, dtype):
        """A host buffer of at least ``numel`` elements of ``dtype``: a free one that fits, a
        new one while fewer than ``buffers`` exist (a free one that does not fit is replaced),
        else wait for one to come back."""
        t0 = time.monotonic()
        with self._avail:
            while True:
                pool = self._free[dtype]
                for k, buf in enumerate(pool):
                    if buf.numel() >= numel:
                        self.submit_wait_s += time.monotonic() - t0
                        return pool.pop(k)
                if self._count < self.buffers:
                    self._count += 1
                    break
                unfit = next((p for p in self._free.values() if p), None)
                if unfit is not None:
                    unfit.pop()  # its place goes to a buffer of this size
                    break
                self._avail.wait()
        self.submit_wait_s += time.monotonic() - t0
        return self.lanes.host_buffer(numel, dtype)

    def _give(self, buf):
        with self._avail:
            self._free[buf.dtype].append(buf)
            self._free[buf.dtype].sort(key=lambda b: -b.numel())
            self._avail.notify()

    def submit(self, g, land):
        if self._error is not None:
            raise self._error
        flat = g.detach().reshape(-1)
        buf = self._take(flat.numel(), flat.dtype)
        host = buf[:flat.numel()]
        ev = self.lanes.d2h(host, flat, self.lanes.record_compute())
        if self._thread is None:
            self._thread = threading.Thread(target=self._watch, name="strata-grad-d2h",
                                            daemon=True)
            self._thread.start()
        with self._avail:
            self._pending += 1
        self._q.put((ev, buf, host.view(g.shape), land))

    def _watch(self):
        while True:
            item = self._q.get()
            if item is None:
                return
            ev, buf, host, land = item
            try:
                self.lanes.synchronize(ev)
                if self._error is None:
                    land(host)
                    self.landed += 1
            except BaseException as exc:
                if self._error is None:
                    self._error = exc
            finally:
                self._give(buf)
                with self._avail:
                    self._pending -= 1
                    self._avail.notify_all()

    def drain(self):
        with self._avail:
            while self._pending:
                self._avail.wait()
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    def close(self):
        if self._thread is not None:
            self._q.put(None)
            self._thread.join()
            self._thread = None
