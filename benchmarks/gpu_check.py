#!/usr/bin/env python3
"""The Python half of benchmarks/gpu_check.sh (issue 12): strata's GPU side checked on a GPU.

    PYTHONPATH=<package dir> $PYTHON benchmarks/gpu_check.py run --out OUTDIR [--bench OUTDIR/bench_gpu.jsonl]
    $PYTHON benchmarks/gpu_check.py summarize OUTDIR

`run` writes OUTDIR/python_checks.json; `summarize` (no torch needed) reads what the shell
script and `run` left in OUTDIR (steps.tsv, test_cuda_*.json, bench_gpu.jsonl,
python_checks.json), prints one table, writes OUTDIR/gpu_check.json and exits 0 when every
check passed, 1 when one failed, 2 when none failed but some could not run.

Checks (status pass / fail / not run, each with the reason):
  (0) binding: without a usable device every CUDA function of strata._C raises
      StrataError("CUDA not available: <reason>") (the path this file takes on a CPU machine);
  (1) CUDA AdamW/Adam (+amsgrad) on the device vs torch.optim on the device, and vs strata's
      CPU kernel: assert_close(rtol=1e-5, atol=1e-6), bit-identical elements counted; bf16
      gradients with bf16 copy-out vs the CPU kernel; GpuUpdater (pinned host state) vs CPU;
  (2) CUDA update bandwidth / device-to-device copy of the same bytes >= 0.8 (from the bench);
  (3) pinned H2D and D2H from the pool / cudaMemcpy from cudaHostAlloc memory >= 0.9;
  (4) the interleaved schedule (model-chosen split) vs CPU-only and all-GPU updates, step
      time, >= 1.5x faster than CPU-only;
  (5) a GPT trained on the GPU for 50 steps in fp32, optimizer state offloaded (cpu and nvme,
      overlap on) vs the same model with torch.optim.AdamW: losses within 1e-3 relative at
      every step, parameters assert_close(rtol=1e-4, atol=1e-5) at the end.
(4) needs the engine to update sub-groups on the GPU; it runs when
strata._C.engine_features()["gpu_update"] is true (a CUDA build) and otherwise says "not run".
(5) updates on the CPU through host copies of the GPU parameters (docs/deepspeed.md "GPU
parameters")."""

import argparse
import json
import os
import statistics
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ADAM_BW_TARGET = 0.8
PINNED_TARGET = 0.9
INTERLEAVE_TARGET = 1.5


def result(cid, name, status, detail="", **metrics):
    return {"id": cid, "name": name, "status": status, "detail": detail, "metrics": metrics}


# --------------------------------------------------------------------------- (0) binding
def check_binding_without_cuda(C, reason):
    calls = {
        "cuda_devices": lambda: C.cuda_devices(),
        "install_cuda_pin_backend": lambda: C.install_cuda_pin_backend(),
        "measure_gpu_rates": lambda: C.measure_gpu_rates(),
        "cuda_adam_step": lambda: C.cuda_adam_step({}, 1, 1.0, [8, 8, 8], 1, 8, "float32", [],
                                                   "float32"),
        "CudaUpdater": lambda: C.CudaUpdater(1024),
    }
    bad = []
    for name, fn in calls.items():
        try:
            fn()
            bad.append(f"{name} did not raise")
        except C.StrataError as e:
            if not str(e).startswith("CUDA not available: "):
                bad.append(f"{name}: unexpected message {e}")
        except Exception as e:  # noqa: BLE001 - any other exception type is the failure
            bad.append(f"{name} raised {type(e).__name__}: {e}")
    info = C.cuda_info()
    if info["available"] or not info["reason"]:
        bad.append(f"cuda_info() says available={info['available']} reason={info['reason']!r}")
    if bad:
        return result("0", "binding without a device raises cleanly", "fail", "; ".join(bad))
    return result("0", "binding without a device raises cleanly", "pass",
                  f"{len(calls)} functions raise StrataError('CUDA not available: {reason}')")


# --------------------------------------------------------------------------- (1) correctness
def _compare(torch, got, want, rtol, atol):
    """(passed, detail, bit-identical fraction, max abs err)."""
    try:
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
        ok, msg = True, ""
    except AssertionError as e:
        ok, msg = False, str(e).splitlines()[0:3]
    same = (got.view(torch.int32) == want.view(torch.int32)).float().mean().item()
    err = (got.double() - want.double()).abs().max().item()
    return ok, msg, same, err


