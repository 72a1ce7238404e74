"""State moved by the record, not by the slot (issue 19): checkpoint save and load, state_dict,
load_state_dict and rebuilds fetch and store each sub-group record once, for a model of many
tensors per sub-group and a tensor split across sub-groups — bounded by the engine's byte
counters, not only checked by value."""

import hashlib
import json

import pytest
import torch
import torch.nn as nn

import strata as deepspeed
from strata import _C

# 24 small tensors per sub-group of 40000 and one tensor (the embedding, 48000 elements)
# split across two sub-groups.
SUB_GROUP = 40000


class Many(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(1500, 32)
        self.layers = nn.ModuleList(nn.Linear(32, 32) for _ in range(24))
        self.head = nn.Linear(32, 4)

    def forward(self, x, y):
        h = self.emb(x).mean(1)
        for layer in self.layers:
            h = torch.tanh(layer(h))
        return nn.functional.cross_entropy(self.head(h), y)


def config(swap):
    return {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 1,
        "steps_per_print": 1000,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}},
        "zero_optimization": {"stage": 2, "sub_group_size": SUB_GROUP,
                              "offload_optimizer": {"device": "nvme", "nvme_path": str(swap),
                                                    "buffer_count": 3}},
        "aio": {"block_size": 65536, "queue_depth": 8},
    }


def make(swap, seed=0):
    torch.manual_seed(seed)
    engine, *_ = deepspeed.initialize(model=Many(), config=config(swap))
    return engine


def train(engine, steps=2):
    g = torch.Generator().manual_seed(5)
    for _ in range(steps):
        x = torch.randint(0, 1500, (4, 6), generator=g)
        y = torch.randint(0, 4, (4,), generator=g)
        engine.backward(engine(x, y))
        engine.step()


def state_bytes(engine):
    """The state's size: every trainable element's slots (master, m, v), fp32."""
    return sum(4 * 3 * p.numel() for p in engine.module.parameters() if p.requires_grad)


def counters(engine):
    # The last step's write-back may still be in flight: count from a sync point.
    engine.optimizer._b.engine.sync()
    s = engine.optimizer.stats()
    return s["bytes_fetched"], s["bytes_stored"]


def moved(engine, fn):
    f0, s0 = counters(engine)
    out = fn()
    f1, s1 = counters(engine)
    return out, f1 - f0, s1 - s0


@pytest.fixture
def trained(tmp_path):
    (tmp_path / "swap_a").mkdir()
    e = make(tmp_path / "swap_a")
    train(e)
    yield e
    e.close()


def bound(engine):
    # The records' own padding (each slot rounded up to 4 KiB) plus one partial record at
    # each end is all a by-record walk may add to the state's bytes.
    return 1.05 * state_bytes(engine) + 2 * 3 * 4 * SUB_GROUP


def test_the_model_has_many_tensors_per_sub_group_and_a_split_one(trained):
    # 51 tensors, 73k elements, in sub-groups of 40k: two records of many tensors each,
    # and the embedding (48k elements) cannot fit in one.
    assert len(list(trained.module.parameters())) == 51
    assert trained.module.emb.weight.numel() > SUB_GROUP
    assert sum(p.numel() for p in trained.module.parameters()) < 2 * SUB_GROUP


def test_save_fetches_the_state_once_and_stores_nothing(trained, tmp_path):
    _, fetched, stored = moved(trained, lambda: trained.save_checkpoint(tmp_path / "ck"))
    assert state_bytes(trained) <= fetched <= bound(trained)
    assert stored == 0


def test_load_stores_the_state_once_and_fetches_nothing(trained, tmp_path):
    trained.save_checkpoint(tmp_path / "ck")
    (tmp_path / "swap_b").mkdir()
    other = make(tmp_path / "swap_b", seed=3)
    try:
        _, fetched, stored = moved(other, lambda: other.load_checkpoint(tmp_path / "ck"))
        assert fetched == 0
        assert state_bytes(other) <= stored <= bound(other)
        for p, q in zip(trained.module.parameters(), other.module.parameters()):
            assert torch.equal(p, q)
        sa, sb = trained.optimizer.state_dict(), other.optimizer.state_dict()
        for k in sa["state"]:
            for name in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(sa["state"][k][name], sb["state"][k][name])
        # And both continue bit-identically.
        train(trained, 1)
        train(other, 1)
        for p, q in zip(trained.module.parameters(), other.module.parameters()):
            assert torch.equal(p, q)
    finally:
        other.close()


