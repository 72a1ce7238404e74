#!/usr/bin/env python3
"""strata's CPU AdamW kernel against torch.optim.AdamW(foreach=True), and against DeepSpeed's
cpu_adam when given its built extension, on the same data sizes and threads.

    PYTHONPATH=python /usr/bin/python3 benchmarks/bench_cpu_adam.py --sizes 16M,64M --threads 2
    PYTHONPATH=python /usr/bin/python3 benchmarks/bench_cpu_adam.py --sizes 64M,256M --threads 1,2 \\
        --deepspeed-ext /tmp/ds_cpu_adam/ds_cpu_adam_avx512/ds_cpu_adam_avx512.so --torch off

Each contender updates its own fp32 master weights, m and v (separately allocated torch
tensors) from the same fp32 gradients with the same hyper-parameters (AdamW, lr 1e-3, betas
(0.9, 0.999), eps 1e-8, weight decay 0.01), on the same number of threads: torch's intra-op
threads = strata's kernel threads = DeepSpeed's OpenMP threads (torch.set_num_threads, one
libgomp). Each round runs every contender once, the order rotated round by round, with a 20 ms
pause between calls (OpenMP workers spin for a while after a parallel region); the table gives
G params/s from the median run and strata's speed-up as the median over the rounds of
(other's time / strata's time).

DeepSpeed's cpu_adam is never part of this repository: --deepspeed-ext is the path of the
extension the user built from DeepSpeed's own sources (csrc/adam/cpu_adam.cpp and
cpu_adam_impl.cpp, e.g. with torch.utils.cpp_extension.load and the flags of its op builder:
-O3 -march=native -fopenmp -D__AVX512__ or -D__AVX256__); the bench calls its adam_update on
torch tensors, as DeepSpeedCPUAdam does. Without the path the DeepSpeed rows are skipped, and
the bench says so.

The "bound" contender is the independent memory bound of build/bin/strata-bench-adam
(benchmarks/common/plain_bound.h, loaded from build/lib/libstrata_plain_bound.so through
ctypes): a plain loop that shares no code with either kernel, its own arrays (4 KiB pages with
--memory torch, 2 MiB-aligned huge pages with --memory huge) first-touched by its own threads
under a static partition, moving the same 28 bytes per parameter (p, g, m, v read; p, m, v
written). It runs in the same rounds, so every contender's "x bound" (the median over rounds
of bound time / its time) says how close it is to what the memory gives in that moment: two
kernels both at about 1.0 of it cannot be far apart.
"""

import argparse
import ctypes
import importlib.util
import json
import mmap
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))

import torch  # noqa: E402

from strata import _C  # noqa: E402

HYPER = {"kind": "adamw", "lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01}
PAUSE_S = 0.02
DEFAULT_BOUND_LIB = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "build", "lib",
                                 "libstrata_plain_bound.so")


def size(text):
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(float(text[:-1]) * mult[text[-1].upper()]) if text[-1].upper() in mult else int(float(text))


def load_extension(path):
    """The user's built DeepSpeed cpu_adam extension (a .so whose module name is its file stem)."""
    name = os.path.basename(path).split(".")[0]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None:
        raise SystemExit(f"--deepspeed-ext {path}: not a loadable extension")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    for fn in ("create_adam", "adam_update", "destroy_adam"):
        if not hasattr(mod, fn):
            raise SystemExit(f"--deepspeed-ext {path}: no {fn}(); is it DeepSpeed's cpu_adam?")
    return mod


class HugeRecord:
    """p, m, v (and optionally g) as views of one anonymous mapping with MADV_HUGEPAGE, at the engine's slot
    stride (_C.slot_stride_for): the memory strata's engine gives its kernel. --memory huge gives every
    contender one of these."""

    def __init__(self, p0, slots):
        n = p0.numel()
        self.stride = _C.slot_stride_for(n)
        self.map = mmap.mmap(-1, self.stride * 4 * slots)
        self.map.madvise(mmap.MADV_HUGEPAGE)
        self.views = [torch.frombuffer(self.map, dtype=torch.float32, count=n, offset=k * self.stride * 4)
                      for k in range(slots)]
        self.views[0].copy_(p0)
        for v in self.views[1:]:
            v.zero_()


def state_for(p0, memory):
    """(p, m, v, keep-alive) of one contender: separate torch tensors, or one huge-page record."""
    if memory == "torch":
        return p0.clone(), torch.zeros_like(p0), torch.zeros_like(p0), None
    rec = HugeRecord(p0, 3)
    return rec.views[0], rec.views[1], rec.views[2], rec


