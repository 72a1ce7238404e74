"""Checkpoints across ranks (docs/checkpoints.md, "Several ranks"): each rank writes its shard
of the optimizer state, keyed by parameter names and shapes; a checkpoint saved by 2 ranks
loads bit-identically into 2 ranks and into 1 process, and one saved by 1 process into 2 ranks
(re-sharding), whatever the ZeRO stage on either side."""

import json
import os

import pytest
import torch

import strata
from strata.checkpoint import CheckpointError, read_master

from test_distributed import assert_ranks_agree_and_match, config, launch, worker

STEPS, SAVE_AT, GAS = 6, 3, 2


def state_equal(a, b):
    """Two optimizer state_dicts hold the same bits (and step counts)."""
    assert a["state"].keys() == b["state"].keys()
    for k, entry in a["state"].items():
        for name, v in entry.items():
            w = b["state"][k][name]
            assert torch.equal(v, w) if torch.is_tensor(v) else v == w, (k, name)


def single(cfg, steps, load=None, save=None):
    """One process on the whole batch: (engine, model, state_dict after loading or None)."""
    cfg = json.loads(json.dumps(cfg))
    cfg["train_micro_batch_size_per_gpu"] = worker.GLOBAL_ROWS
    cfg["gradient_accumulation_steps"] = GAS
    model = worker.make_model()
    engine, opt, *_ = strata.initialize(model=model, config=cfg)
    loaded = None
    first = 0
    if load is not None:
        assert engine.load_checkpoint(load)[0] is not None
        loaded = opt.state_dict()
        first = engine.global_steps
    worker.train(engine, model, "mlp", first, steps, GAS, 0, 1)
    if save is not None:
        engine.save_checkpoint(save)
    return engine, model, loaded


def test_two_ranks_save_and_load_two_and_one_and_one_saves_for_two(tmp_path, swap_dir):
    ck2, ck1 = str(tmp_path / "ck2"), str(tmp_path / "ck1")
    cfg2 = config(2, swap_dir)
    # A one-process checkpoint at SAVE_AT, for loading into two ranks (re-sharding 1 -> 2).
    e1, _, _ = single(cfg2, SAVE_AT, save=ck1)
    one_state = e1.optimizer.state_dict()
    e1.close()
    scenarios = [
        {"name": "save", "steps": STEPS, "gas": GAS, "config": cfg2,
         "save": {"dir": ck2, "at": SAVE_AT}},
        {"name": "load", "steps": STEPS, "gas": GAS, "config": cfg2, "load": ck2},
        # another stage on load: the state is keyed by parameter, not by shard
        {"name": "load_stage1", "steps": STEPS, "gas": GAS, "config": config(1, swap_dir),
         "load": ck2},
        {"name": "from_one", "steps": STEPS, "gas": GAS, "config": cfg2, "load": ck1},
    ]
    results, _ = launch(tmp_path, scenarios)
    saved, loaded, stage1, from_one = ([r[i] for r in results] for i in range(4))
    # 2 -> 2: the loaded state is the saved state, bit for bit, and training goes on as if
    # never interrupted
    for r in range(2):
        state_equal(saved[r]["state_at_save"], loaded[r]["loaded_state"])
        state_equal(saved[r]["state_at_save"], stage1[r]["loaded_state"])
        for k, v in saved[r]["model"].items():
            assert torch.equal(v, loaded[r]["model"][k]), k
            # stage 1 sums the micro-batches before the ranks, stage 2 after: other rounding
            torch.testing.assert_close(v, stage1[r]["model"][k], rtol=1e-5, atol=1e-6)
        assert loaded[r]["norms"] == saved[r]["norms"][SAVE_AT:]
    # the layout: a shard file per rank, each rank's RNG state, the whole model once
    tag_dir = os.path.join(ck2, f"global_step{SAVE_AT}")
    manifest = json.load(open(os.path.join(tag_dir, "manifest.json")))
    info = manifest["optimizer"]
    assert info["sharded"] and info["world_size"] == 2 and info["stage"] == 2
    assert info["class"] == "DeepSpeedCPUAdam"  # config AdamW with offload: DeepSpeed's class
    assert sorted(manifest["files"]) == sorted([
        "optimizer_state.rank00000.bin", "optimizer_state.rank00001.bin", "rng_state.pt",
        "rng_state.rank00000.pt", "rng_state.rank00001.pt", "mp_rank_00_model_states.pt",
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt",
        "engine_state.pt", "client_state.pt"])
    sizes = [os.path.getsize(os.path.join(tag_dir, f)) for f in info["shard_files"]]
    assert abs(sizes[0] - sizes[1]) <= 12 * 4 and sum(sizes) == 12 * sum(
        p["numel"] for p in info["params"]), "each rank: 12 bytes per element of its shard"
    split = [p for p in info["params"] if len(p["shards"]) == 2]
    assert len(split) == 1, "one parameter straddles the two shards"
    masters = saved[0]["model_at_save"]  # fp32 model: the weights are the masters
    for p in info["params"]:
        assert torch.equal(read_master(tag_dir, manifest, p["name"]), masters[p["name"]])
    # 1 -> 2: each rank took its slices of the one-process state
    for r in range(2):
        state_equal(one_state, from_one[r]["loaded_state"])
    # 2 -> 1: one process takes every slice back
    e, model, state = single(cfg2, STEPS, load=ck2)
    try:
        state_equal(saved[0]["state_at_save"], state)
        for k, v in model.state_dict().items():
            torch.testing.assert_close(v, saved[0]["model"][k], rtol=1e-5, atol=1e-6)
    finally:
        e.close()
    # the same training on 2 ranks as on 1
    assert_ranks_agree_and_match(saved, {"name": "save", "steps": STEPS, "gas": GAS,
                                         "config": cfg2})


def test_a_corrupted_shard_is_named_and_nothing_is_half_loaded(tmp_path, swap_dir):
    ck2 = str(tmp_path / "ck2")
    results, _ = launch(tmp_path, [{"name": "save", "steps": 2, "gas": 1,
                                    "config": config(1, swap_dir),
                                    "save": {"dir": ck2, "at": 1}}])
    tag_dir = os.path.join(ck2, "global_step1")
    manifest = json.load(open(os.path.join(tag_dir, "manifest.json")))
    victim = next(p for p in manifest["optimizer"]["params"] if len(p["shards"]) == 2)
    shard = victim["shards"][1]
    slot = shard["slots"][2]
    path = os.path.join(tag_dir, shard["file"])
    with open(path, "r+b") as f:
        f.seek(slot["offset"] + 4)
        b = f.read(1)
        f.seek(slot["offset"] + 4)
        f.write(bytes([b[0] ^ 0x40]))
    cfg = config(2, swap_dir)
    cfg["train_micro_batch_size_per_gpu"] = worker.GLOBAL_ROWS
    model = worker.make_model()
    engine, opt, *_ = strata.initialize(model=model, config=cfg)
    try:
        with pytest.raises(CheckpointError, match=rf"optimizer_state.rank00001.bin: checksum "
                                                  rf"mismatch in parameter '{victim['name']}' "
                                                  rf"slot exp_avg_sq"):
            engine.load_checkpoint(ck2)
        with pytest.raises(RuntimeError, match="refused"):
            x, y = worker.global_batch(0, 0)
            engine.backward(torch.nn.functional.cross_entropy(engine(x), y))
            engine.step()
        os.unlink(path)
        with pytest.raises(CheckpointError, match=r"optimizer_state.rank00001.bin: missing"):
            engine.load_checkpoint(ck2)
    finally:
        engine.close()
