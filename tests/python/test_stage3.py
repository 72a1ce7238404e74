"""ZeRO stage 3 in one process (strata.param_tier, strata.zero): the model's weights on the param
tier (cpu, nvme), fetched per module; gradients streamed to the optimizer.

- Same numbers: a GPT-style model (8 layers, embeddings, LayerNorm, tied head) trained with
  stage 3 + offload_param cpu / nvme ends bit-identical to stage 2, in fp32 and bf16, with
  gradient accumulation 2, clipping 1.0 and WarmupLR, overlap on and off.
- Bytes and residency: the weights are fetched per module and released; what is resident
  outside a module's window is the persistent parameters only; each stage3_* key has its
  effect (window size, prefetch, persistence).
- Bad input: nvme without nvme_path, buffer_size below a parameter, max_live below a module,
  a model built outside zero.Init (works, with a note).
"""

import copy
import logging
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import strata
from strata import param_tier as pt


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 4 * d)
        self.out = nn.Linear(4 * d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        att = (q @ k.transpose(1, 2)) / math.sqrt(d)
        mask = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        att = att.masked_fill(~mask, float("-inf")).softmax(-1)
        x = x + self.proj(att @ v)
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, vocab=96, d=32, layers=8, ctx=16):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(ctx, d)
        self.blocks = nn.ModuleList([Block(d) for _ in range(layers)])
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.wte.weight  # tied
        self.apply(self._init)

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, 0.05)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)

    def forward(self, idx, targets):
        t = idx.shape[1]
        x = self.wte(idx) + self.wpe(torch.arange(t, device=idx.device))
        for b in self.blocks:
            x = b(x)
        logits = self.head(self.ln_f(x))
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))


def data(n, seed=0, batch=4, t=16, vocab=96):
    """Two batches, repeated: a loss that goes down."""
    g = torch.Generator().manual_seed(seed)
    two = [(torch.randint(0, vocab, (batch, t), generator=g),
            torch.randint(0, vocab, (batch, t), generator=g)) for _ in range(2)]
    return [two[k % 2] for k in range(n)]


def config(stage, param_device="none", tmp=None, *, bf16=False, overlap=True, clip=1.0, gas=2,
           **zero):
    z = {"stage": stage, "sub_group_size": 20000,
         "offload_optimizer": {"device": "nvme", "nvme_path": str(tmp / "opt"),
                               "buffer_count": 3},
         # Every weight matrix on the tier; LayerNorm and biases persist.
         "stage3_param_persistence_threshold": 200}
    if stage == 3:
        z["offload_param"] = {"device": param_device}
        if param_device == "nvme":
            z["offload_param"].update(nvme_path=str(tmp / "param"), buffer_count=4,
                                      buffer_size=20000)
    z.update(zero)
    return {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": gas,
        "gradient_clipping": clip,
        "bf16": {"enabled": bf16},
        "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "betas": [0.9, 0.95],
                                                   "eps": 1e-8, "weight_decay": 0.01}},
        "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0,
                                                     "warmup_max_lr": 3e-3,
                                                     "warmup_num_steps": 5}},
        "zero_optimization": z,
        "aio": {"block_size": 65536, "queue_depth": 8},
        "strata": {"overlap_backward": overlap, "threads": 2, "progress": "off"},
    }


def build(cfg, *, under_init=True, seed=0):
    torch.manual_seed(seed)
    if under_init:
        dtype = torch.bfloat16 if cfg["bf16"]["enabled"] else None
        with strata.zero.Init(config_dict_or_path=cfg, dtype=dtype):
            return GPT()
    return GPT()


def train(cfg, steps=20, under_init=True, norms=None):
    model = build(cfg, under_init=under_init)
    engine, _, _, _ = strata.initialize(model=model, config=cfg,
                                        model_parameters=model.parameters())
    losses = []
    for x, y in data(steps * cfg["gradient_accumulation_steps"]):
        loss = engine(x, y)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
        if norms is not None and engine.is_gradient_accumulation_boundary():
            norms.append(engine.get_global_grad_norm())
    final = {}
    for n, p in model.named_parameters():
        with strata.zero.GatheredParameters([p]):
            final[n] = p.detach().clone()
    stats = engine.param_tier.stats() if engine.param_tier is not None else {}
    engine.close()
    return final, losses, stats, engine


def saved_after(cfg, batches, path):
    """An engine over a model built under zero.Init, trained on ``batches`` and checkpointed
    to ``path``; returned open."""
    model = build(cfg)
    engine, _, _, _ = strata.initialize(model=model, config=cfg)
    for x, y in batches:
        engine.backward(engine(x, y))
        engine.step()
    engine.save_checkpoint(str(path))
    return engine


