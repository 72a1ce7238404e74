"""ZeRO stage 3 in one process: memory and time of a GPT-style model whose weights live on the
param tier (offload_param) and whose AdamW state lives on NVMe.

For one configuration (--stage 3 --param-device nvme|cpu, or --stage 2 for the comparison) the
bench, in a fresh process:
  1. measures the process's baseline resident memory (torch and strata imported);
  2. builds the model (under strata.zero.Init at stage 3) and measures resident memory;
  3. trains --steps steps on one repeated batch and reports seconds per step, the losses, the
     peak resident memory (VmHWM, reset after the baseline) and the bytes the param tier and
     the optimizer tier moved.
With --compare it runs stage 3 (nvme) and stage 2 side by side, each in its own process, and
prints both. Memory figures are above the baseline. --json prints the results as JSON.

With --speed it also measures, in the same run, the bound of a stage-3 step:
  max(forward+backward of the same model with its weights resident (plain torch, no strata),
      (2 x weight bytes + state bytes) / fio's read rate + state bytes / fio's write rate)
(weights read in forward and again in backward, AdamW state read and written once; fio on a
file in --nvme-path, O_DIRECT, io_uring, 1 MiB blocks, queue depth 32, with huge-page buffers
(--iomem=shmhuge) when huge pages are reserved, as strata's pool has them — none of strata's
code) and prints the step's ratio to it. A second figure adds the weights' write-back
(weight bytes / write rate) to the I/O side.

    /usr/bin/python3 benchmarks/bench_stage3.py --params 1.2e9 --nvme-path /tmp/s3 --compare
    /usr/bin/python3 benchmarks/bench_stage3.py --params 4e9 --nvme-path /tmp/s3 --steps 2
    /usr/bin/python3 benchmarks/bench_stage3.py --params 3e8 --layers 12 --batch 4 --speed \
        --nvme-path /tmp/s3
"""

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "python"))
sys.path.insert(0, HERE)
import fio_util  # noqa: E402


def status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def reset_peak():
    """VmHWM := VmRSS (Linux: writing 5 to clear_refs resets the high-water mark)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def shape_for(params, layers):
    """d_model (multiple of 64) so that layers x 12 d^2 + the embedding is about `params`."""
    d = int(math.sqrt(params / (12 * layers)))
    return max(64, d // 64 * 64)


def model_class():
    """The bench's GPT (pre-LayerNorm blocks, tied head)."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    class Block(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.ln1 = nn.LayerNorm(d)
            self.qkv = nn.Linear(d, 3 * d)
            self.proj = nn.Linear(d, d)
            self.ln2 = nn.LayerNorm(d)
            self.fc = nn.Linear(d, 4 * d)
            self.out = nn.Linear(4 * d, d)

        def forward(self, x):
            b, t, d = x.shape
            q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
            att = ((q @ k.transpose(1, 2)) / math.sqrt(d)).masked_fill(
                ~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf")).softmax(-1)
            x = x + self.proj(att @ v)
            return x + self.out(F.gelu(self.fc(self.ln2(x))))

    class GPT(nn.Module):
        def __init__(self, vocab, d, layers, ctx):
            super().__init__()
            self.wte = nn.Embedding(vocab, d)
            self.wpe = nn.Embedding(ctx, d)
            self.blocks = nn.ModuleList([Block(d) for _ in range(layers)])
            self.ln_f = nn.LayerNorm(d)
            self.head = nn.Linear(d, vocab, bias=False)
            self.head.weight = self.wte.weight
            self.apply(self._init)  # under zero.Init: gathered module by module

        @staticmethod
        def _init(m):
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)

        def forward(self, idx, targets):
            x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
            for b in self.blocks:
                x = b(x)
            logits = self.head(self.ln_f(x))
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))

    return GPT


