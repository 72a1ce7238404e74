"""Parameters that live on a device (ZeRO-Offload's data flow): host copies the CPU update
reads and writes, gradients copied into the engine's arena at step, new values copied back.

Without a GPU the same path runs on CPU parameters with STRATA_TEST_STAGE_PARAMS=1 (the only
difference is where the parameter memory is); the tests marked gpu run it on CUDA tensors.
"""

import copy

import pytest
import torch
import torch.nn as nn

import strata
import strata.optim as so
from strata.lr_schedules import WarmupLR

from conftest import nvme_config


@pytest.fixture
def staged(monkeypatch):
    monkeypatch.setenv("STRATA_TEST_STAGE_PARAMS", "1")


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(),
                         nn.Linear(32, 3))


def data(n, seed=1, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 12, generator=g).to(device), torch.randint(0, 3, (8,), generator=g)
             .to(device)) for _ in range(n)]


def run_pair(model, ref, opt, ref_opt, batches, gas, between=None):
    """The same loop on strata and torch; ``between`` runs after each strata step."""
    it = iter(batches)
    while True:
        try:
            micro = [next(it) for _ in range(gas)]
        except StopIteration:
            return
        for x, y in micro:
            nn.functional.cross_entropy(model(x), y).backward()
            nn.functional.cross_entropy(ref(x), y).backward()
        opt.step()
        ref_opt.step()
        if between is not None:
            between()
        opt.zero_grad()
        ref_opt.zero_grad()


def test_staged_parameters_follow_torch_adamw(staged, swap_dir):
    """Two param groups, a frozen layer, accumulation over 2 micro-steps, NVMe state: the
    host-copy path matches torch.optim.AdamW; the model's memory is not the engine's."""
    model, ref = mlp(), mlp()
    ref.load_state_dict(model.state_dict())
    for m in (model, ref):
        m[0].weight.requires_grad_(False)
    groups = lambda m: [{"params": [m[0].bias, m[2].weight, m[2].bias]},  # noqa: E731
                        {"params": [m[4].weight, m[4].bias], "lr": 3e-3, "weight_decay": 0.0}]
    opt = so.OffloadAdamW(groups(model), lr=1e-2, weight_decay=0.05, config=nvme_config(swap_dir))
    ref_opt = torch.optim.AdamW(groups(ref), lr=1e-2, weight_decay=0.05)
    try:
        b = opt._b
        assert all(h is not None for h in b.shadows)
        for p, h in zip(b.managed, b.shadows):
            assert h.data_ptr() != p.data_ptr() and torch.equal(h, p.detach())
        assert id(model[0].weight) not in b.index  # frozen: no state, no host copy
        run_pair(model, ref, opt, ref_opt, data(20), gas=2)
        for a, r in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-6)
        assert all(p.grad is None for p in model.parameters())  # zero_grad: set to None
    finally:
        opt.close()


def test_host_copies_come_from_the_engines_pool_and_the_plan_counts_them(staged, swap_dir):
    """Regression (issue 19): the host copies came from torch's pinned allocator (a tensor
    rounded up to a power of two, outside the pool and outside ``strata plan``). The engine
    allocates them from its pool now, and the plan — of the engine and of the CLI — counts
    them, each 4 KiB-aligned."""
    import json
    import subprocess
    import sys

    model = mlp()
    opt = so.OffloadAdamW(model.parameters(), lr=1e-2, config=nvme_config(swap_dir))
    try:
        b = opt._b
        want = sum((p.numel() * p.element_size() + 4095) // 4096 * 4096 for p in b.managed)
        plan = json.loads(b.engine.plan_json())
        assert plan["host_copy_bytes"] == want
        st = opt.stats()
        raw = sum(p.numel() * p.element_size() for p in b.managed)
        arenas = sum(a.numel() * a.element_size() for a in b.arenas.values())
        assert st["pool_requested"] >= raw + arenas
        # the one slab sized by the plan (at least 1 MiB) holds them
        assert st["pool_reserved"] <= max(plan["pool_bytes"], 1 << 20)
        for i, h in enumerate(b.shadows):
            assert h.data_ptr() == b.engine.host_copy(i).address
    finally:
        opt.close()
    cfg = swap_dir / "plan.json"
    cfg.write_text(json.dumps(nvme_config(swap_dir)))
    out = {}
    for flag in ([], ["--model-on-gpu"]):
        r = subprocess.run([sys.executable, "-m", "strata", "plan", "--config", str(cfg),
                            "--params", "1000000", "--dtype", "bfloat16", "--json"] + flag,
                           capture_output=True, text=True, check=True)
        out[bool(flag)] = json.loads(r.stdout)
    assert out[False]["host_copy_bytes"] == 0
    assert out[True]["host_copy_bytes"] == (2_000_000 + 4095) // 4096 * 4096
    assert out[True]["pool_bytes"] - out[False]["pool_bytes"] == out[True]["host_copy_bytes"]


def test_gradients_are_copied_once_and_replaced_gradients_are_seen(staged):
    """grad_stats then step copy each device gradient once; a .grad replaced between steps
    (torch's own zero_grad(set_to_none=True), an assignment) is copied again, even when the
    new tensor has the old one's version and address."""
    model, ref = mlp(2), mlp(2)
    ref.load_state_dict(model.state_dict())
    opt = so.OffloadAdamW(model.parameters(), lr=1e-2,
                          config={"zero_optimization": {"offload_optimizer": {"device": "cpu"}}})
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    try:
        copies = []
        real_copy = so._OffloadOptimizer._check_dense
        so._OffloadOptimizer._check_dense = lambda self, b, p, g: copies.append(id(p)) or \
            real_copy(self, b, p, g)
        try:
            batches = data(6, seed=4)
            for k, (x, y) in enumerate(batches):
                nn.functional.cross_entropy(model(x), y).backward()
                nn.functional.cross_entropy(ref(x), y).backward()
                copies.clear()
                opt.grad_stats()
                opt.step()
                assert len(copies) == len(opt._b.managed)  # once each, not twice
                ref_opt.step()
                if k % 2:
                    model.zero_grad(set_to_none=True)  # torch's: the arena is not told
                else:
                    for p in model.parameters():
                        p.grad = torch.zeros_like(p)  # fresh tensors, version 0
                ref_opt.zero_grad()
        finally:
            so._OffloadOptimizer._check_dense = real_copy
        for a, r in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-6)
    finally:
        opt.close()


