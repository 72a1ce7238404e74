"""Checkpoints: atomic, checksummed, streamed per parameter; and the kill-point test hook.

Layout of ``save_dir/tag/`` (see docs/checkpoints.md):

- ``manifest.json``: format version, tag, strata/torch/Python/numpy versions, the filled
  config, counters (global steps, samples, micro steps, skipped steps), loss-scaler and
  scheduler state, and for every file its size and BLAKE2b checksum; for every trainable
  parameter (by name and shape) the extent of each state slot in ``optimizer_state.bin`` with
  its own checksum, and the engine's sub-group layout at save time.
- ``optimizer_state.bin``: raw little-endian fp32 slots (master, then the optimizer's slots in
  torch's order), parameter after parameter, read from the engine one parameter at a time.
- ``mp_rank_00_model_states.pt``: DeepSpeed's layout, a plain torch file (``torch.load`` reads
  it) of a dict whose ``module`` is the module's ``state_dict()``, written one tensor at a time
  from the module's own memory, beside DeepSpeed's other keys (older checkpoints:
  ``model_states.pt``, a flat state_dict; the manifest names the file).
- ``zero_pp_rank_R_mp_rank_00_optim_states.pt``: DeepSpeed's per-rank optimizer file, naming
  the strata file that holds the rank's state; ``save_dir/zero_to_fp32.py`` consolidates.
- ``engine_state.pt``: optimizer param groups (hyper-parameters), scheduler and loss-scaler
  state; ``rng_state.pt``: torch (CPU and CUDA), numpy and Python RNG states;
  ``client_state.pt``: the ``client_state`` given to ``save_checkpoint``.

Several ranks (docs/distributed.md): ``save`` is a collective. With the optimizer state sharded
(ZeRO stage 1 and 2) each rank writes ``optimizer_state.rank<RRRRR>.bin`` (its slices, slot after
slot, with their extents and checksums in the manifest under each parameter's ``shards``)
instead of ``optimizer_state.bin``; every rank writes ``rng_state.rank<RRRRR>.pt``; rank 0 writes
the rest and the manifest. Loading reads, for every slice the loading rank owns, the saved pieces
that overlap it, so any world size and stage loads any other (re-sharding).

Atomicity: everything is written into a hidden temporary directory next to the tag, each file
fsynced, then the directory fsynced, renamed to ``tag`` (an existing ``tag`` is swapped out with
``renameat2(RENAME_EXCHANGE)`` and removed), and the parent fsynced; ``latest`` is then
replaced atomically (temporary file, fsync, rename, fsync). A crash at any point leaves the
previous complete checkpoint, and ``latest`` pointing at a complete one.

Test hook: ``STRATA_TEST_KILL_AT=point:N`` (comma-separated for several) makes the process
SIGKILL itself the N-th time (1-based) it reaches a kill point whose name is ``point`` or
starts with ``point_``: ``forward``, ``backward``, ``step_begin``, ``update`` (sent from a
helper thread while the C++ step runs), ``step_end``, ``save_begin``, ``save_state`` (after each
parameter's state is written), ``save_model``, ``save_before_rename``, ``save_after_rename``,
``save_after_latest``, ``load_begin``. ``save:3`` is the third save point reached.
"""

import collections
import contextlib
import ctypes
import errno
import hashlib
import io
import json
import os
import pickle
import platform
import random
import shutil
import signal
import sys
import threading
import time

import torch

from . import _C
from . import config as _config
from ._torch_compat import torch_load_trusted

FORMAT = "strata-checkpoint"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
OPTIMIZER_FILE = "optimizer_state.bin"
MODEL_FILE = "mp_rank_00_model_states.pt"  # DeepSpeed's name; the module under "module"
OLD_MODEL_FILE = "model_states.pt"  # checkpoints before issue 25: a flat state_dict
RECOVERY_SCRIPT = "zero_to_fp32.py"
ENGINE_FILE = "engine_state.pt"
RNG_FILE = "rng_state.pt"
CLIENT_FILE = "client_state.pt"
TORCH_OPTIMIZER_FILE = "optimizer_torch.pt"
LATEST = "latest"
_TMP_MARK = ".strata-tmp-"
_OLD_MARK = ".strata-old-"
_CHUNK = 8 << 20


class CheckpointError(_C.StrataError):
    """A checkpoint is incomplete, corrupted or does not fit the engine; the message names the
    file (and the parameter) at fault."""


# ---------------------------------------------------------------------------------------
# kill points (test hook)

_kill_counts = {}


def _kill_specs():
    spec = os.environ.get("STRATA_TEST_KILL_AT", "")
    out = []
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        name, _, index = item.partition(":")
        try:
            n = int(index) if index else 1
        except ValueError:
            raise ValueError(f"STRATA_TEST_KILL_AT: {item!r} is not point:index") from None
        out.append((name, n))
    return out


def _kill_match(point):
    for name, n in _kill_specs():
        if point == name or point.startswith(name + "_"):
            key = f"{name}:{n}"
            _kill_counts[key] = _kill_counts.get(key, 0) + 1
            if _kill_counts[key] == n:
                return True
    return False


def _die():
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(60)  # SIGKILL is delivered before this returns


def kill_point(point):
    """SIGKILL this process here when STRATA_TEST_KILL_AT selects this point."""
    if "STRATA_TEST_KILL_AT" in os.environ and _kill_match(point):
        _die()


@contextlib.contextmanager
def kill_during(point):
    """SIGKILL this process from a helper thread while a C++ call that releases the GIL runs,
    when STRATA_TEST_KILL_AT selects this point. Yields ``arm``: call it right before the C++
    call (or never, for no kill); the thread then sends the signal as soon as it gets the GIL,
    which the C++ call has just released."""
    if "STRATA_TEST_KILL_AT" not in os.environ or not _kill_match(point):
        yield None
        return
    go = threading.Event()
    t = threading.Thread(target=lambda: (go.wait(), os.kill(os.getpid(), signal.SIGKILL)),
                         daemon=True)
    t.start()
    yield go.set
    if go.is_set():
        time.sleep(60)  # the signal lands while or right after the call ran


# ---------------------------------------------------------------------------------------
# small file-system helpers


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _HashingWriter:
    """A binary file that hashes and counts what goes through it."""

    def __init__(self, path):
        self.path = path
        self.f = open(path, "wb")
        self.h = hashlib.blake2b(digest_size=16)
        self.n = 0

    def write(self, data):
        mv = memoryview(data).cast("B")
        if self.f.closed:  # a writer torn down after an error: nothing more to keep
            return len(mv)
        self.h.update(mv)
        self.f.write(mv)
        self.n += len(mv)
        return len(mv)

    def flush(self):
        self.f.flush()

    def close(self):
        """Flush, fsync and close; returns the file's manifest entry."""
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        return {"bytes": self.n, "blake2b": self.h.hexdigest()}


