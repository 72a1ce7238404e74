"""examples/ds_train.py, a DeepSpeed script whose only change is `import strata as deepspeed`,
under ZeRO-2 CPU offload, ZeRO-2 NVMe offload, ZeRO-3 NVMe offload (weights in the model's
memory: offload_param none; gradients streamed), bf16 and a
Hugging Face-style config with "auto" values."""

import json
import logging
import os

import pytest

import strata.config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = os.path.join(ROOT, "examples", "configs")


def config_file(name, tmp_path, swap_dir):
    with open(os.path.join(CONFIGS, name)) as f:
        cfg = json.load(f)
    off = cfg["zero_optimization"]["offload_optimizer"]
    if off.get("device") == "nvme":
        off["nvme_path"] = str(swap_dir)  # the example's relative strata_swap, on tmp disk
    path = tmp_path / name
    path.write_text(json.dumps(cfg))
    return str(path)


@pytest.mark.parametrize("name,dtype,nvme,warnings", [
    ("ds_zero2_cpu.json", "torch.float32", False, []),
    ("ds_zero2_nvme.json", "torch.float32", True, []),
    ("ds_zero3_nvme.json", "torch.float32", True, []),
    ("ds_bf16.json", "torch.bfloat16", False, []),
    ("ds_hf_auto.json", "torch.float32", False, ["overlap_comm"]),
])
def test_example_runs_unchanged(name, dtype, nvme, warnings, tmp_path, swap_dir, caplog):
    import ds_train

    strata.config._warned.clear()
    cfg = config_file(name, tmp_path, swap_dir)
    with caplog.at_level(logging.WARNING, logger="strata"):
        summary = ds_train.run(["--deepspeed", "--deepspeed_config", cfg, "--steps", "6",
                                "--n_layer", "1", "--d_model", "48",
                                "--save_dir", str(tmp_path / "ckpt")])
    messages = [r.getMessage() for r in caplog.records if r.name == "strata"]
    assert len(messages) == len(warnings), messages
    for w in warnings:
        assert any(w in m for m in messages), messages
    assert summary["steps"] == 6 and summary["micro_steps"] == 12  # accumulation 2
    assert summary["param_dtype"] == dtype
    assert summary["same_weights_after_load"] and summary["same_weights_after_next_step"]
    after_a, after_b = summary["losses_after_load"]
    assert after_a == after_b
    assert summary["loaded_from"].endswith(os.path.join("global_step6", "mp_rank_00_model_states.pt"))
    assert (summary["swap_file_bytes"] > 0) == nvme
    losses = summary["losses"]
    assert sum(losses[-4:]) < sum(losses[:4]), "the loss goes down"
    assert not [f for f in os.listdir(swap_dir) if f.endswith(".swap")], "swap files removed"
