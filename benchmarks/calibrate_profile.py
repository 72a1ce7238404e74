#!/usr/bin/env python3
"""Writes a hardware profile (benchmarks/profiles/*.json) from strata's own calibration.

    PYTHONPATH=python /usr/bin/python3 benchmarks/calibrate_profile.py --swap-dir /tmp/model-swap \\
        --runs 5 --name "this machine: ..." --out benchmarks/profiles/this-machine.json

Runs `_C.calibrate` (the CPU kernel, checksums, gradient statistics, then the NVMe rates on the
swap folder) --runs times back to back with the config {offload_optimizer: {device: nvme,
nvme_path: SWAP}, aio: {block_size: 1 MiB, queue_depth: 32}}, keeps the run with the median NVMe
read rate, and adds the name and notes giving the date, the load average and the spread of the
runs (the machine may be shared: calibrating at start, strata.hardware_profile not given, is
better than reusing these figures).
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))

from strata import _C  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--swap-dir", default="/tmp/model-swap")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--name", required=True, help="what machine this is")
    ap.add_argument("--note", action="append", default=[], help="an extra note (repeatable)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    os.makedirs(args.swap_dir, exist_ok=True)
    cfg = {"offload_optimizer": {"device": "nvme", "nvme_path": args.swap_dir},
           "aio": {"block_size": 1 << 20, "queue_depth": 32}}
    runs, loads = [], []
    for i in range(args.runs):
        loads.append(os.getloadavg()[0])
        prof = _C.calibrate(json.dumps(cfg), args.swap_dir)
        runs.append(prof)
        print(f"run {i + 1}: fp32 {prof['cpu_update_params_per_s']['fp32'] / 1e9:.2f} "
              f"bf16 {prof['cpu_update_params_per_s']['bf16'] / 1e9:.2f} "
              f"1-thread {prof['cpu_update_params_per_s_1thread'] / 1e9:.2f} G params/s, "
              f"NVMe read {prof['nvme_read_bytes_per_s'] / 1e9:.2f} write {prof['nvme_write_bytes_per_s'] / 1e9:.2f} GB/s"
              f" (load {loads[-1]:.1f})")
    by_read = sorted(runs, key=lambda p: p["nvme_read_bytes_per_s"])
    prof = by_read[len(by_read) // 2]

    def span(key, sub=None, scale=1e9):
        vals = [(p[key][sub] if sub else p[key]) / scale for p in runs]
        return f"{min(vals):.2f}-{max(vals):.2f}"

    prof["name"] = args.name
    prof["notes"] = [
        f"The median (by NVMe read rate) of {args.runs} calibrations run back to back on "
        f"{time.strftime('%Y-%m-%d')} with config {json.dumps(cfg)} "
        f"(benchmarks/calibrate_profile.py).",
        f"Load average (1 min, counting the previous run) at the start of each run: {', '.join(f'{x:.1f}' for x in loads)}. Over the runs "
        f"the fp32 CPU rate ranged {span('cpu_update_params_per_s', 'fp32')} G params/s, bf16 "
        f"{span('cpu_update_params_per_s', 'bf16')}, one thread {span('cpu_update_params_per_s_1thread')}; "
        f"NVMe read {span('nvme_read_bytes_per_s')} GB/s, write {span('nvme_write_bytes_per_s')}. Calibrate at "
        f"start (strata.hardware_profile not given) rather than reuse these figures.",
    ] + args.note
    if prof.get("gpu_update_params_per_s", 0) == 0:
        prof["notes"].append("No GPU: gpu_update_params_per_s is 0 and the scheduler keeps every sub-group on "
                             "the CPU.")
    notes = prof.pop("notes")
    _C.save_hardware_profile(prof, args.out)  # validates; the C++ profile keeps no notes
    with open(args.out) as f:
        saved = json.load(f)
    saved["notes"] = notes
    with open(args.out, "w") as f:
        json.dump(saved, f, indent=2, sort_keys=True)
        f.write("\n")
    print(f"wrote {args.out} (fp32 {prof['cpu_update_params_per_s']['fp32'] / 1e9:.2f} G params/s, "
          f"NVMe read {prof['nvme_read_bytes_per_s'] / 1e9:.2f} GB/s: the run with the median read rate)")


if __name__ == "__main__":
    main()
