"""DeepSpeed's warmup schedules: names, arguments and step semantics (values written out from
DeepSpeed's formulas, not from the implementation)."""

import math

import pytest
import torch

from strata import lr_schedules
from strata.lr_schedules import (LRRangeTest, OneCycle, WarmupCosineLR, WarmupDecayLR,
                                 WarmupLR)


def opt(lr=0.1, groups=1):
    params = [torch.nn.Parameter(torch.zeros(2)) for _ in range(groups)]
    return torch.optim.SGD([{"params": [p]} for p in params], lr=lr)


def lrs_after_steps(sched, o, n):
    """lr of group 0 at init and after each of n steps."""
    out = [o.param_groups[0]["lr"]]
    for _ in range(n):
        sched.step()
        out.append(o.param_groups[0]["lr"])
    return out


def test_warmup_lr_linear_starts_at_min_and_stays_at_max():
    o = opt()
    s = WarmupLR(o, warmup_min_lr=0.01, warmup_max_lr=0.11, warmup_num_steps=4,
                 warmup_type="linear")
    got = lrs_after_steps(s, o, 6)
    # init: min; step k sets last_batch_iteration k-1: min + (max-min) * (k-1)/4 until 4.
    want = [0.01, 0.01, 0.035, 0.06, 0.085, 0.11, 0.11]
    assert got == pytest.approx(want, abs=1e-12)
    assert s.get_last_lr() == [pytest.approx(0.11)]


def test_warmup_lr_log_and_defaults():
    o = opt(lr=0.5)
    s = WarmupLR(o, warmup_num_steps=10)  # warmup_max_lr None: the optimizer's lr; log warmup
    got = lrs_after_steps(s, o, 12)
    want = [0.0] + [0.5 * math.log(i + 1) / math.log(10) for i in range(10)] + [0.5, 0.5]
    assert got == pytest.approx(want, abs=1e-12)


def test_warmup_num_steps_is_at_least_two_and_must_be_positive():
    o = opt()
    s = WarmupLR(o, warmup_min_lr=0.0, warmup_max_lr=1.0, warmup_num_steps=1,
                 warmup_type="linear")
    assert s.warmup_num_steps == 2
    assert lrs_after_steps(s, o, 3) == pytest.approx([0.0, 0.0, 0.5, 1.0])
    with pytest.raises(ValueError, match="warmup_num_steps"):
        WarmupLR(opt(), warmup_num_steps=0)


def test_warmup_decay_lr():
    o = opt()
    s = WarmupDecayLR(o, total_num_steps=10, warmup_min_lr=0.0, warmup_max_lr=1.0,
                      warmup_num_steps=4, warmup_type="linear")
    got = lrs_after_steps(s, o, 12)
    want = [0.0, 0.0, 0.25, 0.5, 0.75] + [(10 - i) / 6 for i in range(4, 11)] + [0.0]
    assert got == pytest.approx(want, abs=1e-12)


def test_warmup_cosine_lr():
    o = opt(lr=2.0)
    s = WarmupCosineLR(o, total_num_steps=8, warmup_min_ratio=0.1, warmup_num_steps=3,
                       cos_min_ratio=0.01, warmup_type="linear")
    got = lrs_after_steps(s, o, 10)
    want = [0.0]  # DeepSpeed sets 0 at construction
    for it in range(10):
        if it < 3:
            ratio = 0.1 + (it / 3) * 0.9
        else:
            progress = min(1.0, (it - 3 + 1) / (8 - 3))
            ratio = 0.01 + 0.99 * (1 + math.cos(math.pi * progress)) / 2
        want.append(2.0 * ratio)
    assert got == pytest.approx(want, abs=1e-12)


