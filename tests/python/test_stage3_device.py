"""ZeRO stage 3 with the model on a GPU, run against the host emulation of the device
(strata.device_lanes.HostEmulatedLanes, armed by strata.testing.emulated_device).

The window copies each module's weights "H2D" on a weight lane of their own and the compute
waits for that copy's event; gradients go "D2H" on a gradient lane into bounded host buffers
and land in the optimizer's arena from a watcher thread. The emulated device memory is NaN
until a copy lands, and each copy runs on its lane's thread after a delay, so a missing wait
gives wrong numbers — the tests below that break one wait on purpose show that it does.

- Same numbers: the GPT of test_stage3 trained with the emulated device, offload_param cpu and
  nvme, fp32 and bf16, overlap on and off, gradient accumulation 2, clipping 1.0, WarmupLR,
  ends bit-identical to stage 2 on the CPU path.
- Bytes: every H2D copy is one parameter's weights; device weight memory peaks within
  stage3_max_live_parameters; with prefetch the copies start before their module asks.
- What runs only on a GPU (CudaLanes, record_stream): the last test, skipped without CUDA.
"""

import gc
import threading

import pytest
import torch

import strata
from strata import device_lanes, param_tier as pt
from strata.testing import emulated_device

from test_stage3 import assert_master_took, assert_same, build, config, data, saved_after, \
    train


def train_on_device(cfg, steps=20, delay_s=0.001):
    made = []
    with emulated_device(delay_s=delay_s, made=made):
        got = train(cfg, steps=steps)
    assert len(made) == 1, "one stage 3 engine, one set of lanes"
    return got + (made[0],)


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("overlap", [True, False], ids=["overlap", "no-overlap"])
def test_emulated_device_matches_stage2_bit_for_bit(tmp_path, bf16, overlap):
    ref, ref_losses, _, _ = train(config(2, tmp=tmp_path, bf16=bf16, overlap=overlap))
    for device in ("cpu", "nvme"):
        # A window smaller than the model (about 4 blocks' weights) on both tiers.
        got, losses, stats, _, lanes = train_on_device(
            config(3, device, tmp_path, bf16=bf16, overlap=overlap,
                   stage3_max_live_parameters=50000))
        assert losses == ref_losses, device
        assert_same(got, ref)
        s = lanes.stats()
        itemsize = 2 if bf16 else 4
        # Weights went H2D one parameter per copy; every gradient of a tier parameter D2H.
        assert s["h2d_copies"] > 0 and s["h2d_bytes"] % itemsize == 0
        assert stats["grad_lane_landed"] == s["d2h_copies"] > 0
        assert s["compute_waits"] > 0
        # Device weight memory stays within the window (elements x bytes per element).
        assert stats["window_limit_elements"] == 50000
        assert s["device_weight_peak_bytes"] <= stats["window_limit_elements"] * itemsize
        assert s["device_weight_peak_bytes"] > 0
    assert ref_losses[-1] < ref_losses[0]


def test_persistent_parameters_go_through_the_staged_device_path(tmp_path, monkeypatch):
    """LayerNorm and biases stay resident (persistence threshold); on a GPU they are device
    parameters updated through host copies (the stage 2 device path), emulated with
    STRATA_TEST_STAGE_PARAMS=1, while the weight matrices go through the lanes."""
    ref, _, _, _ = train(config(2, tmp=tmp_path), steps=6)
    monkeypatch.setenv("STRATA_TEST_STAGE_PARAMS", "1")
    got, _, _, _, lanes = train_on_device(config(3, "nvme", tmp_path), steps=6)
    assert_same(got, ref)
    assert lanes.stats()["d2h_copies"] > 0


def test_prefetched_weights_are_copied_before_their_module_asks(tmp_path):
    """After the first step (the module order recorded) reads are submitted ahead and their
    H2D copies start as soon as the read completed: some compute waits find the copy done."""
    cfg = config(3, "nvme", tmp_path, stage3_prefetch_bucket_size=200000)
    _, _, stats, _, lanes = train_on_device(cfg, steps=6)
    s = lanes.stats()
    assert stats["prefetches"] > 0
    assert stats["h2d_at_prefetch"] > 0
    assert s["waits_already_done"] > 0


def test_gathered_parameters_with_modifier_writes_the_device_copy_back(tmp_path):
    cfg = config(3, "nvme", tmp_path, clip=0.0, gas=1)
    with emulated_device():
        model = build(cfg)
        engine, _, _, _ = strata.initialize(model=model, config=cfg)
    w = model.blocks[0].fc.weight
    assert w.numel() == 0 and w.ds_status == pt.NOT_AVAILABLE
    with strata.zero.GatheredParameters([w], modifier_rank=0):
        assert w.numel() == w.ds_numel and not torch.isnan(w).any()
        with torch.no_grad():
            w.fill_(0.5)
    assert w.ds_status == pt.NOT_AVAILABLE
    assert_master_took(engine, w, 0.5)