def run_one(args):
    import torch

    import strata

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    GPT = model_class()

    d = shape_for(args.params, args.layers)
    zero = {"stage": args.stage, "sub_group_size": int(args.sub_group_size),
            "offload_optimizer": {"device": "nvme", "nvme_path": os.path.join(args.nvme_path,
                                                                              "opt"),
                                  "buffer_count": args.buffer_count}}
    if args.stage == 3:
        zero["offload_param"] = {"device": args.param_device,
                                 "nvme_path": os.path.join(args.nvme_path, "param"),
                                 "buffer_count": 4, "buffer_size": int(args.window)}
        zero["stage3_max_live_parameters"] = int(args.window)
        zero["stage3_prefetch_bucket_size"] = int(args.window / 4)
        zero["stage3_max_reuse_distance"] = 0
    cfg = {"train_micro_batch_size_per_gpu": args.batch, "gradient_accumulation_steps": 1,
           "optimizer": {"type": "AdamW", "params": {"lr": args.lr, "weight_decay": 0.0}},
           "zero_optimization": zero,
           "aio": {"block_size": 1 << 20, "queue_depth": 32},
           "strata": {"threads": args.threads, "progress": "off",
                      "overlap_backward": args.overlap == "on"}}
    if args.trace:
        cfg["strata"]["trace"] = {"path": args.trace, "steps": 2}
    base = status_kib("VmRSS")
    peak_reset = reset_peak()
    t0 = time.perf_counter()
    if args.stage == 3:
        with strata.zero.Init(config_dict_or_path=cfg):
            model = GPT(args.vocab, d, args.layers, args.ctx)
    else:
        model = GPT(args.vocab, d, args.layers, args.ctx)
    build_s = time.perf_counter() - t0
    n_params = sum(getattr(p, "ds_numel", None) or p.numel()
                   for p in {id(p): p for p in model.parameters()}.values())
    after_build = status_kib("VmRSS")
    t0 = time.perf_counter()
    engine, _, _, _ = strata.initialize(model=model, config=cfg)
    init_s = time.perf_counter() - t0
    after_init = status_kib("VmRSS")
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, args.vocab, (args.batch, args.ctx), generator=g)
    y = torch.randint(0, args.vocab, (args.batch, args.ctx), generator=g)
    losses, times, phases = [], [], []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        loss = engine(x, y)
        t1 = time.perf_counter()
        engine.backward(loss)
        t2 = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t0)
        phases.append({"forward": t1 - t0, "backward": t2 - t1, "step": times[-1] - (t2 - t0)})
        losses.append(loss.item())
        print(f"  step {len(times)}: loss {losses[-1]:.4f}, {times[-1]:.1f} s, "
              f"RSS {(status_kib('VmRSS') - base) / 2**20:.2f} GiB above baseline",
              file=sys.stderr, flush=True)
    peak = status_kib("VmHWM")
    opt_stats = engine.optimizer.stats()
    tier_stats = engine.param_tier.stats() if engine.param_tier is not None else {}
    engine.close()
    gib = 2 ** 20  # KiB per GiB
    return {
        "stage": args.stage, "param_device": args.param_device if args.stage == 3 else "model",
        "params": n_params, "d_model": d, "layers": args.layers, "batch": args.batch,
        "ctx": args.ctx, "weights_gib": n_params * 4 / 2 ** 30,
        "baseline_gib": base / gib,
        "rss_after_build_gib": (after_build - base) / gib,
        "rss_after_initialize_gib": (after_init - base) / gib,
        "peak_rss_gib": (peak - base) / gib if peak_reset else None,
        "build_s": build_s, "initialize_s": init_s, "step_s": times, "losses": losses,
        "param_tier": {k: tier_stats.get(k) for k in ("bytes", "bytes_fetched", "bytes_stored",
                                                       "fetches", "prefetches",
                                                       "window_peak_elements")},
        "state_bytes_fetched": opt_stats.get("bytes_fetched"),
        "state_bytes_stored": opt_stats.get("bytes_stored"),
        "grad_wait_s": opt_stats.get("grad_wait_s"),
        "phase_s": phases,
    }


def run_resident(args):
    """Forward+backward of the same model and batch with its weights in memory (plain torch):
    seconds per pass, the first pass excluded."""
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = model_class()(args.vocab, shape_for(args.params, args.layers), args.layers, args.ctx)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, args.vocab, (args.batch, args.ctx), generator=g)
    y = torch.randint(0, args.vocab, (args.batch, args.ctx), generator=g)
    times = []
    for _ in range(max(2, args.steps)):
        t0 = time.perf_counter()
        model(x, y).backward()
        times.append(time.perf_counter() - t0)
        model.zero_grad(set_to_none=True)
    return {"forward_backward_s": times[1:]}


def fio_rate(path, rw, size, huge):
    """Bytes/s fio moves on `path` (O_DIRECT, io_uring, 1 MiB blocks, queue depth 32)."""
    cmd = ["fio", "--name=bound", f"--filename={path}", f"--size={size}", "--bs=1M",
           f"--rw={rw}", "--direct=1", "--ioengine=io_uring", "--iodepth=32",
           "--output-format=json"] + fio_util.iomem_args(huge)
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    job = json.loads(out.stdout)["jobs"][0]
    io = job["read"] if rw == "read" else job["write"]
    return io["io_bytes"] / max(io["runtime"] / 1e3, 1e-9)


