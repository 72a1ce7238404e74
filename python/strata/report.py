"""Pictures of a step: ``python -m strata report TRACE.json -o step.png``.

Reads the Chrome/Perfetto trace the engine writes (``strata.trace`` in the config, or
``optimizer.write_trace(path)``) and draws one lane per resource the engine recorded (NVMe
read, NVMe write, CPU update, and GPU update, H2D, D2H, forward, backward, and the param tier's
weight read and weight write at stage 3, where recorded), a bar
per sub-group and stage, the step's start and end, and the bound a perfect pipeline would reach
(max of I/O busy and update busy after the step's start) as lines; the caption gives the step
breakdown (busy %, overlap %, stall).
"""

import json

# Lanes in drawing order (top to bottom); names match the engine's thread names.
LANE_ORDER = ["forward", "backward", "weight read", "NVMe read", "CXL fetch", "H2D", "CPU update",
              "GPU update", "D2H", "NVMe write", "weight write", "CXL store"]
COLORS = {"NVMe read": "#4C72B0", "CXL fetch": "#64B5CD", "H2D": "#8172B2", "CPU update": "#55A868",
          "GPU update": "#2E8B57", "D2H": "#CCB974", "NVMe write": "#C44E52", "CXL store": "#DD8452",
          "forward": "#999999", "backward": "#777777", "weight read": "#2A5783",
          "weight write": "#8C2D2F"}


def load_trace(path):
    with open(path) as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    other = data.get("otherData", {}) if isinstance(data, dict) else {}
    return events, other


def lanes_of(events):
    names = {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "thread_name":
            names[e["tid"]] = e["args"]["name"]
    used = {names.get(e["tid"], str(e["tid"])) for e in events if e.get("ph") == "X"}
    used.discard("step")
    ordered = [n for n in LANE_ORDER if n in used] + sorted(used - set(LANE_ORDER))
    return names, ordered


def _busy(intervals):
    total, end = 0.0, None
    for a, b in sorted(intervals):
        if end is None or a > end:
            total += b - a
            end = b
        elif b > end:
            total += b - end
            end = b
    return total


def select_steps(events, steps=1):
    """Events of the last `steps` steps (all when steps is None), metadata kept."""
    xs = [e for e in events if e.get("ph") == "X"]
    ids = sorted({e.get("args", {}).get("step") for e in xs if e.get("args", {}).get("step") is not None})
    if steps is None or len(ids) <= steps:
        return events
    keep = set(ids[-steps:])
    return [e for e in events if e.get("ph") != "X" or e.get("args", {}).get("step") in keep]


def build_figure(events, other=None, title=None, steps=1):
    """Returns (figure, lane names) for the last `steps` steps. No file is written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    events = select_steps(events, steps)
    names, lanes = lanes_of(events)
    xs = [e for e in events if e.get("ph") == "X"]
    if not xs:
        raise ValueError("the trace has no events")
    t0 = min(e["ts"] for e in xs)
    fig_h = 1.2 + 0.55 * max(1, len(lanes))
    fig, ax = plt.subplots(figsize=(11, fig_h))
    y_of = {lane: len(lanes) - 1 - i for i, lane in enumerate(lanes)}
    io, upd, steps = [], [], []
    for e in xs:
        lane = names.get(e["tid"], str(e["tid"]))
        start, dur = (e["ts"] - t0) / 1e3, e["dur"] / 1e3  # ms
        if lane == "step":
            steps.append((start, start + dur))
            continue
        y = y_of[lane]
        ax.barh(y, dur, left=start, height=0.7, color=COLORS.get(lane, "#888888"),
                edgecolor="white", linewidth=0.4)
        sg = e.get("args", {}).get("subgroup", -1)
        if sg is not None and sg >= 0 and dur > 0:
            ax.text(start + dur / 2, y, str(sg), ha="center", va="center", fontsize=6, color="white",
                    clip_on=True)
        if lane in ("NVMe read", "NVMe write", "CXL fetch", "CXL store", "H2D", "D2H"):
            io.append((start, start + dur))
        elif lane in ("CPU update", "GPU update"):
            upd.append((start, start + dur))
    for i, (a, b) in enumerate(steps):
        ax.axvline(a, color="black", lw=0.8, ls="-")
        ax.axvline(b, color="black", lw=0.8, ls="-")
        in_step = lambda iv: [(max(x, a), min(y, b)) for x, y in iv if y > a and x < b]  # noqa: E731
        bound = a + max(_busy(in_step(io)), _busy(in_step(upd)))
        ax.axvline(bound, color="black", lw=1.0, ls="--",
                   label="bound: max(I/O busy, update busy)" if i == 0 else None)
    ax.set_yticks([y_of[l] for l in lanes])
    ax.set_yticklabels(lanes)
    ax.set_xlabel("time (ms)")
    ax.set_ylim(-0.6, len(lanes) - 0.4)
    if steps:
        ax.legend(loc="upper right", fontsize=8)
    bd = (other or {}).get("breakdown") or {}
    if bd.get("wall_s"):
        w = bd["wall_s"]
        caption = (f"step {bd.get('step', '?')}: {w * 1e3:.1f} ms | I/O busy {100 * bd['io_busy_s'] / w:.0f}% | "
                   f"update busy {100 * bd['compute_busy_s'] / w:.0f}% | overlap {100 * bd['overlap_s'] / w:.0f}% | "
                   f"stall {100 * bd['stall_s'] / w:.0f}%")
    else:
        caption = "no step breakdown in the trace"
    ax.set_title(title or "strata step timeline", fontsize=11)
    fig.text(0.01, 0.01, caption, fontsize=9, ha="left", va="bottom")
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return fig, lanes


def render(trace_path, out_png, title=None, steps=1):
    events, other = load_trace(trace_path)
    fig, lanes = build_figure(events, other, title, steps)
    fig.savefig(out_png, dpi=120)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return lanes
