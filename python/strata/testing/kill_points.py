"""Kill points: a test hook that makes the process SIGKILL itself at a chosen place, so that
crash-safety tests (tests/python/test_checkpoint_resume.py) cover every phase deterministically
rather than by luck of timing. The C++ engine has points of its own that read the same variable
(csrc/engine/kill_point.h).

``STRATA_TEST_KILL_AT=point:N`` (comma-separated for several) makes the process SIGKILL itself
the N-th time (1-based) it reaches a kill point whose name is ``point`` or starts with
``point_``: ``forward``, ``backward``, ``step_begin``, ``update`` (sent from a helper thread
while the C++ step runs), ``step_end``, ``save_begin``, ``save_state`` (after each parameter's
state is written), ``save_model``, ``save_before_rename``, ``save_after_rename``,
``save_after_latest``, ``load_begin``. ``save:3`` is the third save point reached.

Production code calls ``kill_point(name)`` (or ``kill_during(name)``); without the variable in
the environment that is one dictionary lookup and nothing else.
"""

import contextlib
import os
import signal
import sys
import threading
import time

_kill_counts = {}


def _kill_specs():
    spec = os.environ.get("STRATA_TEST_KILL_AT", "")
    out = []
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        name, _, index = item.partition(":")
        try:
            n = int(index) if index else 1
        except ValueError:
            raise ValueError(f"STRATA_TEST_KILL_AT: {item!r} is not point:index") from None
        out.append((name, n))
    return out



def _kill_match(point):
    for name, n in _kill_specs():
        if point == name or point.startswith(name + "_"):
            key = f"{name}:{n}"
            _kill_counts[key] = _kill_counts.get(key, 0) + 1
            if _kill_counts[key] == n:
                return True
    return False



def _die():
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(60)  # SIGKILL is delivered before this returns



def kill_point(point):
    """SIGKILL this process here when STRATA_TEST_KILL_AT selects this point."""
    if "STRATA_TEST_KILL_AT" in os.environ and _kill_match(point):
        _die()



@contextlib.contextmanager
def kill_during(point):
    """SIGKILL this process from a helper thread while a C++ call that releases the GIL runs,
    when STRATA_TEST_KILL_AT selects this point. Yields ``arm``: call it right before the C++
    call (or never, for no kill); the thread then sends the signal as soon as it gets the GIL,
    which the C++ call has just released."""
    if "STRATA_TEST_KILL_AT" not in os.environ or not _kill_match(point):
        yield None
        return
    go = threading.Event()
    t = threading.Thread(target=lambda: (go.wait(), os.kill(os.getpid(), signal.SIGKILL)),
                         daemon=True)
    t.start()
    yield go.set
    if go.is_set():
        time.sleep(60)  # the signal lands while or right after the call ran

