"""The DeepSpeed-style engine: strata.initialize, forward/backward/step, precision, clipping,
accumulation, schedules, client optimizers, parameters that change after the optimizer was built,
and DeepSpeed's small helpers (comm, zero, add_config_arguments)."""

import argparse
import copy
import logging
import os
import warnings

import pytest
import torch
import torch.nn as nn

import strata
import strata as deepspeed
import strata.config
from strata.lr_schedules import WarmupLR


class Net(nn.Module):
    def __init__(self, dropout=0.0):
        super().__init__()
        self.emb = nn.Embedding(64, 32)
        self.body = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Dropout(dropout),
                                  nn.Linear(64, 64), nn.Tanh())
        self.head = nn.Linear(64, 10)

    def forward(self, x, y):
        logits = self.head(self.body(self.emb(x).mean(1)))
        return nn.functional.cross_entropy(logits, y)


def batches(n, seed=0, batch=8):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 64, (batch, 6), generator=g), torch.randint(0, 10, (batch,),
                                                                          generator=g))
            for _ in range(n)]


def base_config(device="cpu", swap=None, **extra):
    off = {"device": device}
    if device == "nvme":
        off.update(nvme_path=str(swap), buffer_count=3)
    cfg = {
        "train_micro_batch_size_per_gpu": 8,
        "gradient_accumulation_steps": 2,
        "gradient_clipping": 1.0,
        "steps_per_print": 1000,
        "optimizer": {"type": "AdamW",
                      "params": {"lr": 2e-2, "betas": [0.9, 0.99], "eps": 1e-8,
                                 "weight_decay": 0.01}},
        "scheduler": {"type": "WarmupLR",
                      "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 2e-2,
                                 "warmup_num_steps": 10, "warmup_type": "linear"}},
        "zero_optimization": {"stage": 2, "sub_group_size": 3000, "offload_optimizer": off},
        "aio": {"block_size": 65536, "queue_depth": 8},
    }
    cfg.update(extra)
    return cfg


def torch_reference(model, data, steps, gas=2, lr=2e-2, clip=1.0, warmup=10):
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.99), eps=1e-8,
                            weight_decay=0.01)
    sched = WarmupLR(opt, warmup_min_lr=0.0, warmup_max_lr=lr, warmup_num_steps=warmup,
                     warmup_type="linear")
    losses, norms = [], []
    it = iter(data)
    for _ in range(steps):
        for _ in range(gas):
            x, y = next(it)
            loss = model(x, y)
            (loss / gas).backward()
            losses.append(loss.item())
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip)))
        opt.step()
        opt.zero_grad()
        sched.step()
    return losses, norms


def engine_run(engine, data, steps):
    losses, norms = [], []
    it = iter(data)
    for _ in range(steps * engine.gradient_accumulation_steps()):
        x, y = next(it)
        loss = engine(x, y)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
        if engine.is_gradient_accumulation_boundary() is False and \
                engine.micro_steps % engine.gradient_accumulation_steps() == 0:
            norms.append(engine.get_global_grad_norm())
    return losses, norms


