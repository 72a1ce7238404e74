"""Progress for long work: a bar on a terminal, periodic log lines otherwise.

``strata.progress`` in the config (or the ``mode`` argument) picks: ``auto`` (bar when stderr
is a terminal, log lines otherwise), ``bar``, ``log`` or ``off``. Log lines carry no terminal
control characters, so batch jobs and CI logs stay readable. Only rank 0 shows progress
unless told otherwise.
"""

import os
import sys
import time


def _rank():
    for var in ("RANK", "LOCAL_RANK"):
        if var in os.environ:
            try:
                return int(os.environ[var])
            except ValueError:
                pass
    return 0


def resolve_mode(mode="auto", stream=None):
    stream = stream or sys.stderr
    if mode not in ("auto", "bar", "log", "off"):
        raise ValueError(f"progress mode {mode!r} is not one of auto, bar, log, off")
    if mode == "auto":
        mode = "bar" if hasattr(stream, "isatty") and stream.isatty() else "log"
    if mode == "bar":
        try:
            import tqdm  # noqa: F401
        except ImportError:
            mode = "log"
    return mode


def _fmt_eta(seconds):
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Progress:
    """``with Progress(total, "train", unit="step") as p: p.update(1, loss=...)``

    ``budget_s``: the work also ends when this many seconds have passed (a demo's time
    budget). The ETA is then the sooner of the two ends, and the total shown (the bar's length,
    the ``n/total`` of log lines) is the count expected when the run actually stops.
    """

    def __init__(self, total, desc, *, unit="it", mode="auto", stream=None, interval=10.0,
                 all_ranks=False, scale=1.0, budget_s=None):
        self.stream = stream or sys.stderr
        self.mode = resolve_mode(mode, self.stream)
        if not all_ranks and _rank() != 0:
            self.mode = "off"
        self.total, self.desc, self.unit = total, desc, unit
        self.interval, self.scale = interval, scale
        self.budget_s = budget_s
        self.n = 0
        self.start = time.monotonic()
        self.last_log = self.start
        self.postfix = {}
        self.printed = False
        self._bar = None
        if self.mode == "bar":
            import tqdm

            self._bar = tqdm.tqdm(total=total, desc=desc, unit=unit, file=self.stream,
                                  dynamic_ncols=True, unit_scale=scale != 1.0)

    def expected_total(self, now=None):
        """The count at which the work ends: ``total``, or fewer when the time budget runs out
        first at the rate seen so far."""
        if self.budget_s is None or self.n == 0:
            return self.total
        elapsed = (now or time.monotonic()) - self.start
        if elapsed <= 0:
            return self.total
        at_budget = self.n + int(self.n / elapsed * max(0.0, self.budget_s - elapsed)) + 1
        return min(self.total, at_budget) if self.total else at_budget

    def update(self, n=1, **postfix):
        self.n += n
        self.postfix.update(postfix)
        if self.mode == "bar":
            expected = self.expected_total()
            if expected != self._bar.total:
                self._bar.total = max(expected, self.n)
                self._bar.refresh()
            if postfix:
                self._bar.set_postfix({k: _short(v) for k, v in self.postfix.items()}, refresh=False)
            self._bar.update(n)
        elif self.mode == "log":
            now = time.monotonic()
            done = self.total and self.n >= self.expected_total(now)
            # Work that finished within a second needs no line of its own; longer work shows
            # its first line once a second has passed (not only after `interval`), so a reader
            # sees it has started.
            first = not self.printed and now - self.start >= 1.0
            if first or now - self.last_log >= self.interval or \
                    (done and (self.printed or now - self.start >= 1.0)):
                self.last_log = now
                self._log_line(now)

    def _log_line(self, now):
        elapsed = now - self.start
        rate = self.n / elapsed if elapsed > 0 else 0.0
        expected = self.expected_total(now)
        eta = (expected - self.n) / rate if expected and rate > 0 else None
        if self.budget_s is not None:
            left = max(0.0, self.budget_s - elapsed)
            eta = left if eta is None else min(eta, left)
        total = f"/{expected}" if expected else ""
        unit = self.unit
        if self.budget_s is not None and expected != self.total:
            unit += f" (time budget {_fmt_eta(self.budget_s)})"
        extra = " ".join(f"{k}={_short(v)}" for k, v in self.postfix.items())
        self.printed = True
        print(f"[strata] {self.desc}: {self.n}{total} {unit} | {rate:.2f} {self.unit}/s | "
              f"elapsed {_fmt_eta(elapsed)} | eta {_fmt_eta(eta)}" + (f" | {extra}" if extra else ""),
              file=self.stream, flush=True)

    def close(self):
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.mode == "log" and self.n and (not self.total or self.n < self.expected_total()) \
                and (self.printed or time.monotonic() - self.start >= 1.0):
            self._log_line(time.monotonic())

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def _short(v):
    if isinstance(v, float):
        return f"{v:.4g}"
    return v


class EngineProgress:
    """Callable for ``_C.Engine(progress=...)``: one bar (or log lines) per phase of the
    engine's creation — pinning the pool, writing the initial state to the tiers — shown only
    for work of at least ``min_bytes``, in MiB."""

    def __init__(self, mode="auto", min_bytes=256 << 20):
        self.mode, self.min_bytes = mode, min_bytes
        self.phase, self.bar, self.last = None, None, 0

    def __call__(self, phase, done, total):
        if total < self.min_bytes:
            return
        if phase != self.phase:
            self.close()
            self.phase, self.last = phase, 0
            self.bar = Progress(total >> 20, phase, unit="MiB", mode=self.mode, interval=5.0)
        step = (done >> 20) - self.last
        if step > 0:
            self.bar.update(step)
            self.last += step
        if done >= total:
            self.close()

    def close(self):
        if self.bar is not None:
            self.bar.close()
        self.bar, self.phase = None, None
