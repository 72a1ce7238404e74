"""pip install --no-build-isolation .  (in a venv made with --system-site-packages)

Drives the same CMake build as `make build` (one source list: CMakeLists.txt), building only
the Python module strata._C and placing it in the wheel.
"""

import os
import subprocess
import sys

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        out_dir = os.path.abspath(os.path.dirname(self.get_ext_fullpath(ext.name)))
        build_dir = os.path.join(ROOT, "build-setuptools")
        cfg = [
            "cmake", "-S", ROOT, "-B", build_dir, "-G", "Ninja",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DSTRATA_PYTHON_OUT={out_dir}",
            "-DSTRATA_BUILD_TESTS=OFF", "-DSTRATA_BUILD_BENCH=OFF",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
        # The CUDA side on demand, as `make cuda`: STRATA_WITH_CUDA=1 pip install ...
        if os.environ.get("STRATA_WITH_CUDA", "0") not in ("", "0", "OFF", "off"):
            cfg.append("-DSTRATA_WITH_CUDA=ON")
        subprocess.check_call(cfg)
        subprocess.check_call(["cmake", "--build", build_dir, "--target", "_C", "-j",
                               str(os.cpu_count() or 2)])


def version():
    with open(os.path.join(ROOT, "CMakeLists.txt")) as f:
        for line in f:
            if line.startswith("project(strata VERSION"):
                return line.split()[2]
    return "0.0.0"


setup(
    name="strata",
    version=version(),
    description="Optimizer state on the tier that has room: DRAM, CXL, NVMe (io_uring)",
    packages=find_packages("python"),  # strata and its subpackages (ops, utils)
    package_dir={"": "python"},
    ext_modules=[CMakeExtension("strata._C")],
    cmdclass={"build_ext": CMakeBuild},
    python_requires=">=3.9",
    zip_safe=False,
)