def _file_digest(path):
    h = hashlib.blake2b(digest_size=16)
    n = 0
    buf = bytearray(_CHUNK)
    mv = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while True:
            k = f.readinto(buf)
            if not k:
                break
            h.update(mv[:k])
            n += k
    return {"bytes": n, "blake2b": h.hexdigest()}


def _torch_save_file(obj, path):
    w = _HashingWriter(path)
    try:
        torch.save(obj, w)
    except BaseException:
        w.f.close()
        raise
    return w.close()


def _renameat2_exchange(a, b):
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE). False if unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    AT_FDCWD = -100
    RENAME_EXCHANGE = 2
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    rc = fn(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, f"renameat2 exchange {a} <-> {b}: {os.strerror(err)}")


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clean_stale(save_dir):
    """Remove temporary and swapped-out directories that dead processes left behind."""
    try:
        names = os.listdir(save_dir)
    except OSError:
        return
    for name in names:
        for mark in (_TMP_MARK, _OLD_MARK):
            if name.startswith(".") and mark in name:
                try:
                    pid = int(name.split(mark, 1)[1].split("-", 1)[0])
                except ValueError:
                    continue
                if pid != os.getpid() and not _pid_alive(pid):
                    shutil.rmtree(os.path.join(save_dir, name), ignore_errors=True)
        if name.startswith(f".{LATEST}{_TMP_MARK}"):
            try:
                pid = int(name.split(_TMP_MARK, 1)[1].split("-", 1)[0])
            except ValueError:
                continue
            if pid != os.getpid() and not _pid_alive(pid):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(save_dir, name))


def _write_latest(save_dir, tag):
    tmp = os.path.join(save_dir, f".{LATEST}{_TMP_MARK}{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(tag)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(save_dir, LATEST))
    _fsync_dir(save_dir)


def read_latest(load_dir):
    path = os.path.join(load_dir, LATEST)
    try:
        with open(path) as f:
            return f.read().strip()
    except FileNotFoundError:
        return None


def _check_tag(tag):
    tag = str(tag)
    if not tag or tag in (".", "..") or "/" in tag or "\0" in tag or tag.startswith("."):
        raise ValueError(f"checkpoint tag {tag!r}: must be a plain, non-hidden file name")
    return tag


# ---------------------------------------------------------------------------------------
# torch files written and read one tensor at a time


class _StorageRef:
    __slots__ = ("key", "storage_type", "numel")

    def __init__(self, key, storage_type, numel):
        self.key, self.storage_type, self.numel = key, storage_type, numel


_STORAGE_TYPES = {
    torch.float32: "FloatStorage", torch.float64: "DoubleStorage", torch.float16: "HalfStorage",
    torch.bfloat16: "BFloat16Storage", torch.int64: "LongStorage", torch.int32: "IntStorage",
    torch.int16: "ShortStorage", torch.int8: "CharStorage", torch.uint8: "ByteStorage",
    torch.bool: "BoolStorage",
}


def _storage_type(dtype):
    try:
        return getattr(torch, _STORAGE_TYPES[dtype])
    except KeyError:
        raise CheckpointError(f"tensors of dtype {dtype} cannot be written to a checkpoint") \
            from None


def _contiguous_stride(shape):
    stride = []
    acc = 1
    for d in reversed(list(shape)):
        stride.append(acc)
        acc *= d
    return tuple(reversed(stride))


class _TensorRef:
    __slots__ = ("storage", "shape")

    def __init__(self, storage, shape):
        self.storage, self.shape = storage, tuple(shape)

    def __reduce_ex__(self, proto):
        return (torch._utils._rebuild_tensor_v2,
                (self.storage, 0, self.shape, _contiguous_stride(self.shape), False,
                 collections.OrderedDict()))


class _RefPickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _StorageRef):
            return ("storage", obj.storage_type, obj.key, "cpu", obj.numel)
        return None


def zero_optim_file(rank):
    """DeepSpeed's per-rank optimizer file name (zero_pp_rank_R_mp_rank_00_optim_states.pt)."""
    return f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"


def write_tensor_file(path, entries, metadata=None, wrap=None):
    """Write a torch-loadable file of an ordered ``name -> tensor`` dict without holding more
    than one tensor's bytes at a time. ``wrap``: a dict of plain values; the file then holds
    ``dict(wrap, module=<the tensors>)`` (DeepSpeed's model-states layout).

    ``entries``: list of (name, shape, dtype, storage_id, produce) where ``produce()`` returns
    a contiguous CPU tensor of that shape and dtype (called once per distinct storage_id, in
    order); entries with equal storage_id share one storage, as tied weights do.
    Returns the file's manifest entry.
    """
    od = collections.OrderedDict()
    storages = {}
    order = []
    for name, shape, dtype, sid, produce in entries:
        if sid not in storages:
            numel = 1
            for d in shape:
                numel *= int(d)
            storages[sid] = _StorageRef(str(len(storages)), _storage_type(dtype), numel)
            order.append((sid, produce, numel, dtype))
        od[name] = _TensorRef(storages[sid], shape)
    if metadata is not None:
        od._metadata = metadata
    obj = od if wrap is None else dict(wrap, module=od)
    buf = io.BytesIO()
    _RefPickler(buf, protocol=2).dump(obj)
    data = buf.getvalue()
    w = _HashingWriter(path)
    zf = None
    try:
        zf = torch._C.PyTorchFileWriter(w)
        zf.write_record("data.pkl", data, len(data))
        zf.write_record("byteorder", sys.byteorder, len(sys.byteorder))
        for sid, produce, numel, dtype in order:
            t = produce()
            if t.dtype != dtype or t.numel() != numel or not t.is_contiguous():
                raise CheckpointError(f"{path}: tensor for storage {sid} has the wrong layout")
            nbytes = t.numel() * t.element_size()
            zf.write_record(f"data/{storages[sid].key}", t.data_ptr(), nbytes)
            del t
        zf.write_end_of_file()
        zf = None
    except BaseException:
        zf = None  # its destructor still writes through w: close the file after it
        w.f.close()
        raise
    return w.close()


class _LazyTensor:
    __slots__ = ("key", "dtype", "offset", "shape", "stride", "numel")


class _LazyStorage:
    __slots__ = ("key", "dtype", "numel")


def _rebuild_lazy(storage, offset, size, stride, *rest):
    t = _LazyTensor()
    t.key, t.dtype, t.offset, t.shape, t.stride = storage.key, storage.dtype, offset, tuple(size), \
        tuple(stride)
    n = 1
    for d in t.shape:
        n *= d
    t.numel = n
    return t


class _LazyUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_lazy
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch" and name.endswith("Storage"):
            return getattr(torch, name)
        if module in ("builtins", "collections", "_codecs"):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"unexpected object {module}.{name} in a tensor file")

    def persistent_load(self, pid):
        typename, storage_type, key, location, numel = pid
        s = _LazyStorage()
        s.key = key
        s.dtype = storage_type.dtype if hasattr(storage_type, "dtype") else torch.uint8
        s.numel = numel
        return s