def assert_same(a, b):
    assert a.keys() == b.keys()
    for n in a:
        assert torch.equal(a[n], b[n]), n


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("overlap", [True, False], ids=["overlap", "no-overlap"])
def test_stage3_cpu_and_nvme_match_stage2_bit_for_bit(tmp_path, bf16, overlap):
    ref, ref_losses, _, _ = train(config(2, tmp=tmp_path, bf16=bf16, overlap=overlap))
    for device in ("cpu", "nvme"):
        got, losses, stats, _ = train(config(3, device, tmp_path, bf16=bf16, overlap=overlap))
        assert losses == ref_losses, device
        assert_same(got, ref)
        if device == "nvme":
            # The window fetched weights per module (forward and backward) and released them.
            assert stats["fetches"] > 0 and stats["records"] > 0
            assert stats["window_peak_elements"] <= stats["window_limit_elements"]
    assert ref_losses[-1] < ref_losses[0]


def test_stage3_eager_overlap_without_clipping_matches_stage2(tmp_path):
    """No clipping, no accumulation: updates run during backward (eager) and each sub-group's
    gradients are released right after its update; the reported norm still covers all of
    them (gathered as they arrived, not read back from the released arena)."""
    ref_norms, norms = [], []
    ref, _, _, _ = train(config(2, tmp=tmp_path, clip=0.0, gas=1), steps=8, norms=ref_norms)
    got, _, stats, _ = train(config(3, "nvme", tmp_path, clip=0.0, gas=1), steps=8, norms=norms)
    assert_same(got, ref)
    assert len(norms) == 8 and all(n > 0 for n in ref_norms)
    torch.testing.assert_close(torch.tensor(norms), torch.tensor(ref_norms), rtol=1e-6, atol=0)


def test_weights_are_released_outside_their_module_and_carry_deepspeed_attributes(tmp_path):
    cfg = config(3, "nvme", tmp_path)
    model = build(cfg)
    big = [p for p in model.parameters() if p.ds_numel >= 200]
    small = [p for p in model.parameters() if p.ds_numel < 200]
    assert big and small
    for p in big:
        assert p.ds_status == pt.NOT_AVAILABLE and p.numel() == 0 and not p.ds_persist
        assert p.ds_numel == math.prod(p.ds_shape)
    for p in small:
        assert p.ds_persist and p.numel() == p.ds_numel
    seen = {}

    def spy(m, inp, out):
        seen[m] = [p.ds_status for p in m.parameters(recurse=False) if not p.ds_persist]

    # Registered before the window's hooks: runs inside the module's window.
    hooks = [m.register_forward_hook(spy) for m in model.modules()]
    engine, _, _, _ = strata.initialize(model=model, config=cfg)
    for x, y in data(2):
        engine.backward(engine(x, y))
        engine.step()
    for h in hooks:
        h.remove()
    # Inside each module's forward its own weights were resident...
    assert all(s == pt.AVAILABLE for v in seen.values() for s in v)
    # ...and outside, after the step, none is.
    assert all(p.ds_status == pt.NOT_AVAILABLE for p in big)
    st = engine.param_tier.stats()
    assert st["window_elements"] == 0
    engine.close()


def test_max_live_parameters_bounds_the_window_and_too_small_names_the_module(tmp_path):
    big = 96 * 32  # the embedding (and tied head): the largest single module's weights
    cfg = config(3, "nvme", tmp_path, stage3_max_live_parameters=big + 4 * 32 * 32 * 4,
                 stage3_max_reuse_distance=0)
    _, _, stats, _ = train(cfg, steps=2)
    assert stats["window_peak_elements"] <= big + 4 * 32 * 32 * 4
    cfg = config(3, "nvme", tmp_path, stage3_max_live_parameters=1000)
    with pytest.raises(ValueError, match=r"module wte .*needs 3072 elements.*"
                                         r"stage3_max_live_parameters"):
        train(cfg, steps=1)


def test_prefetch_bucket_fetches_ahead_after_the_first_step(tmp_path):
    _, _, on, _ = train(config(3, "nvme", tmp_path, stage3_prefetch_bucket_size=50000), steps=3)
    _, _, off, _ = train(config(3, "nvme", tmp_path, stage3_prefetch_bucket_size=0), steps=3)
    assert on["prefetches"] > 0
    assert off["prefetches"] == 0


