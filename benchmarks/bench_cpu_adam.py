#!/usr/bin/env python3
"""strata's CPU AdamW kernel against torch.optim.AdamW(foreach=True) on the same data.

    PYTHONPATH=python /usr/bin/python3 benchmarks/bench_cpu_adam.py --sizes 16M,64M --threads 2

Both update fp32 master weights, m and v from fp32 gradients with the same hyper-parameters,
on the same number of threads (torch's intra-op threads = strata's kernel threads); the table
gives G params/s and strata's speed-up. The kernel's ratio to the machine's memory-bandwidth
bound is measured by build/bin/strata-bench-adam.
"""

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))

import torch  # noqa: E402

from strata import _C  # noqa: E402


def size(text):
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(float(text[:-1]) * mult[text[-1].upper()]) if text[-1].upper() in mult else int(float(text))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="4M,16M,64M")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    hyper = {"kind": "adamw", "lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01}
    if not args.json:
        print(f"{'numel':>12} {'torch G/s':>10} {'strata G/s':>11} {'speed-up':>9}   (threads {args.threads}, "
              f"torch {torch.__version__}, kernel {_C.detect_isa()})")
    for n in (size(s) for s in args.sizes.split(",")):
        p = torch.randn(n)
        g = torch.randn(n) * 1e-2
        m, v = torch.zeros(n), torch.zeros(n)
        # torch: one foreach AdamW step per iteration on the same tensors.
        tp = p.clone().requires_grad_(False)
        opt = torch.optim.AdamW([tp], foreach=True, **{k: hyper[k] for k in ("lr", "betas", "eps", "weight_decay")})
        tp.grad = g
        opt.step()  # state allocated outside the timing
        times_t, times_s = [], []
        for i in range(args.iters):
            t0 = time.perf_counter()
            opt.step()
            times_t.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            _C.optimizer_step(hyper, i + 1, 1.0, [p.data_ptr(), m.data_ptr(), v.data_ptr()], n,
                              g.data_ptr(), "float32", [], "float32", args.threads)
            times_s.append(time.perf_counter() - t0)
        rt, rs = n / statistics.median(times_t) / 1e9, n / statistics.median(times_s) / 1e9
        row = {"numel": n, "torch_gparams_per_s": rt, "strata_gparams_per_s": rs, "speedup": rs / rt,
               "threads": args.threads}
        if args.json:
            print(json.dumps(row))
        else:
            print(f"{n:>12} {rt:>10.3f} {rs:>11.3f} {rs / rt:>8.1f}x")


if __name__ == "__main__":
    main()