class TensorFileReader:
    """Reads a torch file of a flat ``name -> tensor`` dict one tensor at a time."""

    def __init__(self, path):
        self.path = path
        try:
            self._zf = torch._C.PyTorchFileReader(os.fspath(path))
            data = self._zf.get_record("data.pkl")
            obj = _LazyUnpickler(io.BytesIO(data)).load()
        except CheckpointError:
            raise
        except Exception as exc:
            raise CheckpointError(f"{path}: not a readable torch tensor file ({exc})") from exc
        if not isinstance(obj, dict):
            raise CheckpointError(f"{path}: expected a dict of tensors")
        self.extra = {}
        if isinstance(obj.get("module"), dict):  # DeepSpeed's layout: the tensors under "module"
            self.extra = {k: v for k, v in obj.items() if k != "module"}
            obj = obj["module"]
        self.entries = obj
        self.metadata = getattr(obj, "_metadata", None)

    def names(self):
        return list(self.entries)

    def meta(self, name):
        return self.entries[name]

    def tensor(self, name):
        lt = self.entries[name]
        if not isinstance(lt, _LazyTensor):
            raise CheckpointError(f"{self.path}: entry {name!r} is not a tensor")
        raw = self._zf.get_record(f"data/{lt.key}")
        whole = torch.frombuffer(bytearray(raw), dtype=lt.dtype) if len(raw) else \
            torch.empty(0, dtype=lt.dtype)
        return torch.as_strided(whole, lt.shape, lt.stride, lt.offset).clone()


# ---------------------------------------------------------------------------------------
# save


def _versions():
    out = {
        "strata": _C.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cuda": getattr(torch.version, "cuda", None),
    }
    try:
        import numpy

        out["numpy"] = numpy.__version__
    except ImportError:
        out["numpy"] = None
    return out


def _rng_state():
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy

        state["numpy"] = numpy.random.get_state()
    except ImportError:
        pass
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state):
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        try:
            import numpy

            numpy.random.set_state(state["numpy"])
        except ImportError:
            pass
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _jsonable(obj):
    try:
        return json.loads(json.dumps(obj))
    except (TypeError, ValueError):
        return None


def _model_entries(module, exclude_frozen):
    sd = module.state_dict(keep_vars=True)
    frozen = set()
    if exclude_frozen:
        frozen = {name for name, p in module.named_parameters() if not p.requires_grad}
    entries = []
    for name, t in sd.items():
        if name in frozen:
            continue
        t = t.detach()
        if t.device.type != "cpu":
            def produce(t=t):
                return t.to("cpu").contiguous()
        elif t.is_contiguous():
            def produce(t=t):
                return t
        else:
            def produce(t=t):
                return t.contiguous()
        sid = (t.untyped_storage().data_ptr() if hasattr(t, "untyped_storage")
               else t.storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype) \
            if t.numel() else ("empty", name)
        entries.append((name, tuple(t.shape), t.dtype, sid, produce))
    return entries, getattr(sd, "_metadata", None), sorted(frozen)


def _state_progress(opt, phase, total_bytes):
    """Progress (bar or log lines, as ``strata.progress`` says) for moving large optimizer
    state; silent below 256 MiB."""
    from .progress import EngineProgress

    mode = _config.get(getattr(opt, "config", {}) or {}, "strata.progress")
    prog = EngineProgress(mode)
    state = {"done": 0}

    def advance(nbytes):
        state["done"] += nbytes
        prog(phase, state["done"], total_bytes)

    advance(0)
    return advance, prog.close


def _write_optimizer_state(opt, path, names):
    """Stream every parameter's slots into ``path``; returns (file entry, params list)."""
    b = opt._b
    w = _HashingWriter(path)
    params = []
    offset = 0
    buf = None
    total = sum(p.numel() * 4 * len(opt._slot_names(i)) for i, p in enumerate(b.managed))
    advance, done = _state_progress(opt, "saving optimizer state", total)
    try:
        for i, p in enumerate(b.managed):
            n = p.numel()
            if buf is None or buf.numel() < n:
                buf = torch.empty(n, dtype=torch.float32)
            t = buf[:n]
            slots = []
            for slot, slot_name in enumerate(opt._slot_names(i)):
                opt._read_slot(i, slot, t)
                mv = memoryview(t.numpy()).cast("B")
                digest = hashlib.blake2b(mv, digest_size=16).hexdigest()
                w.write(mv)
                slots.append({"name": slot_name, "offset": offset, "bytes": len(mv),
                              "blake2b": digest})
                offset += len(mv)
            params.append({
                "name": names[i],
                "shape": list(p.shape),
                "numel": n,
                "dtype": str(p.dtype).replace("torch.", ""),
                "group": b.cohort_group[b.cohort_of[i]],
                "step": b.engine.step_count(b.cohort_of[i]),
                "slots": slots,
            })
            advance(n * 4 * len(slots))
            kill_point("save_state")
    except BaseException:
        w.f.close()
        raise
    finally:
        done()
    return w.close(), params


def _is_sharded(opt):
    """A data-parallel optimizer whose engine holds only this rank's slices."""
    from .optim import _OffloadOptimizer

    return isinstance(opt, _OffloadOptimizer) and opt.layout is not None and opt.layout.sharded


def _class_name(opt):
    return opt.class_name  # the optimizer, not its sharding


def shard_file(rank):
    return f"optimizer_state.rank{rank:05d}.bin"


def rng_file(rank):
    return f"rng_state.rank{rank:05d}.pt"


def _write_optimizer_shard(opt, path, names):
    """Stream this rank's slices of every parameter's slots into ``path`` (one pass over each
    slice's records); returns (file entry, per-slice entries)."""
    b = opt._b
    w = _HashingWriter(path)
    params = []
    offset = 0
    buf = None
    try:
        for j, (i, po, _, n) in enumerate(b.slices):
            slot_names = opt._slot_names(i)
            if buf is None or buf.numel() < len(slot_names) * n:
                buf = torch.empty(len(slot_names) * n, dtype=torch.float32)
            rows = [buf[k * n:(k + 1) * n] for k in range(len(slot_names))]
            b.engine.read_param_states(j, [r.data_ptr() for r in rows])
            slots = []
            for slot_name, t in zip(slot_names, rows):
                mv = memoryview(t.numpy()).cast("B")
                digest = hashlib.blake2b(mv, digest_size=16).hexdigest()
                w.write(mv)
                slots.append({"name": slot_name, "offset": offset, "bytes": len(mv),
                              "blake2b": digest})
                offset += len(mv)
            params.append({"name": names[i], "start": po, "numel": n, "slots": slots})
            kill_point("save_state")
    except BaseException:
        w.f.close()
        raise
    return w.close(), params


def _base_manifest(engine, tag):
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "tag": tag,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": _versions(),
        "byteorder": sys.byteorder,
        "world_size": engine.world_size,
        "rank": engine.global_rank,
        "config": engine.config,
        "global_steps": engine.global_steps,
        "global_samples": engine.global_samples,
        "micro_steps": engine.micro_steps,
        "skipped_steps": engine.skipped_steps,
        "loss_scaler": engine.loss_scaler.state_dict() if engine.loss_scaler else None,
    }


