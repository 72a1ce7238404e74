#!/usr/bin/env python3
"""Consolidate a strata checkpoint into one fp32 state_dict, as DeepSpeed's zero_to_fp32 does.

strata writes this file into every checkpoint folder (beside ``latest``), as DeepSpeed does:

    cd CHECKPOINT_DIR && python zero_to_fp32.py . pytorch_model.bin [-t TAG]

Trainable parameters come from their fp32 master weights in the optimizer state (one file or
the per-rank shards, re-assembled; every byte checked against the manifest's checksums);
frozen parameters and buffers from ``mp_rank_00_model_states.pt`` (floating ones cast to fp32).
The output is written one tensor at a time (``strata.export``), so consolidating does not need
memory for the whole model. It needs strata installed (the checkpoint's optimizer state is
strata's streamed format, not DeepSpeed's).

From Python (``strata.utils.zero_to_fp32``, DeepSpeed's names):

- ``get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag=None,
  exclude_frozen_parameters=False)``: the state_dict in memory;
- ``convert_zero_checkpoint_to_fp32_state_dict(checkpoint_dir, output_dir_or_file, tag=None,
  exclude_frozen_parameters=False)``: written to a file (a folder: ``pytorch_model.bin`` in it);
- ``load_state_dict_from_zero_checkpoint(model, checkpoint_dir, tag=None)``: loaded into
  ``model`` (on the CPU, fp32), which is returned.
"""

import argparse
import collections
import os
import sys

import torch


def _strata():
    try:
        from strata import checkpoint as ckpt
        from strata import export
    except ImportError as exc:  # pragma: no cover - the script run without strata
        raise SystemExit(f"zero_to_fp32: strata is needed to read this checkpoint ({exc})")
    return ckpt, export


def get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag=None,
                                             exclude_frozen_parameters=False):
    ckpt, _ = _strata()
    tag_dir = ckpt.resolve_tag_dir(checkpoint_dir, tag)
    manifest = ckpt.read_manifest(tag_dir)
    reader = ckpt.TensorFileReader(ckpt.verify_file(tag_dir, manifest, ckpt.model_file(manifest)))
    trainable = {p["name"] for p in (manifest.get("optimizer") or {}).get("params", [])}
    out = collections.OrderedDict()
    by_storage = {}
    for name in reader.names():
        lt = reader.meta(name)
        if exclude_frozen_parameters and trainable and name not in trainable \
                and name not in (reader.extra.get("buffer_names") or []):
            continue
        sid = (lt.key, lt.offset, tuple(lt.shape))
        if sid in by_storage:  # tied parameters stay tied
            out[name] = by_storage[sid]
            continue
        master = ckpt.read_master(tag_dir, manifest, name)
        t = master.reshape(lt.shape) if master is not None else reader.tensor(name)
        if t.is_floating_point():
            t = t.float()
        out[name] = by_storage[sid] = t
    return out


def convert_zero_checkpoint_to_fp32_state_dict(checkpoint_dir, output_dir_or_file, tag=None,
                                               exclude_frozen_parameters=False, **_ignored):
    """Returns the path written."""
    _, export = _strata()
    out = os.fspath(output_dir_or_file)
    if os.path.isdir(out) or out.endswith(os.sep):
        out = os.path.join(out, "pytorch_model.bin")
    if exclude_frozen_parameters:
        sd = get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag, True)
        torch.save(sd, out)
    else:
        export.export_checkpoint(checkpoint_dir, out, dtype="fp32", tag=tag)
    return out


def load_state_dict_from_zero_checkpoint(model, checkpoint_dir, tag=None):
    sd = get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag)
    model = model.cpu()
    model.load_state_dict(sd, strict=False)
    return model


def main(argv=None):
    ap = argparse.ArgumentParser(description="consolidate a strata checkpoint into one fp32 "
                                 "state_dict file (DeepSpeed's zero_to_fp32)")
    ap.add_argument("checkpoint_dir", help="the checkpoint folder (with 'latest') or a tag folder")
    ap.add_argument("output_file", help="output file (a folder: pytorch_model.bin in it)")
    ap.add_argument("-t", "--tag", default=None, help="checkpoint tag (default: 'latest')")
    ap.add_argument("--exclude_frozen_parameters", action="store_true")
    args = ap.parse_args(argv)
    path = convert_zero_checkpoint_to_fp32_state_dict(
        args.checkpoint_dir, args.output_file, tag=args.tag,
        exclude_frozen_parameters=args.exclude_frozen_parameters)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
