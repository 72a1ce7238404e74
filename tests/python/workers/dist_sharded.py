"""One rank of the data-parallel tests (tests/python/test_distributed*.py), gloo on CPU.

    dist_sharded.py SPEC.json OUT

Runs the scenarios of SPEC one after the other in this process (one process start for many
runs) and writes this rank's results to ``OUT.<rank>.pt``: per scenario the model's weights,
the global gradient norms, the optimizer's stats (this rank's pool, swap file, gradient
buffers, collectives), and what the scenario asked to check. Each rank trains on its rows of
every global batch (``global_batch``), so the weights must equal one process training on the
whole batch.

A scenario: ``{"name", "config", "steps", "gas", "model", "save": {"dir", "at"}, "load": dir,
"probe_grads": bool, "emulate_reduce_scatter": bool, "overflow_at": [step, rank],
"unfreeze_at": step, "client": "strata" | "torch", "save16": dir}``.
"""

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "..", "python"))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

import strata as deepspeed  # noqa: E402
from strata import comm  # noqa: E402

GLOBAL_ROWS = 8  # rows of one global micro-batch (all ranks together)


class CastMLP(nn.Module):
    """Arithmetic in fp32 whatever the parameters' dtype (CPU torch 1.13 has no fp16 matmul)."""

    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(16, 64)
        self.l2 = nn.Linear(64, 4)

    def forward(self, x):
        h = torch.tanh(nn.functional.linear(x.float(), self.l1.weight.float(),
                                            self.l1.bias.float()))
        return nn.functional.linear(h, self.l2.weight.float(), self.l2.bias.float())


def make_model(kind="mlp"):
    torch.manual_seed(0)
    if kind == "cast":
        return CastMLP()
    if kind == "wide":  # enough state for the per-rank memory figures
        return nn.Sequential(nn.Linear(32, 512), nn.Tanh(), nn.Linear(512, 256), nn.Tanh(),
                             nn.Linear(256, 4))
    return nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(),
                         nn.Linear(64, 4))


def in_features(kind="mlp"):
    return 32 if kind == "wide" else 16


def global_batch(step, micro, kind="mlp"):
    g = torch.Generator().manual_seed(1000 * step + micro)
    return (torch.randn(GLOBAL_ROWS, in_features(kind), generator=g),
            torch.randint(0, 4, (GLOBAL_ROWS,), generator=g))


def rows(x, rank, world):
    n = GLOBAL_ROWS // world
    return x[rank * n:(rank + 1) * n]


def train(engine, model, kind, first, last, gas, rank, world, overflow_at=None,
          unfreeze_at=None):
    norms = []
    for step in range(first, last):
        if unfreeze_at is not None and step == unfreeze_at:
            for p in model[0].parameters():
                p.requires_grad_(True)  # noticed at the next backward: the state is re-sharded
        for micro in range(gas):
            x, y = global_batch(step, micro, kind)
            loss = nn.functional.cross_entropy(engine(rows(x, rank, world)),
                                               rows(y, rank, world))
            if overflow_at is not None and [step, rank] == list(overflow_at) and micro == 0:
                loss = loss * float("inf")  # one rank overflows: every rank must skip
            engine.backward(loss)
            engine.step()
        norms.append(engine.get_global_grad_norm())
    return norms


def emulate_reduce_scatter():
    """Gloo has no reduce-scatter: stand one in (all_reduce + this rank's part), so that the
    path NCCL takes at stage 1 runs here too."""
    real_all_reduce = comm.all_reduce

    def reduce_scatter_tensor(output, input, op=None, group=None, async_op=False,
                              stats=None):
        comm._count(stats, "reduce_scatter", comm._nbytes(input), async_op)
        t = input.clone()
        real_all_reduce(t)
        r, n = comm.get_rank(), output.numel()
        output.copy_(t[r * n:(r + 1) * n])

    comm.has_reduce_scatter = lambda group=None: True
    comm.reduce_scatter_tensor = reduce_scatter_tensor


def weights(engine):
    """The whole weights (a collective with partitioned parameters: all-gathered)."""
    return {k: v.clone() for k, v in engine.module_state_dict().items()}