def _write_rest(engine, tmp, files, manifest, client_state, exclude_frozen_parameters):
    """The model, engine, RNG and client files (rank 0's, with several ranks)."""
    opt = engine.optimizer
    entries, metadata, excluded = _model_entries(engine.module, exclude_frozen_parameters)
    sched = engine.lr_scheduler
    sched_state = sched.state_dict() if sched is not None and hasattr(sched, "state_dict") \
        else None
    # DeepSpeed's model-states keys around the module (its loaders and users' scripts read
    # "module"); the optimizer state is in strata's files, named in zero_pp_rank_*.
    frozen = {n for n, p in engine.module.named_parameters() if not p.requires_grad}
    wrap = {
        "buffer_names": [n for n, _ in engine.module.named_buffers()],
        # Plain values only (lists for shapes, JSON for the rest): the file is read back by
        # strata's restricted unpickler.
        "param_shapes": [{n: list(p.shape) for n, p in engine.module.named_parameters()
                          if p.requires_grad}],
        "frozen_param_shapes": {n: list(p.shape) for n, p in engine.module.named_parameters()
                                if n in frozen} or None,
        "optimizer": None,
        "lr_scheduler": _jsonable(sched_state),
        "global_steps": engine.global_steps,
        "global_samples": engine.global_samples,
        "skipped_steps": engine.skipped_steps,
        "dp_world_size": engine.world_size,
        "mp_world_size": 1,
        "ds_config": _jsonable(engine.config),
        "ds_version": f"strata-{_C.__version__}",
    }
    files[MODEL_FILE] = write_tensor_file(os.path.join(tmp, MODEL_FILE), entries, metadata,
                                          wrap=wrap)
    manifest["model"] = {
        "file": MODEL_FILE,
        "tensors": [{"name": n, "shape": list(s), "dtype": str(d).replace("torch.", "")}
                    for n, s, d, _, _ in entries],
        "excluded_frozen": excluded,
    }
    kill_point("save_model")
    _write_zero_pointers(engine, tmp, files, manifest)
    manifest["lr_scheduler"] = {"class": type(sched).__name__ if sched is not None else None,
                                "state": _jsonable(sched_state)}
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] \
        if opt is not None else []
    files[ENGINE_FILE] = _torch_save_file({
        "optimizer_param_groups": groups,
        "lr_scheduler": sched_state,
        "loss_scaler": manifest["loss_scaler"],
    }, os.path.join(tmp, ENGINE_FILE))
    files[RNG_FILE] = _torch_save_file(_rng_state(), os.path.join(tmp, RNG_FILE))
    files[CLIENT_FILE] = _torch_save_file(dict(client_state or {}),
                                          os.path.join(tmp, CLIENT_FILE))


def _write_zero_pointers(engine, tmp, files, manifest):
    """DeepSpeed's zero_pp_rank_R_mp_rank_00_optim_states.pt, one per rank: what that rank's
    optimizer state is and which strata file (streamed, checksummed) holds it. DeepSpeed's own
    zero_to_fp32.py cannot read strata's state; strata.utils.zero_to_fp32 (and the
    zero_to_fp32.py written beside the tags) can."""
    info = manifest.get("optimizer") or {}
    stage = engine.zero_optimization_stage()
    for rank in range(engine.world_size):
        if info.get("sharded"):
            state_file = shard_file(rank)
        else:
            state_file = info.get("file")
        files[zero_optim_file(rank)] = _torch_save_file({
            "optimizer_state_dict": {
                "zero_stage": stage,
                "partition_count": engine.world_size if info.get("sharded") else 1,
                "strata_state_file": state_file,
                "strata_optimizer": info.get("class"),
                "loss_scaler": manifest.get("loss_scaler"),
            },
            "ds_config": engine.config,
            "ds_version": f"strata-{_C.__version__}",
        }, os.path.join(tmp, zero_optim_file(rank)))


def write_recovery_script(save_dir):
    """zero_to_fp32.py in the checkpoint folder, as DeepSpeed writes it (atomically), after the
    checkpoint and ``latest`` are complete. A folder that refuses it (or refuses chmod, as some
    network file shares do) costs a warning, never the save."""
    src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "utils", "zero_to_fp32.py")
    dst = os.path.join(os.fspath(save_dir), RECOVERY_SCRIPT)
    tmp = f"{dst}.tmp-{os.getpid()}"
    try:
        shutil.copyfile(src, tmp)
        try:
            os.chmod(tmp, 0o755)
        except OSError as exc:
            _config.warn_once(f"{dst}: cannot make it executable ({exc}); run it with python")
        os.replace(tmp, dst)
    except OSError as exc:
        _config.warn_once(f"{dst}: not written ({exc}); strata.utils.zero_to_fp32 does the same")
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def model_file(manifest):
    """The model file a manifest names (older checkpoints: model_states.pt)."""
    return (manifest.get("model") or {}).get("file") or MODEL_FILE


def _finalize(save_dir, tmp, final, tag, manifest, files):
    manifest["files"] = files
    with open(os.path.join(tmp, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1, default=str)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)
    kill_point("save_before_rename")
    if os.path.lexists(final):
        if _renameat2_exchange(tmp, final):
            _fsync_dir(save_dir)
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            old = os.path.join(save_dir, f".{tag}{_OLD_MARK}{os.getpid()}")
            os.rename(final, old)
            os.rename(tmp, final)
            _fsync_dir(save_dir)
            shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    _fsync_dir(save_dir)


def _single_optimizer(engine, tmp, files, manifest):
    """The whole optimizer state in one file (one process, or ZeRO stage 0 on rank 0)."""
    from .optim import _OffloadOptimizer

    opt = engine.optimizer
    if isinstance(opt, _OffloadOptimizer):
        opt._prepare()
        names = engine._param_names_in_engine_order()
        entry, params = _write_optimizer_state(opt, os.path.join(tmp, OPTIMIZER_FILE), names)
        files[OPTIMIZER_FILE] = entry
        manifest["optimizer"] = {
            "class": _class_name(opt),
            "kind": opt._kind,
            "file": OPTIMIZER_FILE,
            "dtype": "float32",
            "params": params,
            "subgroups": opt._b.engine.subgroups(),
        }
    elif opt is not None:
        files[TORCH_OPTIMIZER_FILE] = _torch_save_file(opt.state_dict(),
                                                       os.path.join(tmp, TORCH_OPTIMIZER_FILE))
        manifest["optimizer"] = {"class": type(opt.optimizer).__name__, "kind": "torch",
                                 "file": TORCH_OPTIMIZER_FILE, "params": []}
    else:
        manifest["optimizer"] = None


