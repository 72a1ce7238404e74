"""The on-disk format of a strata checkpoint: file names, the manifest, torch files written and
read one tensor at a time, and the optimizer-state files (written, checked, read back into an
engine). Layout of a tag directory: see the package doc (``strata/checkpoint/__init__.py``).
"""

import collections
import io
import json
import os
import pickle
import sys

import torch

from .. import _C
from .. import config as _config
from .. import param_tier as _pt
from . import state as _ckpt_state
from .._torch_compat import tensor_from_buffer, torch_load_trusted
from ..testing.kill_points import kill_point
from .fsutil import _CHUNK, _OLD_MARK, LATEST, MANIFEST, _file_digest, _fsync_dir, \
    _HashingWriter, read_latest

FORMAT = "strata-checkpoint"
FORMAT_VERSION = 1
OPTIMIZER_FILE = "optimizer_state.bin"
MODEL_FILE = "mp_rank_00_model_states.pt"  # DeepSpeed's name; the module under "module"
OLD_MODEL_FILE = "model_states.pt"  # checkpoints before issue 25: a flat state_dict
RECOVERY_SCRIPT = "zero_to_fp32.py"
ENGINE_FILE = "engine_state.pt"
RNG_FILE = "rng_state.pt"
CLIENT_FILE = "client_state.pt"
TORCH_OPTIMIZER_FILE = "optimizer_torch.pt"


class CheckpointError(_C.StrataError):
    """A checkpoint is incomplete, corrupted or does not fit the engine; the message names the
    file (and the parameter) at fault."""


CheckpointError.__module__ = "strata.checkpoint"  # where users catch it (and pickle finds it)


# ---------------------------------------------------------------------------------------
# file names


def zero_optim_file(rank):
    """DeepSpeed's per-rank optimizer file name (zero_pp_rank_R_mp_rank_00_optim_states.pt)."""
    return f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"



def shard_file(rank):
    return f"optimizer_state.rank{rank:05d}.bin"



def rng_file(rank):
    return f"rng_state.rank{rank:05d}.pt"



def model_file(manifest):
    """The model file a manifest names (older checkpoints: model_states.pt)."""
    return (manifest.get("model") or {}).get("file") or MODEL_FILE



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
        w.abort()
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

    def _view(self, name):
        """A read-only view of the saved tensor over the record's bytes (valid while the
        returned bytes object lives)."""
        lt = self.entries[name]
        if not isinstance(lt, _LazyTensor):
            raise CheckpointError(f"{self.path}: entry {name!r} is not a tensor")
        raw = self._zf.get_record(f"data/{lt.key}")
        whole = tensor_from_buffer(raw, lt.dtype) if len(raw) else \
            torch.empty(0, dtype=lt.dtype)
        return torch.as_strided(whole, lt.shape, lt.stride, lt.offset), raw

    def tensor(self, name):
        view, _ = self._view(name)
        return view.clone()

    def copy_to(self, name, dst):
        """Copies the saved tensor into ``dst`` (one copy out of the record, no clone)."""
        view, raw = self._view(name)
        dst.copy_(view)
        del view, raw



# ---------------------------------------------------------------------------------------
# the manifest


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
        algo = "blake2b" if "blake2b" in entry and "xxh3" not in entry else "xxh3"
        got = _file_digest(path, algo)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    if got["bytes"] != entry["bytes"]:
        raise CheckpointError(f"{path}: {got['bytes']} bytes, the manifest says "
                              f"{entry['bytes']} (truncated or replaced)")
    if got[algo] != entry[algo]:
        raise CheckpointError(f"{path}: checksum mismatch ({algo} {got[algo]}, the "
                              f"manifest says {entry[algo]}): the file is corrupted")
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



# ---------------------------------------------------------------------------------------
# the model file, checked and loaded


def _check_model(engine, path, manifest, strict):
    """Validate the saved module against the engine's module; returns the reader."""
    reader = TensorFileReader(path)
    target = engine.module.state_dict(keep_vars=True)
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
        if tuple(lt.shape) != _pt.shape(dst):
            raise CheckpointError(f"{path}: {name} has shape {list(lt.shape)} in the checkpoint, "
                                  f"{list(_pt.shape(dst))} in the module")
    return reader



