"""Command line: ``python -m strata info|plan|report``.

    python -m strata info [--config ds.json] [--path DIR] [--json]
    python -m strata plan --config ds.json --params 7e9 [--dtype bf16] [--json]
    python -m strata report TRACE.json -o step.png
"""

import argparse
import json
import os
import sys

from . import _C
from . import config as _config


def _bytes(n):
    return _C.format_bytes(int(n))


def _blas_in_use():
    """Which BLAS library torch loaded (Debian's torch uses whatever libblas.so.3 points at)."""
    libs = set()
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.split()[-1] if "/" in line else ""
                base = os.path.basename(path)
                if "blas" in base or "mkl" in base or "blis" in base:
                    libs.add(os.path.realpath(path))
    except OSError:
        pass
    return sorted(libs)


def _torch_info():
    try:
        import torch
    except ImportError:
        return {"torch": None}
    torch.zeros(2, 2) @ torch.zeros(2, 2)  # make sure BLAS is loaded
    info = {
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "blas": _blas_in_use(),
        "cuda_available": torch.cuda.is_available(),
        "cuda_devices": [],
    }
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            info["cuda_devices"].append({"name": p.name, "memory": p.total_memory})
    return info


def cmd_info(args):
    swap_dir = args.path
    cfg = None
    if args.config:
        cfg = _config.load_config(args.config, quiet=False)
        swap_dir = swap_dir or _config.get(cfg, "zero_optimization.offload_optimizer.nvme_path")
    swap_dir = swap_dir or os.getcwd()
    sysinfo = _C.system_info(swap_dir)
    tinfo = _torch_info()
    if args.json:
        out = {"strata": _C.__version__, "system": sysinfo, "torch": tinfo,
               "engine": dict(_C.engine_features())}
        if cfg is not None:
            out["config"] = cfg
        print(json.dumps(out, indent=2, default=str))
        return 0
    uring = "available" if sysinfo["io_uring_available"] else (
        "not compiled in" if not sysinfo["io_uring_compiled"] else "unavailable")
    print(f"strata {_C.__version__}")
    print(f"  io_uring        {uring}" + (f" ({sysinfo['io_uring_reason']})" if sysinfo["io_uring_reason"] else ""))
    print(f"  swap I/O        {'io_uring' if sysinfo['io_uring_available'] else 'thread-pool pread/pwrite'}")
    if sysinfo.get("direct_io") is not None:
        print(f"  O_DIRECT        {'yes' if sysinfo['direct_io'] else 'refused (buffered fallback)'} on {swap_dir}")
    else:
        print(f"  O_DIRECT        unknown on {swap_dir}: {sysinfo.get('direct_io_error', '')}")
    print(f"  CPU SIMD        {sysinfo['simd']} ({sysinfo['cpus']} CPUs); checksums XXH3 on "
          f"{sysinfo['checksum_isa']}")
    print(f"  memory          {_bytes(sysinfo['mem_total'])} total, {_bytes(sysinfo['mem_available'])} available")
    if sysinfo["memlock_unlimited"]:
        ml = "unlimited"
    else:
        ml = f"{_bytes(sysinfo['memlock_soft'])} (hard {_bytes(sysinfo['memlock_hard'])})"
    if sysinfo["cap_ipc_lock"]:
        ml += ", CAP_IPC_LOCK held (not enforced)"
    print(f"  RLIMIT_MEMLOCK  {ml}")
    print("  NUMA nodes")
    for line in sysinfo["numa_text"].strip().splitlines():
        print(f"    {line}")
    cxl = sysinfo["cxl_nodes"]
    print(f"  CXL/memory-only nodes: {', '.join(map(str, cxl)) if cxl else 'none'}")
    print(f"  CUDA            {'compiled in' if sysinfo['cuda_compiled'] else 'not compiled in'}; "
          f"devices: {', '.join(d['name'] for d in tinfo.get('cuda_devices', [])) or 'none'}")
    gpu_update = bool(_C.engine_features().get("gpu_update"))
    print("  GPU models      trained with CPU updates through host copies"
          + ("; the engine can also update sub-groups on the GPU (strata.schedule)"
             if gpu_update else "; GPU updates need a CUDA build"))
    print(f"  torch           {tinfo.get('torch') or 'not importable'}"
          + (f", {tinfo['torch_threads']} intra-op threads" if tinfo.get("torch") else ""))
    if tinfo.get("torch"):
        blas = tinfo["blas"]
        print(f"  BLAS            {', '.join(blas) if blas else 'unknown'}")
        if blas and not any("openblas" in b or "mkl" in b or "blis" in b for b in blas):
            print("                  (reference BLAS: matmuls ~90x slower; install libopenblas0-pthread)")
        from .comm import openmp_spins

        wait = os.environ.get("OMP_WAIT_POLICY")
        print(f"  OpenMP wait     {'OMP_WAIT_POLICY=' + wait if wait else 'OMP_WAIT_POLICY unset'}"
              + ("" if not openmp_spins() else
                 ": torch's OpenMP threads spin between operations; with every core busy set "
                 "OMP_WAIT_POLICY=PASSIVE (docs/performance.md)"))
    if cfg is not None:
        diffs = _config.deepspeed_differences(cfg, _config._read(args.config))
        if diffs:
            print(f"\nconfig {args.config}: accepted, but acted on differently from DeepSpeed "
                  "(docs/deepspeed.md):")
            for d in diffs:
                print(f"  warning: {d}")
        print(f"\nconfig {args.config} (defaults filled):")
        _print_config(cfg)
    return 0