def load_bound(path):
    """The independent bound's C ABI (benchmarks/plain_bound_lib.cpp), or None with the reason."""
    if not os.path.exists(path):
        return None, f"no {path} (cmake --build build --target strata_plain_bound)"
    lib = ctypes.CDLL(path)
    lib.strata_plain_bound_new.restype = ctypes.c_void_p
    lib.strata_plain_bound_new.argtypes = [ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                           ctypes.c_uint, ctypes.c_int, ctypes.c_int]
    lib.strata_plain_bound_run.restype = ctypes.c_double
    lib.strata_plain_bound_run.argtypes = [ctypes.c_void_p]
    lib.strata_plain_bound_isa.restype = ctypes.c_char_p
    lib.strata_plain_bound_isa.argtypes = [ctypes.c_void_p]
    lib.strata_plain_bound_free.argtypes = [ctypes.c_void_p]
    return lib, None


class PlainBound:
    """AdamW's bytes per parameter with fp32 gradients and no copy-out (3 fp32 arrays read and
    written, a 4-byte gradient read) on the bound's own arrays and threads."""
    name = "bound"

    def __init__(self, lib, n, threads, huge):
        self.lib = lib
        self.h = lib.strata_plain_bound_new(n, 3, 4, 0, threads, 1 if huge else 0, 4)
        if not self.h:
            raise SystemExit(f"strata_plain_bound_new({n}, threads={threads}) failed")
        self.isa = lib.strata_plain_bound_isa(self.h).decode()

    def step(self):
        self.lib.strata_plain_bound_run(self.h)

    def close(self):
        self.lib.strata_plain_bound_free(self.h)


class Strata:
    name = "strata"

    def __init__(self, p0, g, threads, isa="auto", memory="torch"):
        self.p, self.m, self.v, self.rec = state_for(p0, memory)
        self.g = g
        self.threads, self.isa, self.t = threads, isa, 0

    def step(self):
        self.t += 1
        _C.optimizer_step(HYPER, self.t, 1.0, [self.p.data_ptr(), self.m.data_ptr(), self.v.data_ptr()],
                          self.p.numel(), self.g.data_ptr(), "float32", [], "float32", self.threads, self.isa)


class DeepSpeed:
    name = "deepspeed"
    _next_id = 0

    def __init__(self, ext, p0, g, memory="torch"):
        self.ext = ext
        self.p, self.m, self.v, self.rec = state_for(p0, memory)
        self.g = g
        self.id = DeepSpeed._next_id
        DeepSpeed._next_id += 1
        b1, b2 = HYPER["betas"]
        ext.create_adam(self.id, HYPER["lr"], b1, b2, HYPER["eps"], HYPER["weight_decay"], True, False)
        self.t = 0

    def step(self):
        self.t += 1
        b1, b2 = HYPER["betas"]
        self.ext.adam_update(self.id, self.t, HYPER["lr"], b1, b2, HYPER["eps"], HYPER["weight_decay"], True,
                             self.p, self.g, self.m, self.v)

    def close(self):
        self.ext.destroy_adam(self.id)


class Torch:
    name = "torch"

    def __init__(self, p0, g):
        self.p = p0.clone()
        self.opt = torch.optim.AdamW([self.p], foreach=True,
                                     **{k: HYPER[k] for k in ("lr", "betas", "eps", "weight_decay")})
        self.p.grad = g
        self.opt.step()  # state allocated outside the timing

    def step(self):
        self.opt.step()


