"""Save and load orchestration: what ``Engine.save_checkpoint`` and ``Engine.load_checkpoint`` do,
in which order, on one rank or several (a collective), built on the format (``format.py``) and
the atomic directories (``fsutil.py``).
"""

import contextlib
import json
import os
import platform
import random
import shutil
import sys
import time

import torch

from .. import _C
from .. import config as _config
from .. import param_tier as _pt
from .._torch_compat import torch_load_trusted
from ..testing.kill_points import kill_point
from .format import CLIENT_FILE, ENGINE_FILE, FORMAT, FORMAT_VERSION, MODEL_FILE, \
    OPTIMIZER_FILE, RECOVERY_SCRIPT, RNG_FILE, TORCH_OPTIMIZER_FILE, CheckpointError, \
    _apply_optimizer, _check_model, _check_optimizer, _class_name, _is_sharded, _load_model, \
    _write_optimizer_shard, _write_optimizer_state, model_file, read_manifest, resolve_tag_dir, \
    param_entry, rng_file, shard_file, state_dtypes, verify_file, write_tensor_file, \
    zero_optim_file
from .fsutil import _TMP_MARK, LATEST, _check_tag, _clean_stale, _finalize, _torch_save_file, \
    _write_latest, read_latest


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
        if _pt.fetched_on_demand(t):
            # Weights on the cxl/nvme param tier: read one parameter at a time as written
            # (partitioned: all-gathered, a collective; see write_model).
            def produce(p=t):
                return _pt.read_weights(p).detach().contiguous()
            produce.collective = _pt.partitioned(t)
            entries.append((name, tuple(t.ds_shape), t.dtype, ("tier", id(_pt.tier_of(t)), t.ds_id),
                            produce))
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



def _model_wrap(engine):
    """DeepSpeed's model-states keys around the module (its loaders and users' scripts read
    "module"); the optimizer state is in strata's files, named in zero_pp_rank_*."""
    sched = engine.lr_scheduler
    sched_state = sched.state_dict() if sched is not None and hasattr(sched, "state_dict") \
        else None
    frozen = {n for n, p in engine.module.named_parameters() if not p.requires_grad}
    return {
        "buffer_names": [n for n, _ in engine.module.named_buffers()],
        # Plain values only (lists for shapes, JSON for the rest): the file is read back by
        # strata's restricted unpickler.
        "param_shapes": [{n: list(_pt.shape(p)) for n, p in engine.module.named_parameters()
                          if p.requires_grad}],
        "frozen_param_shapes": {n: list(_pt.shape(p)) for n, p in engine.module.named_parameters()
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


def write_model(engine, path, exclude_frozen, wrap=None):
    """The module's weights as a torch file at ``path``, one tensor at a time; returns (file
    entry, entries, excluded frozen names) on the rank that wrote it.

    With partitioned weights (ZeRO-3 across ranks) every rank must call it: rank 0 writes while
    every rank takes part in each partitioned parameter's all-gather, in the order the writer
    asks for them (``write_tensor_file``: each storage once, in entry order); the other ranks
    return None. Should rank 0's writing fail, it still takes part in the gathers left, so
    that no rank waits forever, and then raises."""
    entries, metadata, excluded = _model_entries(engine.module, exclude_frozen)
    seen, gathers = set(), []
    for _, _, _, sid, produce in entries:
        if sid not in seen:
            seen.add(sid)
            if getattr(produce, "collective", False):
                gathers.append(produce)
    if gathers and engine.global_rank != 0:
        for g in gathers:
            g()
        return None
    done = [0]

    def counted(produce):
        def run():
            done[0] += 1
            return produce()
        return run

    writes = [(n, s, d, sid, counted(f) if getattr(f, "collective", False) else f)
              for n, s, d, sid, f in entries]
    try:
        entry = write_tensor_file(path, writes, metadata, wrap=wrap)
    except BaseException:
        for g in gathers[done[0]:]:
            g()
        raise
    return entry, entries, excluded


def write_gathered_model(engine, path, exclude_frozen_parameters=False):
    """``save_16bit_model`` with partitioned weights: a plain state-dict file written by rank
    0 (a collective: see ``write_model``)."""
    if engine.global_rank == 0:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_model(engine, path, exclude_frozen_parameters)


def _write_rest(engine, tmp, files, manifest, client_state, exclude_frozen_parameters,
                model=None):
    """The model, engine, RNG and client files (rank 0's, with several ranks). ``model``:
    what ``write_model`` returned when the model file is written already (partitioned)."""
    opt = engine.optimizer
    sched = engine.lr_scheduler
    sched_state = sched.state_dict() if sched is not None and hasattr(sched, "state_dict") \
        else None
    if model is None:
        model = write_model(engine, os.path.join(tmp, MODEL_FILE), exclude_frozen_parameters,
                            wrap=_model_wrap(engine))
    files[MODEL_FILE], entries, excluded = model
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
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # strata/
    src = os.path.join(package, "utils", "zero_to_fp32.py")
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



def _single_optimizer(engine, tmp, files, manifest):
    """The whole optimizer state in one file (one process, or ZeRO stage 0 on rank 0)."""
    from ..optim import _OffloadOptimizer

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
            "state_dtypes": state_dtypes(opt._b.engine.subgroups()),
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
    for i in range(len(b.managed)):
        parts = sorted(by_name.get(names[i], []), key=lambda s: s["start"])
        params.append(dict(param_entry(opt, names, i), slot_names=opt._slot_names(i),
                           shards=parts))
    manifest["optimizer"] = {
        "class": _class_name(opt),
        "kind": opt._kind,
        "sharded": True,
        "stage": opt._dp.stage,
        "world_size": len(shards),
        "shard_files": [sh["file"] for sh in shards],
        "dtype": "float32",
        "state_dtypes": state_dtypes(opt._b.engine.subgroups()),
        "params": params,
        "subgroups": {str(sh["rank"]): sh["subgroups"] for sh in shards},
    }



def _save_ranks(engine, save_dir, tag, client_state, save_latest, exclude_frozen_parameters):
    """Several ranks (a collective): rank 0 makes the temporary directory; every rank writes
    its shard of the optimizer state (stage 1 and 2) and its RNG state into it; rank 0 writes
    the model, engine, client files and the manifest, renames, and writes ``latest``. A failure
    on any rank makes every rank raise, and nothing replaces the previous checkpoint."""
    from .. import comm

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
        err, model = None, None
        tier = engine.__dict__.get("param_tier")
        if tier is not None and tier.partitioned:
            # Partitioned weights: every rank takes part in the model file's all-gathers.
            try:
                model = write_model(engine, os.path.join(tmp, MODEL_FILE),
                                    exclude_frozen_parameters, wrap=_model_wrap(engine))
            except Exception as exc:
                err = f"rank {rank}: {type(exc).__name__}: {exc}"
        if rank == 0 and err is None:
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
                            exclude_frozen_parameters, model=model)
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
        from .. import comm

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