def check_correctness(C, torch):
    out = []
    dev = torch.device("cuda")
    stream = lambda: torch.cuda.current_stream().cuda_stream  # noqa: E731
    n, steps = (1 << 20) + 13, 10
    gen = torch.Generator().manual_seed(0)
    variants = [
        ("AdamW wd=0.01", dict(kind="adamw", weight_decay=0.01, amsgrad=False)),
        ("AdamW wd=0.1 amsgrad", dict(kind="adamw", weight_decay=0.1, amsgrad=True)),
        ("Adam L2 wd=0.01", dict(kind="adam", weight_decay=0.01, amsgrad=False)),
    ]
    lr, betas, eps = 1e-3, (0.9, 0.999), 1e-8
    for label, v in variants:
        hyper = dict(kind=v["kind"], lr=lr, betas=betas, eps=eps, weight_decay=v["weight_decay"],
                     amsgrad=v["amsgrad"])
        p0 = torch.randn(n, generator=gen)
        grads = [torch.randn(n, generator=gen) for _ in range(steps)]
        # torch.optim on the device
        ref = p0.clone().to(dev).requires_grad_(True)
        cls = torch.optim.AdamW if v["kind"] == "adamw" else torch.optim.Adam
        opt = cls([ref], lr=lr, betas=betas, eps=eps, weight_decay=v["weight_decay"],
                  amsgrad=v["amsgrad"])
        # strata on the device and on the CPU (scalar reference)
        nslots = 4 if v["amsgrad"] else 3
        gslots = [p0.clone().to(dev)] + [torch.zeros(n, device=dev) for _ in range(nslots - 1)]
        cslots = [p0.clone()] + [torch.zeros(n) for _ in range(nslots - 1)]
        out_dev = torch.empty(n, device=dev)
        for t in range(1, steps + 1):
            g = grads[t - 1]
            ref.grad = g.to(dev)
            opt.step()
            gd = g.to(dev)
            C.cuda_adam_step(hyper, t, 1.0, [s.data_ptr() for s in gslots], n, gd.data_ptr(),
                             "float32", [(0, n, out_dev.data_ptr())], "float32", stream=stream())
            C.optimizer_step(hyper, t, 1.0, [s.data_ptr() for s in cslots], n, g.data_ptr(),
                             "float32", [], "float32", threads=1, isa="scalar")
        torch.cuda.synchronize()
        gpu_p = gslots[0].cpu()
        ok1, msg1, same1, err1 = _compare(torch, gpu_p, ref.detach().cpu(), 1e-5, 1e-6)
        ok2, msg2, same2, err2 = _compare(torch, gpu_p, cslots[0], 1e-5, 1e-6)
        ok3 = torch.equal(out_dev.cpu(), gpu_p)
        slots_ok = all(torch.equal(gslots[i].cpu(), cslots[i]) or
                       _compare(torch, gslots[i].cpu(), cslots[i], 1e-5, 1e-6)[0]
                       for i in range(1, nslots))
        out.append(result("1", f"CUDA {label} vs torch.optim ({steps} steps, {n} elems)",
                          "pass" if ok1 else "fail",
                          f"max abs err {err1:.3g}, bit-identical {same1:.1%}" +
                          ("" if ok1 else f"; {msg1}"), max_abs_err=err1, bit_identical=same1))
        out.append(result("1", f"CUDA {label} vs strata CPU kernel",
                          "pass" if ok2 and ok3 and slots_ok else "fail",
                          f"max abs err {err2:.3g}, bit-identical {same2:.1%}" +
                          ("" if ok3 else "; copy-out differs from master") +
                          ("" if slots_ok else "; m/v slots differ") +
                          ("" if ok2 else f"; {msg2}"), max_abs_err=err2, bit_identical=same2))

    # bf16 gradients, grad_mul, bf16 copy-out in two ranges: against the CPU kernel.
    hyper = dict(kind="adamw", lr=lr, betas=betas, eps=eps, weight_decay=0.1)
    p0 = torch.randn(n, generator=gen)
    g = torch.randn(n, generator=gen).to(torch.bfloat16)
    gslots = [p0.clone().to(dev), torch.zeros(n, device=dev), torch.zeros(n, device=dev)]
    cslots = [p0.clone(), torch.zeros(n), torch.zeros(n)]
    gout = torch.empty(n, dtype=torch.bfloat16, device=dev)
    cout = torch.empty(n, dtype=torch.bfloat16)
    half = n // 2
    for t in (1, 2, 3):
        gd = g.to(dev)
        C.cuda_adam_step(hyper, t, 0.5, [s.data_ptr() for s in gslots], n, gd.data_ptr(),
                         "bfloat16", [(half, n - half, gout.data_ptr() + 2 * half),
                                      (0, half, gout.data_ptr())], "bfloat16", stream=stream())
        C.optimizer_step(hyper, t, 0.5, [s.data_ptr() for s in cslots], n, g.data_ptr(),
                         "bfloat16", [(0, n, cout.data_ptr())], "bfloat16", threads=1,
                         isa="scalar")
    torch.cuda.synchronize()
    ok, msg, same, err = _compare(torch, gslots[0].cpu(), cslots[0], 1e-5, 1e-6)
    out_same = torch.equal(gout.cpu().view(torch.int16), cout.view(torch.int16))
    out.append(result("1", "CUDA AdamW bf16 grads x0.5, bf16 copy-out vs CPU kernel",
                      "pass" if ok and out_same else "fail",
                      f"bit-identical master {same:.1%}, copy-out identical: {out_same}" +
                      ("" if ok else f"; {msg}"), bit_identical=same))

    # GpuUpdater: pinned host records through H2D -> kernel -> D2H, several in flight.
    jobs, m = 6, (1 << 18) + 5
    up = C.CudaUpdater(m, buffers=2)
    hyper = dict(kind="adamw", lr=lr, betas=betas, eps=eps, weight_decay=0.01)
    recs = []
    for j in range(jobs):
        host = torch.randn(4 * m, generator=gen).pin_memory()
        host[m:3 * m].zero_()
        cpu = host.clone()
        recs.append((host, cpu))
    params = torch.empty(jobs, m, device=dev)
    tickets = []
    for j, (host, _) in enumerate(recs):
        base = host.data_ptr()
        tickets.append(up.submit(hyper, j + 1, 1.0, [base, base + 4 * m, base + 8 * m], m,
                                 base + 12 * m, "float32", [(0, m, params[j].data_ptr())],
                                 "float32"))
    up.wait_all()
    times = up.job_times(tickets[-1])
    bad = 0
    for j, (host, cpu) in enumerate(recs):
        base = cpu.data_ptr()
        C.optimizer_step(hyper, j + 1, 1.0, [base, base + 4 * m, base + 8 * m], m, base + 12 * m,
                         "float32", [], "float32", threads=1, isa="scalar")
        if not (torch.equal(host[:3 * m], cpu[:3 * m]) and torch.equal(params[j].cpu(), cpu[:m])):
            bad += 1
    up.close()
    out.append(result("1", f"GpuUpdater pipeline ({jobs} jobs, K=2) vs CPU kernel",
                      "pass" if bad == 0 else "fail",
                      f"{jobs - bad}/{jobs} records bit-identical; last job h2d "
                      f"{times['h2d_ms']:.2f} ms, kernel {times['kernel_ms']:.2f} ms, d2h "
                      f"{times['d2h_ms']:.2f} ms", **times))
    return out


