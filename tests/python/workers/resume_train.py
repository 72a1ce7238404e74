"""Training subprocess for the kill-and-resume tests (tests/python/test_checkpoint_resume.py).

Trains a small model with dropout to --steps optimizer steps (gradient accumulation 2, NVMe
state, WarmupLR, clipping), saving a checkpoint after every step, resuming from the latest one
at start. Batches depend only on the step index, dropout on the RNG state the checkpoints
carry, so an interrupted and resumed run must end bit-identical to an uninterrupted one.
STRATA_TEST_KILL_AT (read by strata) makes it SIGKILL itself at a chosen point.
"""

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "..", "python"))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

import strata as deepspeed  # noqa: E402


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(64, 32)
        self.body = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Dropout(0.3), nn.Linear(64, 64),
                                  nn.Tanh(), nn.Dropout(0.3))
        self.head = nn.Linear(64, 10)

    def forward(self, x, y):
        return nn.functional.cross_entropy(self.head(self.body(self.emb(x).mean(1))), y)


def batch(step, micro):
    g = torch.Generator().manual_seed(1000 * step + micro)
    return torch.randint(0, 64, (8, 6), generator=g), torch.randint(0, 10, (8,), generator=g)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--swap", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = Net()
    config = {
        "train_micro_batch_size_per_gpu": 8,
        "gradient_accumulation_steps": 2,
        "gradient_clipping": 0.5,
        "steps_per_print": 1000,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.01}},
        "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 4,
                                                     "warmup_type": "linear"}},
        "zero_optimization": {"stage": 2, "sub_group_size": 2048, "offload_optimizer": {
            "device": "nvme", "nvme_path": args.swap, "buffer_count": 2}},
        "aio": {"block_size": 65536, "queue_depth": 8},
    }
    engine, *_ = deepspeed.initialize(model=model, config=config)
    path, _ = engine.load_checkpoint(args.ckpt)
    print(f"resumed from step {engine.global_steps if path else 0}", flush=True)
    while engine.global_steps < args.steps:
        step = engine.global_steps
        for micro in range(engine.gradient_accumulation_steps()):
            loss = engine(*batch(step, micro))
            engine.backward(loss)
            engine.step()
        engine.save_checkpoint(args.ckpt)
    torch.save({"model": engine.module.state_dict(), "optimizer": engine.optimizer.state_dict(),
                "rng": torch.get_rng_state(), "steps": engine.global_steps}, args.out)
    engine.close()


if __name__ == "__main__":
    main()