def test_deepspeed_engine_with_staged_parameters(staged, swap_dir, tmp_path):
    """initialize -> backward -> step with clipping, accumulation and WarmupLR on the host-copy
    path equals torch; a checkpoint saved from it resumes identically in a second engine; bf16
    with fp32 gradient accumulation also runs through it."""
    cfg = {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 2,
           "gradient_clipping": 0.5, "steps_per_print": 1000,
           "optimizer": {"type": "AdamW", "params": {"lr": 2e-2, "weight_decay": 0.01}},
           "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0,
                                                        "warmup_max_lr": 2e-2,
                                                        "warmup_num_steps": 5}},
           "zero_optimization": {"stage": 2, "offload_optimizer": {
               "device": "nvme", "nvme_path": str(swap_dir)}},
           "strata": {"progress": "off"}}
    model, ref = mlp(5), mlp(5)
    ref.load_state_dict(model.state_dict())
    engine, opt, _, _ = strata.initialize(model=model, config=cfg)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=2e-2, weight_decay=0.01)
    sched = WarmupLR(ref_opt, warmup_min_lr=0.0, warmup_max_lr=2e-2, warmup_num_steps=5)
    batches = data(16, seed=6)
    try:
        assert all(h is not None for h in opt._b.shadows)
        for k, (x, y) in enumerate(batches):
            engine.backward(nn.functional.cross_entropy(engine(x), y))
            engine.step()
            (nn.functional.cross_entropy(ref(x), y) / 2).backward()
            if k % 2:
                norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
                assert engine.get_global_grad_norm() == pytest.approx(float(norm), rel=1e-5)
                ref_opt.step()
                ref_opt.zero_grad()
                sched.step()
            if k == 7:
                engine.save_checkpoint(str(tmp_path / "ckpt"))
                saved = copy.deepcopy(model.state_dict())
        for a, r in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-6)
        final = copy.deepcopy(model.state_dict())
    finally:
        engine.close()

    model2 = mlp(9)  # other weights: the checkpoint brings them
    engine2, *_ = strata.initialize(model=model2, config=cfg)
    try:
        path, _ = engine2.load_checkpoint(str(tmp_path / "ckpt"))
        assert path is not None
        for k, v in saved.items():
            assert torch.equal(model2.state_dict()[k], v)
        for x, y in batches[8:]:
            engine2.backward(nn.functional.cross_entropy(engine2(x), y))
            engine2.step()
        for k, v in final.items():
            torch.testing.assert_close(model2.state_dict()[k], v, rtol=0, atol=0)
    finally:
        engine2.close()

    bf = dict(cfg, bf16={"enabled": True}, data_types={"grad_accum_dtype": "fp32"})
    model3 = mlp(5).to(torch.bfloat16)
    engine3, opt3, *_ = strata.initialize(model=model3, config=bf)
    try:
        w0 = model3[4].weight.detach().clone()
        for x, y in batches[:6]:  # WarmupLR: the first two updates have lr 0
            engine3.backward(nn.functional.cross_entropy(engine3(x.to(torch.bfloat16)).float(), y))
            assert all(p.grad is None for p in model3.parameters())  # folded into fp32 arena
            engine3.step()
        assert engine3.global_steps == 3 and not torch.equal(model3[4].weight, w0)
    finally:
        engine3.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_parameters_follow_torch_adamw(swap_dir):
    """CUDA parameters (fp32), state on NVMe: equal to torch.optim.AdamW on the GPU."""
    model, ref = mlp(7).cuda(), mlp(7).cuda()
    ref.load_state_dict(model.state_dict())
    opt = so.OffloadAdamW(model.parameters(), lr=1e-2, weight_decay=0.05,
                          config=nvme_config(swap_dir))
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.05)
    try:
        run_pair(model, ref, opt, ref_opt, data(12, device="cuda"), gas=2)
        torch.cuda.synchronize()
        for a, r in zip(model.parameters(), ref.parameters()):
            assert a.is_cuda
            torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-6)
    finally:
        opt.close()


