"""DeepSpeed's warmup schedules: names, arguments and step semantics (values written out from
DeepSpeed's formulas, not from the implementation)."""

import math

import pytest
import torch

from strata import lr_schedules
from strata.lr_schedules import WarmupCosineLR, WarmupDecayLR, WarmupLR


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
    with pytest.raises(ValueError, match="OneCycle"):
        lr_schedules.from_config(o, {"scheduler": {"type": "OneCycle", "params": {}}})