def save(engine, save_dir, tag=None, client_state=None, save_latest=True,
         exclude_frozen_parameters=False):
    """``Engine.save_checkpoint``: write ``save_dir/tag`` atomically (see the module doc).
    With several ranks every rank must call it (``_save_ranks``)."""
    tag = _check_tag(tag if tag is not None else f"global_step{engine.global_steps}")
    save_dir = os.fspath(save_dir)
    if engine.micro_steps % engine.gradient_accumulation_steps() != 0:
        _config.warn_once("save_checkpoint between gradient accumulation boundaries: the "
                          "gradients accumulated since the last optimizer step are not saved")
    if engine.world_size > 1:
        return _save_ranks(engine, save_dir, tag, client_state, save_latest,
                           exclude_frozen_parameters)
    os.makedirs(save_dir, exist_ok=True)
    _clean_stale(save_dir)
    kill_point("save_begin")
    final = os.path.join(save_dir, tag)
    tmp = os.path.join(save_dir, f".{tag}{_TMP_MARK}{os.getpid()}-{time.monotonic_ns()}")
    os.mkdir(tmp)
    try:
        files = {}
        manifest = _base_manifest(engine, tag)
        if _is_sharded(engine.optimizer):
            # a data-parallel optimizer run as one rank: its one shard is everything
            _write_shards(engine, tmp, files, manifest, [_local_shard(engine, tmp)])
        else:
            _single_optimizer(engine, tmp, files, manifest)
        _write_rest(engine, tmp, files, manifest, client_state, exclude_frozen_parameters)
        _finalize(save_dir, tmp, final, tag, manifest, files)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    kill_point("save_after_rename")
    if save_latest:
        _write_latest(save_dir, tag)
    kill_point("save_after_latest")
    write_recovery_script(save_dir)
    return True


def _local_shard(engine, tmp):
    """This rank's shard file; returns what rank 0 needs for the manifest."""
    opt = engine.optimizer
    opt._prepare()
    rank = opt._dp.rank
    names = engine._param_names_in_engine_order()
    name = shard_file(rank)
    entry, params = _write_optimizer_shard(opt, os.path.join(tmp, name), names)
    return {"rank": rank, "file": name, "entry": entry, "params": params,
            "subgroups": opt._b.engine.subgroups()}


def _write_shards(engine, tmp, files, manifest, shards):
    """The manifest's optimizer section for per-rank shard files: every parameter by name and
    shape with its step and, per shard, the slice it holds and the slot extents in that file."""
    opt = engine.optimizer
    b = opt._b
    names = engine._param_names_in_engine_order()
    by_name = {}
    for sh in shards:
        files[sh["file"]] = sh["entry"]
        for sp in sh["params"]:
            by_name.setdefault(sp["name"], []).append(
                {"rank": sh["rank"], "file": sh["file"], "start": sp["start"],
                 "numel": sp["numel"], "slots": sp["slots"]})
    params = []
    for i, p in enumerate(b.managed):
        parts = sorted(by_name.get(names[i], []), key=lambda s: s["start"])
        params.append({
            "name": names[i],
            "shape": list(p.shape),
            "numel": p.numel(),
            "dtype": str(p.dtype).replace("torch.", ""),
            "group": b.cohort_group[b.cohort_of[i]],
            "step": b.engine.step_count(b.cohort_of[i]),
            "slot_names": opt._slot_names(i),
            "shards": parts,
        })
    manifest["optimizer"] = {
        "class": _class_name(opt),
        "kind": opt._kind,
        "sharded": True,
        "stage": opt._dp.stage,
        "world_size": len(shards),
        "shard_files": [sh["file"] for sh in shards],
        "dtype": "float32",
        "params": params,
        "subgroups": {str(sh["rank"]): sh["subgroups"] for sh in shards},
    }


def _save_ranks(engine, save_dir, tag, client_state, save_latest, exclude_frozen_parameters):
    """Several ranks (a collective): rank 0 makes the temporary directory; every rank writes
    its shard of the optimizer state (stage 1 and 2) and its RNG state into it; rank 0 writes
    the model, engine, client files and the manifest, renames, and writes ``latest``. A failure
    on any rank makes every rank raise, and nothing replaces the previous checkpoint."""
    from . import comm

    rank, world = engine.global_rank, engine.world_size
    kill_point("save_begin")
    tmp, err = None, None
    if rank == 0:
        try:
            os.makedirs(save_dir, exist_ok=True)
            _clean_stale(save_dir)
            tmp = os.path.join(save_dir,
                               f".{tag}{_TMP_MARK}{os.getpid()}-{time.monotonic_ns()}")
            os.mkdir(tmp)
        except OSError as exc:
            err = f"rank 0: {exc}"
    box = [(tmp, err)]
    comm.broadcast_object_list(box, src=0)
    tmp, err = box[0]
    if err is not None:
        raise CheckpointError(f"save_checkpoint to {save_dir}: {err}")
    final = os.path.join(save_dir, tag)
    try:
        mine, err = {}, None
        try:
            if _is_sharded(engine.optimizer):
                mine["shard"] = _local_shard(engine, tmp)
            mine["rng"] = (rng_file(rank),
                           _torch_save_file(_rng_state(), os.path.join(tmp, rng_file(rank))))
        except Exception as exc:  # every rank learns of it below, then it is raised
            err = f"rank {rank}: {type(exc).__name__}: {exc}"
        parts = [None] * world
        comm.all_gather_object(parts, (mine, err))
        errors = [e for _, e in parts if e is not None]
        if errors:
            raise CheckpointError(f"save_checkpoint to {final} failed: {'; '.join(errors)}")
        err = None
        if rank == 0:
            try:
                files = {}
                manifest = _base_manifest(engine, tag)
                if _is_sharded(engine.optimizer):
                    _write_shards(engine, tmp, files, manifest, [m["shard"] for m, _ in parts])
                else:
                    _single_optimizer(engine, tmp, files, manifest)  # replicated: rank 0's
                manifest["rng_files"] = {}
                for r, (m, _) in enumerate(parts):
                    name, entry = m["rng"]
                    files[name] = entry
                    manifest["rng_files"][str(r)] = name
                _write_rest(engine, tmp, files, manifest, client_state,
                            exclude_frozen_parameters)
                _finalize(save_dir, tmp, final, tag, manifest, files)
            except Exception as exc:
                err = f"rank 0: {type(exc).__name__}: {exc}"
        box = [err]
        comm.broadcast_object_list(box, src=0)
        if box[0] is not None:
            raise CheckpointError(f"save_checkpoint to {final} failed: {box[0]}")
    except BaseException:
        if rank == 0 and tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if rank == 0:
        kill_point("save_after_rename")
        if save_latest:
            _write_latest(save_dir, tag)
        kill_point("save_after_latest")
        write_recovery_script(save_dir)
    comm.barrier()  # `latest` is written before any rank goes on (and may load it)
    return True


# ---------------------------------------------------------------------------------------
# load