def test_trace_has_weight_lanes_and_the_fetches_overlap_compute(tmp_path):
    """strata.trace at stage 3 (nvme): lanes for the param tier's reads and writes beside
    forward and backward; prefetched reads run while a forward or backward is running; the
    report draws them."""
    import json

    from strata import report

    cfg = config(3, "nvme", tmp_path, clip=0.0, gas=1, stage3_prefetch_bucket_size=50000)
    cfg["strata"]["trace"] = {"path": str(tmp_path / "trace.json"), "steps": 2}
    train(cfg, steps=3)
    events, _ = report.load_trace(tmp_path / "trace.json")
    names, lanes = report.lanes_of(events)
    for lane in ("forward", "backward", "weight read", "weight write", "NVMe read"):
        assert lane in lanes, lanes
    xs = [e for e in events if e.get("ph") == "X"]
    by = {}
    for e in xs:
        by.setdefault(names[e["tid"]], []).append((e["ts"], e["ts"] + e["dur"],
                                                    e["args"]["step"]))
    steps = {s for _, _, s in by["step"]}
    # Each lane's events belong to the kept steps; reads of a step's weights (forward
    # and backward) are at least twice the tier's records.
    assert {s for _, _, s in by["weight read"]} <= steps
    # Every kept step has weight reads that ran while its forward or backward ran (how
    # many depends on timing: prefetches issued at a step's end run before the next forward).
    compute = by["forward"] + by["backward"]
    for step in steps:
        assert any(a < r[1] and r[0] < b for r in by["weight read"] if r[2] == step
                   for a, b, _ in compute), step
    report.render(tmp_path / "trace.json", tmp_path / "step.png")
    assert (tmp_path / "step.png").stat().st_size > 0


def test_persistence_threshold_keeps_small_parameters_resident(tmp_path):
    cfg = config(3, "nvme", tmp_path, stage3_param_persistence_threshold=10 ** 9)
    model = build(cfg)
    assert all(p.ds_persist and p.numel() > 0 for p in model.parameters())
    cfg = config(3, "nvme", tmp_path, stage3_param_persistence_threshold=0)
    model = build(cfg)
    assert not any(p.ds_persist for p in model.parameters())
    cfg = config(3, "nvme", tmp_path, stage3_param_persistence_threshold=200,
                 stage3_model_persistence_threshold=100)
    model = build(cfg)
    persisted = sum(p.numel() for p in model.parameters() if p.ds_persist)
    assert persisted <= 100


def test_bad_input_is_refused_with_the_key_and_the_size(tmp_path):
    cfg = config(3, "nvme", tmp_path)
    del cfg["zero_optimization"]["offload_param"]["nvme_path"]
    with pytest.raises(ValueError, match="offload_param.nvme_path: missing"):
        build(cfg)
    cfg = config(3, "nvme", tmp_path)
    cfg["zero_optimization"]["offload_param"]["buffer_size"] = 1000
    with pytest.raises(ValueError, match=r"has 3072 elements, more than .*buffer_size \(1000\); "
                                         r"set buffer_size to at least 3072"):
        build(cfg)


def test_model_built_outside_init_is_moved_to_the_tier_with_a_note(tmp_path, caplog):
    cfg = config(3, "nvme", tmp_path)
    ref, _, _, _ = train(cfg, steps=3)
    strata.config._warned.clear()
    with caplog.at_level(logging.WARNING, logger="strata"):
        got, _, _, _ = train(cfg, steps=3, under_init=False)
    assert "built outside strata.zero.Init" in caplog.text
    assert_same(got, ref)


def test_gathered_parameters_with_modifier_writes_back_to_tier_and_masters(tmp_path):
    cfg = config(3, "nvme", tmp_path, clip=0.0, gas=1)
    model = build(cfg)
    engine, _, _, _ = strata.initialize(model=model, config=cfg)
    w = model.blocks[0].fc.weight
    with strata.zero.GatheredParameters([w], modifier_rank=0):
        assert w.numel() == w.ds_numel
        with torch.no_grad():
            w.fill_(0.5)
    assert w.ds_status == pt.NOT_AVAILABLE
    with strata.zero.GatheredParameters([w]):
        assert torch.all(w == 0.5)
    assert_master_took(engine, w, 0.5)


def assert_master_took(engine, w, value):
    """The fp32 master took a change written back to ``w``: with lr 0 a step leaves ``w`` at
    ``value`` (a master left behind would overwrite it with the old weights)."""
    for g in engine.optimizer.param_groups:
        g["lr"] = 0.0
    engine.lr_scheduler = None
    x, y = data(1)[0]
    engine.backward(engine(x, y))
    engine.step()
    with strata.zero.GatheredParameters([w]):
        assert torch.all(w == value)
    engine.close()