def agreement(ext, threads, isa):
    """Max |difference| of parameters after 3 steps of strata and DeepSpeed from the same start (1M
    elements): they must do the same update (DeepSpeed's operation order differs, so not bit for bit)."""
    torch.manual_seed(1)
    p0, g = torch.randn(1 << 20), torch.randn(1 << 20) * 1e-2
    s, d = Strata(p0, g, threads, isa), DeepSpeed(ext, p0, g)
    for _ in range(3):
        s.step()
        d.step()
    d.close()
    return float((s.p - d.p).abs().max()), float((s.p - p0).abs().max())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="4M,16M,64M")
    ap.add_argument("--threads", default=str(os.cpu_count()), help="comma list of thread counts")
    ap.add_argument("--iters", type=int, default=5, help="rounds per size and thread count")
    ap.add_argument("--deepspeed-ext", metavar="PATH",
                    help="DeepSpeed's cpu_adam extension built from its own sources (a .so)")
    ap.add_argument("--torch", choices=("on", "off"), default="on",
                    help="the torch.optim.AdamW(foreach=True) rows (off saves ~4 GiB per 256M params)")
    ap.add_argument("--isa", default="auto", choices=("auto", "avx512", "avx2", "scalar"),
                    help="strata's kernel variant (avx2: compare with DeepSpeed's -D__AVX256__ build)")
    ap.add_argument("--memory", choices=("torch", "huge"), default="torch",
                    help="torch: every contender's p, m, v are separately allocated torch tensors (4 KiB pages); "
                         "huge: each its own huge-page record at the engine's slot stride, the gradient too")
    ap.add_argument("--bound-lib", metavar="PATH", default=DEFAULT_BOUND_LIB,
                    help="the independent bound's library (default build/lib/libstrata_plain_bound.so)")
    ap.add_argument("--bound", choices=("on", "off"), default="on",
                    help="the independent memory bound as a contender in the same rounds")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    ext = load_extension(args.deepspeed_ext) if args.deepspeed_ext else None
    bound_lib, bound_why = load_bound(args.bound_lib) if args.bound == "on" else (None, "--bound off")
    threads_list = [int(t) for t in args.threads.split(",")]
    say = (lambda *a: None) if args.json else print
    say(f"# torch {torch.__version__}, strata kernel {_C.detect_isa() if args.isa == 'auto' else args.isa}, "
        f"deepspeed {'cpu_adam from ' + args.deepspeed_ext if ext else 'skipped'}; memory {args.memory}; "
        f"{args.iters} rounds, "
        f"order rotated; G params/s from the median run; x = median over rounds of (its time / strata's)")
    if ext is None:
        say("# deepspeed rows skipped: no --deepspeed-ext PATH given (build DeepSpeed's csrc/adam/cpu_adam.cpp "
            "and cpu_adam_impl.cpp outside this repository, e.g. with torch.utils.cpp_extension.load, "
            "and pass the .so)")
    if args.torch == "off":
        say("# torch rows skipped: --torch off")
    if bound_lib is None:
        say(f"# bound rows skipped: {bound_why}")
    else:
        pages = "huge" if args.memory == "huge" else "4 KiB"
        say(f"# bound: a plain loop sharing no code with either kernel, own arrays ({pages} pages) and threads, "
            "28 B per param; x bound = median over rounds of (bound time / its time)")
    for threads in threads_list:
        torch.set_num_threads(threads)
        if ext is not None:
            diff, moved = agreement(ext, threads, args.isa)
            say(f"# threads {threads}: strata vs deepspeed after 3 steps on 1M params: max |dp| {diff:.3g} "
                f"(the update moved params by up to {moved:.3g})")
        say(f"{'numel':>11} {'threads':>7} {'contender':>10} {'G params/s':>11} {'strata x':>9} {'x bound':>8}")
        for n in (size(s) for s in args.sizes.split(",")):
            torch.manual_seed(0)
            p0 = torch.randn(n)
            g = torch.randn(n) * 1e-2
            if args.memory == "huge":
                grec = HugeRecord(g, 1)
                g = grec.views[0]
            runs = [Strata(p0, g, threads, args.isa, args.memory)]
            if ext is not None:
                runs.append(DeepSpeed(ext, p0, g, args.memory))
            if args.torch == "on":
                runs.append(Torch(p0, g))
            if bound_lib is not None:
                runs.append(PlainBound(bound_lib, n, threads, args.memory == "huge"))
            del p0
            for r in runs:  # warm-up: page faults, thread start
                r.step()
            times = {r.name: [] for r in runs}
            for it in range(args.iters):
                for k in range(len(runs)):
                    r = runs[(it + k) % len(runs)]
                    time.sleep(PAUSE_S)
                    t0 = time.perf_counter()
                    r.step()
                    times[r.name].append(time.perf_counter() - t0)
            base = times["strata"]
            bound_t = times.get("bound")
            for r in runs:
                t = times[r.name]
                rate = n / statistics.median(t) / 1e9
                speedup = statistics.median(a / b for a, b in zip(t, base))
                to_bound = statistics.median(b / a for a, b in zip(t, bound_t)) if bound_t else None
                row = {"numel": n, "threads": threads, "contender": r.name, "gparams_per_s": rate,
                       "strata_speedup": speedup, "ratio_to_bound": to_bound}
                if args.json:
                    print(json.dumps(row))
                else:
                    xb = f"{to_bound:>8.2f}" if to_bound is not None else f"{'-':>8}"
                    print(f"{n:>11} {threads:>7} {r.name:>10} {rate:>11.3f} {speedup:>8.2f}x {xb}")
            for r in runs:
                if isinstance(r, (DeepSpeed, PlainBound)):
                    r.close()
            del runs


if __name__ == "__main__":
    main()