def read_manifest(tag_dir):
    path = os.path.join(tag_dir, MANIFEST)
    try:
        with open(path) as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing — {tag_dir} is not a complete strata "
                              "checkpoint") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable manifest ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a strata checkpoint manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format version {manifest.get('format_version')} is not "
                              f"{FORMAT_VERSION}, the one this strata reads")
    return manifest


def verify_file(tag_dir, manifest, name):
    entry = manifest.get("files", {}).get(name)
    path = os.path.join(tag_dir, name)
    if entry is None:
        raise CheckpointError(f"{path}: not listed in the manifest")
    try:
        got = _file_digest(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    if got["bytes"] != entry["bytes"]:
        raise CheckpointError(f"{path}: {got['bytes']} bytes, the manifest says "
                              f"{entry['bytes']} (truncated or replaced)")
    if got["blake2b"] != entry["blake2b"]:
        raise CheckpointError(f"{path}: checksum mismatch (BLAKE2b {got['blake2b']}, the "
                              f"manifest says {entry['blake2b']}): the file is corrupted")
    return path


def resolve_tag_dir(path, tag=None):
    """The tag directory for a checkpoint folder (with ``latest``) or a tag folder itself."""
    path = os.fspath(path)
    if tag is None and os.path.isfile(os.path.join(path, MANIFEST)):
        return path
    if tag is None:
        tag = read_latest(path)
        if tag is None:
            raise CheckpointError(f"{path}: no '{LATEST}' file and no {MANIFEST}; name the tag")
    tag_dir = os.path.join(path, str(tag))
    if not os.path.isdir(tag_dir):
        # An interrupted overwrite without RENAME_EXCHANGE leaves the old copy aside.
        aside = [n for n in os.listdir(path) if n.startswith(f".{tag}{_OLD_MARK}")] \
            if os.path.isdir(path) else []
        for name in aside:
            cand = os.path.join(path, name)
            if os.path.isfile(os.path.join(cand, MANIFEST)):
                os.rename(cand, tag_dir)
                _fsync_dir(path)
                break
        else:
            raise CheckpointError(f"{tag_dir}: checkpoint tag {tag!r} does not exist")
    return tag_dir


def read_slot(f, path, param, slot, out):
    """Read one slot extent into the fp32 tensor ``out`` and check its checksum."""
    mv = memoryview(out.numpy()).cast("B")
    if len(mv) != slot["bytes"]:
        raise CheckpointError(f"{path}: parameter {param['name']!r} slot {slot['name']} has "
                              f"{slot['bytes']} bytes, expected {len(mv)}")
    f.seek(slot["offset"])
    got = f.readinto(mv)
    if got != len(mv):
        raise CheckpointError(f"{path}: short read of parameter {param['name']!r} slot "
                              f"{slot['name']} at offset {slot['offset']} (file truncated)")
    digest = hashlib.blake2b(mv, digest_size=16).hexdigest()
    if digest != slot["blake2b"]:
        raise CheckpointError(f"{path}: checksum mismatch in parameter {param['name']!r} slot "
                              f"{slot['name']} (bytes {slot['offset']}..{slot['offset'] + len(mv)})"
                              ": the file is corrupted")


def _check_model(engine, path, manifest, strict):
    """Validate the saved module against the engine's module; returns the reader."""
    reader = TensorFileReader(path)
    target = engine.module.state_dict()
    saved = set(reader.names())
    expected = set(target)
    excluded = set(manifest.get("model", {}).get("excluded_frozen", []))
    missing = sorted(expected - saved - excluded)
    unexpected = sorted(saved - expected)
    if strict and (missing or unexpected):
        raise CheckpointError(
            f"{path}: the module does not match the checkpoint"
            + (f"; missing in the checkpoint: {', '.join(missing[:10])}" if missing else "")
            + (f"; not in the module: {', '.join(unexpected[:10])}" if unexpected else "")
            + " (load_module_strict=False loads the common part)")
    for name in reader.names():
        if name not in target:
            continue
        lt = reader.meta(name)
        dst = target[name]
        if tuple(lt.shape) != tuple(dst.shape):
            raise CheckpointError(f"{path}: {name} has shape {list(lt.shape)} in the checkpoint, "
                                  f"{list(dst.shape)} in the module")
    return reader


def _load_model(engine, reader):
    target = engine.module.state_dict()
    with torch.no_grad():
        for name in reader.names():
            if name in target:
                target[name].copy_(reader.tensor(name))


def _check_optimizer(engine, tag_dir, manifest):
    """Validate the saved optimizer state against the engine's optimizer before anything is
    changed. Returns what _apply_optimizer needs."""
    from .optim import _OffloadOptimizer

    opt = engine.optimizer
    info = manifest.get("optimizer")
    if info is None:
        raise CheckpointError(f"{tag_dir}: the checkpoint has no optimizer state "
                              "(load_optimizer_states=False loads the weights only)")
    if not isinstance(opt, _OffloadOptimizer):
        if info.get("kind") != "torch":
            raise CheckpointError(f"{tag_dir}: the checkpoint holds strata optimizer state, the "
                                  f"engine runs the client optimizer {type(opt.optimizer).__name__}")
        return ("torch", verify_file(tag_dir, manifest, TORCH_OPTIMIZER_FILE))
    if info.get("kind") == "torch":
        raise CheckpointError(f"{tag_dir}: the checkpoint holds the state of a client torch "
                              f"optimizer ({info.get('class')}), the engine runs {type(opt).__name__}")
    if info.get("sharded") or _is_sharded(opt):
        return _check_optimizer_pieces(engine, tag_dir, manifest, info)
    path = os.path.join(tag_dir, info.get("file", OPTIMIZER_FILE))
    entry = manifest.get("files", {}).get(OPTIMIZER_FILE)
    if entry is None:
        raise CheckpointError(f"{path}: not listed in the manifest")
    try:
        size = os.path.getsize(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    if size != entry["bytes"]:
        raise CheckpointError(f"{path}: {size} bytes, the manifest says {entry['bytes']} "
                              "(truncated or replaced)")
    opt._refresh()
    names = engine._param_names_in_engine_order()
    b = opt._b
    saved = {p["name"]: p for p in info["params"]}
    missing = [n for n in names if n not in saved]
    extra = [n for n in saved if n not in set(names)]
    if missing or extra:
        raise CheckpointError(
            f"{path}: the trainable parameters differ from the checkpoint's"
            + (f"; without saved state: {', '.join(missing[:10])}" if missing else "")
            + (f"; saved but not trainable here: {', '.join(extra[:10])}" if extra else "")
            + " (load_optimizer_states=False loads the weights only)")
    for i, n in enumerate(names):
        p = b.managed[i]
        sp = saved[n]
        if list(sp["shape"]) != list(p.shape):
            raise CheckpointError(f"{path}: parameter {n!r} has shape {sp['shape']} in the "
                                  f"checkpoint, {list(p.shape)} here")
        want = opt._slot_names(i)
        have = [s["name"] for s in sp["slots"]]
        if want != have:
            raise CheckpointError(
                f"{path}: parameter {n!r} has state slots {have} in the checkpoint "
                f"({info.get('class')}), this optimizer ({type(opt).__name__}) keeps {want}; "
                "load_optimizer_states=False loads the weights only")
        for slot in sp["slots"]:
            if slot["bytes"] != 4 * p.numel() or slot["offset"] + slot["bytes"] > size:
                raise CheckpointError(f"{path}: parameter {n!r} slot {slot['name']} has an "
                                      "extent outside the file or of the wrong size")
    return ("strata", path, [saved[n] for n in names], [b.managed[i] for i in range(len(names))])


def _saved_pieces(tag_dir, info):
    """name -> (saved entry, [(start, numel, path, slots)]): where each parameter's state is,
    for the one-file layout and the per-rank shard layout alike."""
    out = {}
    for p in info["params"]:
        if info.get("sharded"):
            pieces = [(s["start"], s["numel"], os.path.join(tag_dir, s["file"]), s["slots"])
                      for s in p.get("shards", [])]
        else:
            pieces = [(0, p["numel"], os.path.join(tag_dir, info.get("file", OPTIMIZER_FILE)),
                       p["slots"])]
        out[p["name"]] = (p, pieces)
    return out


def _check_optimizer_pieces(engine, tag_dir, manifest, info):
    """Validation for a sharded checkpoint, or for loading into a sharded optimizer: by
    parameter name and shape, whatever world size saved it (re-sharding)."""
    opt = engine.optimizer
    files = manifest.get("files", {})
    saved = _saved_pieces(tag_dir, info)
    sizes = {}
    for _, pieces in saved.values():
        for _, _, path, _ in pieces:
            if path in sizes:
                continue
            entry = files.get(os.path.basename(path))
            if entry is None:
                raise CheckpointError(f"{path}: not listed in the manifest")
            try:
                size = os.path.getsize(path)
            except FileNotFoundError:
                raise CheckpointError(f"{path}: missing") from None
            if size != entry["bytes"]:
                raise CheckpointError(f"{path}: {size} bytes, the manifest says {entry['bytes']} "
                                      "(truncated or replaced)")
            sizes[path] = size
    opt._refresh()
    names = engine._param_names_in_engine_order()
    b = opt._b
    where = os.path.join(tag_dir, MANIFEST)
    missing = [n for n in names if n not in saved]
    extra = [n for n in saved if n not in set(names)]
    if missing or extra:
        raise CheckpointError(
            f"{where}: the trainable parameters differ from the checkpoint's"
            + (f"; without saved state: {', '.join(missing[:10])}" if missing else "")
            + (f"; saved but not trainable here: {', '.join(extra[:10])}" if extra else "")
            + " (load_optimizer_states=False loads the weights only)")
    for i, n in enumerate(names):
        p = b.managed[i]
        sp, pieces = saved[n]
        if list(sp["shape"]) != list(p.shape):
            raise CheckpointError(f"{where}: parameter {n!r} has shape {sp['shape']} in the "
                                  f"checkpoint, {list(p.shape)} here")
        want = opt._slot_names(i)
        have = sp.get("slot_names") or [s["name"] for s in sp["slots"]]
        if want != have:
            raise CheckpointError(
                f"{where}: parameter {n!r} has state slots {have} in the checkpoint "
                f"({info.get('class')}), this optimizer ({_class_name(opt)}) keeps {want}; "
                "load_optimizer_states=False loads the weights only")
        at = 0
        for start, numel, path, slots in sorted(pieces, key=lambda x: x[0]):
            if start != at:
                raise CheckpointError(f"{where}: the shards of parameter {n!r} do not cover "
                                      f"elements {at}..{start}")
            if [s["name"] for s in slots] != want:
                raise CheckpointError(f"{path}: parameter {n!r} has slots "
                                      f"{[s['name'] for s in slots]}, expected {want}")
            for slot in slots:
                if slot["bytes"] != 4 * numel or slot["offset"] + slot["bytes"] > sizes[path]:
                    raise CheckpointError(f"{path}: parameter {n!r} slot {slot['name']} has an "
                                          "extent outside the file or of the wrong size")
            at = start + numel
        if at != p.numel():
            raise CheckpointError(f"{where}: the shards of parameter {n!r} cover {at} of its "
                                  f"{p.numel()} elements")
    return ("pieces", [saved[n] for n in names], [b.managed[i] for i in range(len(names))])


def _read_piece(f, path, name, slot, start, numel, lo, out):
    """Elements [max(start, lo), ...) of one saved slot extent (which holds elements
    [start, start + numel) of the parameter) into ``out`` (which holds elements
    [lo, lo + out.numel())), checking the whole extent's checksum."""
    hi = lo + out.numel()
    a, e = max(start, lo), min(start + numel, hi)
    h = hashlib.blake2b(digest_size=16)
    f.seek(slot["offset"])
    if a == start and e == start + numel:  # the whole extent is wanted: read it in place
        mv = memoryview(out[a - lo:e - lo].numpy()).cast("B")
        got = f.readinto(mv)
        if got != len(mv):
            raise CheckpointError(f"{path}: short read of parameter {name!r} slot "
                                  f"{slot['name']} at offset {slot['offset']} (file truncated)")
        h.update(mv)
    else:  # part of it: stream it all through a chunk (for the checksum), keep the overlap
        chunk = torch.empty(_CHUNK // 4, dtype=torch.float32)
        mv = memoryview(chunk.numpy()).cast("B")
        pos = start  # parameter element at the start of the next chunk
        left = slot["bytes"]
        while left > 0:
            k = f.readinto(mv[:min(len(mv), left)])
            if not k:
                raise CheckpointError(f"{path}: short read of parameter {name!r} slot "
                                      f"{slot['name']} (file truncated)")
            h.update(mv[:k])
            m = k // 4
            ca, ce = max(a, pos), min(e, pos + m)
            if ca < ce:
                out[ca - lo:ce - lo].copy_(chunk[ca - pos:ce - pos])
            pos += m
            left -= k
    if h.hexdigest() != slot["blake2b"]:
        raise CheckpointError(f"{path}: checksum mismatch in parameter {name!r} slot "
                              f"{slot['name']} (bytes {slot['offset']}.."
                              f"{slot['offset'] + slot['bytes']}): the file is corrupted")


def read_master(tag_dir, manifest, name):
    """The fp32 master weights of parameter ``name`` (shaped as saved), from a one-file or a
    per-rank (sharded) checkpoint, every byte checked against the manifest; None when the
    checkpoint holds no strata optimizer state for it (for export tools)."""
    info = manifest.get("optimizer") or {}
    if info.get("kind") in (None, "torch"):
        return None
    saved = _saved_pieces(os.fspath(tag_dir), info)
    if name not in saved:
        return None
    sp, pieces = saved[name]
    out = torch.empty(sp["numel"], dtype=torch.float32)
    for start, numel, path, slots in pieces:
        slot = next(s for s in slots if s["name"] == "master")
        with open(path, "rb", buffering=0) as f:
            _read_piece(f, path, name, slot, start, numel, 0, out)
    return out.view(sp["shape"])


def _apply_pieces(engine, plan):
    _, saved, params = plan
    opt = engine.optimizer
    opt._set_steps({id(p): int(sp.get("step", 0)) for p, (sp, _) in zip(params, saved)})
    b = opt._b
    sharded = _is_sharded(opt)
    handles = {}
    buf = None
    total = sum(4 * p.numel() * len(sp.get("slot_names") or sp["slots"]) for p, (sp, _) in zip(params, saved))
    advance, done = _state_progress(opt, "loading optimizer state", total)
    try:
        for p, (sp, pieces) in zip(params, saved):
            i = b.index[id(p)]
            advance(4 * p.numel() * len(sp.get("slot_names") or sp["slots"]))
            if sharded:
                j = b.slice_of.get(i)
                if j is None:
                    continue  # no part of it on this rank
                _, lo, _, n = b.slices[j]
            else:
                j, lo, n = i, 0, p.numel()
            nslots = len(sp.get("slot_names") or sp["slots"])
            if buf is None or buf.numel() < nslots * n:
                buf = torch.empty(nslots * n, dtype=torch.float32)
            rows = [buf[k * n:(k + 1) * n] for k in range(nslots)]
            for start, numel, path, slots in pieces:
                if start >= lo + n or start + numel <= lo:
                    continue
                f = handles.get(path)
                if f is None:
                    f = handles[path] = open(path, "rb", buffering=0)
                for k, slot in enumerate(slots):
                    _read_piece(f, path, sp["name"], slot, start, numel, lo, rows[k])
            b.engine.write_param_states(j, [r.data_ptr() for r in rows])
    finally:
        done()
        for f in handles.values():
            f.close()
    opt._mark_synced()
    b.engine.clear_error()


def _apply_optimizer(engine, plan):
    opt = engine.optimizer
    if plan[0] == "torch":
        opt.load_state_dict(torch_load_trusted(plan[1]))
        return
    if plan[0] == "pieces":
        _apply_pieces(engine, plan)
        return
    _, path, saved, params = plan
    # Step counts: parameters of one group that stepped a different number of times get
    # cohorts of their own, as they had when saved.
    opt._set_steps({id(p): int(sp.get("step", 0)) for p, sp in zip(params, saved)})
    b = opt._b
    buf = None
    with open(path, "rb", buffering=0) as f:
        for p, sp in zip(params, saved):
            i = b.index[id(p)]
            if buf is None or buf.numel() < p.numel():
                buf = torch.empty(p.numel(), dtype=torch.float32)
            t = buf[: p.numel()]
            for slot_index, slot in enumerate(sp["slots"]):
                read_slot(f, path, sp, slot, t)
                opt._write_slot(i, slot_index, t)
    opt._mark_synced()
    b.engine.clear_error()


def load(engine, load_dir, tag=None, load_module_strict=True, load_optimizer_states=True,
         load_lr_scheduler_states=True, load_module_only=False):
    """``Engine.load_checkpoint``: returns (load_path, client_state), or (None, None) when
    ``tag`` is None and there is no ``latest`` file (as DeepSpeed)."""
    load_dir = os.fspath(load_dir)
    if tag is None:
        tag = read_latest(load_dir)
        if tag is None:
            _config.warn_once(f"load_checkpoint: no '{LATEST}' file in {load_dir}; nothing "
                              "loaded (pass tag= to load a given checkpoint)")
            return None, None
    kill_point("load_begin")
    opt = engine.optimizer
    with_optimizer = opt is not None and load_optimizer_states and not load_module_only
    plan = None
    failure = None
    try:
        tag_dir = resolve_tag_dir(load_dir, str(tag))
        manifest = read_manifest(tag_dir)
        # Everything small is verified before anything is touched.
        engine_state = torch_load_trusted(verify_file(tag_dir, manifest, ENGINE_FILE))
        # Several ranks: each rank its own RNG state when the checkpoint has one for its rank
        # (saved with several ranks), else rank 0's.
        rng_name = (manifest.get("rng_files") or {}).get(str(engine.global_rank), RNG_FILE) \
            if engine.world_size > 1 else RNG_FILE
        rng = torch_load_trusted(verify_file(tag_dir, manifest, rng_name))
        client_state = torch_load_trusted(verify_file(tag_dir, manifest, CLIENT_FILE))
        model_reader = _check_model(engine,
                                    verify_file(tag_dir, manifest, model_file(manifest)), manifest,
                                    load_module_strict)
        if with_optimizer:
            groups = engine_state.get("optimizer_param_groups") or []
            if len(groups) != len(opt.param_groups):
                raise CheckpointError(f"{os.path.join(tag_dir, ENGINE_FILE)}: {len(groups)} "
                                      f"param groups saved, the optimizer has "
                                      f"{len(opt.param_groups)}")
            plan = _check_optimizer(engine, tag_dir, manifest)
    except Exception as exc:
        failure = exc
    if engine.world_size > 1:
        # Every rank checked what it will read; all go on, or all raise (a rank that went on
        # alone would wait forever in the collectives of the load).
        from . import comm

        verdicts = [None] * engine.world_size
        comm.all_gather_object(verdicts, None if failure is None else
                               f"{type(failure).__name__}: {failure}")
        if failure is None:
            bad = [(r, v) for r, v in enumerate(verdicts) if v is not None]
            if bad:
                raise CheckpointError(f"load_checkpoint from {load_dir}: rank {bad[0][0]} "
                                      f"failed: {bad[0][1]}")
    if failure is not None:
        raise failure

    # From here on state changes: a failure leaves the optimizer refusing to step until a load
    # succeeds, never half-loaded and reported as fine.
    if opt is not None:
        opt._poisoned = f"load_checkpoint from {tag_dir} did not complete"
    _load_model(engine, model_reader)
    if with_optimizer:
        for saved, group in zip(engine_state["optimizer_param_groups"], opt.param_groups):
            for k, v in saved.items():
                if k != "params":
                    group[k] = v
        _apply_optimizer(engine, plan)
    elif hasattr(opt, "sync_masters"):
        # Weights only: the masters follow the loaded weights.
        opt.sync_masters()
    if not load_module_only:
        if load_lr_scheduler_states and engine.lr_scheduler is not None \
                and engine_state.get("lr_scheduler") is not None:
            engine.lr_scheduler.load_state_dict(engine_state["lr_scheduler"])
        if engine.loss_scaler is not None and engine_state.get("loss_scaler"):
            engine.loss_scaler.load_state_dict(engine_state["loss_scaler"])
        engine.global_steps = int(manifest.get("global_steps", 0))
        engine.global_samples = int(manifest.get("global_samples", 0))
        engine.micro_steps = int(manifest.get("micro_steps", 0))
        engine.skipped_steps = int(manifest.get("skipped_steps", 0))
        _set_rng_state(rng)
    if opt is not None:
        opt._poisoned = None
    return os.path.join(tag_dir, model_file(manifest)), client_state
