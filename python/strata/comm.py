"""``strata.comm``: DeepSpeed's ``deepspeed.comm`` names, forwarded to ``torch.distributed``.

strata has no communication layer of its own. ``init_distributed`` starts torch.distributed when
the process was launched as one of several (``torchrun`` / the ``deepspeed`` launcher set
``WORLD_SIZE`` > 1, ``RANK``, ``MASTER_ADDR``); a single process (no launcher) is left alone and
behaves as rank 0 of 1, so DeepSpeed scripts that call ``deepspeed.init_distributed()``
unconditionally still run on one machine without opening a port. ``get_rank``,
``get_world_size`` and ``get_local_rank`` answer 0, 1 and ``LOCAL_RANK`` (default 0) before
torch.distributed is initialised (DeepSpeed asserts instead). Every other name
(``all_reduce``, ``broadcast``, ``barrier``, ``ReduceOp``, ...) is torch.distributed's own.
"""

import datetime
import os

import torch

try:
    import torch.distributed as _dist
except ImportError:  # pragma: no cover - torch built without distributed
    _dist = None


def is_available():
    return _dist is not None and _dist.is_available()


def is_initialized():
    return is_available() and _dist.is_initialized()


def _env_world_size():
    for var in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        if var in os.environ:
            try:
                return int(os.environ[var])
            except ValueError:
                pass
    return 1


def init_distributed(dist_backend=None, auto_mpi_discovery=True, distributed_port=29500,
                     verbose=True, timeout=datetime.timedelta(minutes=30), init_method=None,
                     dist_init_required=None, config=None, rank=-1, world_size=-1):
    """Start torch.distributed when the launcher asked for several processes (see module doc).

    Returns True when torch.distributed is (now) initialised.
    """
    os.environ.setdefault("LOCAL_RANK", "0")
    if is_initialized():
        return True
    if dist_init_required is False:
        return False
    if world_size is None or world_size < 0:
        world_size = _env_world_size()
    if world_size <= 1 and not dist_init_required:
        return False
    if not is_available():
        raise RuntimeError("strata: this torch was built without torch.distributed, but the "
                           f"launcher asked for {world_size} processes")
    if dist_backend is None:
        dist_backend = "nccl" if torch.cuda.is_available() else "gloo"
    kwargs = {"backend": dist_backend, "timeout": timeout}
    if init_method is not None:
        kwargs["init_method"] = init_method
    if rank is not None and rank >= 0:
        kwargs["rank"] = rank
        kwargs["world_size"] = world_size
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(distributed_port))
    _dist.init_process_group(**kwargs)
    return True


def get_rank(group=None):
    if not is_initialized():
        return 0
    return _dist.get_rank(group) if group is not None else _dist.get_rank()


def get_world_size(group=None):
    if not is_initialized():
        return 1
    return _dist.get_world_size(group) if group is not None else _dist.get_world_size()


def get_local_rank():
    try:
        return int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        return 0


def barrier(group=None, **kwargs):
    if not is_initialized():
        return None
    return _dist.barrier(group=group, **kwargs) if group is not None else _dist.barrier(**kwargs)


def all_reduce(tensor, op=None, group=None, async_op=False):
    if not is_initialized():
        return None
    if op is None:
        op = _dist.ReduceOp.SUM
    return _dist.all_reduce(tensor, op=op, group=group, async_op=async_op)


def broadcast(tensor, src, group=None, async_op=False):
    if not is_initialized():
        return None
    return _dist.broadcast(tensor, src, group=group, async_op=async_op)


def __getattr__(name):
    if _dist is not None and hasattr(_dist, name):
        return getattr(_dist, name)
    raise AttributeError(f"module 'strata.comm' has no attribute {name!r} "
                         "(it forwards to torch.distributed, which has none either)")