def test_per_group_values_and_state_dict_round_trip():
    o = opt(groups=2)
    s = WarmupLR(o, warmup_min_lr=[0.0, 0.1], warmup_max_lr=[1.0, 0.2], warmup_num_steps=5,
                 warmup_type="linear")
    for _ in range(3):
        s.step()
    assert [g["lr"] for g in o.param_groups] == pytest.approx([0.4, 0.14])
    sd = s.state_dict()
    assert sd == {"last_batch_iteration": 2}
    o2 = opt(groups=2)
    s2 = WarmupLR(o2, warmup_min_lr=[0.0, 0.1], warmup_max_lr=[1.0, 0.2], warmup_num_steps=5,
                  warmup_type="linear")
    s2.load_state_dict(sd)
    assert [g["lr"] for g in o2.param_groups] == pytest.approx([0.4, 0.14])
    s.step()
    s2.step()
    assert [g["lr"] for g in o2.param_groups] == [g["lr"] for g in o.param_groups]
    with pytest.raises(ValueError, match="min_lr"):
        WarmupLR(o, warmup_min_lr=[0.0], warmup_max_lr=1.0)


def test_from_config_builds_the_named_schedule():
    o = opt(lr=0.3)
    cfg = {"scheduler": {"type": "WarmupDecayLR",
                         "params": {"total_num_steps": 20, "warmup_min_lr": 0.0,
                                    "warmup_max_lr": 0.3, "warmup_num_steps": 5,
                                    "warmup_type": "linear", "last_batch_iteration": -1,
                                    "cos_min_ratio": None}}}
    s = lr_schedules.from_config(o, cfg)
    assert isinstance(s, WarmupDecayLR) and s.total_num_steps == 20
    assert lr_schedules.from_config(o, {}) is None
    with pytest.raises(ValueError, match="cycle_min_lr: missing; OneCycle"):
        lr_schedules.from_config(o, {"scheduler": {"type": "OneCycle", "params": {}}})
    with pytest.raises(ValueError, match="is not one of"):
        lr_schedules.from_config(o, {"scheduler": {"type": "Cyclic", "params": {}}})


# Issue 25 item 1: OneCycle and LRRangeTest did not exist (the config type was refused), WarmupLR
# with warmup_max_lr=None gave every group group 0's lr, and a tensor lr was replaced by a new
# shape-(1,) tensor. Expected values are written out from DeepSpeed's formulas.


def test_lr_range_test_continuous_and_staircase():
    o = opt(lr=1.0)
    s = LRRangeTest(o, lr_range_test_min_lr=0.01, lr_range_test_step_size=4,
                    lr_range_test_step_rate=2.0)
    got = lrs_after_steps(s, o, 5)
    # lr = min * (1 + rate * (it + 1) / size), it = step index (init sets min).
    want = [0.01] + [0.01 * (1 + 2.0 * (i + 1) / 4) for i in range(5)]
    assert got == pytest.approx(want, abs=1e-12)
    o = opt(lr=1.0)
    s = LRRangeTest(o, lr_range_test_min_lr=0.01, lr_range_test_step_size=4,
                    lr_range_test_step_rate=2.0, lr_range_test_staircase=True)
    got = lrs_after_steps(s, o, 8)
    want = [0.01] + [0.01 * (1 + 2.0 * math.floor((i + 1) / 4)) for i in range(8)]
    assert got == pytest.approx(want, abs=1e-12)
    for bad in (0, -5):
        with pytest.raises(ValueError, match="lr_range_test_step_size"):
            LRRangeTest(opt(), lr_range_test_step_size=bad)


def test_one_cycle_lr_and_momentum_triangle_then_decay():
    p = torch.nn.Parameter(torch.zeros(2))
    o = torch.optim.Adam([p], lr=1.0, betas=(0.5, 0.5))
    s = OneCycle(o, cycle_min_lr=0.1, cycle_max_lr=1.1, cycle_first_step_size=4,
                 cycle_second_step_size=4, decay_step_size=2, decay_lr_rate=0.5,
                 cycle_min_mom=0.8, cycle_max_mom=0.9, decay_mom_rate=0.1)
    assert o.param_groups[0]["lr"] == 0.1 and o.param_groups[0]["betas"] == (0.8, 0.99)
    lrs, moms = [], []
    for _ in range(12):
        s.step()
        lrs.append(o.param_groups[0]["lr"])
        moms.append(o.param_groups[0]["betas"][0])
    # In the cycle (it = 0..7): x = (it + 1) / 8; scale = x / 0.5 rising, (x - 1) / -0.5 falling.
    scale = [min(2 * (i + 1) / 8, 2 * (1 - (i + 1) / 8)) for i in range(8)]
    want_lr = [0.1 + 1.0 * f for f in scale]
    want_mom = [0.9 - 0.1 * f for f in scale]
    # After it: k = (it - 8 + 1) / 2; lr = 0.1 / (1 + 0.5 k), mom = 0.9 * (1 + 0.1 k).
    for it in range(8, 12):
        k = (it - 8 + 1) / 2
        want_lr.append(0.1 / (1 + 0.5 * k))
        want_mom.append(0.9 * (1 + 0.1 * k))
    assert lrs == pytest.approx(want_lr, abs=1e-12)
    assert moms == pytest.approx(want_mom, abs=1e-12)
    assert s.state_dict() == {"last_batch_iteration": 11}


