"""``strata.comm``: DeepSpeed's ``deepspeed.comm`` names, forwarded to ``torch.distributed``.

strata has no communication layer of its own. ``init_distributed`` starts torch.distributed when
the process was launched as one of several (``torchrun`` / the ``deepspeed`` launcher /
``python -m strata launch`` set ``WORLD_SIZE`` > 1, ``RANK``, ``MASTER_ADDR``); a single process
(no launcher) is left alone and behaves as rank 0 of 1, so DeepSpeed scripts that call
``deepspeed.init_distributed()`` unconditionally still run on one machine without opening a
port. ``get_rank``, ``get_world_size`` and ``get_local_rank`` answer 0, 1 and ``LOCAL_RANK``
(default 0) before torch.distributed is initialised (DeepSpeed asserts instead). Every other
name (``ReduceOp``, ``all_gather_object``, ...) is torch.distributed's own.

The collectives strata itself uses (``all_reduce``, ``reduce``, ``broadcast``, ``all_gather``,
``all_gather_into``, ``reduce_scatter_tensor``) go through thin wrappers here that

- count calls, bytes and asynchronous launches per operation (``stats()``, ``reset_stats()``;
  a caller may pass its own ``stats`` dict too), which is how the tests see what the
  ``zero_optimization`` bucket keys change;
- work around what a backend lacks: Gloo has no bfloat16 (reductions run on an fp32 copy,
  gathers move the bits as float16) and no reduce-scatter or all-gather into one tensor (an
  all-gather into a list of views instead); NCCL only moves CUDA tensors, so CPU tensors are
  staged through the current CUDA device and copied back when the work completes.

Logging: after ``init_distributed`` ranks other than 0 log only errors on the ``strata`` logger
(warnings are said once, by rank 0), unless ``STRATA_LOG_ALL_RANKS=1``.
"""

import datetime
import logging
import os

import torch

try:
    import torch.distributed as _dist
except ImportError:  # pragma: no cover - torch built without distributed
    _dist = None

_log = logging.getLogger("strata")


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


def quiet_other_ranks():
    """Ranks other than 0 log only errors on the ``strata`` logger (``STRATA_LOG_ALL_RANKS=1``
    keeps every rank's warnings)."""
    if get_rank() != 0 and os.environ.get("STRATA_LOG_ALL_RANKS", "0") in ("", "0"):
        if _log.level < logging.ERROR:
            _log.setLevel(logging.ERROR)


def init_distributed(dist_backend=None, auto_mpi_discovery=True, distributed_port=29500,
                     verbose=True, timeout=datetime.timedelta(minutes=30), init_method=None,
                     dist_init_required=None, config=None, rank=-1, world_size=-1):
    """Start torch.distributed when the launcher asked for several processes (see module doc).

    Returns True when torch.distributed is (now) initialised.
    """
    os.environ.setdefault("LOCAL_RANK", "0")
    if is_initialized():
        quiet_other_ranks()
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
    if dist_backend == "nccl" and torch.cuda.is_available():
        # One device per local rank, as torchrun users expect.
        torch.cuda.set_device(get_local_rank() % max(1, torch.cuda.device_count()))
    _dist.init_process_group(**kwargs)
    quiet_other_ranks()
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


def get_local_world_size():
    try:
        return int(os.environ.get("LOCAL_WORLD_SIZE", "0")) or get_world_size()
    except ValueError:
        return get_world_size()


def backend(group=None):
    """The backend name (``gloo``, ``nccl``, ...), or None without torch.distributed."""
    if not is_initialized():
        return None
    return str(_dist.get_backend(group) if group is not None else _dist.get_backend()).lower()


def has_reduce_scatter(group=None):
    """Whether the backend has a reduce-scatter (NCCL does; Gloo in torch 1.13 does not)."""
    return backend(group) in ("nccl", "ucc") and _reduce_scatter_fn() is not None


def _reduce_scatter_fn():
    fn = getattr(_dist, "reduce_scatter_tensor", None)  # torch >= 1.13
    if fn is None:
        fn = getattr(_dist, "_reduce_scatter_base", None)
    return fn


# ---------------------------------------------------------------------------------------
# counters

_stats = {}


def _count(stats, op, nbytes, async_op):
    for s in (_stats, stats):
        if s is None:
            continue
        e = s.setdefault(op, {"calls": 0, "bytes": 0, "async": 0})
        e["calls"] += 1
        e["bytes"] += int(nbytes)
        e["async"] += 1 if async_op else 0


def stats():
    """``{op: {"calls", "bytes", "async"}}`` of the collectives strata issued in this process
    since the last ``reset_stats()``."""
    return {k: dict(v) for k, v in _stats.items()}