def _print_config(cfg):
    rows = _config.schema()
    width = max(len(r["path"]) for r in rows)
    for r in rows:
        if r["type"] == "object" and r["default"] is None:
            continue
        value = _config.get(cfg, r["path"])
        if value is None and r["default"] is None and r["support"] != "honoured":
            continue
        mark = "" if value == r["default"] else " *"
        shown = json.dumps(value) if value is not None else "-"
        print(f"  {r['path']:<{width}}  {shown:<14}{mark:2} {r['description']}")
    print("  (* differs from the default)")


def _slots_for(cfg):
    kind = (_config.get(cfg, "optimizer.type") or "AdamW").lower()
    params = _config.get(cfg, "optimizer.params", {}) or {}
    if kind in ("adam", "adamw"):
        return 4 if params.get("amsgrad") else 3
    if kind == "sgd":
        return 2 if params.get("momentum", 0) else 1
    if kind == "adagrad":
        return 2
    return 3


def cmd_plan(args):
    cfg = _config.load_config(args.config, quiet=True, check_paths=False)
    n = int(float(args.params))
    if n <= 0:
        raise SystemExit("--params must be positive")
    mem = int(float(args.mem_available)) if args.mem_available else 0
    # A model on a GPU: the engine keeps a host copy of it in its pinned pool.
    params, slots = [(n, args.dtype, 0, bool(args.model_on_gpu))], [_slots_for(cfg)]
    profile = _C.load_hardware_profile(args.hardware) if args.hardware else None
    gpu = bool(profile and profile.get("gpu_update_params_per_s", 0) > 0)
    text, plan_json = _C.build_plan(cfg.handle, params, slots, gpu, mem)
    plan = json.loads(plan_json)
    choice = None
    if profile is not None:
        choice = _C.predict_step(cfg.handle, params, slots, profile,
                                 backward_seconds=args.backward_seconds if args.backward_seconds is not None else -1.0,
                                 forward_seconds=args.forward_seconds if args.forward_seconds is not None else -1.0,
                                 gpu=gpu, mem_available=mem)
        plan["schedule"] = _schedule_summary(choice, args.hardware, args.backward_seconds, args.forward_seconds)
    if args.json:
        if choice is not None:
            plan["schedule"]["candidates"] = choice["candidates"]
        print(json.dumps(plan, indent=2))
    else:
        print(f"plan for {n:,} {args.dtype} parameters with {args.config}:")
        print(text.rstrip())
        if choice is not None:
            _print_schedule(plan["schedule"], choice)
    return 0


def _schedule_summary(choice, path, backward=None, forward=None):
    """The chosen schedule of ``_C.predict_step`` in a few plain fields."""
    c, p = choice["chosen"], choice["prediction"]
    prof = choice["profile"]
    out = {
        "hardware_profile": path,
        "profile_name": prof.get("name", ""),
        "mode": choice["schedule_mode"],
        "name": c["name"],
        "cpu_fraction": c["cpu_fraction"],
        "subgroups": c["subgroups"],
        "gap_k": c["gap_k"] or None,
        "gap_family": c.get("gap_family"),
        "overlap": c["overlap"],
        "backward_seconds": backward if backward is not None else prof.get("backward_seconds", 0.0),
        "forward_seconds": forward if forward is not None else prof.get("forward_seconds", 0.0),
        "predicted": {k: p[k] for k in ("updates_done_s", "step_s", "exposed_s", "iteration_s", "bound")},
        "notes": choice["notes"],
    }
    if "simulated" in choice:
        out["simulated"] = {k: choice["simulated"][k] for k in ("updates_done_s", "step_s", "exposed_s")}
    return out


