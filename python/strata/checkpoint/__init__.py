"""Checkpoints: atomic, checksummed, streamed by record.

Layout of ``save_dir/tag/`` (see docs/checkpoints.md):

- ``manifest.json``: format version, tag, strata/torch/Python/numpy versions, the filled
  config, counters (global steps, samples, micro steps, skipped steps), loss-scaler and
  scheduler state, and for every file its size and XXH3-128 checksum; for every trainable
  parameter (by name and shape) the extent of each state slot in ``optimizer_state.bin`` with
  its own checksum, and the engine's sub-group layout at save time.
- ``optimizer_state.bin``: raw little-endian fp32 slots (master, then the optimizer's slots in
  torch's order), parameter after parameter, moved to and from the engine record by record
  (``state``).
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

The package, in parts:

- ``engine_io``: ``save`` and ``load`` (``Engine.save_checkpoint`` / ``load_checkpoint``), on
  one rank or several;
- ``format``: file names, the manifest, torch files written and read one tensor at a time, the
  optimizer-state files (written, checked, read back);
- ``state``: optimizer state between the engine's records and the state files, by record (a
  save fetches each record once, a load stores each once), with XXH3-128 extent checksums;
- ``fsutil``: atomic tag directories (see its doc: a crash at any point leaves the previous
  complete checkpoint, and ``latest`` pointing at a complete one), fsync, hashing writer,
  ``latest``.

Crash-safety tests kill the process at named points of a save or a load:
``strata.testing.kill_points`` (``STRATA_TEST_KILL_AT``).
"""

from ..testing.kill_points import kill_during, kill_point
from .engine_io import load, save, write_gathered_model, write_recovery_script
from .format import CLIENT_FILE, ENGINE_FILE, FORMAT, FORMAT_VERSION, MODEL_FILE, \
    OLD_MODEL_FILE, OPTIMIZER_FILE, RECOVERY_SCRIPT, RNG_FILE, TORCH_OPTIMIZER_FILE, \
    CheckpointError, TensorFileReader, model_file, read_manifest, read_master, read_slot, \
    resolve_tag_dir, rng_file, shard_file, verify_file, write_tensor_file, zero_optim_file
from .fsutil import LATEST, MANIFEST, _file_digest, _fsync_dir, read_latest

__all__ = [
    # entry points
    "save", "load", "CheckpointError",
    # reading a checkpoint (export, zero_to_fp32)
    "resolve_tag_dir", "read_latest", "read_manifest", "verify_file", "model_file",
    "TensorFileReader", "read_master", "read_slot",
    # writing
    "write_tensor_file", "write_recovery_script", "write_gathered_model",
    # the format's names
    "FORMAT", "FORMAT_VERSION", "MANIFEST", "LATEST", "OPTIMIZER_FILE", "MODEL_FILE",
    "OLD_MODEL_FILE", "RECOVERY_SCRIPT", "ENGINE_FILE", "RNG_FILE", "CLIENT_FILE",
    "TORCH_OPTIMIZER_FILE", "zero_optim_file", "shard_file", "rng_file",
    # the test hook, where the engine and older callers look for it
    "kill_point", "kill_during",
    # helpers strata.export and the tests use
    "_fsync_dir", "_file_digest",
]