class Branchy(nn.Module):
    """An MLP with a branch that only odd steps use (no gradient in the other backwards)."""

    def __init__(self, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.body = mlp(seed)
        self.extra = nn.Linear(12, 3)

    def forward(self, x, use_extra):
        out = self.body(x)
        return out + self.extra(x) if use_extra else out


@pytest.mark.parametrize("exact", [False, True])
def test_overlapped_backward_with_staged_parameters_is_bit_identical(staged, swap_dir, exact):
    """optimizer.backward(loss) on the host-copy path (gradients copied into the arena by the
    hooks, updates started during backward) gives the same bits as backward() + step(),
    including a branch that receives no gradient in the overlapped backward."""
    results = []
    for overlap in (False, True):
        model = Branchy(11)
        opt = so.OffloadAdamW(model.parameters(), lr=1e-2, weight_decay=0.01,
                              config=nvme_config(swap_dir, zero_optimization__sub_group_size=300))
        assert all(h is not None for h in opt._b.shadows)
        try:
            for k, (x, y) in enumerate(data(8, seed=12)):
                nn.functional.cross_entropy(model(x, use_extra=k % 4 == 0), y).backward()
                x2, y2 = data(1, seed=100 + k)[0]
                loss = nn.functional.cross_entropy(model(x2, use_extra=False), y2)
                if overlap:
                    opt.backward(loss, exact=exact)
                    assert opt._stage_queue is None  # every copy reached the engine
                    opt.step()
                else:
                    loss.backward()
                    opt.step()
                opt.zero_grad()
            results.append([p.detach().clone() for p in model.parameters()])
        finally:
            opt.close()
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_only_the_ranges_the_cpu_updated_are_copied_back():
    """With GPU updates (offload_optimizer.ratio < 1) the GPU writes its sub-groups' new values
    into the parameters itself: the H2D copy-back takes only the CPU-updated ranges."""

    class FakeEngine:
        def subgroups(self):
            return [{"update": "cpu", "segments": [(0, 0, 0, 10), (1, 0, 10, 5)]},
                    {"update": "gpu", "segments": [(1, 5, 0, 20)]},
                    {"update": "cpu", "segments": [(1, 25, 0, 7)]},
                    {"update": "gpu", "segments": [(2, 0, 0, 4)]}]

    b = so._Built()
    b.engine = FakeEngine()
    b.managed = [torch.zeros(10), torch.zeros(32), torch.zeros(4)]
    b.shadows = [torch.arange(10.0), torch.arange(32.0), torch.arange(4.0)]
    b.push = so._OffloadOptimizer._push_ranges(b)
    assert b.push == [None, [(0, 5), (25, 7)], []]
    so._OffloadOptimizer._push_shadows(None, b)
    assert torch.equal(b.managed[0], torch.arange(10.0))
    want = torch.zeros(32)
    want[:5] = torch.arange(5.0)
    want[25:] = torch.arange(25.0, 32.0)
    assert torch.equal(b.managed[1], want)
    assert torch.equal(b.managed[2], torch.zeros(4))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("ratio", [0.0, 0.5])
def test_gpu_updates_follow_torch_adamw(ratio):
    """Half or all of the sub-groups updated on the GPU (state streamed from host memory),
    the rest on the CPU: equal to torch.optim.AdamW on the GPU."""
    if not strata._C.engine_features().get("gpu_update"):
        pytest.skip("this strata build has no CUDA")
    model, ref = mlp(8).cuda(), mlp(8).cuda()
    ref.load_state_dict(model.state_dict())
    cfg = {"zero_optimization": {"sub_group_size": 300, "offload_optimizer": {
        "device": "cpu", "ratio": ratio}}, "strata": {"schedule": "static"}}
    opt = so.OffloadAdamW(model.parameters(), lr=1e-2, weight_decay=0.05, config=cfg)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.05)
    try:
        updates = [sg["update"] for sg in opt._b.engine.subgroups()]
        assert updates.count("gpu") == round((1 - ratio) * len(updates))
        run_pair(model, ref, opt, ref_opt, data(12, device="cuda"), gas=2)
        torch.cuda.synchronize()
        for a, r in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-6)
    finally:
        opt.close()
