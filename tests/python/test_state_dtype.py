"""Compressed optimizer state (strata.optimizer_state_dtype, DeepSpeed's bf16.* keys and
fp32_optimizer_states=False): the update against torch's AdamW, what the records store,
checkpoints that resume bit-exactly and refuse to invent precision."""

import json

import pytest
import torch
import torch.nn as nn

import strata
import strata as deepspeed
import strata.optim
from strata.checkpoint import CheckpointError
from strata.ops.adam import DeepSpeedCPUAdam
from test_deepspeed_engine import Net, base_config, batches

torch.set_num_threads(1)


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(48, 96), nn.Tanh(), nn.Linear(96, 300), nn.Tanh(),
                         nn.Linear(300, 8))


def _run(opt_factory, steps, seed=0):
    """Trains a fresh model with the optimizer opt_factory(params) makes; returns the params
    after every step."""
    model = _model(seed)
    opt = opt_factory(model.parameters())
    g = torch.Generator().manual_seed(5)
    out = []
    try:
        for _ in range(steps):
            x = torch.randn(32, 48, generator=g)
            y = torch.randn(32, 8, generator=g)
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            out.append([p.detach().clone() for p in model.parameters()])
    finally:
        if hasattr(opt, "close"):
            opt.close()
    return out


def _strata_adamw(state, lr=1e-2):
    cfg = {"zero_optimization": {"sub_group_size": 5000, "offload_optimizer": {"device": "cpu"}},
           "strata": {"optimizer_state_dtype": state}}
    return lambda params: strata.optim.OffloadAdamW(params, lr=lr, weight_decay=0.01, config=cfg)