def reset_stats():
    _stats.clear()


def _nbytes(t):
    return t.numel() * t.element_size()


# ---------------------------------------------------------------------------------------
# backend work-arounds


class _Work:
    """A torch.distributed work handle plus what must happen once it completed (copy a staged
    or upcast buffer back). ``wait()`` is idempotent."""

    def __init__(self, work, after=()):
        self._work = work
        self._after = list(after)

    def wait(self, timeout=None):
        if self._work is not None:
            self._work.wait()
            self._work = None
        after, self._after = self._after, []
        for fn in after:
            fn()
        return True

    def is_completed(self):
        return self._work is None or self._work.is_completed()


def _done(after=()):
    for fn in after:
        fn()
    return None


def _stage(tensor, reducing, group):
    """(tensor to hand to the backend, functions that copy the result back)."""
    be = backend(group)
    t = tensor
    after = []
    if be == "gloo" and t.dtype == torch.bfloat16:
        if reducing:
            t = tensor.float()
            after.append(lambda src=t, dst=tensor: dst.copy_(src))
        else:
            t = tensor.view(torch.float16)  # Gloo moves the bits; it has no bfloat16
    if be == "nccl" and t.device.type == "cpu":
        dev = torch.device("cuda", torch.cuda.current_device())
        g = t.to(dev)
        after.insert(0, lambda src=g, dst=t: dst.copy_(src))
        t = g
    return t, after


def _run(fn, tensor, reducing, group, async_op, op_name, stats, *args, **kwargs):
    _count(stats, op_name, _nbytes(tensor), async_op)
    t, after = _stage(tensor, reducing, group)
    if group is not None:
        kwargs["group"] = group
    work = fn(t, *args, async_op=async_op, **kwargs)
    if async_op:
        return _Work(work, after)
    return _done(after)


# ---------------------------------------------------------------------------------------
# collectives


def barrier(group=None, **kwargs):
    if not is_initialized():
        return None
    return _dist.barrier(group=group, **kwargs) if group is not None else _dist.barrier(**kwargs)


def all_reduce(tensor, op=None, group=None, async_op=False, stats=None):
    if not is_initialized():
        return None
    if op is None:
        op = _dist.ReduceOp.SUM
    return _run(_dist.all_reduce, tensor, True, group, async_op, "all_reduce", stats, op=op)


def reduce(tensor, dst, op=None, group=None, async_op=False, stats=None):
    """Sum ``tensor`` into rank ``dst``; on the other ranks ``tensor`` is scratch afterwards."""
    if not is_initialized():
        return None
    if op is None:
        op = _dist.ReduceOp.SUM
    return _run(_dist.reduce, tensor, True, group, async_op, "reduce", stats, dst, op=op)


def broadcast(tensor, src, group=None, async_op=False, stats=None):
    if not is_initialized():
        return None
    return _run(_dist.broadcast, tensor, False, group, async_op, "broadcast", stats, src)


def all_gather(tensor_list, tensor, group=None, async_op=False, stats=None):
    if not is_initialized():
        for t in tensor_list[:1]:
            t.copy_(tensor)
        return None
    _count(stats, "all_gather", _nbytes(tensor), async_op)
    src, after = _stage(tensor, False, group)
    outs = []
    for t in tensor_list:
        o, a = _stage(t, False, group)
        outs.append(o)
        after.extend(a)
    kwargs = {"group": group} if group is not None else {}
    work = _dist.all_gather(outs, src, async_op=async_op, **kwargs)
    if async_op:
        return _Work(work, after)
    return _done(after)


def all_gather_into(output, tensor, group=None, async_op=False, stats=None):
    """Gather every rank's ``tensor`` (same size on each) into ``output`` (world x that size),
    rank after rank: ``all_gather_into_tensor`` where the backend has it (NCCL), an all-gather
    into views of ``output`` elsewhere (Gloo)."""
    world = get_world_size(group)
    if not is_initialized():
        output.view(-1)[: tensor.numel()].copy_(tensor.view(-1))
        return None
    fn = getattr(_dist, "all_gather_into_tensor", None) or getattr(_dist, "_all_gather_base", None)
    if backend(group) in ("nccl", "ucc") and fn is not None:
        _count(stats, "all_gather", _nbytes(tensor), async_op)
        src, after = _stage(tensor, False, group)
        out, a = _stage(output, False, group)
        after.extend(a)
        kwargs = {"group": group} if group is not None else {}
        work = fn(out, src, async_op=async_op, **kwargs)
        if async_op:
            return _Work(work, after)
        return _done(after)
    return all_gather(list(output.view(-1).chunk(world)), tensor, group=group, async_op=async_op,
                      stats=stats)


