"""Real-world config shapes (DeepSpeed docs, Hugging Face integration, LoRA recipes; files in
tests/data/configs/) through strata.initialize: the batch rule, the optimizer and schedule built,
the precision, where the state lives, and exactly which warnings are given."""

import argparse
import json
import logging
import os

import pytest
import torch
import torch.nn as nn

import strata
import strata.config

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data",
                    "configs")


class Probe(nn.Module):
    """Arithmetic in fp32 whatever the parameter dtype (CPU torch has few fp16 kernels)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(16, 8) * 0.1)
        self.b = nn.Parameter(torch.zeros(8))

    def forward(self, x):
        return (x @ self.w.float() + self.b.float()).pow(2).mean()


HF_ARGS = dict(learning_rate=1e-3, adam_beta1=0.9, adam_beta2=0.98, adam_epsilon=1e-6,
               weight_decay=0.01, per_device_train_batch_size=4, gradient_accumulation_steps=2,
               max_grad_norm=1.0, warmup_steps=10, max_steps=100)

# file: (device, stage, (train, micro, accumulation), optimizer class, schedule class,
#        parameter dtype, warnings that must appear (one substring per warning), tier)
CASES = {
    "adagrad_monitors.json": ("none", 0, (64, 32, 2), "OffloadAdagrad", None, torch.float32,
                              ["some_future_deepspeed_key: unknown key", "activation_checkpointing",
                               "tensorboard"], "dram"),
    "bf16.json": ("cpu", 1, (32, 8, 4), "DeepSpeedCPUAdam", None, torch.bfloat16, [], "dram"),
    "ds_docs_bert_warmuplr.json": ("none", 0, (4096, 64, 64), "FusedAdam", "WarmupLR",
                                   torch.float16, ["fp16.hysteresis: not used at ZeRO stage 0"],
                                   "dram"),
    "ds_docs_getting_started.json": ("none", 1, (8, 8, 1), "FusedAdam", None, torch.float16,
                                     ["zero_optimization: the form true/false is deprecated"],
                                     "dram"),
    "ds_docs_zero_infinity_nvme.json": ("nvme", 3, (16, 16, 1), "DeepSpeedCPUAdam", None,
                                        torch.float16,
                                        ["aio.thread_count is deprecated", "reduce_bucket_size"],
                                        "nvme"),
    "ds_docs_zero_offload_cpu.json": ("cpu", 2, (1, 1, 1), None, None, torch.float32,
                                      ["overlap_comm"], None),
    "fp16.json": ("cpu", 2, (32, 8, 4), "DeepSpeedCPUAdam", None, torch.float16, [], "dram"),
    "hf_zero2_auto.json": ("cpu", 2, (8, 4, 2), "DeepSpeedCPUAdam", "WarmupLR", torch.float32,
                           ["allgather_bucket_size"], "dram"),
    "hf_zero3_auto.json": ("nvme", 3, (8, 4, 2), "DeepSpeedCPUAdam", "WarmupDecayLR", torch.float32,
                           ["overlap_comm"], "nvme"),
    "legacy_aliases.json": ("cpu", 2, (8, 8, 1), None, None, torch.bfloat16,
                            ["bfloat16 is deprecated", "cpu_offload is deprecated",
                             "cpu_offload_use_pin_memory is deprecated",
                             "aio.thread_count is deprecated"], None),
    "lora.json": ("cpu", 2, (16, 1, 16), "DeepSpeedCPUAdam", "WarmupDecayLR", torch.bfloat16,
                  ["allgather_partitions"], "dram"),
    "strata_cxl.json": ("cxl", 0, (4, 4, 1), "OffloadSGD", None, torch.float32, [], "cxl"),
    "zero2_cpu.json": ("cpu", 2, (8, 4, 2), "DeepSpeedCPUAdam", "WarmupLR", torch.float32, [],
                       "dram"),
    "zero2_nvme.json": ("nvme", 2, (16, 4, 4), "DeepSpeedCPUAdam", None, torch.float32, [], "nvme"),
    "zero3_nvme.json": ("nvme", 3, (4, 2, 2), "DeepSpeedCPUAdam", "WarmupCosineLR", torch.bfloat16,
                        [], "nvme"),
    "python/sgd_cosine_nvme.json": ("nvme", 1, (8, 4, 2), "OffloadSGD", "WarmupCosineLR",
                                    torch.float32, [], "nvme"),
    "python/hf_zero2_bf16_cosine.json": ("cpu", 2, (8, 4, 2), "DeepSpeedCPUAdam", "WarmupCosineLR",
                                         torch.float32, ["torch_adam", "round_robin_gradients"],
                                         "dram"),
}


def test_every_config_file_is_in_the_table():
    files = {f for f in os.listdir(DATA) if f.endswith(".json")}
    files |= {f"python/{f}" for f in os.listdir(os.path.join(DATA, "python"))
              if f.endswith(".json")}
    assert files == set(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_real_config(name, tmp_path, caplog):
    device, stage, batch, opt_class, sched_class, dtype, warns, tier = CASES[name]
    with open(os.path.join(DATA, name)) as f:
        cfg = json.load(f)
    off = cfg.get("zero_optimization", {})
    for section in ("offload_optimizer", "offload_param"):
        if isinstance(off, dict) and "nvme_path" in off.get(section, {}):
            off[section]["nvme_path"] = str(tmp_path)  # /local_nvme is not here
    args = argparse.Namespace(local_rank=-1, deepspeed_config=None,
                              **(HF_ARGS if name.startswith(("hf_", "python/hf_")) else {}))
    strata.config._warned.clear()
    model = Probe()
    with caplog.at_level(logging.WARNING, logger="strata"):
        if device == "cxl":
            # No CXL memory here: the plan still says where the state would go, and building
            # the engine says why it cannot.
            filled = strata.load_config(cfg)
            _, plan = strata._C.build_plan(json.dumps(filled), [(136, "float32", 0)], [2])
            assert [t["tier"] for t in json.loads(plan)["tiers"]] == ["cxl"]
            with pytest.raises(strata.ConfigError, match="strata.cxl_nodes: NUMA node 2 does not exist"):
                strata.initialize(args=args, model=model, config=cfg)
            engine = None
        else:
            engine, opt, _, sched = strata.initialize(args=args, model=model, config=cfg)
    messages = [r.getMessage() for r in caplog.records if r.name == "strata"]
    for w in warns:
        assert sum(w in m for m in messages) == 1, (w, messages)
    assert len(messages) == len(warns), messages
    if engine is None:
        return
    try:
        c = engine.config
        assert c["zero_optimization"]["offload_optimizer"]["device"] == device
        assert engine.zero_optimization_stage() == stage
        assert (engine.train_batch_size(), engine.train_micro_batch_size_per_gpu(),
                engine.gradient_accumulation_steps()) == batch
        assert model.w.dtype == dtype
        assert (type(opt).__name__ if opt is not None else None) == opt_class
        assert (type(sched).__name__ if sched is not None else None) == sched_class
        if opt is None:
            return
        tiers = {sg["tier"] for sg in opt._b.engine.subgroups()}
        assert tiers == {tier}
        accum = (c.get("data_types") or {}).get("grad_accum_dtype")
        if accum:
            assert {sg["grad_dtype"] for sg in opt._b.engine.subgroups()} == {accum}
        if tier == "nvme":
            assert os.path.dirname(engine.stats()["swap_file_path"]) == str(tmp_path)
        w0 = model.w.detach().float().clone()
        x = torch.randn(engine.train_micro_batch_size_per_gpu(), 16)
        lrs = []
        for _ in range(3 * engine.gradient_accumulation_steps()):
            if engine.is_gradient_accumulation_boundary():
                lrs.append(engine.get_lr()[0])
            engine.backward(engine(x))
            engine.step()
        # fp16 with a large initial scale (2^32 in the ZeRO-Infinity example) skips overflowed
        # steps; the others update.
        applied = engine.global_steps - engine.skipped_steps
        assert engine.global_steps == 3 and opt._b.engine.step_count(0) == applied
        if dtype == torch.float16 and c["fp16"]["initial_scale_power"] >= 24:
            assert engine.skipped_steps > 0
        moved = not torch.equal(model.w.detach().float(), w0)
        assert moved == (applied > 0 and max(lrs) > 0), (lrs, applied)
    finally:
        engine.close()
