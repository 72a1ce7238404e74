"""One rank of the two-process test in test_deepspeed_distributed.py (gloo on CPU).

Each rank trains on its own half of every global batch; gradients are averaged across ranks, so
the weights must equal a single process training on the whole batch, and be the same on both
ranks. Both ranks then save a checkpoint (ZeRO stage 2: each writes its shard of the optimizer
state; rank 0 the rest), which one process loads.
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "..", "python"))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

import strata as deepspeed  # noqa: E402


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))


def global_batch(step):
    g = torch.Generator().manual_seed(step)
    return torch.randn(8, 8, generator=g), torch.randint(0, 3, (8,), generator=g)


CONFIG = {
    "train_micro_batch_size_per_gpu": 4,
    "gradient_accumulation_steps": 1,
    "gradient_clipping": 0.5,
    "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.01}},
    "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}},
}


def main():
    out, ckpt = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    deepspeed.init_distributed()
    rank, world = deepspeed.comm.get_rank(), deepspeed.comm.get_world_size()
    model = make_model()
    engine, *_ = deepspeed.initialize(model=model, config=CONFIG)
    assert engine.train_batch_size() == 4 * world
    norms = []
    for step in range(5):
        x, y = global_batch(step)
        xs, ys = x[rank * 4:(rank + 1) * 4], y[rank * 4:(rank + 1) * 4]
        engine.backward(nn.functional.cross_entropy(engine(xs), ys))
        engine.step()
        norms.append(engine.get_global_grad_norm())
    engine.save_checkpoint(ckpt)
    torch.save({"model": model.state_dict(), "norms": norms}, f"{out}.{rank}")
    engine.close()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