def reduce_scatter_tensor(output, input, op=None, group=None, async_op=False, stats=None):
    """Sum ``input`` (world x ``output.numel()``) across ranks; rank r receives part r. Only on
    backends that have it (``has_reduce_scatter()``)."""
    if not is_initialized():
        output.copy_(input.view(-1)[: output.numel()])
        return None
    fn = _reduce_scatter_fn()
    if fn is None or not has_reduce_scatter(group):
        raise RuntimeError(f"strata.comm.reduce_scatter_tensor: the {backend(group)} backend "
                           "has no reduce-scatter")
    if op is None:
        op = _dist.ReduceOp.SUM
    _count(stats, "reduce_scatter", _nbytes(input), async_op)
    out, after = _stage(output, True, group)
    inp, _ = _stage(input, True, group)  # the input needs no copy back
    after.append(lambda keep=inp: None)  # keep a staged input alive until the work completed
    kwargs = {"group": group} if group is not None else {}
    work = fn(out, inp, op=op, async_op=async_op, **kwargs)
    if async_op:
        return _Work(work, after)
    return _done(after)


def __getattr__(name):
    if _dist is not None and hasattr(_dist, name):
        return getattr(_dist, name)
    raise AttributeError(f"module 'strata.comm' has no attribute {name!r} "
                         "(it forwards to torch.distributed, which has none either)")


# ---------------------------------------------------------------------------------------
# launcher

_LAUNCH_FIXES = (
    # torch <= 2.0's elastic agent on Python >= 3.11: the default "0" of --redirects/--tee
    # turns into None (a zero-valued IntFlag is no longer a member when iterated) and the agent
    # fails with "'NoneType' object has no attribute 'get'". 2 (stderr) is a valid value:
    # stderr goes to a per-rank log file and is copied to the console, stdout is untouched.
    ("--redirects", "-r", "2"),
    ("--tee", "-t", "2"),
)


def _has_option(argv, long, short):
    for a in argv:
        if a == long or a.startswith(long + "=") or a == short or a == long.replace("_", "-") \
                or (short and a.startswith(short) and len(a) > len(short) and a[2:].isdigit()):
            return True
    return False


def launch_argv(argv):
    """torch.distributed.run's arguments for ``argv`` (the part before the script: options
    only) with strata's defaults added where the user gave none."""
    argv = list(argv)
    # The launcher's own options come before the script (the first non-option word that is not
    # an option's value); only those are inspected and extended.
    head = []
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        head.append(argv[i])
        if "=" not in argv[i] and i + 1 < len(argv) and argv[i] not in (
                "--standalone", "--no_python", "--no-python", "-m", "--module", "--run_path",
                "--run-path"):
            head.append(argv[i + 1])
            i += 1
        i += 1
    rest = argv[i:]
    extra = []
    for long, short, value in _LAUNCH_FIXES:
        if not _has_option(head, long, short):
            extra += [long, value]
    single_node = not any(_has_option(head, o, "") for o in (
        "--nnodes", "--rdzv_endpoint", "--rdzv-endpoint", "--master_port", "--master-port",
        "--standalone", "--rdzv_backend", "--rdzv-backend"))
    if single_node and rest:
        # One machine: a free port instead of torchrun's fixed 29500 (two runs at once).
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            extra += ["--master_port", str(s.getsockname()[1])]
    return extra + head + rest


def openmp_spins(env=None):
    """True when the environment leaves libgomp's wait policy at its default, in which torch's
    OpenMP threads spin between operations (neither OMP_WAIT_POLICY nor GOMP_SPINCOUNT set)."""
    env = os.environ if env is None else env
    return "OMP_WAIT_POLICY" not in env and "GOMP_SPINCOUNT" not in env


def launch(argv):
    """``python -m strata launch ...``: ``python -m torch.distributed.run`` (torchrun) with
    ``launch_argv``'s defaults; the script's processes find strata on their PYTHONPATH and get
    ``OMP_WAIT_POLICY=PASSIVE`` unless the environment sets it (or ``GOMP_SPINCOUNT``).
    Returns the launcher's exit status."""
    import subprocess
    import sys

    args = launch_argv(argv)
    env = dict(os.environ)
    # torch's OpenMP threads sleep between operations instead of spinning on the cores the BLAS
    # and strata's threads need (read by libgomp when it loads; docs/performance.md).
    if openmp_spins(env):
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = env.get("PYTHONPATH", "")
    if here not in path.split(os.pathsep):
        env["PYTHONPATH"] = here + (os.pathsep + path if path else "")
    try:
        return subprocess.call([sys.executable, "-m", "torch.distributed.run"] + args, env=env)
    except KeyboardInterrupt:
        return 130
