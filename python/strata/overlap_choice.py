"""``strata.overlap_mode: auto``: whether an overlapped backward can win, from measured phases.

An overlapped backward (``strata.overlap_backward``) starts the step's work while autograd
runs: the state's I/O (fetches, in exact mode a prefetch) and, in eager mode, the updates.
What it can hide is bounded by what the step has to hide and by the cores:

- the I/O runs on the drive and costs little CPU, so it hides behind backward either way;
- an update needs a core: beside torch's threads on a machine whose cores they fill, it only
  takes cores from backward, so it hides only where a core is free (and never in exact mode,
  whose updates wait for the global gradient norm).

So the most an overlapped step can save is ``min(backward, hideable)``, with ``hideable`` the
I/O's busy time, or the larger of it and the update's where a core is free in eager mode. The
overlapped path has costs of its own (a hook per parameter, hand-offs to the update
pipeline, backward slowed by what runs beside it): on the overlap matrix's cells with the
state in memory (docs/performance.md, "Overlap with backward, the matrix") it measured
0.93-1.04x where the phases allowed at most 1.01-1.11x. Below ``MIN_GAIN`` of the step the
engine therefore runs a plain backward and then the step.

``choose`` is a pure function of measured seconds; ``decide`` reads them from an optimizer.
The engine (strata.engine) measures them in the second step and decides once;
benchmarks/bench_overlap.py does the same for its "on" optimizer.
"""

import torch

MIN_GAIN = 0.05  # fraction of the step an overlapped backward must be able to hide


def decide(opt, *, forward_s, backward_s, step_s, exact):
    """``choose`` for a strata optimizer's step just taken: its busy times from
    ``opt.step_breakdown()``, the free cores from the usable CPUs and torch's threads."""
    from . import _C

    br = opt.step_breakdown()
    free = max(0, int(_C.usable_cpus()) - torch.get_num_threads())
    return choose(forward_s=forward_s, backward_s=backward_s, step_s=step_s,
                  update_s=float(br.get("compute_busy_s", 0.0)),
                  io_s=float(br.get("io_busy_s", 0.0)), free_cores=free, exact=exact)


def choose(*, forward_s, backward_s, step_s, update_s, io_s, free_cores, exact):
    """Returns ``(overlap, why)``: True when an overlapped backward can hide at least
    ``MIN_GAIN`` of the step, and a sentence with the figures it was decided from.

    ``forward_s``, ``backward_s``: the step's forward and backward (all its micro-steps);
    ``step_s``: the optimizer step after backward; ``update_s``, ``io_s``: the engine's busy
    time updating and moving state in that step (``step_breakdown()``: compute_busy_s,
    io_busy_s); ``free_cores``: usable CPUs beside torch's intra-op threads; ``exact``:
    clipping or fp16 (updates wait for the norm)."""
    update_hides = free_cores > 0 and not exact
    hideable = max(io_s, update_s) if update_hides else io_s
    whole = forward_s + backward_s + max(step_s, io_s, update_s)
    gain = min(backward_s, hideable)
    frac = gain / whole if whole > 0 else 0.0
    parts = [f"the state's I/O {io_s * 1e3:.0f} ms"]
    if update_hides:
        parts.append(f"the update {update_s * 1e3:.0f} ms (a core is free beside torch's "
                     "threads)")
    elif exact:
        parts.append("not the update (exact mode: it waits for the gradient norm)")
    else:
        parts.append("not the update (torch's threads fill every core)")
    why = (f"an overlapped backward could hide at most {gain * 1e3:.0f} ms of a "
           f"{whole:.3f} s step ({frac * 100:.1f}%: {' and '.join(parts)}, beside a "
           f"{backward_s:.3f} s backward)")
    return frac >= MIN_GAIN, why