def _load_model(engine, reader):
    target = engine.module.state_dict(keep_vars=True)
    with torch.no_grad():
        for name in reader.names():
            if name not in target:
                continue
            dst = target[name]
            if _pt.fetched_on_demand(dst):
                # Weights on the cxl/nvme param tier, or partitioned (each rank keeps its
                # chunk): one parameter at a time onto it.
                tmp = torch.empty(_pt.shape(dst), dtype=dst.dtype)
                reader.copy_to(name, tmp)
                _pt.write_weights(dst, tmp)
            else:
                reader.copy_to(name, dst.detach())



# ---------------------------------------------------------------------------------------
# optimizer-state files: written


def _state_progress(opt, phase, total_bytes):
    """Progress (bar or log lines, as ``strata.progress`` says) for moving large optimizer
    state; silent below 256 MiB."""
    from ..progress import EngineProgress

    mode = _config.get(getattr(opt, "config", {}) or {}, "strata.progress")
    prog = EngineProgress(mode)
    state = {"done": 0}

    def advance(nbytes):
        state["done"] += nbytes
        prog(phase, state["done"], total_bytes)

    advance(0)
    return advance, prog.close



def _write_optimizer_state(opt, path, names):
    """Stream every parameter's slots into ``path`` by record (one fetch per record); returns
    (file entry, params list)."""
    b = opt._b
    items = [(i, opt._slot_names(i)) for i in range(len(b.managed))]
    total = sum(_pt.numel(p) * 4 * len(opt._slot_names(i)) for i, p in enumerate(b.managed))
    advance, done = _state_progress(opt, "saving optimizer state", total)
    try:
        entry, metas = _ckpt_state.save_state(b.engine, path, items, advance,
                                              lambda: kill_point("save_state"))
    finally:
        done()
    return entry, [dict(param_entry(opt, names, i), slots=metas[i]) for i in range(len(b.managed))]


def param_entry(opt, names, i):
    """The manifest's description of parameter ``i``: name, shape, numel, dtype, param group
    and step count (each layout adds where its state is)."""
    b = opt._b
    p = b.managed[i]
    return {
        "name": names[i],
        "shape": list(_pt.shape(p)),
        "numel": _pt.numel(p),
        "dtype": str(p.dtype).replace("torch.", ""),
        "group": b.cohort_group[b.cohort_of[i]],
        "step": b.engine.step_count(b.cohort_of[i]),
    }


def _is_sharded(opt):
    """A data-parallel optimizer whose engine holds only this rank's slices."""
    from ..optim import _OffloadOptimizer

    return isinstance(opt, _OffloadOptimizer) and opt.layout is not None and opt.layout.sharded



def _class_name(opt):
    return opt.class_name  # the optimizer, not its sharding



def _write_optimizer_shard(opt, path, names):
    """Stream this rank's slices of every parameter's slots into ``path`` by record (one
    fetch per record); returns (file entry, per-slice entries)."""
    b = opt._b
    items = [(j, opt._slot_names(i)) for j, (i, _, _, _) in enumerate(b.slices)]
    entry, metas = _ckpt_state.save_state(b.engine, path, items, None,
                                          lambda: kill_point("save_state"))
    params = [{"name": names[i], "start": po, "numel": n, "slots": metas[j]}
              for j, (i, po, _, n) in enumerate(b.slices)]
    return entry, params


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
    h, algo = _ckpt_state.hasher_for(slot)
    h.update(mv)
    if h.hexdigest() != slot[algo]:
        raise CheckpointError(f"{path}: checksum mismatch in parameter {param['name']!r} slot "
                              f"{slot['name']} (bytes {slot['offset']}..{slot['offset'] + len(mv)})"
                              ": the file is corrupted")


# How precisely each kind of slot is stored, most precise first (strata.optimizer_state_dtype's
# values; a sub-group lists q8s/q8u for int8_blockwise).
_STATE_PRECISION = {"fp32": 2, "bf16": 1, "int8_blockwise": 0}
_SLOT_TO_STATE = {"fp32": "fp32", "bf16": "bf16", "q8s": "int8_blockwise", "q8u": "int8_blockwise"}


def state_dtypes(subgroups):
    """``{"master": ..., "moments": ...}``: how the engine's records store the master weights
    and the optimizer's other slots (from its sub-groups' ``slot_dtypes``), for the manifest."""
    master, moments = "fp32", "fp32"
    for sg in subgroups:
        d = sg.get("slot_dtypes") or []
        if d:
            master = _SLOT_TO_STATE[d[0]]
        if len(d) > 1:
            moments = _SLOT_TO_STATE[d[1]]
            break
    return {"master": master, "moments": moments}