def test_a_checkpoint_with_blake2b_checksums_still_loads_and_is_verified(trained, tmp_path):
    """Checkpoints written before the XXH3 extents carry BLAKE2b per extent and per file."""
    trained.save_checkpoint(tmp_path / "ck", tag="t")
    tag = tmp_path / "ck" / "t"
    m = json.loads((tag / "manifest.json").read_text())
    data = (tag / "optimizer_state.bin").read_bytes()
    for p in m["optimizer"]["params"]:
        for s in p["slots"]:
            del s["xxh3"]
            s["blake2b"] = hashlib.blake2b(data[s["offset"]:s["offset"] + s["bytes"]],
                                           digest_size=16).hexdigest()
    for name, entry in m["files"].items():
        if "xxh3" in entry:
            del entry["xxh3"]
            entry["blake2b"] = hashlib.blake2b((tag / name).read_bytes(),
                                               digest_size=16).hexdigest()
    (tag / "manifest.json").write_text(json.dumps(m))
    (tmp_path / "swap_b").mkdir()
    other = make(tmp_path / "swap_b", seed=3)
    try:
        other.load_checkpoint(tmp_path / "ck", tag="t")
        for p, q in zip(trained.module.parameters(), other.module.parameters()):
            assert torch.equal(p, q)
        # A flipped byte in an extent is caught by its BLAKE2b.
        s = m["optimizer"]["params"][1]["slots"][2]
        raw = bytearray(data)
        raw[s["offset"] + 5] ^= 0x40
        (tag / "optimizer_state.bin").write_bytes(bytes(raw))
        with pytest.raises(deepspeed.checkpoint.CheckpointError, match="checksum mismatch"):
            other.load_checkpoint(tmp_path / "ck", tag="t")
    finally:
        other.close()


def test_xxh3_matches_its_reference_vectors():
    h = _C.Xxh3()
    assert h.hexdigest() == "99aa06d3014798d86001c324468d497f"  # XXH3-128 of b""
    h = _C.Xxh3()
    h.update(b"a" * 100000)
    whole = h.hexdigest()
    h2 = _C.Xxh3()
    for k in range(0, 100000, 7777):
        h2.update(b"a" * min(7777, 100000 - k))
    assert h2.hexdigest() == whole


def test_state_dict_fetches_the_state_once(trained):
    sd, fetched, stored = moved(trained, lambda: trained.optimizer.state_dict())
    assert state_bytes(trained) <= fetched <= bound(trained)
    assert stored == 0
    assert len(sd["state"]) == 51


def test_load_state_dict_moves_the_state_once_each_way(trained, tmp_path):
    sd = trained.optimizer.state_dict()
    (tmp_path / "swap_b").mkdir()
    other = make(tmp_path / "swap_b", seed=3)
    try:
        _, fetched, stored = moved(other, lambda: other.optimizer.load_state_dict(sd))
        # The torch layout has no master for fp32 parameters (the parameter is its master):
        # the records are fetched once for it and stored once with the loaded moments.
        assert fetched <= bound(other)
        assert state_bytes(other) <= stored <= bound(other)
        back = other.optimizer.state_dict()
        for k, entry in sd["state"].items():
            for name in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(entry[name], back["state"][k][name])
    finally:
        other.close()


def test_a_rebuild_carries_the_state_by_record(trained):
    """Freezing a parameter rebuilds the engine; the others keep their state bit for bit."""
    before = trained.optimizer.state_dict()
    names = [n for n, _ in trained.module.named_parameters()]
    trained.module.layers[3].bias.requires_grad_(False)
    train(trained, 0)
    trained.optimizer._refresh()
    after = trained.optimizer.state_dict()
    frozen = names.index("layers.3.bias")
    kept = [k for k in before["state"] if k != frozen]
    assert kept and frozen not in after["state"]
    for k in kept:
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(before["state"][k][name], after["state"][k][name])