# --------------------------------------------------------------------------- (2)-(3) bench
def check_bench(path, reason_missing):
    if not path or not os.path.exists(path):
        msg = reason_missing or f"bench output {path} is missing"
        return [result("2", "CUDA AdamW / D2D copy bandwidth", "not run", msg),
                result("3", "pinned copies pool / cudaHostAlloc", "not run", msg)]
    rows = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line.startswith("{"):
                rows.append(json.loads(line))
    skipped = [r for r in rows if r.get("skipped")]
    if skipped:
        msg = "strata-bench-gpu skipped: " + skipped[0].get("reason", "")
        return [result("2", "CUDA AdamW / D2D copy bandwidth", "not run", msg),
                result("3", "pinned copies pool / cudaHostAlloc", "not run", msg)]
    out = []
    adam = [r for r in rows if r.get("test") == "adam"]
    if adam:
        worst = min(adam, key=lambda r: r["ratio"])
        out.append(result(
            "2", "CUDA AdamW / D2D copy bandwidth",
            "pass" if worst["ratio"] >= ADAM_BW_TARGET else "fail",
            f"min {worst['ratio']:.2f} ({worst['variant']} grad {worst['grad']} out {worst['out']}, "
            f"{worst['gbps']:.0f} GB/s) over {len(adam)} shapes; target >= {ADAM_BW_TARGET}",
            ratio_min=worst["ratio"], ratios={f"{r['variant']} {r['grad']} {r['out']}": r["ratio"]
                                              for r in adam}))
    for d in ("h2d", "d2h"):
        pool = [r for r in rows if r.get("test") == d and r.get("variant") == "pool"]
        if pool:
            r = pool[0]
            out.append(result("3", f"pinned {d.upper()} pool / cudaHostAlloc",
                              "pass" if r["ratio"] >= PINNED_TARGET else "fail",
                              f"{r['ratio']:.2f} ({r['gbps']:.1f} GB/s); target >= {PINNED_TARGET}",
                              ratio=r["ratio"], gbps=r["gbps"]))
    pipe = [r for r in rows if r.get("test") == "pipeline"]
    if pipe:
        r = pipe[0]
        out.append(result("-", "GpuUpdater pipeline / ideal (info)", "info",
                          f"{r['ratio']:.2f} ({r['variant']}, {r['gbps']:.1f} GB/s)",
                          ratio=r["ratio"]))
    return out


