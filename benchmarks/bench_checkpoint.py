#!/usr/bin/env python3
"""Checkpoint save and load of NVMe-placed optimizer state, against the drive (issue 19).

Builds a model of square Linear layers (no bias) whose AdamW state (fp32 master, m, v) is on
NVMe, trains one step, then times ``engine.save_checkpoint`` and ``engine.load_checkpoint``
and prints, beside each, the bytes the engine fetched from and stored to its swap file (as a
multiple of the state) and a bound measured in the same run with fio on the same folder:

- save: the swap file read once (fio, O_DIRECT, the file itself) + the checkpoint's bytes
  (every file of the tag folder) written once (fio, buffered writes then fsync, as the save
  writes them);
- load: the checkpoint's bytes read once (fio, O_DIRECT) + the swap file written once (fio,
  O_DIRECT, the file itself). The load reads the checkpoint after its page cache was dropped.

Peak RSS during each is given above the RSS before it (the pool, the model and its gradients
are already resident), from VmHWM after resetting it (/proc/self/clear_refs).

    PYTHONPATH=python /usr/bin/python3 benchmarks/bench_checkpoint.py --state-gib 6 --path DIR
    PYTHONPATH=python /usr/bin/python3 benchmarks/bench_checkpoint.py --issue-table --path DIR
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

import strata  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fio_util  # noqa: E402


def rss_now():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def peak_reset():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def drop_cache(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def fio(name, path, size, rw, direct, fsync=False, fio_bin="fio", huge=False):
    """Seconds fio takes to move ``size`` bytes of ``path`` (1 MiB blocks, queue depth 16;
    ``huge``: buffers in huge pages, as the engine's records are)."""
    cmd = [fio_bin, f"--name={name}", f"--filename={path}", f"--size={size}", "--bs=1M",
           f"--rw={rw}", f"--direct={1 if direct else 0}", "--ioengine=io_uring" if direct else
           "--ioengine=psync", "--iodepth=16" if direct else "--iodepth=1", "--output-format=json"]
    cmd += fio_util.iomem_args(huge)
    if fsync:
        cmd.append("--end_fsync=1")
    t = time.perf_counter()
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    took = time.perf_counter() - t
    job = json.loads(out.stdout)["jobs"][0]
    io = job["read"] if rw == "read" else job["write"]
    runtime = io["runtime"] / 1e3  # ms -> s (fio's own timing of the I/O)
    return max(runtime, 1e-9) if runtime > 0 else took


def build(args, swap):
    torch.manual_seed(0)
    if args.issue_table:
        model = nn.Sequential(*[nn.Linear(1024, 1024) for _ in range(16)])
        sub_group = 16_000_000
    else:
        layers = max(1, round(args.state_gib * (1 << 30) / 12 / (args.width * args.width)))
        model = nn.Sequential(*[nn.Linear(args.width, args.width, bias=False)
                                for _ in range(layers)])
        sub_group = args.sub_group_size
    cfg = {
        "train_micro_batch_size_per_gpu": 1,
        "steps_per_print": 10 ** 9,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
        "zero_optimization": {"stage": 2, "sub_group_size": sub_group,
                              "offload_optimizer": {"device": "nvme", "nvme_path": swap,
                                                    "buffer_count": args.buffer_count}},
        "aio": {"block_size": 1 << 20, "queue_depth": 32},
        "strata": {"progress": "off"},
    }
    engine, *_ = strata.initialize(model=model, config=cfg)
    return engine, model


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--state-gib", type=float, default=6.0, help="AdamW state size (GiB)")
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--sub-group-size", type=int, default=1_000_000_000,
                    help="DeepSpeed's default (1e9)")
    ap.add_argument("--buffer-count", type=int, default=4)
    ap.add_argument("--issue-table", action="store_true",
                    help="issue 19's model: 16 Linear(1024, 1024), sub_group_size 16M")
    ap.add_argument("--path", default=None, help="folder for the swap file and the checkpoint")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--no-fio", action="store_true")
    ap.add_argument("--fio-bin", default="fio")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    root = args.path or tempfile.mkdtemp(prefix="strata-bench-ckpt-", dir=".")
    swap = os.path.join(root, "swap")
    ck = os.path.join(root, "ck")
    os.makedirs(swap, exist_ok=True)
    shutil.rmtree(ck, ignore_errors=True)
    engine, model = build(args, swap)
    opt = engine.optimizer
    nparams = sum(p.numel() for p in model.parameters())
    state = 12 * nparams
    x = torch.randn(2, model[0].in_features)
    engine.backward(model(x).float().pow(2).mean())
    engine.step()
    opt._b.engine.sync()

    def measure(fn):
        s0 = opt.stats()
        r0 = rss_now()
        can_peak = peak_reset()
        t = time.perf_counter()
        fn()
        opt._b.engine.sync()
        took = time.perf_counter() - t
        s1 = opt.stats()
        return {"seconds": took,
                "fetched_x_state": (s1["bytes_fetched"] - s0["bytes_fetched"]) / state,
                "stored_x_state": (s1["bytes_stored"] - s0["bytes_stored"]) / state,
                "peak_rss_above_before": (peak() - r0) if can_peak else None}

    save = measure(lambda: engine.save_checkpoint(ck, tag="t"))
    state_file = os.path.join(ck, "t", "optimizer_state.bin")
    for f in os.listdir(os.path.join(ck, "t")):
        drop_cache(os.path.join(ck, "t", f))
    load = measure(lambda: engine.load_checkpoint(ck, tag="t"))
    swap_file = opt.stats()["swap_file_path"]
    swap_bytes = opt.stats()["swap_file_bytes"]
    tag_dir = os.path.join(ck, "t")
    ck_bytes = sum(os.path.getsize(os.path.join(tag_dir, f)) for f in os.listdir(tag_dir))
    bounds = {}
    if not args.no_fio and shutil.which(args.fio_bin):
        engine.close()  # the swap file is fio's now
        huge = fio_util.huge_pages_for_fio()
        if not huge:
            fio_util.warn_no_huge_pages("bench_checkpoint")
        r_swap = fio("swap-read", swap_file, swap_bytes, "read", True, fio_bin=args.fio_bin,
                     huge=huge)
        scratch = os.path.join(root, "fio-write.dat")
        w_ck = fio("ckpt-write", scratch, ck_bytes, "write", False, fsync=True,
                   fio_bin=args.fio_bin)
        os.unlink(scratch)
        scratch = os.path.join(root, "fio-read.dat")
        fio("ckpt-prefill", scratch, ck_bytes, "write", True, fio_bin=args.fio_bin)
        r_ck = fio("ckpt-read", scratch, ck_bytes, "read", True, fio_bin=args.fio_bin, huge=huge)
        os.unlink(scratch)
        w_swap = fio("swap-write", swap_file, swap_bytes, "write", True, fio_bin=args.fio_bin,
                     huge=huge)
        bounds = {"save": r_swap + w_ck, "load": r_ck + w_swap, "fio_huge_pages": huge,
                  "rates_GBps": {"swap_read": swap_bytes / r_swap / 1e9,
                                 "ckpt_write": ck_bytes / w_ck / 1e9,
                                 "ckpt_read": ck_bytes / r_ck / 1e9,
                                 "swap_write": swap_bytes / w_swap / 1e9}}
    else:
        engine.close()
    result = {"params": nparams, "tensors": len(list(model.parameters())),
              "state_bytes": state, "swap_file_bytes": swap_bytes, "checkpoint_state_bytes":
              ck_bytes, "save": save, "load": load, "bound_seconds": bounds}
    for k in ("save", "load"):
        if k in bounds:
            result[k]["ratio_to_bound"] = result[k]["seconds"] / bounds[k]
    if not args.json:
        print(f"model: {nparams / 1e6:.1f}M parameters in {result['tensors']} tensors, AdamW state "
              f"{state / 2**30:.2f} GiB on NVMe ({root})")
        if "rates_GBps" in bounds:
            r = bounds["rates_GBps"]
            print(f"fio on this folder: swap read {r['swap_read']:.2f} GB/s, checkpoint write "
                  f"{r['ckpt_write']:.2f} GB/s, checkpoint read {r['ckpt_read']:.2f} GB/s, swap "
                  f"write {r['swap_write']:.2f} GB/s")
        print(f"{'':6} {'seconds':>8} {'bound s':>8} {'ratio':>6} {'fetched':>8} {'stored':>7} "
              f"{'peak RSS +':>11}")
        for k in ("save", "load"):
            m = result[k]
            pk = m["peak_rss_above_before"]
            print(f"{k:6} {m['seconds']:8.2f} {bounds.get(k, float('nan')):8.2f} "
                  f"{m.get('ratio_to_bound', float('nan')):6.2f} {m['fetched_x_state']:7.3f}x "
                  f"{m['stored_x_state']:6.3f}x "
                  f"{(pk / 2**20 if pk is not None else float('nan')):8.0f} MiB")
        print("(fetched/stored: bytes the engine moved to/from its swap file, as a multiple "
              "of the state)")
    else:
        print(json.dumps(result, indent=1))
    if not args.path:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