def _print_schedule(s, choice):
    sg = s["subgroups"]
    gpu = sg["gpu_streamed"] + sg["gpu_resident"]
    gap = ""
    if s["gap_k"]:
        gap = f", gap k={s['gap_k']} ({s['gap_family']})"
    print(f"\nschedule (strata.schedule {s['mode']}, hardware {s['hardware_profile']}"
          + (f": {s['profile_name']}" if s["profile_name"] else "") + ")")
    print(f"  chosen      {s['name']}: {sg['cpu']} sub-groups on the CPU ({s['cpu_fraction'] * 100:.0f}%), "
          f"{gpu} on the GPU ({sg['gpu_streamed']} streamed, {sg['gpu_resident']} resident){gap}; "
          f"overlap {s['overlap']}")
    p = s["predicted"]
    bw = s["backward_seconds"]
    print(f"  predicted   step {p['step_s']:.3f} s (updates done {p['updates_done_s']:.3f} s after backward, "
          f"bound: {p['bound']}); exposed beyond backward {p['exposed_s']:.3f} s"
          + (f"; iteration {p['iteration_s']:.3f} s with backward {bw:g} s" if p["iteration_s"] else ""))
    if "simulated" in s:
        q = s["simulated"]
        print(f"  simulated   step {q['step_s']:.3f} s (updates done {q['updates_done_s']:.3f} s), "
              f"exposed {q['exposed_s']:.3f} s")
    cands = choice["candidates"]
    feasible = sorted((c for c in cands if c["prediction"]["feasible"]), key=lambda c: c["prediction"]["exposed_s"])
    shown = feasible[:8]
    for c in feasible:  # always show the all-CPU and static rows for comparison
        if c not in shown and (c["name"] == "all-cpu" or c["name"].startswith("static")):
            shown.append(c)
    print(f"  {'candidate':<22} {'overlap':<7} {'cpu%':>5} {'step_s':>9} {'exposed_s':>10} {'bound':<5}")
    for c in shown:
        mark = "*" if c["name"] == s["name"] and c["overlap"] == s["overlap"] else " "
        pr = c["prediction"]
        print(f"{mark} {c['name']:<22} {c['overlap']:<7} {c['cpu_fraction'] * 100:5.0f} {pr['step_s']:9.3f} "
              f"{pr['exposed_s']:10.3f} {pr['bound']:<5}")
    infeasible = [c for c in cands if not c["prediction"]["feasible"]]
    if infeasible:
        print(f"  ({len(infeasible)} of {len(cands)} candidates infeasible, e.g. {infeasible[0]['name']}: "
              f"{infeasible[0]['prediction']['infeasible_reason']})")
    for note in s["notes"]:
        print(f"  note: {note}")


def cmd_report(args):
    from . import report

    out = args.output or (os_path_stem(args.trace) + ".png")
    lanes = report.render(args.trace, out, title=args.title, steps=None if args.all_steps else 1)
    print(f"wrote {out} ({len(lanes)} lanes: {', '.join(lanes)})")
    return 0


def os_path_stem(path):
    root, _ = os.path.splitext(path)
    return root


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m strata", description="strata command line")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("info", help="what this machine offers strata (and a config with its defaults)")
    p.add_argument("--config", help="a DeepSpeed-style JSON config to validate and show with defaults")
    p.add_argument("--path", help="folder to probe for O_DIRECT (default: the config's nvme_path or .)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_info)
    p = sub.add_parser("plan", help="sub-groups, tiers and host memory for a model size, no model needed")
    p.add_argument("--config", required=True)
    p.add_argument("--params", required=True, help="number of trainable parameters, e.g. 7e9")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--mem-available", help="bytes of MemAvailable to plan for (default: this machine)")
    p.add_argument("--model-on-gpu", action="store_true",
                   help="the model's parameters live on a GPU (ZeRO-Offload): count the host copies "
                        "the engine keeps of them in its pinned pool")
    p.add_argument("--hardware", metavar="PROFILE",
                   help="hardware-profile JSON (benchmarks/profiles/): show the CPU/GPU split, gap k, overlap "
                        "and step time the performance model chooses for that machine")
    p.add_argument("--backward-seconds", type=float,
                   help="backward time per step for the overlap prediction (default: the profile's)")
    p.add_argument("--forward-seconds", type=float,
                   help="forward time per step: hides deferred write-back (default: the profile's)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_plan)
    p = sub.add_parser("report", help="render an engine trace as a timeline picture")
    p.add_argument("trace", help="Chrome/Perfetto trace JSON written by the engine")
    p.add_argument("-o", "--output", help="PNG to write (default: next to the trace)")
    p.add_argument("--title")
    p.add_argument("--all-steps", action="store_true", help="draw every step the trace kept (default: the last)")
    p.set_defaults(fn=cmd_report)
    p = sub.add_parser("export", help="write a checkpoint's weights as a plain torch state_dict")
    p.add_argument("checkpoint", help="checkpoint folder (uses its 'latest') or a tag folder")
    p.add_argument("-o", "--output", required=True, help="output file, e.g. model.pt")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="dtype of floating-point tensors (default fp32: the master weights)")
    p.add_argument("--tag", help="checkpoint tag (default: the one in the 'latest' file)")
    p.set_defaults(fn=lambda a: __import__("strata.export", fromlist=["cmd_export"]).cmd_export(a))
    # Everything after `launch` goes to torch.distributed.run (no option of our own: the odd
    # prefix character keeps argparse from reading --nproc_per_node and friends).
    p = sub.add_parser("launch", prefix_chars="\x01", add_help=False,
                       help="run a training script on several processes: torch.distributed.run "
                            "(torchrun) with defaults that work on Python 3.11 + torch 1.13")
    p.add_argument("args", nargs=argparse.REMAINDER,
                   help="torchrun's arguments, e.g. --nproc_per_node 2 train.py --lr 1e-4")
    p.set_defaults(fn=lambda a: __import__("strata.comm", fromlist=["launch"]).launch(a.args))
    args = ap.parse_args(argv)
    try:
        return args.fn(args)
    except (_C.ConfigError, _C.StrataError, OSError) as exc:
        print(f"strata: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