def speed_bound(args, stage3, resident):
    os.makedirs(args.nvme_path, exist_ok=True)
    path = os.path.join(args.nvme_path, "fio-bound.dat")
    size = int(args.fio_gib * 2 ** 30)
    huge = fio_util.huge_pages_for_fio()
    if not huge:
        fio_util.warn_no_huge_pages("bench_stage3")
    try:
        write = fio_rate(path, "write", size, huge)  # also lays the file out for the read
        read = fio_rate(path, "read", size, huge)
    finally:
        if os.path.exists(path):
            os.unlink(path)
    n = stage3["params"]
    weights, state = 4 * n, 12 * n
    io_s = (2 * weights + state) / read + state / write
    fb = statistics.median(resident["forward_backward_s"])
    steps = stage3["step_s"]
    step = statistics.median(steps[1:] if len(steps) > 1 else steps)
    bound = max(fb, io_s)
    bound_wb = max(fb, io_s + weights / write)
    return {"fio_huge_pages": huge, "read_gbps": read / 1e9, "write_gbps": write / 1e9,
            "io_s": io_s,
            "forward_backward_s": fb, "bound_s": bound, "step_s": step,
            "ratio": step / bound, "bound_with_writeback_s": bound_wb,
            "ratio_with_writeback": step / bound_wb}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", type=float, default=1.2e9)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--ctx", type=int, default=32)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--stage", type=int, default=3, choices=[2, 3])
    ap.add_argument("--param-device", default="nvme", choices=["nvme", "cpu"])
    ap.add_argument("--nvme-path", required=True)
    ap.add_argument("--sub-group-size", type=float, default=1e7)
    ap.add_argument("--buffer-count", type=int, default=3)
    ap.add_argument("--window", type=float, default=6e7, help="stage3_max_live_parameters")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compare", action="store_true", help="stage 3 and stage 2, side by side")
    ap.add_argument("--speed", action="store_true",
                    help="also measure the step's bound (resident forward+backward, fio)")
    ap.add_argument("--fio-gib", type=float, default=2.0, help="size of fio's file (--speed)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--resident", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--overlap", default="on", choices=["on", "off"],
                    help="strata.overlap_backward")
    ap.add_argument("--trace", default="",
                    help="write the last two steps' trace (stage 3 run) here; "
                         "python -m strata report PATH draws it")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(run_resident(args) if args.resident else run_one(args)))
        return 0
    runs = [["--stage", "3", "--param-device", args.param_device]]
    if args.compare:
        runs.append(["--stage", "2"])
    if not args.compare and args.stage == 2:
        runs = [["--stage", "2"]]
    keep = [a for a in (argv if argv is not None else sys.argv[1:])
            if a not in ("--compare", "--json", "--speed")]
    results = []
    for extra in runs:
        cmd = [sys.executable, os.path.abspath(__file__), "--child"] + keep + extra
        r = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
        if r.returncode != 0:
            print(f"run {' '.join(extra)} failed (exit {r.returncode})", file=sys.stderr)
            return r.returncode
        results.append(json.loads(r.stdout.strip().splitlines()[-1]))
    speed = None
    if args.speed:
        cmd = [sys.executable, os.path.abspath(__file__), "--child", "--resident"] + keep
        r = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
        speed = speed_bound(args, results[0], json.loads(r.stdout.strip().splitlines()[-1]))
    if args.json:
        print(json.dumps({"runs": results, "speed": speed} if speed else results, indent=2))
        return 0
    print(f"{'run':<16}{'params':>14}{'weights GiB':>12}{'after build':>12}{'after init':>11}"
          f"{'peak RSS':>10}{'s/step':>9}  losses")
    for r in results:
        name = f"stage {r['stage']} {r['param_device']}"
        steps = r["step_s"]
        print(f"{name:<16}{r['params']:>14,}{r['weights_gib']:>12.2f}"
              f"{r['rss_after_build_gib']:>12.2f}{r['rss_after_initialize_gib']:>11.2f}"
              f"{r['peak_rss_gib'] or float('nan'):>10.2f}"
              f"{sum(steps[1:]) / max(1, len(steps) - 1) if len(steps) > 1 else steps[0]:>9.1f}"
              f"  {' '.join(f'{x:.3f}' for x in r['losses'])}")
    print("(GiB above the process's baseline; s/step excludes the first step when there are "
          "several)")
    if speed:
        sp = speed
        print(f"\nbound: fio ({'huge' if sp['fio_huge_pages'] else '4 KiB'}-page buffers) read "
              f"{sp['read_gbps']:.2f} GB/s, write {sp['write_gbps']:.2f} GB/s "
              f"-> I/O {sp['io_s']:.2f} s; resident forward+backward "
              f"{sp['forward_backward_s']:.2f} s")
        print(f"stage 3 step (median) {sp['step_s']:.2f} s = {sp['ratio']:.2f} x the bound "
              f"{sp['bound_s']:.2f} s ({sp['ratio_with_writeback']:.2f} x "
              f"{sp['bound_with_writeback_s']:.2f} s with the weights' write-back)")
        if not sp["fio_huge_pages"]:
            # Seen on a 2-vCPU VM: 0.43-0.67 x such a bound, 1.03-1.11 x with huge pages.
            print("  not a bound: fio ran with 4 KiB-page buffers (no reserved huge pages), "
                  "which read this kind of disk at about half the rate strata's pool does; "
                  "as root: echo 64 > /proc/sys/vm/nr_hugepages, and run again")
    return 0


if __name__ == "__main__":
    sys.exit(main())
