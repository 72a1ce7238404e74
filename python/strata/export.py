"""Export a strata checkpoint to a plain torch ``state_dict`` file (like DeepSpeed's
``zero_to_fp32``), one tensor at a time so that it fits in small memory.

    python -m strata export CKPT -o model.pt [--dtype bf16] [--tag TAG]

``CKPT`` is a checkpoint folder (the tag in its ``latest`` file is used, or ``--tag``) or a tag
folder. Trainable parameters are written from their fp32 master weights (full precision, even
for a bf16 or fp16 model); frozen parameters and buffers from the saved module. ``--dtype``
(fp32 by default) casts every floating-point tensor; integer buffers keep their dtype. Tied
parameters stay tied (one storage). Every byte read is checked against the manifest's
checksums. ``torch.load(model.pt)`` gives the state_dict.
"""

import argparse
import os
import sys

import torch

from . import checkpoint as _ckpt

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


def export_checkpoint(checkpoint, output, dtype="fp32", tag=None):
    """Write ``output`` from the checkpoint; returns the number of tensors written."""
    try:
        target = DTYPES[str(dtype).replace("torch.", "")]
    except KeyError:
        raise ValueError(f"dtype {dtype!r} is not one of fp32, bf16, fp16") from None
    tag_dir = _ckpt.resolve_tag_dir(checkpoint, tag)
    manifest = _ckpt.read_manifest(tag_dir)
    model_path = _ckpt.verify_file(tag_dir, manifest, _ckpt.model_file(manifest))
    reader = _ckpt.TensorFileReader(model_path)

    names = reader.names()
    entries = []
    for name in names:
        lt = reader.meta(name)
        dt = target if lt.dtype.is_floating_point else lt.dtype
        sid = (lt.key, lt.offset, lt.shape)

        def produce(name=name, lt=lt, dt=dt):
            # The fp32 master from the optimizer state (one file or per-rank shards,
            # every byte checked), else the model file's tensor.
            master = _ckpt.read_master(tag_dir, manifest, name)
            t = master.reshape(lt.shape) if master is not None else reader.tensor(name)
            return t.to(dt).contiguous()

        entries.append((name, tuple(lt.shape), dt, sid, produce))
    # Tied parameters: the first name has the master; later names share its storage.
    out_dir = os.path.dirname(os.path.abspath(output))
    os.makedirs(out_dir, exist_ok=True)
    tmp = f"{output}.tmp-{os.getpid()}"
    try:
        _ckpt.write_tensor_file(tmp, entries, reader.metadata)
        os.replace(tmp, output)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _ckpt._fsync_dir(out_dir)
    return len(entries)


def add_parser(sub):
    """The ``export`` subcommand of ``python -m strata``."""
    p = sub.add_parser("export", help="write a checkpoint's weights as a plain torch state_dict")
    p.add_argument("checkpoint", help="checkpoint folder (uses its 'latest') or a tag folder")
    p.add_argument("-o", "--output", required=True, help="output file, e.g. model.pt")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="dtype of floating-point tensors (default fp32: the masters)")
    p.add_argument("--tag", default=None, help="checkpoint tag (default: the 'latest' file)")
    p.set_defaults(fn=cmd_export)
    return p


def cmd_export(args):
    try:
        n = export_checkpoint(args.checkpoint, args.output, dtype=args.dtype, tag=args.tag)
    except _ckpt.CheckpointError as exc:
        print(f"strata: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {n} tensors ({args.dtype}) to {args.output}")
    return 0


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m strata.export")
    sub = ap.add_subparsers(dest="cmd", required=True)
    add_parser(sub)
    args = ap.parse_args(["export"] + list(argv if argv is not None else sys.argv[1:]))
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
