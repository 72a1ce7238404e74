"""Engine checkpoints: round trip across placements, the manifest, corruption and mismatch
detection, atomic replacement, and export to a plain state_dict."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import strata as deepspeed
from strata import checkpoint as ckpt
from strata.checkpoint import CheckpointError
from test_deepspeed_engine import Net, base_config, batches

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def train(engine, data):
    for x, y in data:
        engine.backward(engine(x, y))
        engine.step()


def make(device="cpu", swap=None, model=None, seed=0, **extra):
    torch.manual_seed(seed)
    model = model if model is not None else Net(dropout=0.2)
    engine, *_ = deepspeed.initialize(model=model, config=base_config(device, swap, **extra))
    return engine


def same_params(a, b):
    return all(torch.equal(p, q) for p, q in zip(a.module.state_dict().values(),
                                                   b.module.state_dict().values()))


def test_round_trip_into_another_placement_continues_bit_identically(tmp_path, swap_dir):
    a = make("nvme", swap_dir)
    b = make("cpu", zero_optimization={"stage": 2, "sub_group_size": 777,
                                       "offload_optimizer": {"device": "cpu"}}, seed=99)
    try:
        train(a, batches(8))
        assert a.save_checkpoint(tmp_path / "ck", client_state={"epoch": 3}) is True
        assert (tmp_path / "ck" / "latest").read_text() == "global_step4"
        path, client = b.load_checkpoint(tmp_path / "ck")
        assert path == str(tmp_path / "ck" / "global_step4" / "mp_rank_00_model_states.pt")
        assert client == {"epoch": 3}
        assert same_params(a, b)
        assert (b.global_steps, b.micro_steps, b.global_samples) == (4, 8, 64)
        assert b.get_lr() == a.get_lr()
        assert b.lr_scheduler.state_dict() == a.lr_scheduler.state_dict()
        # The RNG state was restored: the same dropout masks follow on both.
        rng = torch.get_rng_state()
        data = batches(6, seed=1)
        train(a, data)
        after_a = torch.get_rng_state()
        torch.set_rng_state(rng)
        train(b, data)
        assert same_params(a, b)
        assert torch.equal(after_a, torch.get_rng_state())
        sa, sb = a.optimizer.state_dict(), b.optimizer.state_dict()
        for k in sa["state"]:
            for name in ("exp_avg", "exp_avg_sq", "step"):
                assert torch.equal(sa["state"][k][name], sb["state"][k][name])
    finally:
        a.close()
        b.close()


def test_manifest_records_state_files_checksums_and_versions(tmp_path):
    e = make()
    try:
        train(e, batches(4))
        e.save_checkpoint(tmp_path, tag="t1")
        tag_dir = tmp_path / "t1"
        m = json.loads((tag_dir / "manifest.json").read_text())
        assert m["format"] == "strata-checkpoint" and m["tag"] == "t1"
        assert m["global_steps"] == 2 and m["versions"]["torch"] == torch.__version__
        assert m["versions"]["strata"] == deepspeed.__version__ and m["versions"]["python"]
        assert m["config"]["optimizer"]["type"] == "AdamW"
        assert m["lr_scheduler"] == {"class": "WarmupLR", "state": {"last_batch_iteration": 1}}
        names = [p["name"] for p in m["optimizer"]["params"]]
        assert sorted(names) == sorted(n for n, _ in e.module.named_parameters())
        for p in m["optimizer"]["params"]:
            assert [s["name"] for s in p["slots"]] == ["master", "exp_avg", "exp_avg_sq"]
            assert all(s["bytes"] == 4 * p["numel"] and len(s["xxh3"]) == 32
                       for s in p["slots"])
            assert p["shape"] == list(dict(e.module.named_parameters())[p["name"]].shape)
        for name, entry in m["files"].items():
            assert os.path.getsize(tag_dir / name) == entry["bytes"]
        assert set(m["files"]) == {"optimizer_state.bin", "mp_rank_00_model_states.pt",
                                   "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                   "engine_state.pt", "rng_state.pt", "client_state.pt"}
        # The model file is a plain torch file in DeepSpeed's layout: the module under "module".
        saved = torch.load(tag_dir / "mp_rank_00_model_states.pt")
        sd = saved["module"]
        for k, v in e.module.state_dict().items():
            assert torch.equal(sd[k], v)
        assert saved["global_steps"] == e.global_steps and saved["dp_world_size"] == 1
        assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]
    finally:
        e.close()


def flip_byte(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x01]))


def test_corruption_is_detected_and_named(tmp_path):
    e = make()
    b = make(seed=5)
    try:
        train(e, batches(4))
        e.save_checkpoint(tmp_path, tag="good")
        e.save_checkpoint(tmp_path, tag="bad")
        tag_dir = tmp_path / "bad"
        m = json.loads((tag_dir / "manifest.json").read_text())
        victim = m["optimizer"]["params"][1]
        flip_byte(tag_dir / "optimizer_state.bin", victim["slots"][2]["offset"] + 5)
        with pytest.raises(CheckpointError,
                           match=rf"optimizer_state.bin: checksum mismatch in parameter "
                                 rf"'{victim['name']}' slot exp_avg_sq"):
            b.load_checkpoint(tmp_path, tag="bad")
        # Half-loaded state is never reported as fine: steps are refused until a load works.
        with pytest.raises(RuntimeError, match="refused"):
            train(b, batches(2))
        b.load_checkpoint(tmp_path, tag="good")
        assert same_params(e, b)
        train(b, batches(2))

        e.save_checkpoint(tmp_path, tag="bad_model")
        flip_byte(tmp_path / "bad_model" / "mp_rank_00_model_states.pt", 200)
        before = {k: v.clone() for k, v in b.module.state_dict().items()}
        with pytest.raises(CheckpointError, match=r"model_states.pt: checksum mismatch"):
            b.load_checkpoint(tmp_path, tag="bad_model")
        # Detected before anything was changed.
        assert all(torch.equal(v, before[k]) for k, v in b.module.state_dict().items())
        train(b, batches(2))

        e.save_checkpoint(tmp_path, tag="short")
        with open(tmp_path / "short" / "optimizer_state.bin", "r+b") as f:
            f.truncate(100)
        with pytest.raises(CheckpointError, match=r"optimizer_state.bin: 100 bytes, the manifest"):
            b.load_checkpoint(tmp_path, tag="short")
        os.unlink(tmp_path / "short" / "manifest.json")
        with pytest.raises(CheckpointError, match="manifest.json: missing"):
            b.load_checkpoint(tmp_path, tag="short")
        with pytest.raises(CheckpointError, match="does not exist"):
            b.load_checkpoint(tmp_path, tag="nope")
    finally:
        e.close()
        b.close()


def test_mismatches_are_refused_with_names(tmp_path):
    e = make()
    try:
        train(e, batches(2))
        e.save_checkpoint(tmp_path, tag="t")
    finally:
        e.close()
    cfg = base_config()
    cfg["optimizer"] = {"type": "SGD", "params": {"lr": 0.1, "momentum": 0.9}}
    torch.manual_seed(0)
    sgd, *_ = deepspeed.initialize(model=Net(), config=cfg)
    try:
        with pytest.raises(CheckpointError, match=r"state slots \['master', 'exp_avg', "
                                                  r"'exp_avg_sq'\] in the checkpoint"):
            sgd.load_checkpoint(tmp_path, tag="t")
        # Weights only: the masters follow the loaded weights.
        sgd.load_checkpoint(tmp_path, tag="t", load_optimizer_states=False)
        t = torch.empty(sgd.module.head.weight.numel())
        sgd.optimizer._read_slot(sgd.optimizer._b.index[id(sgd.module.head.weight)], 0, t)
        assert torch.equal(t.view_as(sgd.module.head.weight), sgd.module.head.weight)
        train(sgd, batches(2))
    finally:
        sgd.close()

    class Wider(Net):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(64, 11)

    torch.manual_seed(0)
    w, *_ = deepspeed.initialize(model=Wider(), config=base_config())
    try:
        with pytest.raises(CheckpointError, match=r"head.weight has shape \[10, 64\] in the "
                                                  r"checkpoint, \[11, 64\] in the module"):
            w.load_checkpoint(tmp_path, tag="t")
    finally:
        w.close()


def test_no_latest_returns_none(tmp_path):
    e = make()
    try:
        assert e.load_checkpoint(tmp_path / "empty") == (None, None)
    finally:
        e.close()


def test_overwriting_a_tag_and_stale_temporaries(tmp_path):
    e = make()
    try:
        train(e, batches(2))
        e.save_checkpoint(tmp_path, tag="same")
        train(e, batches(2))
        # A dead process's half-written checkpoint is removed at the next save.
        stale = tmp_path / ".same.strata-tmp-999999999-1"
        stale.mkdir()
        (stale / "junk").write_text("x")
        e.save_checkpoint(tmp_path, tag="same")
        assert json.loads((tmp_path / "same" / "manifest.json").read_text())["global_steps"] == 2
        assert sorted(os.listdir(tmp_path)) == ["latest", "same", "zero_to_fp32.py"]
    finally:
        e.close()


def test_overwriting_a_tag_without_rename_exchange_falls_back(tmp_path, monkeypatch):
    # Where the file system cannot exchange (rename_exchange answers False), the old tag is
    # renamed aside, the new one renamed in, and the old one removed.
    from strata.checkpoint import fsutil

    e = make()
    try:
        train(e, batches(2))
        e.save_checkpoint(tmp_path, tag="same")
        asked = []
        monkeypatch.setattr(fsutil, "_rename_exchange", lambda a, b: asked.append(b) or False)
        train(e, batches(2))
        e.save_checkpoint(tmp_path, tag="same")
        assert asked == [str(tmp_path / "same")]
        assert json.loads((tmp_path / "same" / "manifest.json").read_text())["global_steps"] == 2
        assert sorted(os.listdir(tmp_path)) == ["latest", "same", "zero_to_fp32.py"]
    finally:
        e.close()


def test_rename_exchange_swaps_and_raises_oserror_with_the_errno(tmp_path):
    import errno

    from strata.checkpoint import fsutil

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "which").write_text("a")
    (b / "which").write_text("b")
    if not fsutil._rename_exchange(a, b):
        pytest.skip(f"no RENAME_EXCHANGE on the file system of {tmp_path}")
    assert (a / "which").read_text() == "b" and (b / "which").read_text() == "a"
    with pytest.raises(OSError) as info:
        fsutil._rename_exchange(a, tmp_path / "missing")
    assert info.value.errno == errno.ENOENT
    assert str(a) in str(info.value) and str(tmp_path / "missing") in str(info.value)


def test_bf16_masters_survive_a_checkpoint(tmp_path):
    a = make(bf16={"enabled": True})
    b = make(bf16={"enabled": True}, seed=3)
    try:
        train(a, batches(4))
        a.save_checkpoint(tmp_path)
        b.load_checkpoint(tmp_path)
        sa, sb = a.optimizer.state_dict(), b.optimizer.state_dict()
        for k in sa["state"]:
            assert torch.equal(sa["state"][k]["master"], sb["state"][k]["master"])
        data = batches(4, seed=2)
        rng = torch.get_rng_state()
        train(a, data)
        torch.set_rng_state(rng)
        train(b, data)
        assert same_params(a, b)
    finally:
        a.close()
        b.close()


def test_fp16_loss_scaler_state_is_restored(tmp_path):
    from test_deepspeed_engine import HalfNet

    cfg = dict(fp16={"enabled": True, "initial_scale_power": 24, "hysteresis": 1},
               gradient_accumulation_steps=1)
    a = make(model=HalfNet(), **cfg)
    b = make(model=HalfNet(), **cfg)
    try:
        x = torch.randn(16, 8) * 4
        for _ in range(12):
            a.backward(a(x))
            a.step()
        assert a.skipped_steps > 0
        a.save_checkpoint(tmp_path)
        b.load_checkpoint(tmp_path)
        assert b.loss_scale == a.loss_scale and b.skipped_steps == a.skipped_steps
        assert b.loss_scaler.state_dict() == a.loss_scaler.state_dict()
    finally:
        a.close()
        b.close()


def test_export_fp32_and_bf16(tmp_path):
    e = make(bf16={"enabled": True})
    try:
        train(e, batches(4))
        e.save_checkpoint(tmp_path / "ck")
        masters = {}
        names = e._param_names_in_engine_order()
        for i, n in enumerate(names):
            t = torch.empty(e.optimizer._b.managed[i].numel())
            e.optimizer._read_slot(i, 0, t)
            masters[n] = t.view(e.optimizer._b.managed[i].shape)
        from strata.export import export_checkpoint

        assert export_checkpoint(tmp_path / "ck", tmp_path / "fp32.pt") == len(masters)
        sd = torch.load(tmp_path / "fp32.pt")
        assert set(sd) == set(e.module.state_dict())
        for n, t in masters.items():
            assert sd[n].dtype == torch.float32 and torch.equal(sd[n], t), n
        out = subprocess.run(
            [sys.executable, "-m", "strata", "export", str(tmp_path / "ck"), "-o",
             str(tmp_path / "bf16.pt"), "--dtype", "bf16"],
            env=dict(os.environ, PYTHONPATH=os.path.join(ROOT, "python")),
            capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        sd = torch.load(tmp_path / "bf16.pt")
        for n, t in masters.items():
            assert sd[n].dtype == torch.bfloat16 and torch.equal(sd[n], t.to(torch.bfloat16))
        # Corruption is caught on export too.
        m = json.loads((tmp_path / "ck" / "global_step2" / "manifest.json").read_text())
        flip_byte(tmp_path / "ck" / "global_step2" / "optimizer_state.bin",
                  m["optimizer"]["params"][0]["slots"][0]["offset"])
        out = subprocess.run(
            [sys.executable, "-m", "strata", "export", str(tmp_path / "ck"), "-o",
             str(tmp_path / "x.pt")],
            env=dict(os.environ, PYTHONPATH=os.path.join(ROOT, "python")),
            capture_output=True, text=True, timeout=120)
        assert out.returncode == 2 and "checksum mismatch" in out.stderr
        assert not os.path.exists(tmp_path / "x.pt")
    finally:
        e.close()


def test_export_keeps_tied_weights_tied(tmp_path):
    from test_deepspeed_engine import Tied

    torch.manual_seed(0)
    e, *_ = deepspeed.initialize(model=Tied(), config=base_config(gradient_accumulation_steps=1))
    try:
        e.backward(e(torch.randint(0, 32, (4, 3)), torch.randint(0, 32, (4,))))
        e.step()
        e.save_checkpoint(tmp_path)
        from strata.export import export_checkpoint

        export_checkpoint(tmp_path, tmp_path / "m.pt")
        sd = torch.load(tmp_path / "m.pt")
        assert sd["emb.weight"].data_ptr() == sd["out.weight"].data_ptr()
        assert torch.equal(sd["emb.weight"], e.module.emb.weight)
    finally:
        e.close()


def test_tensor_file_round_trip_streams_one_tensor_at_a_time(tmp_path):
    tensors = {"a": torch.randn(3, 4), "b": torch.arange(5, dtype=torch.int64),
               "c": torch.randn(2).to(torch.bfloat16), "s": torch.tensor(1.5)}
    produced = []

    def producer(n):
        def f():
            produced.append(n)
            return tensors[n]
        return f

    entries = [(n, tuple(t.shape), t.dtype, n, producer(n)) for n, t in tensors.items()]
    ckpt.write_tensor_file(tmp_path / "t.pt", entries)
    assert produced == list(tensors)
    sd = torch.load(tmp_path / "t.pt")
    assert list(sd) == list(tensors)
    for n, t in tensors.items():
        assert torch.equal(sd[n], t) and sd[n].dtype == t.dtype
    r = ckpt.TensorFileReader(tmp_path / "t.pt")
    assert torch.equal(r.tensor("c"), tensors["c"])


def test_engine_without_optimizer_and_client_torch_optimizer(tmp_path):
    # No optimizer (inference-style engine): weights only.
    torch.manual_seed(0)
    a, *_ = deepspeed.initialize(model=Net(), config={"zero_optimization": {"stage": 0}})
    b, *_ = deepspeed.initialize(model=Net(), config={"zero_optimization": {"stage": 0}})
    try:
        assert a.optimizer is None
        a.save_checkpoint(tmp_path / "plain")
        b.load_checkpoint(tmp_path / "plain")
        assert same_params(a, b)
    finally:
        a.close()
        b.close()
    # A client optimizer strata runs as given: its torch state_dict is saved and restored.
    # (RMSprop under ZeRO needs DeepSpeed's opt-in.)
    cfg = base_config(gradient_accumulation_steps=1, zero_allow_untested_optimizer=True)
    cfg.pop("optimizer")
    cfg.pop("scheduler")
    torch.manual_seed(1)
    c, *_ = deepspeed.initialize(model=Net(), config=cfg,
                                 optimizer=lambda ps: torch.optim.RMSprop(ps, lr=1e-3))
    d, *_ = deepspeed.initialize(model=Net(), config=cfg,
                                 optimizer=lambda ps: torch.optim.RMSprop(ps, lr=1e-3))
    try:
        train(c, batches(3))
        c.save_checkpoint(tmp_path / "client")
        d.load_checkpoint(tmp_path / "client")
        data = batches(2, seed=4)
        train(c, data)
        train(d, data)
        assert same_params(c, d)
    finally:
        c.close()
        d.close()