def write_profile(C, out_dir):
    rates = C.measure_gpu_rates(copy_bytes=256 << 20, adam_elements=32 << 20, reps=5)
    devs = C.cuda_devices()
    profile = {
        "name": f"{rates['device_name']} (strata gpu_check, {time.strftime('%Y-%m-%d')})",
        "h2d_bytes_per_s": rates["h2d_gbps"] * 1e9,
        "d2h_bytes_per_s": rates["d2h_gbps"] * 1e9,
        "pcie_duplex": bool(devs and devs[0]["async_engines"] >= 2),
        "gpu_update_params_per_s": rates["adam_params_per_s"],
        "gpu_free_bytes": rates["free_memory"],
    }
    path = os.path.join(out_dir, "hardware_profile_gpu.json")
    with open(path, "w") as f:
        json.dump(profile, f, indent=2)
    return result("-", "GPU rates for the performance model", "info",
                  f"H2D {rates['h2d_gbps']:.1f} GB/s, D2H {rates['d2h_gbps']:.1f} GB/s, D2D "
                  f"{rates['d2d_gbps']:.0f} GB/s, AdamW {rates['adam_params_per_s'] / 1e9:.2f} "
                  f"G params/s -> {path}", **rates)


# --------------------------------------------------------------------------- (4)-(5) engine
def engine_gpu_update(C):
    feats = getattr(C, "engine_features", None)
    if feats is None:
        return False
    try:
        return bool(feats().get("gpu_update"))
    except Exception:  # noqa: BLE001
        return False


def _gpt(torch, size, seed):
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    from gpt import GPT  # noqa: E402

    torch.manual_seed(seed)
    return GPT(**size, dropout=0.0)


def _offload_cfg(device, nvme_dir, ratio=None, schedule=None, overlap=True, sub_group=2_000_000):
    off = {"device": device, "pin_memory": True}
    if device == "nvme":
        off["nvme_path"] = nvme_dir
    if ratio is not None:
        off["ratio"] = ratio
    cfg = {"train_micro_batch_size_per_gpu": 8,
           "zero_optimization": {"stage": 2, "sub_group_size": sub_group, "offload_optimizer": off},
           "strata": {"overlap_backward": overlap, "progress": "off"}}
    if schedule is not None:
        cfg["strata"]["schedule"] = schedule
    return cfg


def check_interleave(C, torch, out_dir):
    import strata.optim

    size = dict(d_model=1024, n_layer=12, n_head=16, seq_len=256)
    nvme = os.path.join(out_dir, "swap")
    os.makedirs(nvme, exist_ok=True)
    configs = [("cpu-only", _offload_cfg("cpu", nvme, ratio=1.0, schedule="static")),
               ("all-gpu", _offload_cfg("cpu", nvme, ratio=0.0, schedule="static")),
               ("interleaved (auto)", _offload_cfg("cpu", nvme, schedule="auto"))]
    times = {}
    for name, cfg in configs:
        model = _gpt(torch, size, 0).cuda()
        opt = strata.optim.OffloadAdamW(model.parameters(), lr=1e-4, config=cfg)
        x = torch.randint(0, 256, (8, size["seq_len"]), device="cuda")
        y = torch.randint(0, 256, (8, size["seq_len"]), device="cuda")
        per_step = []
        for step in range(6):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            loss = model(x, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            torch.cuda.synchronize()
            if step > 0:
                per_step.append(time.perf_counter() - t0)
        opt.close()
        times[name] = statistics.median(per_step)
        del model, opt
        torch.cuda.empty_cache()
    speedup = times["cpu-only"] / times["interleaved (auto)"]
    return [result("4", "interleaved schedule vs CPU-only (step time)",
                   "pass" if speedup >= INTERLEAVE_TARGET else "fail",
                   ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in times.items()) +
                   f"; speedup {speedup:.2f}x, target >= {INTERLEAVE_TARGET}x",
                   speedup=speedup, **{k: v for k, v in times.items()})]


