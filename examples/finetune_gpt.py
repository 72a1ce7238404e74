#!/usr/bin/env python3
"""Fine-tune a small GPT on the Python standard library's sources with the optimizer state on
strata's NVMe tier (or whatever tier the config names).

    PYTHONPATH=python /usr/bin/python3 examples/finetune_gpt.py --config examples/configs/nvme.json

With --device cuda the model trains on the GPU; the optimizer state stays on the config's tier
and the update runs on the CPU (gradients copied down, new weights copied up).

Ends with a summary: loss first -> last, median step time, bytes the engine read and wrote on
its swap file, peak RSS; and writes the step trace, a timeline picture and a loss curve into
--out.

Data parallel on CPU processes (Gloo), with the same config (its zero_optimization.stage says
how the optimizer state is sharded across ranks; docs/distributed.md):

    PYTHONPATH=python /usr/bin/python3 -m strata launch --nproc_per_node 2 examples/finetune_gpt.py

(or ``torchrun --redirects 2 --tee 2 --nproc_per_node 2 ...``). Each rank trains on its own
batches; rank 0 prints, writes --out and reports the loss averaged over the ranks.
"""

import argparse
import json
import os
import resource
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import strata  # noqa: E402
import strata.comm  # noqa: E402
import strata.optim  # noqa: E402
import strata.sharded  # noqa: E402
from strata.progress import Progress  # noqa: E402

from gpt import GPT, Batches, param_count, stdlib_corpus  # noqa: E402

# Shapes by layers x width; the demo names the model by its parameter count (the default is
# about 11M parameters, far from GPT-2's "medium" 355M, so it is not called that).
SIZES = {
    "2x128": dict(d_model=128, n_layer=2, n_head=4, seq_len=64),
    "4x256": dict(d_model=256, n_layer=4, n_head=4, seq_len=128),
    "6x384": dict(d_model=384, n_layer=6, n_head=6, seq_len=128),
}
SIZE_ALIASES = {"tiny": "2x128", "small": "4x256", "medium": "6x384"}  # earlier names


def model_name(n_params, shape):
    """'GPT, 10.9M parameters (6 layers, width 384)'."""
    return (f"GPT, {n_params / 1e6:.1f}M parameters ({shape['n_layer']} layers, "
            f"width {shape['d_model']})")