def test_one_cycle_without_betas_and_bad_sizes():
    o = opt(lr=1.0)  # SGD: no betas in defaults -> momentum cycling is turned off
    s = OneCycle(o, cycle_min_lr=0.1, cycle_max_lr=0.2, cycle_first_step_size=2)
    s.step()
    assert not s.cycle_momentum and "betas" not in o.param_groups[0]
    for first, second in ((0, None), (-1, None), (100, -1)):
        with pytest.raises(ValueError, match="step_size"):
            OneCycle(opt(), 0.1, 0.2, cycle_first_step_size=first, cycle_second_step_size=second)
    with pytest.raises(ValueError, match="cycle_max_lr"):
        OneCycle(opt(groups=2), 0.1, [0.2, 0.3, 0.4])


def test_warmup_lr_without_max_uses_each_groups_own_lr():
    p1, p2 = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    o = torch.optim.SGD([{"params": [p1], "lr": 0.1}, {"params": [p2], "lr": 0.2}])
    s = WarmupLR(o, warmup_min_lr=0.0, warmup_num_steps=2, warmup_type="linear")
    for _ in range(4):
        s.step()
    assert [g["lr"] for g in o.param_groups] == pytest.approx([0.1, 0.2])


@pytest.mark.parametrize("make", [
    lambda o: WarmupLR(o, warmup_max_lr=0.5, warmup_num_steps=3),
    lambda o: WarmupDecayLR(o, total_num_steps=10, warmup_num_steps=3),
    lambda o: WarmupCosineLR(o, total_num_steps=10, warmup_num_steps=3),
    lambda o: LRRangeTest(o, lr_range_test_step_size=2),
    lambda o: OneCycle(o, 0.01, 0.1, cycle_first_step_size=2),
])
@pytest.mark.parametrize("shape", [(), (1,)])
def test_tensor_lr_is_updated_in_place(make, shape):
    p = torch.nn.Parameter(torch.zeros(2))
    lr = torch.full(shape, 0.3)
    o = torch.optim.Adam([p], lr=0.3, betas=(0.9, 0.999))
    o.param_groups[0]["lr"] = lr
    s = make(o)
    for _ in range(3):
        s.step()
        assert o.param_groups[0]["lr"] is lr and lr.shape == shape
    assert float(lr) == pytest.approx(float(s.get_lr()[0]))


def test_config_accepts_one_cycle_and_lr_range_test():
    import strata

    for sched in ({"type": "OneCycle", "params": {"cycle_min_lr": 0.01, "cycle_max_lr": 0.1,
                                                 "cycle_first_step_size": 3}},
                  {"type": "LRRangeTest", "params": {"lr_range_test_min_lr": 0.02,
                                                    "lr_range_test_step_size": 5}}):
        model = torch.nn.Linear(2, 2)
        cfg = {"train_batch_size": 1, "optimizer": {"type": "Adam", "params": {"lr": 0.5}},
               "scheduler": sched}
        engine, _, _, scheduler = strata.initialize(model=model, config=cfg)
        try:
            assert type(scheduler).__name__ == sched["type"]
            assert engine.get_lr()[0] == pytest.approx(list(sched["params"].values())[0])
        finally:
            engine.close()
