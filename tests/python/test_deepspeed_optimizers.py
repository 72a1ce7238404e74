"""strata's SGD, Adagrad, Adam and AdamW against torch.optim over 100 steps, torch's state
names, and DeepSpeed's optimizer class names (strata.ops)."""

import pytest
import torch

import strata
import strata.ops
from strata.optim import OffloadAdagrad, OffloadAdam, OffloadAdamW, OffloadSGD

CPU = {"zero_optimization": {"offload_optimizer": {"device": "cpu"}, "sub_group_size": 3000}}


def make_params(seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(37, 29), (29,), (5000,), (3, 7, 11)]
    return [torch.randn(s, generator=g) for s in shapes]


def run_pair(make_ref, make_mine, steps=100, seed=0, groups=None):
    ref_params = [torch.nn.Parameter(t.clone()) for t in make_params(seed)]
    my_params = [torch.nn.Parameter(t.clone()) for t in make_params(seed)]

    def grouped(ps):
        if groups is None:
            return ps
        return [dict(g, params=[ps[i] for i in g["params"]]) for g in groups]

    ref = make_ref(grouped(ref_params))
    mine = make_mine(grouped(my_params))
    g = torch.Generator().manual_seed(seed + 1)
    try:
        for _ in range(steps):
            grads = [torch.randn(p.shape, generator=g) * 0.5 for p in ref_params]
            for p, q, gr in zip(ref_params, my_params, grads):
                p.grad = gr.clone()
                q.grad.copy_(gr)
            ref.step()
            mine.step()
        for i, (p, q) in enumerate(zip(ref_params, my_params)):
            torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=lambda m: f"param {i}: {m}")
        return ref, mine
    except BaseException:
        mine.close()
        raise


def compare_state(ref, mine, names):
    rs, ms = ref.state_dict()["state"], mine.state_dict()["state"]
    assert set(rs) == set(ms)
    for k in rs:
        for name in names:
            torch.testing.assert_close(ms[k][name], rs[k][name], rtol=1e-5, atol=1e-6)


def test_sgd_momentum_dampening_weight_decay_matches_torch():
    ref, mine = run_pair(
        lambda ps: torch.optim.SGD(ps, lr=0.01, momentum=0.9, dampening=0.1, weight_decay=1e-3),
        lambda ps: OffloadSGD(ps, lr=0.01, momentum=0.9, dampening=0.1, weight_decay=1e-3,
                              config=CPU))
    compare_state(ref, mine, ["momentum_buffer"])
    mine.close()


def test_sgd_nesterov_and_plain_sgd_with_groups():
    groups = [{"params": [0, 1], "momentum": 0.8, "nesterov": True},
              {"params": [2, 3], "lr": 0.05, "momentum": 0.0}]
    ref, mine = run_pair(
        lambda ps: torch.optim.SGD(ps, lr=0.02, momentum=0.5, weight_decay=1e-4),
        lambda ps: OffloadSGD(ps, lr=0.02, momentum=0.5, weight_decay=1e-4, config=CPU),
        groups=groups)
    sd = mine.state_dict()
    assert "momentum_buffer" in sd["state"][0] and sd["state"][2]["momentum_buffer"] is None
    # torch's SGD takes strata's state dict and vice versa.
    ps = [torch.nn.Parameter(t.clone()) for t in make_params()]
    fresh = torch.optim.SGD([{"params": ps[:2]}, {"params": ps[2:]}], lr=0.02)
    fresh.load_state_dict(sd)
    torch.testing.assert_close(fresh.state_dict()["state"][0]["momentum_buffer"],
                               ref.state_dict()["state"][0]["momentum_buffer"], rtol=1e-5,
                               atol=1e-6)
    mine.close()


def test_adagrad_matches_torch():
    ref, mine = run_pair(
        lambda ps: torch.optim.Adagrad(ps, lr=0.05, lr_decay=1e-3, weight_decay=1e-3,
                                       initial_accumulator_value=0.1, eps=1e-10),
        lambda ps: OffloadAdagrad(ps, lr=0.05, lr_decay=1e-3, weight_decay=1e-3,
                                  initial_accumulator_value=0.1, eps=1e-10, config=CPU))
    compare_state(ref, mine, ["sum", "step"])
    mine.close()


def test_adam_with_l2_weight_decay_matches_torch():
    ref, mine = run_pair(
        lambda ps: torch.optim.Adam(ps, lr=1e-3, betas=(0.8, 0.99), eps=1e-7, weight_decay=0.05),
        lambda ps: OffloadAdam(ps, lr=1e-3, betas=(0.8, 0.99), eps=1e-7, weight_decay=0.05,
                               config=CPU))
    compare_state(ref, mine, ["exp_avg", "exp_avg_sq", "step"])
    mine.close()


def test_adamw_amsgrad_matches_torch():
    ref, mine = run_pair(
        lambda ps: torch.optim.AdamW(ps, lr=2e-3, weight_decay=0.1, amsgrad=True),
        lambda ps: OffloadAdamW(ps, lr=2e-3, weight_decay=0.1, amsgrad=True, config=CPU))
    compare_state(ref, mine, ["exp_avg", "exp_avg_sq", "max_exp_avg_sq"])
    mine.close()


def test_deepspeed_names_map_to_strata_optimizers():
    # DeepSpeedCPUAdam: adamw_mode=True is AdamW; False is Adam with L2 decay.
    ref, mine = run_pair(
        lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.01),
        lambda ps: strata.ops.adam.DeepSpeedCPUAdam(ps, lr=1e-3, weight_decay=0.01), steps=10)
    assert isinstance(mine, OffloadAdamW) and mine._kind == "adamw"
    assert mine.stats()["swap_file_path"] == ""  # built directly: pinned DRAM, no swap file
    mine.close()
    ref, mine = run_pair(
        lambda ps: torch.optim.Adam(ps, lr=1e-3, weight_decay=0.01),
        lambda ps: strata.ops.adam.FusedAdam(ps, lr=1e-3, weight_decay=0.01, adam_w_mode=False),
        steps=10)
    assert mine._kind == "adam"
    mine.close()
    ref, mine = run_pair(
        lambda ps: torch.optim.Adagrad(ps, lr=1e-2),
        lambda ps: strata.ops.adagrad.DeepSpeedCPUAdagrad(ps, lr=1e-2), steps=10)
    mine.close()
    with pytest.raises(RuntimeError, match="AMSGrad"):
        strata.ops.adam.FusedAdam([torch.nn.Parameter(torch.zeros(3))], amsgrad=True)


def test_bias_correction_false_is_deepspeeds_switch():
    # Without bias correction the first Adam step is lr * g / (sqrt(1-b2) |g| + eps) * (1-b1).
    p = torch.nn.Parameter(torch.zeros(4))
    o = OffloadAdamW([p], lr=0.1, betas=(0.9, 0.999), eps=0.0, weight_decay=0.0,
                     bias_correction=False, config=CPU)
    p.grad.copy_(torch.tensor([1.0, -2.0, 4.0, -0.5]))
    o.step()
    want = -0.1 * (0.1 * torch.sign(torch.tensor([1.0, -2.0, 4.0, -0.5]))) / (0.001 ** 0.5)
    torch.testing.assert_close(p.detach(), want, rtol=1e-5, atol=1e-6)
    o.close()
