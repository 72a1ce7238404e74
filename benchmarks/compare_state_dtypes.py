#!/usr/bin/env python3
"""Training quality and bytes moved of the optimizer state dtypes, on the GPT demo.

Runs examples/finetune_gpt.py once per strata.optimizer_state_dtype (same seed, same data, same
config otherwise: AdamW, state on NVMe), then prints, per dtype, the mean loss over the last
--window steps against fp32's, and the swap bytes read and written per step and parameter; and
draws the loss curves into one picture (OUT/loss_compare.png).

    PYTHONPATH=python /usr/bin/python3 benchmarks/compare_state_dtypes.py --steps 300 \\
        --out /tmp/state_dtypes --swap /var/tmp/sd_swap [--json]
"""

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--window", type=int, default=50, help="steps the final mean loss covers")
    ap.add_argument("--size", default="6x384")
    ap.add_argument("--states", default="fp32,bf16,int8_blockwise")
    ap.add_argument("--config", default=os.path.join(ROOT, "examples", "configs", "nvme.json"))
    ap.add_argument("--out", default="state_dtypes_out")
    ap.add_argument("--swap", default="strata_swap", help="folder for the swap files")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    states = [s for s in args.states.split(",") if s]
    os.makedirs(args.out, exist_ok=True)
    with open(args.config) as f:
        base = json.load(f)

    runs = {}
    for state in states:
        cfg = json.loads(json.dumps(base))
        cfg.setdefault("strata", {})["optimizer_state_dtype"] = state
        cfg["strata"].pop("trace", None)
        cfg["strata"]["progress"] = "off"
        off = cfg.setdefault("zero_optimization", {}).setdefault("offload_optimizer", {})
        if off.get("device") == "nvme":
            off["nvme_path"] = os.path.join(args.swap, state)
            os.makedirs(off["nvme_path"], exist_ok=True)
        out = os.path.join(args.out, state)
        os.makedirs(out, exist_ok=True)
        cfg_path = os.path.join(out, "config.json")
        with open(cfg_path, "w") as f:
            json.dump(cfg, f, indent=2)
        cmd = [sys.executable, os.path.join(ROOT, "examples", "finetune_gpt.py"), "--config",
               cfg_path, "--out", out, "--size", args.size, "--steps", str(args.steps),
               "--min-steps", str(args.steps), "--max-seconds", "1e9", "--seed", str(args.seed),
               "--progress", "off"]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "python"))
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        print(f"{state}: {' '.join(cmd)}", file=sys.stderr, flush=True)
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
        with open(os.path.join(out, "losses.json")) as f:
            losses = json.load(f)
        with open(os.path.join(out, "summary.json")) as f:
            summary = json.load(f)
        runs[state] = (losses, summary)

    ref = states[0]
    ref_last = sum(runs[ref][0][-args.window:]) / len(runs[ref][0][-args.window:])
    rows = []
    for state in states:
        losses, summary = runs[state]
        tail = losses[-args.window:]
        last = sum(tail) / len(tail)
        steps = max(1, summary["steps"])
        n = summary["params"]
        rows.append({
            "state": state, "steps": summary["steps"], "loss_first": losses[0],
            "loss_last_window": last, "vs_first_state": last / ref_last,
            "read_bytes_per_param_step": summary["swap_bytes_read"] / steps / n,
            "written_bytes_per_param_step": summary["swap_bytes_written"] / steps / n,
            "median_optimizer_step_s": summary["median_optimizer_step_s"],
        })
    if args.json:
        print(json.dumps({"reference": ref, "window": args.window, "rows": rows}, indent=2))
    else:
        print(f"{'state':<16}{'steps':>6}{'loss[0]':>9}{'last %d' % args.window:>9}"
              f"{'vs ' + ref:>10}{'read B/p':>10}{'write B/p':>10}{'opt step':>10}")
        for r in rows:
            print(f"{r['state']:<16}{r['steps']:>6}{r['loss_first']:>9.4f}"
                  f"{r['loss_last_window']:>9.4f}{r['vs_first_state']:>10.4f}"
                  f"{r['read_bytes_per_param_step']:>10.2f}"
                  f"{r['written_bytes_per_param_step']:>10.2f}"
                  f"{r['median_optimizer_step_s'] * 1e3:>8.1f}ms")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no loss_compare.png", file=sys.stderr)
        return 0
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for state in states:
        losses = runs[state][0]
        ax.plot(range(1, len(losses) + 1), losses, lw=1, label=state)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(f"GPT {args.size}, AdamW, optimizer state dtypes (seed {args.seed})")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = os.path.join(args.out, "loss_compare.png")
    fig.savefig(path, dpi=110)
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