def test_stage2_with_offload_param_warns_and_leaves_the_weights(tmp_path, caplog):
    cfg = config(2, tmp=tmp_path)
    cfg["zero_optimization"]["offload_param"] = {"device": "cpu"}
    strata.config._warned.clear()
    with caplog.at_level(logging.WARNING, logger="strata"):
        model = build(cfg, under_init=False)
        engine, _, _, _ = strata.initialize(model=model, config=cfg)
    assert "is not acted on at zero_optimization.stage 2" in caplog.text
    assert engine.param_tier is None
    assert all(pt.tier_of(p) is None for p in model.parameters())
    engine.close()


def test_checkpoint_with_weights_on_nvme_resumes_bit_identically(tmp_path):
    """save_checkpoint streams the tier's weights into the model file one parameter at a
    time; a fresh engine (built under zero.Init) loads them onto its own tier and continues
    exactly as the first."""
    cfg = config(3, "nvme", tmp_path)
    batches = data(12)
    engine = saved_after(cfg, batches[:6], tmp_path / "ck")
    model2 = build(cfg, seed=1)  # other initial weights: the load must replace them
    engine2, _, _, _ = strata.initialize(model=model2, config=cfg)
    engine2.load_checkpoint(str(tmp_path / "ck"))
    for e in (engine, engine2):
        for x, y in batches[6:]:
            e.backward(e(x, y))
            e.step()
    a, b = engine.module_state_dict(), engine2.module_state_dict()
    assert a.keys() == b.keys()
    for n in a:
        assert a[n].shape == b[n].shape and torch.equal(a[n], b[n]), n
    # save_16bit_model follows DeepSpeed's gather switch.
    assert engine.save_16bit_model(str(tmp_path / "m16")) is False
    engine.close()
    engine2.close()
    cfg["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True
    model3 = build(cfg)
    engine3, _, _, _ = strata.initialize(model=model3, config=cfg)
    assert engine3.save_16bit_model(str(tmp_path / "m16")) is True
    sd = torch.load(str(tmp_path / "m16" / "pytorch_model.bin"))
    assert sd["blocks.0.fc.weight"].shape == (128, 32)
    engine3.close()


def test_reuse_distance_keeps_weights_between_forward_and_backward(tmp_path):
    """With room in the window, weights used again within stage3_max_reuse_distance elements
    of fetches stay resident (fewer fetches); with 0 every use fetches."""
    kw = dict(stage3_max_live_parameters=10 ** 6)
    cfg_keep = config(3, "nvme", tmp_path, stage3_max_reuse_distance=10 ** 9, **kw)
    cfg_drop = config(3, "nvme", tmp_path, stage3_max_reuse_distance=0, **kw)
    for c in (cfg_keep, cfg_drop):
        c["zero_optimization"]["offload_param"]["buffer_count"] = 64
    got_keep, _, keep, _ = train(cfg_keep, steps=3)
    got_drop, _, drop, _ = train(cfg_drop, steps=3)
    assert keep["fetches"] < drop["fetches"], (keep, drop)
    assert_same(got_keep, got_drop)


def test_plan_shows_the_param_tier_and_the_window(tmp_path):
    import json

    cfg = strata.load_config(config(3, "nvme", tmp_path, stage3_max_live_parameters=50000))
    _, plan = strata._C.build_plan(cfg.handle, [(10 ** 6, "float32", 0)], [3])
    pt = json.loads(plan)["param_tier"]
    assert pt["device"] == "nvme"
    assert pt["window_elements"] == 50000  # min(max_live, buffer_count x buffer_size = 80000)
    assert pt["bytes"] >= 4 * 10 ** 6
    assert pt["peak_host_bytes_overlapped"] < pt["peak_host_bytes_exact"]


def test_outputs_changed_in_place_and_tuple_outputs_work(tmp_path):
    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(32, 32)
            self.b = nn.Linear(32, 32)

        def forward(self, x):
            return self.a(x), self.b(x)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.pair = Pair()
            self.act = nn.ReLU(inplace=True)
            self.out = nn.Linear(32, 1)

        def forward(self, x, y):
            a, b = self.pair(x)
            h = self.act(self.pair.a(x))  # in place on a module's output
            return F.mse_loss(self.out(h + a + b).squeeze(-1), y)

    def run(stage, device):
        cfg = config(stage, device, tmp_path, clip=0.0, gas=1)
        torch.manual_seed(0)
        with strata.zero.Init(config_dict_or_path=cfg):
            model = Net()
        engine, _, _, _ = strata.initialize(model=model, config=cfg)
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(8, 32, generator=g), torch.randn(8, generator=g)
        for _ in range(3):
            engine.backward(engine(x, y))
            engine.step()
        sd = engine.module_state_dict()
        engine.close()
        return sd

    ref = run(2, "none")
    got = run(3, "nvme")
    for n in ref:
        assert torch.equal(ref[n], got[n]), n