def optimizer_bound(cfg, st, n_params, trace_path):
    """The optimizer step from the trace against its own bound on this machine, measured now:
    max(bytes moved / the drive's mixed read+write rate, elements / the CPU kernel's rate),
    with the rates from strata's calibration on the same swap folder."""
    if not st["swap_file_path"]:
        return None
    from strata import _C

    with open(trace_path) as f:
        events = json.load(f)["traceEvents"]
    steps = [e["dur"] / 1e6 for e in events if e.get("ph") == "X" and e.get("cat") == "step"]
    if not steps:
        return None
    swap_dir = os.path.dirname(st["swap_file_path"])
    prof = _C.calibrate(json.dumps(cfg), swap_dir, 0.0, 256 << 20)
    io_s = 2 * st["swap_file_bytes"] / prof["nvme_duplex_bytes_per_s"]
    update_s = n_params / prof["cpu_update_params_per_s"]["fp32"]
    step_s = statistics.median(steps)
    b = max(io_s, update_s)
    return {"step_s": step_s, "io_s": io_s, "update_s": update_s, "bound_s": b, "ratio": step_s / b}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=os.path.join(os.path.dirname(__file__), "configs", "nvme.json"))
    ap.add_argument("--out", default="demo_out", help="folder for trace, pictures and summary")
    ap.add_argument("--size", default="6x384", choices=sorted(SIZES) + sorted(SIZE_ALIASES),
                    help="layers x width of the model (default 6x384, about 11M parameters)")
    ap.add_argument("--steps", type=int, default=300, help="stop after this many steps")
    ap.add_argument("--max-seconds", type=float, default=180.0,
                    help="stop training after this long (whichever of the two ends first)")
    ap.add_argument("--min-steps", type=int, default=5,
                    help="train at least this many steps whatever the time budget (a loss "
                         "curve, a trace and a timeline need a few)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads (default: the cores, shared by the local ranks)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu",
                    help="where the model trains: cpu, or cuda (one process; the optimizer state "
                         "stays on the config's tier and the update runs on the CPU)")
    ap.add_argument("--progress", default=None, help="auto, bar, log or off (default: the config's)")
    args = ap.parse_args(argv)
    args.size = SIZE_ALIASES.get(args.size, args.size)

    # Several processes (strata launch / torchrun): torch.distributed on Gloo, output on rank 0.
    distributed = strata.comm.init_distributed(dist_backend="gloo")
    rank, world = strata.comm.get_rank(), strata.comm.get_world_size()
    say = print if rank == 0 else (lambda *a, **k: None)
    if args.threads is None:
        args.threads = max(1, (os.cpu_count() or 1) // strata.comm.get_local_world_size())

    torch.manual_seed(args.seed)
    torch.set_num_threads(max(1, args.threads))
    os.makedirs(args.out, exist_ok=True)

    cfg = strata.load_config(args.config)
    opt_params = cfg.get("optimizer", {}).get("params", {})
    batch = int(cfg.get("train_micro_batch_size_per_gpu") or 16)
    trace_cfg = strata.config.get(cfg, "strata.trace", {}) or {}
    trace_path = os.path.join(args.out, "trace.json")
    progress_mode = args.progress or strata.config.get(cfg, "strata.progress", "auto")

    if args.device != "cpu" and distributed:
        raise SystemExit("finetune_gpt.py: --device cuda trains in one process only")
    device = torch.device(args.device)
    model = GPT(**SIZES[args.size], dropout=0.0).to(device)
    data = Batches(stdlib_corpus(), model.seq_len, batch, seed=args.seed + rank)
    n_params = param_count(model)
    say(f"strata {strata.__version__}: {model_name(n_params, SIZES[args.size])}, "
          f"batch {batch}x{model.seq_len} bytes, torch {torch.__version__} on {args.threads} threads"
        + (f", model on {device}" if device.type != "cpu" else "")
        + (f", {world} ranks (ZeRO stage {strata.config.get(cfg, 'zero_optimization.stage', 0)})"
           if distributed else ""))

    # With several ranks each keeps its shard of the optimizer state (as the config's stage
    # says) on its own tiers: its own swap file, pinned pool and NUMA node.
    klass = strata.sharded.ShardedOffloadAdamW if distributed else strata.optim.OffloadAdamW
    opt = klass(
        model.parameters(), lr=float(opt_params.get("lr", 6e-4)),
        betas=tuple(opt_params.get("betas", (0.9, 0.95))), eps=float(opt_params.get("eps", 1e-8)),
        weight_decay=float(opt_params.get("weight_decay", 0.1)), config=args.config)
    st = opt.stats()
    say(opt.plan().rstrip())
    if st["swap_file_path"]:
        say(f"swap file {st['swap_file_path']} ({st['swap_file_bytes'] / 2**20:.1f} MiB, "
              f"{st['io_backend']}); update kernel {st['isa']} on {st['threads']} threads")

    losses, step_times, opt_times = [], [], []
    start = time.monotonic()
    args.min_steps = max(1, min(args.min_steps, args.steps))
    say(f"training for {args.steps} steps or {args.max_seconds:.0f} s, whichever ends first "
        f"(at least {args.min_steps} steps)")
    with Progress(args.steps, "train", unit="step", mode=progress_mode,
                  budget_s=args.max_seconds) as bar:
        for step in range(args.steps):
            t0 = time.perf_counter()
            x, y = data.next()
            loss = model(x.to(device), y.to(device))
            opt.zero_grad()
            loss.backward()
            t1 = time.perf_counter()
            opt.step()
            t2 = time.perf_counter()
            value = loss.detach().reshape(1)
            over = time.monotonic() - start > args.max_seconds and step + 1 >= args.min_steps
            if distributed:
                # the loss of the global batch; every rank stops at the same step
                both = torch.tensor([float(value), 1.0 if over else 0.0], dtype=torch.float64)
                strata.comm.all_reduce(both)
                value, over = both[:1] / world, bool(both[1] > 0)
            losses.append(value.item())
            step_times.append(t2 - t0)
            opt_times.append(t2 - t1)
            bar.update(1, loss=losses[-1], step_s=step_times[-1])
            if over:
                break
    if rank == 0:
        opt.write_trace(trace_path)
    breakdown = opt.step_breakdown()
    st = opt.stats()
    opt.close()
    # Several ranks: rank 0's step (its trace) against the bound for its shard.
    bound = optimizer_bound(cfg, st, st.get("shard_numel", n_params), trace_path) \
        if rank == 0 else None

    k = max(1, min(10, len(losses) // 5))
    first, last = statistics.mean(losses[:k]), statistics.mean(losses[-k:])
    warm = step_times[1:] or step_times
    summary = {
        "params": n_params,
        "steps": len(losses),
        "loss_first": first,
        "loss_last": last,
        "median_step_s": statistics.median(warm),
        "median_optimizer_step_s": statistics.median(opt_times[1:] or opt_times),
        "swap_bytes_read": st["io_bytes_read"],
        "swap_bytes_written": st["io_bytes_written"],
        "io_backend": st["io_backend"],
        "pinned_pool_bytes": st["pool_reserved"],
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "last_step_breakdown": breakdown,
        "optimizer_step_bound": bound,
    }
    if distributed:
        summary["world_size"] = world
        summary["zero_stage"] = st["stage"]
        summary["shard_numel"] = st["shard_numel"]
        strata.comm.barrier()
        torch.distributed.destroy_process_group()
        if rank != 0:
            return 0 if last < first else 1
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    with open(os.path.join(args.out, "losses.json"), "w") as f:
        json.dump(losses, f)

    pictures = []
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(range(1, len(losses) + 1), losses, lw=1)
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy (nats/byte)")
        ax.set_title(f"{model_name(n_params, SIZES[args.size])} on stdlib sources, "
                     "optimizer state via strata", fontsize=9)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        loss_png = os.path.join(args.out, "loss.png")
        fig.savefig(loss_png, dpi=110)
        plt.close(fig)
        pictures.append(loss_png)
        try:
            from strata import report

            timeline_png = os.path.join(args.out, "timeline.png")
            report.render(trace_path, timeline_png)
            pictures.append(timeline_png)
        except ImportError:
            pass
        except ValueError as e:  # a trace without events: say so, keep the rest of the summary
            print(f"no timeline picture: {e}", file=sys.stderr)
    except ImportError:
        print("matplotlib is not installed: no pictures (make deps installs python3-matplotlib)")

    gib = 2.0**30
    print("\n=== summary ===")
    print(f"steps              {summary['steps']}")
    print(f"loss               {first:.3f} -> {last:.3f} (mean of first/last {k} steps)")
    print(f"median step        {summary['median_step_s'] * 1e3:.1f} ms "
          f"(optimizer {summary['median_optimizer_step_s'] * 1e3:.1f} ms)")
    print(f"swap file I/O      read {st['io_bytes_read'] / gib:.2f} GiB, "
          f"written {st['io_bytes_written'] / gib:.2f} GiB ({st['io_backend'] or 'no swap file'})")
    if bound:
        print(f"optimizer step     {bound['step_s'] * 1e3:.1f} ms (trace, median of kept steps) vs bound "
              f"{bound['bound_s'] * 1e3:.1f} ms = max(I/O {bound['io_s'] * 1e3:.1f}, update "
              f"{bound['update_s'] * 1e3:.1f}) measured now: ratio {bound['ratio']:.2f}")
    print(f"pinned pool        {st['pool_reserved'] / 2**20:.1f} MiB")
    print(f"peak RSS           {summary['peak_rss_bytes'] / 2**20:.0f} MiB")
    print(f"trace              {trace_path}")
    for p in pictures:
        print(f"picture            {p}")
    print(f"summary            {os.path.join(args.out, 'summary.json')}")
    if not last < first:
        print("warning: the loss did not go down", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