@pytest.mark.parametrize("device", ["cpu", "nvme"])
def test_loss_curve_equals_torch_adamw_with_schedule_clipping_and_accumulation(device, swap_dir):
    torch.manual_seed(0)
    model = Net()
    ref = copy.deepcopy(model)
    data = batches(60)
    ref_losses, ref_norms = torch_reference(ref, data, 30)
    engine, opt, loader, sched = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=base_config(device, swap_dir))
    try:
        assert isinstance(opt, strata.optim.OffloadAdamW) and isinstance(sched, WarmupLR)
        assert loader is None
        losses, norms = engine_run(engine, data, 30)
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5,
                                   atol=1e-6)
        torch.testing.assert_close(torch.tensor(norms), torch.tensor(ref_norms), rtol=1e-5,
                                   atol=1e-6)
        assert max(ref_norms) > 1.0, "clipping must have acted in this run"
        for (name, p), q in zip(model.named_parameters(), ref.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
        assert engine.global_steps == 30 and engine.micro_steps == 60
        assert engine.global_samples == 30 * 16
        if device == "nvme":
            st = engine.stats()
            assert os.path.dirname(st["swap_file_path"]) == str(swap_dir)
            assert st["bytes_fetched"] >= 30 * 12 * sum(p.numel() for p in model.parameters())
    finally:
        engine.close()


def test_accumulation_boundaries_and_counters():
    torch.manual_seed(1)
    model = Net()
    engine, *_ = deepspeed.initialize(model=model, config=base_config(
        gradient_accumulation_steps=3, train_micro_batch_size_per_gpu=2))
    try:
        assert engine.train_batch_size() == 6
        w0 = model.head.weight.detach().clone()
        data = batches(6, batch=2)
        for i, (x, y) in enumerate(data[:3]):
            assert engine.is_gradient_accumulation_boundary() == (i == 2)
            engine.backward(engine(x, y))
            if i < 2:
                engine.step()
                assert torch.equal(model.head.weight, w0), "no update between boundaries"
                assert model.head.weight.grad.abs().sum() > 0, "gradients accumulate"
        engine.step()
        assert engine.global_steps == 1 and engine.micro_steps == 3
        assert model.head.weight.grad is None, "grads None after the step, as in DeepSpeed"
        # WarmupLR (linear, 10 steps): steps 1 and 2 run at lr 0 (warmup_min_lr, then
        # iteration 0 of the warmup), step 3 at 2e-3.
        assert engine.get_lr() == [0.0]
        assert torch.equal(model.head.weight, w0)
        for x, y in data[3:]:
            engine.backward(engine(x, y))
            engine.step()
        assert engine.global_steps == 2 and engine.get_lr() == [pytest.approx(2e-3)]
        assert torch.equal(model.head.weight, w0)
        for x, y in data[:3]:
            engine.backward(engine(x, y))
            engine.step()
        assert engine.global_steps == 3 and engine.global_samples == 18
        assert not torch.equal(model.head.weight, w0)
    finally:
        engine.close()


class HalfNet(nn.Module):
    """fp16 parameters, fp32 arithmetic (CPU torch lacks most fp16 kernels)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 4))

    def forward(self, x):
        return (x @ self.w.float()).pow(2).mean()


def test_fp16_dynamic_loss_scaling_skips_overflow_and_lowers_the_scale():
    torch.manual_seed(2)
    model = HalfNet()
    w32 = model.w.detach().clone()
    cfg = base_config(gradient_accumulation_steps=1, gradient_clipping=0.0, scheduler=None,
                      fp16={"enabled": True, "initial_scale_power": 24, "hysteresis": 1,
                            "loss_scale_window": 1000, "min_loss_scale": 1})
    cfg.pop("scheduler")
    engine, opt, *_ = deepspeed.initialize(model=model, config=cfg)
    try:
        assert model.w.dtype == torch.float16
        # The masters start from the fp32 weights, not from their fp16 rounding.
        torch.testing.assert_close(opt.state_dict()["state"][0]["master"], w32, rtol=0, atol=0)
        x = torch.randn(16, 8) * 4
        scales = []
        while engine.skipped_steps == engine.global_steps:
            scales.append(engine.loss_scale)
            before = model.w.detach().clone()
            engine.backward(engine(x))
            engine.step()
            if engine.skipped_steps == engine.global_steps:
                assert torch.equal(model.w, before), "an overflowed step changes nothing"
                assert engine.get_global_grad_norm() == float("inf")
            assert engine.global_steps < 30
        assert engine.skipped_steps >= 5  # 2^24 overflows fp16 gradients of this size
        assert scales == [2.0 ** (24 - k) for k in range(len(scales))]
        assert engine.was_step_applied()
        # The applied step equals AdamW on the unscaled fp16 gradient, from the fp32 weights.
        s = scales[-1]
        probe = HalfNet()
        probe.w.data = w32.half()
        (probe(x) * s).backward()
        ref_w = nn.Parameter(w32.clone())
        ref = torch.optim.AdamW([ref_w], lr=2e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.01)
        ref_w.grad = probe.w.grad.float() / s
        ref.step()
        master = opt.state_dict()["state"][0]["master"]
        torch.testing.assert_close(master, ref_w.detach(), rtol=1e-5, atol=1e-6)
        assert torch.equal(model.w, master.half())
    finally:
        engine.close()


def test_dynamic_loss_scaler_rules():
    from strata.loss_scaler import DynamicLossScaler

    s = DynamicLossScaler(init_scale=2.0 ** 4, scale_window=3, min_scale=2.0, delayed_shift=2)
    seq = []
    for overflow in [True, True, False, False, False, False, True, True, True]:
        s.update_scale(overflow)
        seq.append((s.cur_scale, s.cur_hysteresis))
    # hysteresis 2: the first overflow only spends hysteresis, the second halves; 3 clean
    # steps after the last overflow double the scale (and refill hysteresis).
    assert seq == [(16, 1), (8, 1), (8, 1), (8, 1), (8, 1), (16, 2), (16, 1), (8, 1), (4, 1)]
    s.update_scale(True)
    assert s.cur_scale == 2.0
    with pytest.raises(RuntimeError, match="minimum loss scale"):
        s.update_scale(True)
    assert s.overflows == 7


def test_bf16_parameters_with_fp32_masters():
    torch.manual_seed(3)
    model = Net()
    w32 = {n: p.detach().clone() for n, p in model.named_parameters()}
    engine, opt, *_ = deepspeed.initialize(model=model, config=base_config(
        bf16={"enabled": True}, gradient_accumulation_steps=1))
    try:
        assert all(p.dtype == torch.bfloat16 for p in model.parameters())
        sd = opt.state_dict()
        names = [n for n, _ in model.named_parameters()]
        idx = {id(p): i for i, p in enumerate(model.parameters())}
        for n, p in model.named_parameters():
            torch.testing.assert_close(sd["state"][idx[id(p)]]["master"], w32[n], rtol=0, atol=0)
        for x, y in batches(4):
            engine.backward(engine(x, y))
            engine.step()
        sd = opt.state_dict()
        for n, p in zip(names, model.parameters()):
            master = sd["state"][idx[id(p)]]["master"]
            assert torch.equal(p.detach(), master.to(torch.bfloat16)), n
            assert not torch.equal(master, w32[n])
    finally:
        engine.close()


def test_steps_per_print(capsys):
    torch.manual_seed(4)
    for every, lines in ((2, 3), (3, 2)):
        model = Net()
        engine, *_ = deepspeed.initialize(model=model, config=base_config(
            steps_per_print=every, gradient_accumulation_steps=1))
        try:
            capsys.readouterr()
            for x, y in batches(6):
                engine.backward(engine(x, y))
                engine.step()
            out = capsys.readouterr().out
            got = [ln for ln in out.splitlines() if ln.startswith("[strata] step=")]
            assert len(got) == lines, out
            assert got[0].startswith(f"[strata] step={every}, skipped=0, lr=")
            assert "[strata] time (ms" not in out
        finally:
            engine.close()
    # wall_clock_breakdown adds the timings to each progress line.
    engine, *_ = deepspeed.initialize(model=Net(), config=base_config(
        steps_per_print=2, gradient_accumulation_steps=1, wall_clock_breakdown=True))
    try:
        capsys.readouterr()
        for x, y in batches(4):
            engine.backward(engine(x, y))
            engine.step()
        out = capsys.readouterr().out
        timing = [ln for ln in out.splitlines() if ln.startswith("[strata] time (ms")]
        assert len(timing) == 2 and "forward:" in timing[0] and "optimizer wall:" in timing[0]
    finally:
        engine.close()


class LoRA(nn.Module):
    def __init__(self, d=128, r=4):
        super().__init__()
        self.base = nn.Linear(d, d)
        self.a = nn.Parameter(torch.randn(r, d) * 0.01)
        self.b = nn.Parameter(torch.zeros(d, r))
        self.base.requires_grad_(False)

    def forward(self, x):
        return (self.base(x) + x @ self.a.t() @ self.b.t()).pow(2).mean()


def test_lora_allocates_state_only_for_adapters(swap_dir):
    torch.manual_seed(5)
    model = LoRA()
    base = model.base.weight.detach().clone()
    engine, opt, *_ = deepspeed.initialize(model=model, config=base_config(
        "nvme", swap_dir, gradient_accumulation_steps=1))
    try:
        adapters = model.a.numel() + model.b.numel()
        total = sum(p.numel() for p in model.parameters())
        st = engine.stats()
        # 3 fp32 slots per adapter element, each slot padded to 4 KiB per sub-group.
        assert 12 * adapters <= st["swap_file_bytes"] <= 12 * adapters + 3 * 4096 * 2 + (1 << 20)
        assert st["swap_file_bytes"] < 12 * total / 3
        assert len(opt._b.managed) == 2
        x = torch.randn(4, 128)
        for _ in range(3):
            engine.backward(engine(x))
            engine.step()
        assert torch.equal(model.base.weight, base)
        assert model.base.weight.grad is None
        assert model.b.abs().sum() > 0
    finally:
        engine.close()


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.used = nn.Linear(4, 4)
        self.unused = nn.Linear(4, 4)

    def forward(self, x):
        return self.used(x).pow(2).mean()


def test_parameters_without_gradient_do_not_stall_the_step():
    torch.manual_seed(6)
    model = Branchy()
    engine, *_ = deepspeed.initialize(model=model, config=base_config(
        gradient_accumulation_steps=1, scheduler=None, gradient_clipping=0.0))
    try:
        w = model.used.weight.detach().clone()
        engine.backward(engine(torch.randn(3, 4)))
        engine.step()
        assert engine.global_steps == 1 and not torch.equal(model.used.weight, w)
    finally:
        engine.close()


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(32, 16)
        self.out = nn.Linear(16, 32, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, x, y):
        return nn.functional.cross_entropy(self.out(torch.tanh(self.emb(x).mean(1))), y)


def test_tied_parameters_are_updated_once():
    torch.manual_seed(7)
    model = Tied()
    ref = copy.deepcopy(model)
    cfg = base_config(gradient_accumulation_steps=1)
    cfg.pop("scheduler")
    engine, opt, *_ = deepspeed.initialize(model=model, config=cfg)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=2e-2, betas=(0.9, 0.99), weight_decay=0.01)
    try:
        assert len(opt._b.managed) == 1
        for x, y in [(torch.randint(0, 32, (4, 3)), torch.randint(0, 32, (4,)))
                     for _ in range(5)]:
            engine.backward(engine(x, y))
            engine.step()
            ref(x, y).backward()
            torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
            ref_opt.step()
            ref_opt.zero_grad()
        torch.testing.assert_close(model.emb.weight, ref.emb.weight, rtol=1e-5, atol=1e-6)
        assert model.out.weight is model.emb.weight
    finally:
        engine.close()


def test_clear_errors_for_sparse_meta_and_mixed_devices():
    with pytest.raises(ValueError, match="sparse"):
        deepspeed.initialize(model=nn.Embedding(10, 4, sparse=True), config=base_config())
    meta = nn.Linear(4, 4, device="meta")
    with pytest.raises(ValueError, match="meta device"):
        deepspeed.initialize(model=meta, config=base_config())
    mixed = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4, device="meta"))
    with pytest.raises(ValueError, match="several devices"):
        deepspeed.initialize(model=mixed, config=base_config())


def test_unfreezing_and_add_param_group_follow_torch():
    torch.manual_seed(8)
    model = Net()
    model.head.requires_grad_(False)
    ref = copy.deepcopy(model)
    cfg = base_config(gradient_accumulation_steps=1, gradient_clipping=0.0)
    cfg.pop("scheduler")
    engine, opt, *_ = deepspeed.initialize(model=model, config=cfg)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=2e-2, betas=(0.9, 0.99), weight_decay=0.01)
    extra, ref_extra = nn.Linear(10, 10), None
    try:
        data = batches(9)

        def both(x, y):
            engine.backward(engine(x, y) + (extra(torch.ones(1, 10)).sum() * 0.01
                                            if extra_on else 0))
            engine.step()
            loss = ref(x, y) + (ref_extra(torch.ones(1, 10)).sum() * 0.01 if extra_on else 0)
            loss.backward()
            ref_opt.step()
            ref_opt.zero_grad()

        extra_on = False
        for x, y in data[:3]:
            both(x, y)
        model.head.requires_grad_(True)
        ref.head.requires_grad_(True)
        for x, y in data[3:6]:
            both(x, y)
        ref_extra = copy.deepcopy(extra)
        opt.add_param_group({"params": extra.parameters(), "lr": 1e-2})
        ref_opt.add_param_group({"params": ref_extra.parameters(), "lr": 1e-2})
        extra_on = True
        for x, y in data[6:]:
            both(x, y)
        for p, q in zip(list(model.parameters()) + list(extra.parameters()),
                        list(ref.parameters()) + list(ref_extra.parameters())):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        steps = opt.state_dict()["state"]
        assert sorted({float(s["step"]) for s in steps.values()}) == [3.0, 6.0, 9.0]
    finally:
        engine.close()


def test_client_torch_optimizer_and_scheduler_are_wrapped():
    torch.manual_seed(9)
    model = Net()
    ref = copy.deepcopy(model)
    client = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.StepLR(client, step_size=2, gamma=0.5)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.05)
    ref_sched = torch.optim.lr_scheduler.StepLR(ref_opt, step_size=2, gamma=0.5)
    cfg = base_config(gradient_accumulation_steps=1, gradient_clipping=0.0)
    cfg.pop("optimizer")
    cfg.pop("scheduler")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "lr_scheduler.step() before optimizer.step()"
        engine, opt, _, engine_sched = deepspeed.initialize(model=model, optimizer=client,
                                                            lr_scheduler=sched, config=cfg)
        try:
            assert isinstance(opt, strata.optim.OffloadAdamW) and engine_sched is sched
            for x, y in batches(5):
                engine.backward(engine(x, y))
                engine.step()
                ref(x, y).backward()
                ref_opt.step()
                ref_opt.zero_grad()
                ref_sched.step()
            assert engine.get_lr() == ref_sched.get_last_lr()
            for p, q in zip(model.parameters(), ref.parameters()):
                torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
            assert len(client.state) == 0, "the client's state moved into strata"
        finally:
            engine.close()


def test_callable_optimizer_and_scheduler():
    model = Net()
    cfg = base_config(zero_allow_untested_optimizer=True)  # SGD under ZeRO: DeepSpeed's opt-in
    cfg.pop("optimizer")
    cfg.pop("scheduler")
    engine, opt, _, sched = deepspeed.initialize(
        model=model, config=cfg,
        optimizer=lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9),
        lr_scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 0.5 ** s))
    try:
        assert isinstance(opt, strata.optim.OffloadSGD)
        assert isinstance(sched, torch.optim.lr_scheduler.LambdaLR) and sched.optimizer is opt
        for x, y in batches(4):
            engine.backward(engine(x, y))
            engine.step()
        assert engine.get_lr() == [pytest.approx(0.1 * 0.5 ** 2)]
    finally:
        engine.close()


def test_other_client_optimizer_runs_as_given(caplog):
    torch.manual_seed(10)
    model = Net()
    ref = copy.deepcopy(model)
    cfg = base_config(gradient_accumulation_steps=2, gradient_clipping=0.5,
                      zero_allow_untested_optimizer=True)  # RMSprop under ZeRO: the opt-in
    cfg.pop("optimizer")
    cfg.pop("scheduler")
    client = torch.optim.RMSprop(model.parameters(), lr=1e-3)
    ref_opt = torch.optim.RMSprop(ref.parameters(), lr=1e-3)
    strata.config._warned.clear()
    with caplog.at_level(logging.WARNING, logger="strata"):
        engine, opt, *_ = deepspeed.initialize(model=model, optimizer=client, config=cfg)
    try:
        assert any("RMSprop is not one strata can offload" in r.message for r in caplog.records)
        data = batches(6)
        engine_run(engine, data, 3)
        torch_reference_generic(ref, ref_opt, data, 3, gas=2, clip=0.5)
        for p, q in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    finally:
        engine.close()


def torch_reference_generic(model, opt, data, steps, gas, clip):
    it = iter(data)
    for _ in range(steps):
        for _ in range(gas):
            x, y = next(it)
            (model(x, y) / gas).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad()


def test_training_data_and_batch_rule():
    data = torch.utils.data.TensorDataset(torch.randint(0, 64, (40, 6)),
                                          torch.randint(0, 10, (40,)))
    cfg = base_config(train_batch_size=16, train_micro_batch_size_per_gpu=4)
    cfg.pop("gradient_accumulation_steps")
    engine, _, loader, _ = deepspeed.initialize(model=Net(), config=cfg, training_data=data)
    try:
        assert engine.gradient_accumulation_steps() == 4
        assert engine.train_micro_batch_size_per_gpu() == 4
        x, y = next(iter(loader))
        assert x.shape == (4, 6) and len(loader) == 10
    finally:
        engine.close()
    with pytest.raises(strata.ConfigError, match="train_batch_size"):
        deepspeed.initialize(model=Net(), config=base_config(train_batch_size=15,
                                                             train_micro_batch_size_per_gpu=4))


def hf_args(**over):
    ns = argparse.Namespace(learning_rate=5e-3, adam_beta1=0.8, adam_beta2=0.95,
                            adam_epsilon=1e-7, weight_decay=0.02, per_device_train_batch_size=3,
                            gradient_accumulation_steps=5, max_grad_norm=0.7, warmup_steps=4,
                            max_steps=50, local_rank=-1, deepspeed_config=None)
    for k, v in over.items():
        setattr(ns, k, v)
    return ns


HF_AUTO = {
    "bf16": {"enabled": "auto"},
    "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                              "weight_decay": "auto"}},
    "scheduler": {"type": "WarmupDecayLR", "params": {
        "total_num_steps": "auto", "warmup_min_lr": "auto", "warmup_max_lr": "auto",
        "warmup_num_steps": "auto"}},
    "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}},
    "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
    "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
}


def test_hugging_face_auto_values_resolve_from_arguments():
    engine, opt, _, sched = deepspeed.initialize(args=hf_args(), model=Net(), config=HF_AUTO)
    try:
        assert engine.train_micro_batch_size_per_gpu() == 3
        assert engine.gradient_accumulation_steps() == 5 and engine.train_batch_size() == 15
        assert engine.gradient_clipping() == 0.7
        assert not engine.bfloat16_enabled()  # fp32 model, no --bf16
        g = opt.param_groups[0]
        assert g["betas"] == (0.8, 0.95) and g["eps"] == 1e-7 and g["weight_decay"] == 0.02
        assert sched.total_num_steps == 50 and sched.warmup_num_steps == 4
        assert sched.max_lrs == [5e-3] and sched.min_lrs == [0]
    finally:
        engine.close()
    # bf16 "auto" follows the model's dtype.
    engine, *_ = deepspeed.initialize(args=hf_args(), model=Net().bfloat16(), config=HF_AUTO)
    assert engine.bfloat16_enabled()
    engine.close()
    # A key with nothing to resolve from is named.
    with pytest.raises(strata.ConfigError, match="scheduler.params.total_num_steps"):
        deepspeed.initialize(args=hf_args(max_steps=None), model=Net(), config=HF_AUTO)


def test_config_from_arguments(tmp_path):
    path = tmp_path / "ds.json"
    import json

    path.write_text(json.dumps(base_config()))
    parser = argparse.ArgumentParser()
    parser.add_argument("--local_rank", type=int, default=-1)
    parser = deepspeed.add_config_arguments(parser)
    args = parser.parse_args(["--deepspeed", "--deepspeed_config", str(path)])
    engine, *_ = deepspeed.initialize(args=args, model=Net())
    try:
        assert engine.gradient_accumulation_steps() == 2 and engine.optimizer_name() == "AdamW"
    finally:
        engine.close()
    with pytest.raises(ValueError, match="both"):
        deepspeed.initialize(args=args, model=Net(), config=base_config())
    # Without --local_rank of its own, the parser gets one, and a later one of the script's
    # own replaces it instead of failing.
    p2 = deepspeed.add_config_arguments(argparse.ArgumentParser())
    assert p2.parse_args([]).local_rank == int(os.environ.get("LOCAL_RANK", -1))
    p2.add_argument("--local_rank", type=int, default=7)
    assert p2.parse_args([]).local_rank == 7


def test_weights_loaded_after_the_optimizer_are_not_overwritten_by_stale_masters():
    torch.manual_seed(11)
    model = Net()
    cfg = base_config(gradient_accumulation_steps=1, gradient_clipping=0.0)
    cfg.pop("scheduler")
    engine, opt, *_ = deepspeed.initialize(model=model, config=cfg)
    try:
        data = batches(6)
        for x, y in data[:2]:
            engine.backward(engine(x, y))
            engine.step()
        # New weights far from the current ones: stale masters would pull them back by ~1.
        new_weights = {k: v + 1.0 for k, v in model.state_dict().items()}
        engine.module.load_state_dict(new_weights)  # module.load_state_dict: re-synced at once
        with torch.no_grad():
            model.head.bias.copy_(torch.full((10,), 0.25))  # in-place: seen at the next step
        new_weights["head.bias"] = torch.full((10,), 0.25)
        ref = Net()
        ref.load_state_dict(new_weights)
        x, y = data[2]
        engine.backward(engine(x, y))
        engine.step()
        # Where the masters came from: one step from the new weights (Adam state carried on),
        # so the weights stay within lr of the loaded ones, not of the old ones.
        for (n, p), q in zip(model.named_parameters(), ref.parameters()):
            assert (p - q).abs().max() <= 0.05, n
        # Through .data the version counter does not move: sync by hand.
        model.head.weight.data.fill_(0.5)
        engine.sync_master_from_params()
        engine.backward(engine(*data[3]))
        engine.step()
        assert (model.head.weight - 0.5).abs().max() <= 0.05
    finally:
        engine.close()


def test_several_engines_in_one_process(swap_dir):
    torch.manual_seed(12)
    a = Net()
    b = copy.deepcopy(a)
    ea, *_ = deepspeed.initialize(model=a, config=base_config("nvme", swap_dir))
    eb, *_ = deepspeed.initialize(model=b, config=base_config("cpu"))
    try:
        data = batches(8)
        for x, y in data:
            for e in (ea, eb):
                e.backward(e(x, y))
                e.step()
        for p, q in zip(a.parameters(), b.parameters()):
            assert torch.equal(p, q), "placement does not change results"
        assert ea.stats()["swap_file_path"] != "" and eb.stats()["swap_file_path"] == ""
    finally:
        ea.close()
        eb.close()


def test_accepted_but_ignored_keys_warn_once(caplog):
    strata.config._warned.clear()
    cfg = base_config()
    cfg["zero_optimization"]["overlap_comm"] = True
    cfg["zero_optimization"]["reduce_bucket_size"] = 5e8
    with caplog.at_level(logging.WARNING, logger="strata"):
        for _ in range(2):
            engine, *_ = deepspeed.initialize(model=Net(), config=cfg)
            engine.close()
    hits = [r for r in caplog.records if "overlap_comm" in r.getMessage()]
    assert len(hits) == 1, [r.getMessage() for r in caplog.records]
    assert "not acted on" in hits[0].getMessage()


def test_comm_and_zero_helpers_single_process():
    assert deepspeed.init_distributed() is False
    assert deepspeed.comm.get_rank() == 0 and deepspeed.comm.get_world_size() == 1
    assert deepspeed.comm.ReduceOp is torch.distributed.ReduceOp
    with deepspeed.zero.Init():
        model = Net()
    engine, opt, *_ = deepspeed.initialize(model=model, config=base_config(
        gradient_accumulation_steps=1))
    try:
        with deepspeed.zero.GatheredParameters(list(model.head.parameters()), modifier_rank=0):
            model.head.weight.data.fill_(0.125)  # .data: only the context's re-sync sees it
        i = opt._b.index[id(model.head.weight)]
        t = torch.empty(model.head.weight.numel())
        opt._read_slot(i, 0, t)
        assert torch.all(t == 0.125)
    finally:
        engine.close()


def _micro_grads_fp32_sum(model, data, gas):
    """Each micro-step's gradient (in the parameters' dtype) summed in fp32, in order."""
    sums = {n: torch.zeros(p.shape, dtype=torch.float32) for n, p in model.named_parameters()}
    for x, y in data:
        model.zero_grad(set_to_none=True)
        (model(x, y) / gas).backward()
        for n, p in model.named_parameters():
            sums[n].add_(p.grad)
    model.zero_grad(set_to_none=True)
    return sums


@pytest.mark.parametrize("accum", ["fp32", None, "bf16"])
def test_grad_accum_dtype_sets_where_gradients_accumulate(accum, tmp_path):
    """bf16 parameters, 4 micro-steps. grad_accum_dtype fp32: every backward's bf16 gradient
    is added into fp32 arenas (.grad is None afterwards), so the accumulated gradient is the
    exact fp32 sum of the micro-step gradients; not given or bf16: torch accumulates in .grad
    (a view of a bf16 arena), which rounds at every micro-step."""
    gas = 4
    torch.manual_seed(3)
    model = Net()
    ref_model = copy.deepcopy(model).to(torch.bfloat16)
    data = batches(gas - 1, seed=5)
    cfg = base_config("nvme", tmp_path, gradient_accumulation_steps=gas, bf16={"enabled": True})
    if accum:
        cfg["data_types"] = {"grad_accum_dtype": accum}
    engine, opt, *_ = deepspeed.initialize(model=model, config=cfg)
    try:
        want = torch.float32 if accum == "fp32" else torch.bfloat16
        assert {sg["grad_dtype"] for sg in opt._b.engine.subgroups()} == \
            {"fp32" if accum == "fp32" else "bf16"}
        assert [a.dtype for a in opt.grad_arenas()] == [want]
        for x, y in data:  # not a boundary yet: gradients accumulate
            engine.backward(engine(x, y))
            engine.step()
        exact = _micro_grads_fp32_sum(ref_model, data, gas)
        names = dict(model.named_parameters())
        worst = 0.0
        for n, p in names.items():
            got = opt._b.views[opt._b.index[id(p)]]
            assert got.dtype == want
            if accum == "fp32":
                assert p.grad is None
                assert torch.equal(got, exact[n]), n  # same additions, same order: bit-exact
            else:
                assert p.grad is not None and p.grad.data_ptr() == got.data_ptr()
                worst = max(worst, float((got.float() - exact[n]).abs().max()))
        if accum != "fp32":
            assert worst > 0  # bf16 accumulation rounds: the fp32 mode is not a no-op
        engine.zero_grad()
        assert all(float(a.abs().sum()) == 0 for a in opt.grad_arenas())
    finally:
        engine.close()


@pytest.mark.parametrize("clip", [1.0, 0.0])
def test_fp32_grad_accumulation_trains_like_torch_adamw_on_fp32_masters(clip, tmp_path):
    """bf16 model, fp32 gradient accumulation (gas 2; the boundary's backward overlapped with
    the update: exact mode with clipping 1.0, eager without):
    the masters follow torch.optim.AdamW run on fp32 copies of the weights with, as gradient,
    the fp32 sum of the bf16 micro-step gradients; the model holds the masters rounded to
    bf16."""
    gas, steps = 2, 5
    torch.manual_seed(4)
    model = Net()
    ref_bf16 = copy.deepcopy(model).to(torch.bfloat16)
    masters = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = base_config("nvme", tmp_path, bf16={"enabled": True},
                      data_types={"grad_accum_dtype": "fp32"}, gradient_clipping=clip)
    del cfg["scheduler"]
    engine, opt, *_ = deepspeed.initialize(model=model, config=cfg)
    ref_params = [torch.nn.Parameter(masters[n]) for n, _ in model.named_parameters()]
    ref_opt = torch.optim.AdamW(ref_params, lr=2e-2, betas=(0.9, 0.99), eps=1e-8,
                                weight_decay=0.01)
    data = batches(gas * steps, seed=6)
    try:
        for s in range(steps):
            micro = data[s * gas:(s + 1) * gas]
            exact = _micro_grads_fp32_sum(ref_bf16, micro, gas)
            for x, y in micro:
                engine.backward(engine(x, y))
                engine.step()
            for rp, (n, _) in zip(ref_params, model.named_parameters()):
                rp.grad = exact[n].clone()
            if clip:
                norm = torch.nn.utils.clip_grad_norm_(ref_params, clip)
                assert engine.get_global_grad_norm() == pytest.approx(float(norm), rel=1e-5)
            ref_opt.step()
            with torch.no_grad():  # the reference bf16 model gets the rounded masters
                for rp, p in zip(ref_params, ref_bf16.parameters()):
                    p.copy_(rp)
        for i, (n, p) in enumerate(model.named_parameters()):
            m = torch.empty(p.numel())
            opt._read_slot(opt._b.index[id(p)], 0, m)
            torch.testing.assert_close(m.view_as(p), ref_params[i].detach(), rtol=1e-5,
                                       atol=1e-6)
            assert torch.equal(p.detach(), m.view_as(p).to(torch.bfloat16)), n
    finally:
        engine.close()


def test_fp32_grad_accumulation_with_the_plain_optimizer(tmp_path):
    """OffloadAdamW on bf16 parameters with grad_accum_dtype fp32, driven by a plain loop:
    backward leaves .grad None and the gradient in the fp32 arena; a .grad set by hand is
    added in at step; zero_grad clears the arena."""
    torch.manual_seed(5)
    lin = nn.Linear(16, 8).to(torch.bfloat16)
    opt = strata.optim.OffloadAdamW(lin.parameters(), lr=1e-2, config={
        "data_types": {"grad_accum_dtype": "fp32"},
        "zero_optimization": {"offload_optimizer": {"device": "nvme", "nvme_path": str(tmp_path)}}})
    try:
        x = torch.randn(4, 16, dtype=torch.bfloat16)
        lin(x).float().pow(2).mean().backward()
        assert lin.weight.grad is None and lin.bias.grad is None
        view = opt._b.views[opt._b.index[id(lin.bias)]]
        assert view.dtype == torch.float32 and float(view.abs().sum()) > 0
        before = view.clone()
        lin.bias.grad = torch.full_like(lin.bias, 0.5)
        stats = opt.grad_stats()  # gathers the hand-set gradient
        assert lin.bias.grad is None
        torch.testing.assert_close(view, before + 0.5, rtol=0, atol=0)
        assert stats[0] > 0
        opt.step()
        opt.zero_grad()
        assert float(view.abs().sum()) == 0 and lin.bias.grad is None
    finally:
        opt.close()


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8).to(torch.bfloat16)

    def forward(self, x):
        return self.b(self.a(x).to(torch.bfloat16)).float().pow(2).mean()


def test_mixed_dtypes_get_subgroups_of_one_dtype():
    torch.manual_seed(13)
    model = Mixed()
    engine, opt, *_ = deepspeed.initialize(model=model, config=base_config(
        gradient_accumulation_steps=1))
    try:
        sgs = opt._b.engine.subgroups()
        assert {sg["dtype"] for sg in sgs} == {"fp32", "bf16"}
        managed = opt._b.managed
        for sg in sgs:
            dtypes = {managed[seg[0]].dtype for seg in sg["segments"]}
            assert dtypes == {torch.float32 if sg["dtype"] == "fp32" else torch.bfloat16}
        a0, b0 = model.a.weight.detach().clone(), model.b.weight.detach().clone()
        for _ in range(3):
            engine.backward(engine(torch.randn(4, 8)))
            engine.step()
        assert model.b.weight.dtype == torch.bfloat16 and model.a.weight.dtype == torch.float32
        assert not torch.equal(model.a.weight, a0) and not torch.equal(model.b.weight, b0)
    finally:
        engine.close()


def test_openmp_spin_is_said_once_when_torch_threads_fill_the_cpus(monkeypatch, caplog):
    """A CPU model whose torch threads fill every CPU, with OMP_WAIT_POLICY unset: initialize
    says once how to stop the OpenMP threads spinning; with the variable set, or fewer torch
    threads than CPUs, it says nothing."""
    cfg = {"train_micro_batch_size_per_gpu": 8,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
           "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}},
           "strata": {"progress": "off"}}
    cpus = strata._C.usable_cpus()
    openmp = "OpenMP" in torch.__config__.parallel_info()
    threads = torch.get_num_threads()

    def said(env, torch_threads):
        strata.config._warned.clear()
        for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):
            monkeypatch.delenv(k, raising=False)
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        torch.set_num_threads(torch_threads)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="strata"):
            engine, _, _, _ = deepspeed.initialize(model=Net(), config=cfg)
            engine.close()
        return [r.getMessage() for r in caplog.records if "OMP_WAIT_POLICY" in r.getMessage()]

    try:
        got = said({}, cpus)
        if openmp:
            assert len(got) == 1 and "OMP_WAIT_POLICY=PASSIVE" in got[0], got
        else:
            assert got == []  # torch's thread pool is not OpenMP here: nothing spins that way
        assert said({"OMP_WAIT_POLICY": "PASSIVE"}, cpus) == []
        if cpus > 1:
            assert said({}, cpus - 1) == []
    finally:
        torch.set_num_threads(threads)