@pytest.mark.parametrize("device", ["cpu", "nvme"])
def test_checkpoint_on_the_emulated_device_resumes_as_stage2_continues(tmp_path, device):
    """Saved after 3 optimizer steps on the emulated device, loaded by a fresh engine (other
    initial weights) and trained 3 more: the weights equal stage 2's after 6, bit for bit."""
    ref, _, _, _ = train(config(2, tmp=tmp_path), steps=6)
    cfg = config(3, device, tmp_path)
    batches = data(12)
    with emulated_device():
        saved_after(cfg, batches[:6], tmp_path / "ck").close()
        model2 = build(cfg, seed=1)
        engine2, _, _, _ = strata.initialize(model=model2, config=cfg)
    engine2.load_checkpoint(str(tmp_path / "ck"))
    for x, y in batches[6:]:
        engine2.backward(engine2(x, y))
        engine2.step()
    got = engine2.module_state_dict()
    engine2.close()
    assert_same({n: got[n] for n in ref}, ref)


# ---- the emulation catches what a missing wait does --------------------------------------

def test_a_module_that_does_not_wait_for_its_weights_computes_with_nan(tmp_path, monkeypatch):
    monkeypatch.setattr(device_lanes.HostEmulatedLanes, "use_on_compute",
                        lambda self, t, event: None)
    _, losses, _, _, _ = train_on_device(config(3, "nvme", tmp_path), steps=2, delay_s=0.02)
    assert any(l != l for l in losses), "a missing H2D wait went unnoticed"


def test_a_gradient_read_before_its_copy_landed_gives_other_numbers(tmp_path, monkeypatch):
    ref, _, _, _ = train(config(2, tmp=tmp_path), steps=3)
    real = device_lanes.HostEmulatedLanes.synchronize

    def too_early(self, event):
        if threading.current_thread().name != "strata-grad-d2h":
            real(self, event)  # only the gradient watcher skips its wait

    monkeypatch.setattr(device_lanes.HostEmulatedLanes, "synchronize", too_early)
    got, _, _, _, _ = train_on_device(config(3, "cpu", tmp_path), steps=3, delay_s=0.01)
    assert any(not torch.equal(got[n], ref[n]) for n in ref), "a missing D2H wait went unnoticed"


def test_an_h2d_copy_whose_host_memory_was_let_go_fails():
    lanes = device_lanes.HostEmulatedLanes(delay_s=0.05)
    try:
        dst = lanes.empty(16, torch.float32)
        assert torch.isnan(dst).all()
        src = torch.ones(16)
        ev = lanes.h2d(dst, src)
        del src
        gc.collect()
        with pytest.raises(RuntimeError, match="let go before the copy ran"):
            lanes.synchronize(ev)
    finally:
        lanes.close()


def test_a_d2h_copy_waits_for_the_compute_event_and_device_bytes_are_counted():
    lanes = device_lanes.HostEmulatedLanes(delay_s=0.0)
    try:
        dev = lanes.empty(1000, torch.float32)
        assert lanes.stats()["device_weight_bytes"] == 4000
        after = device_lanes._EmuEvent()
        host = torch.zeros(1000)
        ev = lanes.d2h(host, dev.fill_(3.0), after)
        assert not lanes.query(ev)  # held by the compute event
        after.flag.set()
        lanes.synchronize(ev)
        assert torch.all(host == 3.0)
        del dev
        gc.collect()
        assert lanes.stats()["device_weight_bytes"] == 0
        assert lanes.stats()["device_weight_peak_bytes"] == 4000
    finally:
        lanes.close()


def test_grad_lane_bounds_its_host_buffers_and_reraises_a_landing_error():
    lanes = device_lanes.HostEmulatedLanes(delay_s=0.01)
    lane = device_lanes.GradLane(lanes, buffers=2)
    try:
        got = []
        for k in range(6):
            lane.submit(torch.full((100,), float(k)), lambda h, k=k: got.append((k, h.clone())))
        lane.drain()
        assert [k for k, _ in got] == list(range(6))
        assert all(torch.all(h == k) for k, h in got)
        assert lane._count <= 2  # never more host buffers than asked for

        def boom(_):
            raise ValueError("landing failed")

        lane.submit(torch.ones(10), boom)
        with pytest.raises(ValueError, match="landing failed"):
            lane.drain()
    finally:
        lane.close()
        lanes.close()


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs a CUDA device: CudaLanes (streams, events, record_stream) run "
                           "in the GPU issue; the emulated tests above cover the data flow")
@pytest.mark.parametrize("device", ["cpu", "nvme"])
def test_cuda_lanes_match_stage2_on_the_same_gpu(tmp_path, device):
    def run(cfg):
        model = build(cfg).cuda()  # after zero.Init: placeholders and persistent parameters
        engine, _, _, _ = strata.initialize(model=model, config=cfg)
        for x, y in data(6 * cfg["gradient_accumulation_steps"]):
            engine.backward(engine(x.cuda(), y.cuda()))
            engine.step()
        final = {}
        for n, p in model.named_parameters():
            with strata.zero.GatheredParameters([p]):
                final[n] = p.detach().cpu().clone()
        lanes = engine.param_tier.lanes if engine.param_tier is not None else None
        engine.close()
        return final, lanes

    ref, _ = run(config(2, tmp=tmp_path))
    got, lanes = run(config(3, device, tmp_path))
    assert isinstance(lanes, device_lanes.CudaLanes)
    assert lanes.stats()["h2d_copies"] > 0 and lanes.stats()["d2h_copies"] > 0
    assert_same(got, ref)