@pytest.mark.parametrize("state,bound", [("bf16", 0.01), ("int8_blockwise", 0.1)])
def test_each_step_stays_near_torch_adamw(state, bound):
    # Per step, the deviation from torch's AdamW (fp32 moments) of the parameters' change is
    # bounded relative to the step size: the moments are stored rounded, the update itself is
    # computed in fp32. bf16 keeps 8 bits of mantissa, the 8-bit code 4 (m) and 4 (v).
    lr, steps = 1e-2, 30
    ref = _run(lambda p: torch.optim.AdamW(p, lr=lr, weight_decay=0.01), steps)
    got = _run(_strata_adamw(state, lr), steps)
    fp32 = _run(_strata_adamw("fp32", lr), steps)
    for s in range(steps):
        for a, b in zip(fp32[s], ref[s]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        worst = max(float((a - b).abs().max()) for a, b in zip(got[s], ref[s]))
        # Adam moves each parameter by at most ~lr per step: the drift after s + 1 steps is
        # bounded by a fraction of (s + 1) * lr.
        assert worst <= bound * lr * (s + 1), (state, s, worst)
    # And the compressed run is not the fp32 one (the test would pass vacuously otherwise).
    assert any(not torch.equal(a, b) for a, b in zip(got[-1], fp32[-1]))


def test_records_store_the_chosen_dtypes_and_state_reads_back_as_fp32():
    model = _model()
    opt = _strata_adamw("int8_blockwise")(model.parameters())
    try:
        sgs = opt._b.engine.subgroups()
        assert all(sg["slot_dtypes"] == ["fp32", "q8s", "q8u"] for sg in sgs)
        n = sum(p.numel() for p in model.parameters())
        assert sum(sg["record_bytes"] for sg in sgs) < 6.2 * n + len(sgs) * 20000
        model(torch.randn(4, 48)).square().mean().backward()
        opt.step()
        p = next(model.parameters())
        st = opt.state[p]
        assert st["exp_avg"].dtype == torch.float32 and st["exp_avg"].shape == p.shape
        assert float(st["exp_avg_sq"].min()) >= 0.0
        # A written state comes back as the format stores it: a block's largest value exactly.
        m = torch.full_like(p, 0.5)
        m.view(-1)[0] = 1.0
        st["exp_avg"] = m
        back = opt.state[p]["exp_avg"]
        assert float(back.view(-1)[0]) == 1.0 and float(back.view(-1)[1]) == 0.5
    finally:
        opt.close()


def test_deepspeed_cpu_adam_fp32_optimizer_states_false_keeps_bf16_moments():
    model = _model()
    opt = DeepSpeedCPUAdam(model.parameters(), lr=1e-3, fp32_optimizer_states=False)
    try:
        assert all(sg["slot_dtypes"] == ["fp32", "bf16", "bf16"]
                   for sg in opt._b.engine.subgroups())
    finally:
        opt.close()
    with pytest.raises(ValueError, match="fp32_optimizer_states=False"):
        DeepSpeedCPUAdam(_model().parameters(), fp32_optimizer_states=False,
                         config={"strata": {"optimizer_state_dtype": "fp32"}})


def test_deepspeed_bf16_keys_store_bf16_master_and_moments():
    torch.manual_seed(0)
    model = Net().to(torch.bfloat16)
    cfg = base_config("cpu", bf16={"enabled": True, "bf16_master_weights_and_grads": True,
                                   "bf16_optimizer_states": True})
    engine, *_ = deepspeed.initialize(model=model, config=cfg)
    try:
        assert all(sg["slot_dtypes"] == ["bf16", "bf16", "bf16"]
                   for sg in engine.optimizer._b.engine.subgroups())
        for x, y in batches(4):
            engine.backward(engine(x, y))
            engine.step()
        assert all(torch.isfinite(p).all() for p in model.parameters())
    finally:
        engine.close()
    with pytest.raises(Exception, match="bf16_master_weights_and_grads"):
        deepspeed.initialize(model=Net().to(torch.bfloat16),
                             config=base_config("cpu", bf16={"enabled": True,
                                                             "bf16_optimizer_states": True}))


def _engine(state, device="cpu", swap=None, seed=0):
    torch.manual_seed(seed)
    cfg = base_config(device, swap, strata={"optimizer_state_dtype": state})
    engine, *_ = deepspeed.initialize(model=Net(), config=cfg)
    return engine


def _train(engine, data):
    for x, y in data:
        engine.backward(engine(x, y))
        engine.step()


def _same(a, b):
    return all(torch.equal(p, q) for p, q in zip(a.module.state_dict().values(),
                                                   b.module.state_dict().values()))


@pytest.mark.parametrize("state", ["bf16", "int8_blockwise"])
def test_checkpoint_resumes_bit_exactly(tmp_path, swap_dir, state):
    a = _engine(state, "nvme", swap_dir)
    b = _engine(state, "cpu", seed=7)
    try:
        _train(a, batches(6))
        a.save_checkpoint(tmp_path / "ck")
        m = json.loads((tmp_path / "ck" / "global_step3" / "manifest.json").read_text())
        assert m["optimizer"]["state_dtypes"] == {"master": "fp32", "moments": state}
        b.load_checkpoint(tmp_path / "ck")
        ra = [a.optimizer._b.engine.read_record(sg["id"])
              for sg in a.optimizer._b.engine.subgroups()]
        rb = [b.optimizer._b.engine.read_record(sg["id"])
              for sg in b.optimizer._b.engine.subgroups()]
        assert ra == rb, "records differ after the load"
        data = batches(6, seed=3)
        _train(a, data)
        _train(b, data)
        assert _same(a, b)
    finally:
        a.close()
        b.close()


def test_checkpoint_refuses_more_precision_than_it_saved_and_converts_to_less(tmp_path):
    q = _engine("int8_blockwise")
    f = _engine("fp32")
    h = _engine("bf16")
    try:
        _train(q, batches(4))
        q.save_checkpoint(tmp_path / "q")
        with pytest.raises(CheckpointError, match="claim precision"):
            f.load_checkpoint(tmp_path / "q")
        _train(f, batches(4))
        f.save_checkpoint(tmp_path / "f")
        h.load_checkpoint(tmp_path / "f")  # fp32 -> bf16: rounded once as it loads
        p = next(f.module.parameters())
        exp_f = f.optimizer.state[next(f.module.parameters())]["exp_avg"]
        exp_h = h.optimizer.state[next(h.module.parameters())]["exp_avg"]
        torch.testing.assert_close(exp_h, exp_f.to(torch.bfloat16).float(), rtol=0, atol=0)
        assert p is not None
    finally:
        q.close()
        f.close()
        h.close()
