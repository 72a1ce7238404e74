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

from .config import load_config, schema  # noqa: E402,F401
from ._C import ConfigError, StrataError, StrataIOError  # noqa: E402,F401


# DeepSpeed's surface, for `import strata as deepspeed` (docs/deepspeed.md).
_LAZY_MODULES = ("zero", "ops", "comm", "lr_schedules", "checkpoint", "export", "engine",
                 "loss_scaler", "deepspeed_api")
_LAZY_NAMES = {
    "initialize": ("deepspeed_api", "initialize"),
    "add_config_arguments": ("deepspeed_api", "add_config_arguments"),
    "init_distributed": ("deepspeed_api", "init_distributed"),
    "Engine": ("engine", "Engine"),
    "DeepSpeedEngine": ("engine", "Engine"),
}


def __getattr__(name):
    # Import torch-dependent parts lazily so `python -m strata info` and the
    # config tools work before torch is imported.
    if name == "optim":
        from . import optim

        return optim
    if name in _LAZY_MODULES:
        import importlib

        return importlib.import_module(f".{name}", __name__)
    if name in _LAZY_NAMES:
        import importlib

        module, attr = _LAZY_NAMES[name]
        return getattr(importlib.import_module(f".{module}", __name__), attr)
    raise AttributeError(f"module 'strata' has no attribute {name!r}")