def check_gpt(C, torch, out_dir):
    import strata.optim

    sys.path.insert(0, os.path.join(ROOT, "examples"))
    from gpt import Batches, stdlib_corpus  # noqa: E402

    size = dict(d_model=256, n_layer=4, n_head=4, seq_len=128)
    steps = 50
    corpus = stdlib_corpus(max_bytes=2 << 20)

    def train(make_opt):
        model = _gpt(torch, size, 1).cuda()
        opt = make_opt(model)
        data = Batches(corpus, size["seq_len"], 8, seed=3)
        losses = []
        for _ in range(steps):
            x, y = data.next()
            loss = model(x.cuda(), y.cuda())
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        if hasattr(opt, "close"):
            opt.close()
        return losses, [p.detach().cpu() for p in model.parameters()]

    # Both runs must see the same forward/backward bits, so that the comparison measures the
    # optimizer: deterministic kernels, no TF32.
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    hp = dict(lr=3e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    ref_losses, ref_params = train(lambda m: torch.optim.AdamW(m.parameters(), **hp))
    out = []
    nvme = os.path.join(out_dir, "swap")
    os.makedirs(nvme, exist_ok=True)
    for device in ("cpu", "nvme"):
        cfg = _offload_cfg(device, nvme, overlap=True, schedule="static")  # CPU updates
        losses, params = train(lambda m, c=cfg: strata.optim.OffloadAdamW(m.parameters(), config=c,
                                                                         **hp))
        worst = max(abs(a - b) / abs(b) for a, b in zip(losses, ref_losses))
        try:
            for a, b in zip(params, ref_params):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
            params_ok, msg = True, ""
        except AssertionError as e:
            params_ok, msg = False, str(e).splitlines()[0]
        ok = worst <= 1e-3 and params_ok
        out.append(result("5", f"GPT {steps} steps, state on {device}, overlap on, vs torch AdamW",
                          "pass" if ok else "fail",
                          f"max loss rel diff {worst:.2e} (<= 1e-3), params "
                          f"{'close' if params_ok else 'differ: ' + msg}",
                          max_loss_rel_diff=worst))
    return out


# --------------------------------------------------------------------------- run
def run(args):
    checks = []
    os.makedirs(args.out, exist_ok=True)
    try:
        import strata
        C = strata._C
    except Exception as e:  # noqa: BLE001
        msg = f"import strata failed: {type(e).__name__}: {e}"
        checks = [result(i, n, "not run", msg) for i, n in
                  (("0", "binding"), ("1", "CUDA AdamW correctness"), ("4", "interleave"),
                   ("5", "GPT training"))]
        checks += check_bench(args.bench, None)
        return checks
    available, reason = C.cuda_available()
    try:
        import torch
        torch_cuda = torch.cuda.is_available()
        torch_msg = f"torch {torch.__version__}, CUDA {torch.version.cuda}"
    except Exception as e:  # noqa: BLE001
        torch, torch_cuda, torch_msg = None, False, f"torch not importable: {e}"

    def guarded(fn, cid, name, *a):
        try:
            return fn(*a)
        except Exception as e:  # noqa: BLE001
            return [result(cid, name, "fail", f"{type(e).__name__}: {e}",
                           traceback=traceback.format_exc())]

    if not available:
        checks.append(check_binding_without_cuda(C, reason))
        why = f"no usable CUDA device for strata: {reason}"
        checks.append(result("1", "CUDA AdamW vs torch.optim and the CPU kernel", "not run", why))
        checks += check_bench(args.bench, why)
        checks.append(result("4", "interleaved schedule vs CPU-only", "not run", why))
        checks.append(result("5", "GPT 50 steps vs torch AdamW", "not run", why))
        return checks
    if torch is None or not torch_cuda:
        why = f"strata sees a device but torch cannot use it ({torch_msg})"
        checks.append(result("1", "CUDA AdamW vs torch.optim and the CPU kernel", "not run", why))
    else:
        checks += guarded(check_correctness, "1", "CUDA AdamW correctness", C, torch)
    checks += check_bench(args.bench, None)
    checks += guarded(lambda: [write_profile(C, args.out)], "-", "GPU rates")
    if torch is None or not torch_cuda:
        checks.append(result("4", "interleaved schedule vs CPU-only", "not run", torch_msg))
        checks.append(result("5", "GPT 50 steps vs torch AdamW", "not run", torch_msg))
        return checks
    if not engine_gpu_update(C):
        why = "not run: the engine has no GPU update path yet (strata._C.engine_features()" \
              "['gpu_update'] is missing or false)"
        checks.append(result("4", "interleaved schedule vs CPU-only", "not run", why))
    else:
        checks += guarded(check_interleave, "4", "interleaved schedule", C, torch, args.out)
    # GPU parameters with CPU updates (host copies) need no GPU update path.
    checks += guarded(check_gpt, "5", "GPT training", C, torch, args.out)
    return checks


# --------------------------------------------------------------------------- summarize
def _read_json(path, default):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return default


def summarize(out_dir):
    rows = []
    steps_path = os.path.join(out_dir, "steps.tsv")
    if os.path.exists(steps_path):
        with open(steps_path) as f:
            for line in f:
                parts = line.rstrip("\n").split("\t")
                if len(parts) >= 4:
                    name, status, secs, detail = parts[:4]
                    rows.append(result("-", name, status, f"{detail} ({secs} s)".strip()))
    for name in sorted(os.listdir(out_dir)):
        if name.startswith("test_cuda") and name.endswith(".json"):
            g = _read_json(os.path.join(out_dir, name), None)
            if g is None:
                rows.append(result("T", name[:-5], "fail", "no readable gtest output"))
                continue
            tests = [t for s in g.get("testsuites", []) for t in s.get("testsuite", [])]
            failed = [t["name"] for t in tests if t.get("failures")]
            skipped = [t["name"] for t in tests if t.get("result") == "SKIPPED" or
                       t.get("status") == "NOTRUN"]
            passed = len(tests) - len(failed) - len(skipped)
            status = "fail" if failed else ("pass" if passed else "not run")
            rows.append(result("T", f"C++ {name[:-5]}", status,
                               f"{passed} passed, {len(skipped)} skipped, {len(failed)} failed" +
                               (f": {', '.join(failed)}" if failed else "")))
    py = _read_json(os.path.join(out_dir, "python_checks.json"), None)
    if py is None:
        rows.append(result("P", "Python checks (gpu_check.py run)", "not run",
                           "python_checks.json is missing (see the log)"))
        rows += check_bench(os.path.join(out_dir, "bench_gpu.jsonl"), None)
    else:
        rows += py
    width = max(len(r["name"]) for r in rows) if rows else 10
    print()
    print(f"{'id':<3} {'check':<{width}}  {'status':<8} detail")
    print(f"{'-' * 3} {'-' * width}  {'-' * 8} {'-' * 40}")
    for r in rows:
        print(f"{r['id']:<3} {r['name']:<{width}}  {r['status']:<8} {r['detail']}")
    failed = [r for r in rows if r["status"] == "fail"]
    not_run = [r for r in rows if r["status"] == "not run"]
    verdict = "FAILED" if failed else ("INCOMPLETE" if not_run else "ALL PASSED")
    print(f"\ngpu_check: {verdict}: {len(failed)} failed, {len(not_run)} not run, "
          f"{sum(r['status'] == 'pass' for r in rows)} passed")
    with open(os.path.join(out_dir, "gpu_check.json"), "w") as f:
        json.dump({"verdict": verdict, "checks": rows}, f, indent=2, default=str)
    return 1 if failed else (2 if not_run else 0)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--out", required=True)
    r.add_argument("--bench", default=None, help="strata-bench-gpu --json output")
    s = sub.add_parser("summarize")
    s.add_argument("out")
    args = ap.parse_args(argv)
    # cuBLAS reads this when it starts; deterministic GEMMs for check (5).
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if args.cmd == "summarize":
        return summarize(args.out)
    checks = run(args)
    with open(os.path.join(args.out, "python_checks.json"), "w") as f:
        json.dump(checks, f, indent=2, default=str)
    for c in checks:
        print(f"[{c['status']}] ({c['id']}) {c['name']}: {c['detail']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