def _check_state_dtypes(where, info, engine_subgroups):
    """Loading into less precise state converts (the engine rounds or re-quantises each record
    once; logged). Loading into more precise state is refused: it would claim precision the
    saved state never had. Checkpoints without the entry were saved as fp32."""
    saved = info.get("state_dtypes") or {"master": "fp32", "moments": "fp32"}
    here = state_dtypes(engine_subgroups)
    keys = {"master": "bf16.bf16_master_weights_and_grads", "moments":
            "strata.optimizer_state_dtype"}
    for what in ("master", "moments"):
        if _STATE_PRECISION[here[what]] > _STATE_PRECISION[saved[what]]:
            raise CheckpointError(
                f"{where}: the checkpoint stores the {what} as {saved[what]}; this engine keeps "
                f"them as {here[what]}, which would claim precision the saved state never had. "
                f"Load it with the same setting ({keys[what]}) or save again from an engine "
                f"with {here[what]} state")
        if here[what] != saved[what]:
            _config.warn_once(f"{where}: the checkpoint's {what} ({saved[what]}) are "
                              f"converted to this engine's {here[what]} as they load")


def _check_optimizer(engine, tag_dir, manifest):
    """Validate the saved optimizer state against the engine's optimizer before anything is
    changed. Returns what _apply_optimizer needs."""
    from ..optim import _OffloadOptimizer

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
    _check_state_dtypes(path, info, b.engine.subgroups())
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
        if list(sp["shape"]) != list(_pt.shape(p)):
            raise CheckpointError(f"{path}: parameter {n!r} has shape {sp['shape']} in the "
                                  f"checkpoint, {list(_pt.shape(p))} here")
        want = opt._slot_names(i)
        have = [s["name"] for s in sp["slots"]]
        if want != have:
            raise CheckpointError(
                f"{path}: parameter {n!r} has state slots {have} in the checkpoint "
                f"({info.get('class')}), this optimizer ({type(opt).__name__}) keeps {want}; "
                "load_optimizer_states=False loads the weights only")
        for slot in sp["slots"]:
            if slot["bytes"] != 4 * _pt.numel(p) or slot["offset"] + slot["bytes"] > size:
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
    _check_state_dtypes(where, info, b.engine.subgroups())
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
        if list(sp["shape"]) != list(_pt.shape(p)):
            raise CheckpointError(f"{where}: parameter {n!r} has shape {sp['shape']} in the "
                                  f"checkpoint, {list(_pt.shape(p))} here")
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
        if at != _pt.numel(p):
            raise CheckpointError(f"{where}: the shards of parameter {n!r} cover {at} of its "
                                  f"{_pt.numel(p)} elements")
    return ("pieces", [saved[n] for n in names], [b.managed[i] for i in range(len(names))])



def _read_piece(f, path, name, slot, start, numel, lo, out):
    """Elements [max(start, lo), ...) of one saved slot extent (which holds elements
    [start, start + numel) of the parameter) into ``out`` (which holds elements
    [lo, lo + out.numel())), checking the whole extent's checksum."""
    hi = lo + out.numel()
    a, e = max(start, lo), min(start + numel, hi)
    h, algo = _ckpt_state.hasher_for(slot)
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
    if h.hexdigest() != slot[algo]:
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
    """Load the saved state into the engine by record: each record written once, never
    fetched; each slice read from its place in the checkpoint's file(s)."""
    _, saved, params = plan
    opt = engine.optimizer
    opt._set_steps({id(p): int(sp.get("step", 0)) for p, (sp, _) in zip(params, saved)})
    b = opt._b
    sharded = _is_sharded(opt)
    items = {}
    for p, (sp, pieces) in zip(params, saved):
        i = b.index[id(p)]
        if sharded:
            j = b.slice_of.get(i)
            if j is None:
                continue  # no part of it on this rank
            _, lo, _, _ = b.slices[j]
        else:
            j, lo = i, 0
        items[j] = (sp["name"], lo, pieces)
    total = sum(4 * b.engine.param_numel(j) * b.engine.param_slots(j) for j in items)
    advance, done = _state_progress(opt, "loading optimizer state", total)
    try:
        _ckpt_state.load_state(b.engine, items, advance)
    except _ckpt_state.StateFileError as e:
        raise CheckpointError(str(e)) from None
    finally:
        done()
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
    # The one-file layout: each parameter is one piece, elements [0, numel).
    _, path, saved, params = plan
    _apply_pieces(engine, ("pieces", [(sp, [(0, sp["numel"], path, sp["slots"])])
                                      for sp in saved], params))