def memory(engine):
    """This rank's bytes (ZeRO-3 figures): weights resident outside a module's window (the
    model's own memory plus the param tier's DRAM records), gradients (the optimizer's arena
    and buckets), the param tier's records and the optimizer tier (pool and swap file)."""
    tier = engine.param_tier
    params = {id(p): p for p in engine.module.parameters()}.values()
    resident = 0
    for p in params:
        if getattr(p, "ds_partitioned", False):
            if p.ds_tensor is not None:
                resident += p.ds_tensor.numel() * p.ds_tensor.element_size()
        elif not deepspeed.param_tier.fetched_on_demand(p):
            resident += p.numel() * p.element_size()
    opt = engine.optimizer
    st = opt.stats()
    ts = tier.stats()
    arenas = {a.data_ptr(): a for a in opt._b.arenas.values()}.values()
    return {
        "resident_weight_bytes": resident,
        "grad_bytes": sum(a.numel() * a.element_size() for a in arenas)
        + st.get("grad_bucket_peak_bytes", 0),
        "param_tier_bytes": ts.get("bytes", ts.get("partition_bytes", 0)),
        "optimizer_tier_bytes": st["swap_file_bytes"] or st["pool_reserved"],
    }


def run(sc, rank, world):
    kind = sc.get("model", "mlp")
    steps, gas = sc.get("steps", 5), sc.get("gas", 1)
    cfg = json.loads(json.dumps(sc["config"]))
    cfg["train_micro_batch_size_per_gpu"] = GLOBAL_ROWS // world
    cfg["gradient_accumulation_steps"] = gas
    if sc.get("emulate_reduce_scatter"):
        emulate_reduce_scatter()
    if sc.get("zero_init"):  # ZeRO-3: each module partitioned (or offloaded) as it is built
        with deepspeed.zero.Init(config_dict_or_path=cfg):
            model = make_model(kind)
    else:
        model = make_model(kind)
    if sc.get("unfreeze_at") is not None:
        for p in model[0].parameters():
            p.requires_grad_(False)
    client = None
    if sc.get("client") == "strata":  # built before initialize: converted to its shard there
        client = deepspeed.optim.OffloadAdamW(model.parameters(), lr=1e-2, weight_decay=0.01,
                                             config={"zero_optimization": cfg[
                                                 "zero_optimization"]})
    elif sc.get("client") == "torch":
        client = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    if client is not None:
        cfg.pop("optimizer", None)
    engine, opt, *_ = deepspeed.initialize(model=model, config=cfg, optimizer=client)
    out = {"name": sc["name"]}
    extra = {"overflow_at": sc.get("overflow_at"), "unfreeze_at": sc.get("unfreeze_at")}
    try:
        first = 0
        if sc.get("load"):
            path, _ = engine.load_checkpoint(sc["load"])
            assert path is not None
            first = engine.global_steps
            out["loaded_state"] = opt.state_dict()
            out["loaded_model"] = weights(engine)
        save = sc.get("save")
        if save:
            out["norms"] = train(engine, model, kind, first, save["at"], gas, rank, world)
            out["state_at_save"] = opt.state_dict()
            out["model_at_save"] = weights(engine)
            engine.save_checkpoint(save["dir"])
            out["norms"] += train(engine, model, kind, save["at"], steps, gas, rank, world)
        else:
            out["norms"] = train(engine, model, kind, first, steps, gas, rank, world, **extra)
        out["skipped_steps"] = engine.skipped_steps
        out["loss_scale"] = engine.loss_scale
        st = opt.stats()
        st["plan"] = json.loads(opt._b.engine.plan_json())
        out["stats"] = st
        if sc.get("probe_grads"):
            # One more backward (after the stats): where gradients are kept until the step.
            x, y = global_batch(steps, 0, kind)
            engine.backward(nn.functional.cross_entropy(engine(rows(x, rank, world)),
                                                        rows(y, rank, world)))
            flats = [f.data_ptr() for f in opt.grad_arenas()]
            out["grad_is_none"] = [p.grad is None for p in model.parameters()]
            out["grad_in_flat"] = [p.grad is not None and any(
                f <= p.grad.data_ptr() < f + 4 * opt.stats()["total_numel"] for f in flats)
                for p in model.parameters()]
        out["model"] = weights(engine)
        if sc.get("save16"):  # save_16bit_model: a collective; rank 0 writes the file
            wrote = engine.save_16bit_model(sc["save16"], "model16.bin")
            comm.barrier()
            out["saved16"] = torch.load(os.path.join(sc["save16"], "model16.bin")) \
                if wrote and rank == 0 else None
        tier = engine.param_tier
        if tier is not None:
            out["param_tier"] = tier.stats()
            out["memory"] = memory(engine)
        out["swap_exists_while_open"] = bool(st["swap_file_path"]) and \
            os.path.exists(st["swap_file_path"])
        out["type"] = type(opt).__name__
    finally:
        engine.close()
    return out


def main():
    spec_path, out = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    deepspeed.init_distributed()
    rank, world = comm.get_rank(), comm.get_world_size()
    with open(spec_path) as f:
        spec = json.load(f)
    results = [run(sc, rank, world) for sc in spec["scenarios"]]
    torch.save(results, f"{out}.{rank}")
    if comm.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
