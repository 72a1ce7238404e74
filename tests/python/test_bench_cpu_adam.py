"""benchmarks/bench_cpu_adam.py and the independent bound it runs beside the kernels
(build/lib/libstrata_plain_bound.so through ctypes): the bench runs end to end on a small size
and reports every contender's ratio to the bound; the bound's C ABI refuses bad input."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCH = os.path.join(ROOT, "benchmarks", "bench_cpu_adam.py")
LIB = os.path.join(ROOT, "build", "lib", "libstrata_plain_bound.so")

needs_lib = pytest.mark.skipif(not os.path.exists(LIB),
                               reason=f"no {LIB}: the bench binaries are not built (STRATA_BUILD_BENCH=OFF?)")


@needs_lib
def test_bound_library_refuses_bad_input_and_streams():
    spec = importlib.util.spec_from_file_location("bench_cpu_adam", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    lib, why = bench.load_bound(LIB)  # the bench's own ctypes signatures
    assert lib is not None, why
    # n 0, 5 state arrays, a 3-byte gradient, a 1-byte copy-out, 3-byte moments: each refused.
    for args in ((0, 3, 4, 0, 1, 0, 4), (1024, 5, 4, 0, 1, 0, 4), (1024, 3, 3, 0, 1, 0, 4),
                 (1024, 3, 4, 1, 1, 0, 4), (1024, 3, 4, 0, 1, 0, 3)):
        assert not lib.strata_plain_bound_new(*args), args
    for huge in (0, 1):
        h = lib.strata_plain_bound_new(1 << 20, 3, 4, 0, 2, huge, 4)
        assert h
        try:
            assert lib.strata_plain_bound_isa(h).decode() in ("avx512", "avx2", "sse2")
            assert 0.0 < lib.strata_plain_bound_run(h) < 10.0
        finally:
            lib.strata_plain_bound_free(h)


@needs_lib
@pytest.mark.parametrize("memory", ["torch", "huge"])
def test_bench_reports_the_kernel_against_the_bound(memory):
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "python"))
    out = subprocess.run([sys.executable, BENCH, "--sizes", "1M", "--threads", "1", "--iters", "2",
                          "--torch", "off", "--memory", memory, "--json"],
                         capture_output=True, text=True, env=env, timeout=120, check=True).stdout
    rows = {r["contender"]: r for r in (json.loads(line) for line in out.splitlines() if line.strip())}
    assert set(rows) == {"strata", "bound"}, out
    assert rows["bound"]["ratio_to_bound"] == pytest.approx(1.0)
    assert rows["strata"]["ratio_to_bound"] > 0.0 and rows["strata"]["gparams_per_s"] > 0.0
    assert rows["strata"]["strata_speedup"] == pytest.approx(1.0)


def test_bench_says_why_the_bound_is_skipped(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "python"))
    missing = str(tmp_path / "nothing.so")
    out = subprocess.run([sys.executable, BENCH, "--sizes", "64K", "--threads", "1", "--iters", "1",
                          "--torch", "off", "--bound-lib", missing],
                         capture_output=True, text=True, env=env, timeout=120, check=True).stdout
    assert f"# bound rows skipped: no {missing}" in out
    contenders = [line.split()[2] for line in out.splitlines() if line.strip() and line.split()[0].isdigit()]
    assert contenders == ["strata"], out
