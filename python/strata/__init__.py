"""strata: optimizer state on the tier that has room (DRAM, CXL, NVMe), for PyTorch training.

Low level: ``strata.optim.OffloadAdamW`` is a ``torch.optim.Optimizer`` whose state lives in
strata's C++ engine. See README.md and docs/ for the rest.
"""

try:
    from . import _C  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the build
    raise ImportError(
        "strata's C++ extension strata._C is not built or does not load "
        f"({exc}). Build it from the repository root with `make build` (which also installs "
        "the Debian packages it needs with `make deps`), then run with PYTHONPATH=python, or "
        "install with `pip install --no-build-isolation .` in a virtual environment made "
        "with --system-site-packages."
    ) from exc

__version__ = _C.__version__
__version_major__, __version_minor__, __version_patch__ = (
    int(x) for x in (__version__.split("+")[0].split(".") + ["0", "0"])[:3])

_GIT_INFO = None


def _git_info():
    """(hash, branch) of the checkout this package is imported from, read once on first use
    (DeepSpeed bakes them in at build time); "unknown" outside a git checkout."""
    global _GIT_INFO
    if _GIT_INFO is None:
        import os
        import subprocess

        here = os.path.dirname(os.path.abspath(__file__))
        out = []
        for args in (["rev-parse", "--short", "HEAD"], ["rev-parse", "--abbrev-ref", "HEAD"]):
            try:
                out.append(subprocess.run(["git", "-C", here] + args, capture_output=True,
                                          text=True, timeout=5, check=True).stdout.strip()
                           or "unknown")
            except (OSError, subprocess.SubprocessError):
                out.append("unknown")
        _GIT_INFO = tuple(out)
    return _GIT_INFO

from .config import load_config, schema  # noqa: E402,F401
from ._C import ConfigError, StrataError, StrataIOError  # noqa: E402,F401


# DeepSpeed's surface, for `import strata as deepspeed` (docs/deepspeed.md).
# (importlib, not `from . import x`: that looks the name up on this module first, which
# calls __getattr__ again and recursed without end for `import strata; strata.optim`.)
_LAZY_MODULES = ("optim", "zero", "ops", "comm", "lr_schedules", "checkpoint", "export",
                 "engine", "loss_scaler", "deepspeed_api", "utils")
_LAZY_NAMES = {
    "initialize": ("deepspeed_api", "initialize"),
    "add_config_arguments": ("deepspeed_api", "add_config_arguments"),
    "init_distributed": ("deepspeed_api", "init_distributed"),
    "Engine": ("engine", "Engine"),
    "DeepSpeedEngine": ("engine", "Engine"),
}


def __getattr__(name):
    if name == "__git_hash__":
        return _git_info()[0]
    if name == "__git_branch__":
        return _git_info()[1]
    # Import torch-dependent parts lazily so `python -m strata info` and the
    # config tools work before torch is imported.
    if name in _LAZY_MODULES:
        import importlib

        return importlib.import_module(f".{name}", __name__)
    if name in _LAZY_NAMES:
        import importlib

        module, attr = _LAZY_NAMES[name]
        return getattr(importlib.import_module(f".{module}", __name__), attr)
    raise AttributeError(f"module 'strata' has no attribute {name!r}")
