#!/usr/bin/env python3
"""Updates overlapped with backward vs not, on the CPU with the optimizer state on NVMe.

Alternates steps with overlap on and off on the same model and optimizer (results are
bit-identical either way), takes the median of each after a warm-up, and prints beside the
measured speed-up the ideal one computed from the measured phases of the off steps:
(backward + step) / max(backward, step) — what a perfect overlap of the two would give.

    PYTHONPATH=python /usr/bin/python3 benchmarks/bench_overlap.py --params 100M --path /tmp/x
    ... --clip 1.0    # exact mode: global-norm clipping needs every gradient first
    ... --shape client --batch 256 --sub-group-size 4200000 --threads 2   # issue 20's client
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

import strata.optim  # noqa: E402


def size(text):
    mult = {"K": 1e3, "M": 1e6, "G": 1e9}
    return int(float(text[:-1]) * mult[text[-1].upper()]) if text[-1].upper() in mult else int(float(text))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="square", choices=["square", "client"],
                    help="square: an MLP of --params in square layers of --width with Tanh; client: "
                         "issue 20's unseen client, 6 blocks of Linear(1024, 4096) -> GELU -> "
                         "Linear(4096, 1024), 50M parameters (--params and --width unused)")
    ap.add_argument("--params", default="100M", help="trainable parameters (an MLP of square layers)")
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=384, help="rows per step (sets the backward time)")
    ap.add_argument("--path", default=None, help="swap folder (default: a temp folder in .)")
    ap.add_argument("--sub-group-size", type=int, default=8 << 20)
    ap.add_argument("--buffer-count", type=int, default=4)
    ap.add_argument("--steps", type=int, default=5, help="measured steps per mode")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--clip", type=float, default=0.0, help="global-norm clip (0: none, eager mode)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    if args.shape == "client":
        args.width = 1024
        model = nn.Sequential(*[m for _ in range(6) for m in (
            nn.Linear(1024, 4096), nn.GELU(), nn.Linear(4096, 1024))])
    else:
        n = size(args.params)
        layers = max(1, round(n / (args.width * args.width + args.width)))
        model = nn.Sequential(*[m for _ in range(layers)
                                for m in (nn.Linear(args.width, args.width), nn.Tanh())])
    nparams = sum(p.numel() for p in model.parameters())
    swap = args.path or tempfile.mkdtemp(prefix="strata-overlap-", dir=".")
    os.makedirs(swap, exist_ok=True)
    cfg = {"zero_optimization": {"sub_group_size": args.sub_group_size,
                                 "offload_optimizer": {"device": "nvme", "nvme_path": swap,
                                                       "buffer_count": args.buffer_count}},
           "aio": {"block_size": 1 << 20, "queue_depth": 32}}
    opt = strata.optim.OffloadAdamW(model.parameters(), lr=1e-5, config=cfg)
    x = torch.randn(args.batch, args.width)
    exact = args.clip > 0
    rows = {"on": [], "off": []}
    phases = {"on": [], "off": []}
    total = 2 * (args.warmup + args.steps)
    for i in range(total):
        mode = "on" if i % 2 else "off"
        t0 = time.perf_counter()
        loss = model(x).square().mean()
        t1 = time.perf_counter()
        opt.zero_grad()
        if mode == "on":
            opt.backward(loss, exact=exact)
        else:
            loss.backward()
        t2 = time.perf_counter()
        if exact:
            sum_sq, _ = opt.grad_stats()
            opt._pending_grad_mul = min(1.0, args.clip / (sum_sq ** 0.5 + 1e-6))
        opt.step()
        t3 = time.perf_counter()
        if i >= 2 * args.warmup:
            rows[mode].append(t3 - t0)
            phases[mode].append((t1 - t0, t2 - t1, t3 - t2))
    st = opt.stats()
    opt.close()

    med = {m: statistics.median(v) for m, v in rows.items()}
    fwd = statistics.median(p[0] for p in phases["off"])
    bwd = statistics.median(p[1] for p in phases["off"])
    step = statistics.median(p[2] for p in phases["off"])
    ideal = (fwd + bwd + step) / (fwd + max(bwd, step))
    speedup = med["off"] / med["on"]
    result = {"shape": args.shape, "params": nparams, "state_bytes": 12 * nparams,
              "mode": "exact" if exact else "eager", "torch_threads": args.threads,
              "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset"),
              "step_off_s": med["off"], "step_on_s": med["on"], "speedup": speedup,
              "ideal_speedup": ideal, "forward_s": fwd, "backward_s": bwd, "optimizer_step_off_s": step,
              "io_backend": st["io_backend"], "steps_each": args.steps}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{nparams / 1e6:.0f}M params ({12 * nparams / 2**30:.2f} GiB of state on NVMe), "
              f"{'exact (clip %.2g)' % args.clip if exact else 'eager (no clipping)'} mode, "
              f"median of {args.steps} steps each, alternating")
        print(f"  off: forward {fwd:.3f} s, backward {bwd:.3f} s, optimizer step {step:.3f} s")
        print(f"  step time   off {med['off']:.3f} s   on {med['on']:.3f} s")
        print(f"  speed-up    {speedup:.2f}x   (ideal from the measured phases: {ideal:.2f}x)")
        print("  all off:", " ".join(f"{t:.3f}" for t in rows["off"]))
        print("  all on: ", " ".join(f"{t:.3f}" for t in rows["on"]))


if __name__ == "__main__":
    main()
