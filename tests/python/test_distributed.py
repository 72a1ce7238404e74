"""Data parallel on torch.distributed (strata.sharded): two CPU processes with Gloo, started
with environment variables as torchrun would start them (tests/python/workers/dist_sharded.py),
against one process training on the whole batch.

- ZeRO stages 0, 1, 2 with the state on NVMe: the same weights as one process after 20 steps;
- each rank's pinned pool, swap file and (stage 2) gradient buffers hold 1/world of the total;
- each zero_optimization key acted on (reduce_bucket_size, allgather_bucket_size,
  overlap_comm, reduce_scatter, contiguous_gradients) changes what the stats API shows;
- stage 3 through the engine partitions (test_stage3_ranks.py has its figures).
Checkpoints across ranks are in test_distributed_checkpoint.py.
"""

import json
import math
import os
import socket
import subprocess
import sys

import pytest
import torch

import strata
import strata.numa as numa
import strata.optim
import strata.sharded as sharded
from strata import comm

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "workers"))

import dist_sharded as worker  # noqa: E402

ADAMW = {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.01}}
SGD = {"type": "SGD", "params": {"lr": 0.1, "momentum": 0.9}}
SUB_GROUP = 1000
GRAD_SLACK = 4 * SUB_GROUP + 4096  # one sub-group's gradient and its 4 KiB alignment


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(tmp_path, scenarios, world=2, name="run", timeout=300):
    """Run the scenarios on ``world`` processes; returns (per-rank results, per-rank logs)."""
    spec = tmp_path / f"{name}.json"
    spec.write_text(json.dumps({"scenarios": scenarios}))
    out = str(tmp_path / name)
    port = free_port()
    procs, logs = [], []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                   LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        env.pop("STRATA_TEST_KILL_AT", None)
        env.pop("STRATA_LOG_ALL_RANKS", None)
        log = tmp_path / f"{name}.{rank}.log"
        logs.append(log)
        # Output to files, not pipes: a rank blocked on a full pipe would stall the others.
        with open(log, "w") as f:
            procs.append(subprocess.Popen([sys.executable, worker.__file__, str(spec), out],
                                          env=env, stdout=f, stderr=subprocess.STDOUT))
    try:
        for p in procs:
            p.wait(timeout=timeout)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    texts = [log.read_text() for log in logs]
    for p, text in zip(procs, texts):
        assert p.returncode == 0, text[-4000:]
    return [torch.load(f"{out}.{r}") for r in range(world)], texts


def config(stage, swap_dir=None, device="nvme", **zero):
    z = {"stage": stage, "sub_group_size": SUB_GROUP,
         "offload_optimizer": {"device": device, "buffer_count": 2}}
    if device == "nvme":
        z["offload_optimizer"]["nvme_path"] = str(swap_dir)
    z.update(zero)
    return {"gradient_clipping": 0.5, "optimizer": ADAMW, "zero_optimization": z,
            "aio": {"block_size": 65536, "queue_depth": 8}}


def one_process(sc):
    """The scenario in this process on the whole batch: (weights, norms, stats, sub-groups)."""
    cfg = json.loads(json.dumps(sc["config"]))
    cfg["train_micro_batch_size_per_gpu"] = worker.GLOBAL_ROWS
    cfg["gradient_accumulation_steps"] = sc.get("gas", 1)
    kind = sc.get("model", "mlp")
    model = worker.make_model(kind)
    if sc.get("unfreeze_at") is not None:
        for p in model[0].parameters():
            p.requires_grad_(False)
    engine, *_ = strata.initialize(model=model, config=cfg)
    try:
        overflow = sc.get("overflow_at")
        norms = worker.train(engine, model, kind, 0, sc.get("steps", 5), sc.get("gas", 1), 0, 1,
                             overflow_at=[overflow[0], 0] if overflow else None,
                             unfreeze_at=sc.get("unfreeze_at"))
        st = engine.stats()
        st["grad_arena_bytes"] = sum(a.numel() * a.element_size()
                                     for a in engine.optimizer._b.arenas.values())
        subgroups = engine.optimizer._b.engine.subgroups()
        return model.state_dict(), norms, st, subgroups
    finally:
        engine.close()


def assert_ranks_agree_and_match(results, sc, ref=None):
    ref = ref or one_process(sc)
    weights, norms = ref[0], ref[1]
    for k, v in weights.items():
        for r in results[1:]:
            assert torch.equal(results[0]["model"][k], r["model"][k]), (sc["name"], k)
        torch.testing.assert_close(results[0]["model"][k], v, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor(results[0]["norms"]), torch.tensor(norms),
                               rtol=1e-5, atol=1e-6)
    return ref


def largest_record(subgroups):
    return max(sg["record_bytes"] for sg in subgroups)


# ---------------------------------------------------------------------------------------
# two processes


def test_stages_0_1_2_match_one_process_with_state_on_nvme(tmp_path, swap_dir):
    scenarios = [{"name": f"stage{s}", "steps": 20, "gas": 2, "config": config(s, swap_dir)}
                 for s in (0, 1, 2)]
    # the optimizer given to initialize: a strata one (sharded in place) or torch's AdamW
    clients = [{"name": f"client_{c}", "steps": 5, "gas": 2, "client": c,
                "config": config(2, swap_dir)} for c in ("strata", "torch")]
    results, _ = launch(tmp_path, scenarios + clients)
    for i, sc in enumerate(clients, start=len(scenarios)):
        per_rank = [r[i] for r in results]
        assert_ranks_agree_and_match(per_rank, sc)
        assert [r["stats"]["stage"] for r in per_rank] == [2, 2]
        assert sum(r["stats"]["shard_numel"] for r in per_rank) == \
            per_rank[0]["stats"]["total_numel"]
    for i, sc in enumerate(scenarios):
        per_rank = [r[i] for r in results]
        _, norms, ref_st, ref_plan = assert_ranks_agree_and_match(per_rank, sc)
        assert max(norms) > 0.5, "clipping acted"
        stage = i
        sts = [r["stats"] for r in per_rank]
        assert [s["stage"] for s in sts] == [stage, stage]
        assert all(r["type"] == "ShardedDeepSpeedCPUAdam" for r in per_rank)
        assert all(r["swap_exists_while_open"] for r in per_rank)
        assert len({s["swap_file_path"] for s in sts}) == 2, "a swap file per rank"
        total = ref_st["swap_file_bytes"]
        if stage == 0:
            assert all(s["swap_file_bytes"] == total for s in sts), "stage 0: whole state"
            continue
        assert sum(s["shard_numel"] for s in sts) == sts[0]["total_numel"]
        record = largest_record(ref_plan)
        for s in sts:
            assert abs(s["swap_file_bytes"] - total / 2) <= record, (s["swap_file_bytes"], total)
            assert abs(s["grad_arena_bytes"] - ref_st["grad_arena_bytes"] / 2) <= GRAD_SLACK
    assert not [f for f in os.listdir(swap_dir) if f.endswith(".swap")], "swap files removed"


def test_per_rank_pool_swap_file_and_gradients_are_a_half(tmp_path, swap_dir):
    """Each rank's pinned pool (state in DRAM), swap file (state on NVMe) and, at stage 2,
    gradient buffers (the shard's arena + the reduce bucket) are 1/2 of one process's."""
    bucket = 4096
    scenarios = [
        {"name": "dram", "model": "wide", "steps": 2,
         "config": config(2, device="cpu", reduce_bucket_size=bucket)},
        {"name": "nvme", "model": "wide", "steps": 2,
         "config": config(2, swap_dir, reduce_bucket_size=bucket)},
    ]
    results, _ = launch(tmp_path, scenarios)
    for i, sc in enumerate(scenarios):
        per_rank = [r[i] for r in results]
        # (the weights are compared with one process in the test above; this one is about
        # memory: two steps of Adam on a wide layer amplify rounding in near-zero gradients)
        for k, v in per_rank[0]["model"].items():
            assert torch.equal(v, per_rank[1]["model"][k]), k
        _, _, ref, plan = one_process(sc)
        sts = [r["stats"] for r in per_rank]
        record = largest_record(plan)
        grads = ref["grad_arena_bytes"]
        for s in sts:
            if sc["name"] == "dram":
                # pool = state records + gradient arena, both the shard's
                assert ref["pool_requested"] > 1 << 20
                assert abs(s["pool_requested"] - ref["pool_requested"] / 2) <= \
                    record + GRAD_SLACK, (s["pool_requested"], ref["pool_requested"])
                assert s["swap_file_bytes"] == 0
            else:
                assert abs(s["swap_file_bytes"] - ref["swap_file_bytes"] / 2) <= record
            # stage 2: the only gradient buffers are the shard's arena and one bucket
            assert s["grad_flat_bytes"] == 0
            assert abs(s["grad_arena_bytes"] - grads / 2) <= GRAD_SLACK
            # buckets in flight: the one being filled and the one being reduced, at most
            assert 0 < s["grad_bucket_peak_bytes"] <= 2 * 4 * bucket
            assert s["grad_arena_bytes"] + s["grad_bucket_peak_bytes"] <= \
                grads / 2 + GRAD_SLACK + 2 * 4 * bucket


def test_each_zero_key_changes_what_the_ranks_do(tmp_path, swap_dir):
    steps, gas = 2, 2
    backwards = steps * gas

    def sc(name, stage, **zero):
        return {"name": name, "steps": steps, "gas": gas, "probe_grads": True,
                "config": config(stage, swap_dir, **zero)}

    scenarios = [
        sc("default", 2),
        sc("small_buckets", 2, reduce_bucket_size=1000),
        sc("all_reduce", 2, reduce_scatter=False, reduce_bucket_size=1000),
        sc("overlap", 2, overlap_comm=True, reduce_bucket_size=1000),
        sc("small_gather", 2, allgather_bucket_size=1000),
        sc("stage1", 1, reduce_bucket_size=1000),
        sc("stage1_overlap", 1, reduce_bucket_size=1000, overlap_comm=True),
        sc("stage1_not_contiguous", 1, reduce_bucket_size=1000, contiguous_gradients=False),
        sc("stage1_all_reduce", 1, reduce_bucket_size=1000, reduce_scatter=False),
        sc("stage3", 3),
    ]
    # the path where the backend has reduce-scatter (NCCL), with one emulated over Gloo
    scenarios.append(dict(sc("stage1_reduce_scatter", 1, reduce_bucket_size=1000),
                          emulate_reduce_scatter=True))
    results, logs = launch(tmp_path, scenarios)
    ref = None
    by = {}
    for i, s in enumerate(scenarios):
        per_rank = [r[i] for r in results]
        ref = assert_ranks_agree_and_match(per_rank, s, ref)  # all: the same training
        by[s["name"]] = per_rank
    total = by["default"][0]["stats"]["total_numel"]
    bounds = sharded.shard_bounds(total, 2)

    def buckets(size, cut_at_shards=True):
        cuts = set(range(0, total, size)) | (set(bounds[:-1]) if cut_at_shards else set())
        return len(cuts)

    def comm_of(name, rank=0):
        return by[name][rank]["stats"]["comm"]

    # reduce_bucket_size: the number of buckets, each reduced to its owner once per backward
    for name, size in (("default", sharded.DEFAULT_BUCKET), ("small_buckets", 1000)):
        st = by[name][0]["stats"]
        assert st["reduce_buckets"] == buckets(size)
        assert comm_of(name)["reduce"]["calls"] == buckets(size) * backwards
        assert comm_of(name)["reduce"]["bytes"] == 4 * total * backwards
    assert by["small_buckets"][0]["stats"]["reduce_buckets"] > \
        by["default"][0]["stats"]["reduce_buckets"] == 2
    # reduce_scatter: false -> all-reduce of each bucket instead of a reduce to its owner
    c = comm_of("all_reduce")
    assert "reduce" not in c
    assert c["all_reduce"]["calls"] == buckets(1000) * backwards + steps  # + the global norm
    # overlap_comm: asynchronous reductions launched from the gradient hooks
    for name, overlapped in (("small_buckets", False), ("overlap", True)):
        c, st = comm_of(name), by[name][0]["stats"]
        assert c["reduce"]["async"] == (c["reduce"]["calls"] if overlapped else 0)
        assert st["buckets_reduced_during_backward"] > 0  # stage 2 reduces in the hooks
    # allgather_bucket_size: rounds of at most that many elements (shard/round on each rank)
    longest = max(bounds[1] - bounds[0], bounds[2] - bounds[1])
    for name, size in (("default", sharded.DEFAULT_BUCKET), ("small_gather", 1000)):
        rounds = math.ceil(longest / min(size // 2, longest))
        assert by[name][0]["stats"]["allgather_rounds"] == rounds
        assert comm_of(name)["all_gather"]["calls"] == rounds * steps
    assert by["small_gather"][0]["stats"]["allgather_rounds"] == math.ceil(longest / 500) > 1
    # stage 2 keeps no whole gradient: .grad is dropped once its bucket has it
    assert all(by["default"][0]["grad_is_none"])
    # stage 1: gradients reduced once per accumulation step (not per backward), at the
    # boundary; with overlap_comm from the hooks of the last backward, asynchronously
    c = comm_of("stage1")
    assert c["reduce"]["calls"] == buckets(1000) * steps and c["reduce"]["async"] == 0
    assert by["stage1"][0]["stats"]["buckets_reduced_during_backward"] == 0
    c = comm_of("stage1_overlap")
    assert c["reduce"]["async"] == c["reduce"]["calls"] == buckets(1000) * steps
    assert by["stage1_overlap"][0]["stats"]["buckets_reduced_during_backward"] > 0
    # contiguous_gradients: .grad are views of one flat buffer, or torch's own tensors copied
    # into bucket buffers for the reduction
    on, off = by["stage1"][0], by["stage1_not_contiguous"][0]
    assert on["stats"]["grad_flat_bytes"] == 4 * total and all(on["grad_in_flat"])
    assert on["stats"]["grad_bucket_peak_bytes"] == 0
    assert off["stats"]["grad_flat_bytes"] == 0 and not any(off["grad_in_flat"])
    assert not any(off["grad_is_none"]) and off["stats"]["grad_bucket_peak_bytes"] > 0
    # stage 1 with reduce_scatter false: all-reduced buckets, no shard boundary cut
    c = comm_of("stage1_all_reduce")
    assert "reduce" not in c
    assert by["stage1_all_reduce"][0]["stats"]["reduce_buckets"] == buckets(1000, False)
    # where the backend has reduce-scatter: rounds of bucket/world elements of every shard
    c = comm_of("stage1_reduce_scatter")
    assert "reduce" not in c
    assert c["reduce_scatter"]["calls"] == math.ceil(longest / 500) * steps
    # stage 3 partitions (here every parameter is below stage3_param_persistence_threshold,
    # so all persist whole and only their state and gradients are cut): each backward reduces
    # every element once, to its owner; nothing says it runs as stage 2
    st3 = by["stage3"][0]["stats"]
    assert st3["stage"] == 3
    assert comm_of("stage3")["reduce"]["calls"] == st3["reduce_buckets"] * backwards
    assert comm_of("stage3")["reduce"]["bytes"] == 4 * total * backwards
    assert "runs as stage 2" not in logs[0] and "not partitioned" not in logs[0], logs[0]
    assert "strata:" not in logs[1], logs[1]


def test_half_precision_overflow_on_one_rank_and_unfreezing(tmp_path, swap_dir):
    """bf16 (which Gloo cannot reduce: an fp32 copy is, and gathers move the bits as fp16),
    fp16 with an overflow on rank 1 only (both ranks skip the step and lower the scale), and a
    frozen layer unfrozen mid-run (the state is re-sharded across the ranks)."""
    fp16 = {"enabled": True, "initial_scale_power": 8, "hysteresis": 1}
    scenarios = [
        {"name": "bf16_stage2", "model": "cast", "steps": 4,
         "config": dict(config(2, swap_dir), bf16={"enabled": True})},
        {"name": "bf16_stage1", "model": "cast", "steps": 4,
         "config": dict(config(1, swap_dir), bf16={"enabled": True})},
        # SGD: Adam's update of a near-zero gradient amplifies the ranks' different rounding.
        {"name": "bf16_stage2_accum32", "model": "cast", "steps": 3, "gas": 2,
         "config": dict(config(2, swap_dir), bf16={"enabled": True}, optimizer=SGD,
                        data_types={"grad_accum_dtype": "fp32"})},
        {"name": "bf16_stage1_accum32", "model": "cast", "steps": 2, "gas": 2,
         "config": dict(config(1, swap_dir), bf16={"enabled": True}, optimizer=SGD,
                        data_types={"grad_accum_dtype": "fp32"})},
        {"name": "fp16_overflow", "model": "cast", "steps": 4, "overflow_at": [1, 1],
         "config": dict(config(2, swap_dir, reduce_bucket_size=500), fp16=fp16)},
        {"name": "unfreeze", "steps": 5, "gas": 2, "unfreeze_at": 2,
         "config": config(2, swap_dir, reduce_bucket_size=1000)},
    ]
    results, logs = launch(tmp_path, scenarios)
    # grad_accum_dtype fp32: stage 2 keeps the shard's gradients in fp32 arenas (reduced bf16
    # buckets are added in fp32); stage 1 says once (rank 0) that it accumulates in bf16.
    said = "data_types.grad_accum_dtype 'fp32' with several ranks is honoured at ZeRO stage 2"
    assert logs[0].count(said) == 1 and said not in logs[1]
    for i, sc in enumerate(scenarios):
        per_rank = [r[i] for r in results]
        if sc["name"].endswith("accum32"):
            size = 4 if "stage2" in sc["name"] else 2
            for r in per_rank:
                assert r["stats"]["grad_arena_bytes"] == size * r["stats"]["shard_numel"]
        if sc["name"] == "unfreeze":
            assert_ranks_agree_and_match(per_rank, sc)
            everything = sum(p.numel() for p in worker.make_model().parameters())
            assert per_rank[0]["stats"]["total_numel"] == everything  # the first layer joined
            assert sum(r["stats"]["shard_numel"] for r in per_rank) == everything
            continue
        ref, norms, _, _ = one_process(sc)
        half = torch.bfloat16 if sc["name"].startswith("bf16") else torch.float16
        for k, v in ref.items():
            assert v.dtype == half
            assert torch.equal(per_rank[0]["model"][k], per_rank[1]["model"][k]), k
            # half precision: the sums of ranks and of the batch round differently
            torch.testing.assert_close(per_rank[0]["model"][k].float(), v.float(), rtol=2e-2,
                                       atol=2e-3, msg=lambda m: f"{sc['name']} {k}: {m}")
        if sc["name"] == "fp16_overflow":
            for r in per_rank:
                assert r["skipped_steps"] == 1 and r["loss_scale"] == 2 ** 7
                assert math.isinf(r["norms"][1])


def test_launch_runs_the_gpt_example_on_two_ranks(tmp_path):
    """`python -m strata launch` (torchrun with --redirects 2 --tee 2 and a free port) runs the
    GPT demo with its NVMe config on two Gloo ranks; only rank 0 prints."""
    root = os.path.dirname(os.path.dirname(HERE))
    with open(os.path.join(root, "examples", "configs", "nvme.json")) as f:
        cfg = json.load(f)
    swap = tmp_path / "swap"
    swap.mkdir()
    cfg["zero_optimization"]["offload_optimizer"]["nvme_path"] = str(swap)
    cfg["strata"]["trace"]["path"] = str(tmp_path / "engine_trace.json")
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(cfg))
    env = dict(os.environ, PYTHONPATH=os.path.join(root, "python"))
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "strata", "launch", "--nproc_per_node", "2",
         os.path.join(root, "examples", "finetune_gpt.py"), "--config", str(path), "--out",
         str(out), "--size", "tiny", "--steps", "4", "--progress", "off"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:]
    text = proc.stdout
    assert text.count("=== summary ===") == 1 and text.count("GPT, 0.5M parameters (2 layers, width 128)") == 1, text
    assert "2 ranks (ZeRO stage 2)" in text
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["zero_stage"] == 2
    assert summary["steps"] == 4 and summary["swap_bytes_written"] > 0
    assert 2 * summary["shard_numel"] in range(summary["params"] - 1, summary["params"] + 2)
    assert os.path.exists(tmp_path / "engine_trace.json")
    assert os.path.exists(tmp_path / "engine_trace.rank1.json"), "rank 1's trace beside rank 0's"
    assert not [f for f in os.listdir(swap) if f.endswith(".swap")]


# ---------------------------------------------------------------------------------------
# one process: the pieces


def test_shards_and_buckets_cover_the_flat_space():
    params = [torch.zeros(10), torch.zeros(3, dtype=torch.bfloat16), torch.zeros(7),
              torch.zeros(5, dtype=torch.bfloat16)]
    space = sharded.Space.flat(params)
    assert space.dtypes == [torch.float32, torch.bfloat16]
    assert space.total == {torch.float32: 17, torch.bfloat16: 8}
    assert sharded.shard_bounds(17, 2) == [0, 8, 17]
    assert space.pieces(torch.float32, 8, 17) == [(0, 8, 8, 2), (2, 0, 10, 7)]
    bounds = {d: sharded.shard_bounds(space.total[d], 2) for d in space.dtypes}
    bks = sharded._make_buckets(space, 5, bounds)
    f32 = [(b.start, b.end, b.owner) for b in bks if b.dtype == torch.float32]
    assert f32 == [(0, 5, 0), (5, 8, 0), (8, 10, 1), (10, 15, 1), (15, 17, 1)]
    for b in bks:  # members tile each bucket exactly
        assert sum(n for *_, n in b.members) == b.end - b.start
    # more ranks than elements of a dtype: empty shards own nothing
    assert sharded.shard_bounds(2, 4) == [0, 0, 1, 1, 2]
    bks = sharded._make_buckets(sharded.Space.flat([torch.zeros(2)]), 8,
                                {torch.float32: [0, 0, 1, 1, 2]})
    assert [(b.start, b.end, b.owner) for b in bks] == [(0, 1, 1), (1, 2, 3)]


def test_numa_node_per_local_rank_from_sysfs(tmp_path):
    for node, cpus in ((0, "0-3"), (1, "4-7"), (2, "")):  # node 2: memory only (CXL)
        d = tmp_path / f"node{node}"
        d.mkdir()
        (d / "cpulist").write_text(cpus + "\n")
    assert numa._node_cpus(str(tmp_path)) == {0: [0, 1, 2, 3], 1: [4, 5, 6, 7]}
    assert [numa.numa_node_for(r, 4, str(tmp_path)) for r in range(4)] == [0, 1, 0, 1]
    assert numa.numa_node_for(0, 1, str(tmp_path)) is None  # one process: no binding
    one = tmp_path / "one"
    (one / "node0").mkdir(parents=True)
    (one / "node0" / "cpulist").write_text("0-7\n")
    assert numa.numa_node_for(1, 2, str(one)) is None  # one node: nothing to choose


def test_binding_to_a_numa_node_sets_affinity_and_memory_policy(tmp_path):
    cpus = sorted(os.sched_getaffinity(0))
    (tmp_path / "node0").mkdir()
    (tmp_path / "node0" / "cpulist").write_text(",".join(map(str, cpus)) + "\n")
    (tmp_path / "node2").mkdir()
    (tmp_path / "node2" / "cpulist").write_text("\n")  # memory only (CXL)
    try:
        note = numa.bind_numa_node(0, str(tmp_path))
        assert os.sched_getaffinity(0) == set(cpus)
        assert note == "NUMA node 0: CPUs and memory bound for local rank", note
        assert "no CPUs" in numa.bind_numa_node(5, str(tmp_path))
        assert "no CPUs" in numa.bind_numa_node(2, str(tmp_path))
    finally:
        os.sched_setaffinity(0, cpus)
        strata._C.reset_memory_policy()  # back to the default policy (MPOL_DEFAULT)


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_one_rank_is_bit_identical_to_the_plain_optimizer(stage, swap_dir):
    """The data-parallel classes with one rank: the same bits as OffloadAdamW, whatever the
    stage and bucket sizes (buckets only change how gradients travel)."""
    def run(klass, **zero):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(),
                                    torch.nn.Linear(32, 3))
        cfg = config(stage, swap_dir, **zero)
        del cfg["gradient_clipping"]
        opt = klass(model.parameters(), lr=1e-2, config=cfg)
        for step in range(3):
            x, y = worker.global_batch(step, 0)
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[:, :8]), y % 3).backward()
            opt.step()
        sd = opt.state_dict()
        opt.close()
        return model, sd

    ref, ref_sd = run(strata.optim.OffloadAdamW)
    for zero in ({}, {"reduce_bucket_size": 7, "allgather_bucket_size": 5,
                      "contiguous_gradients": False}):
        model, sd = run(sharded.ShardedOffloadAdamW, **zero)
        for a, b in zip(ref.parameters(), model.parameters()):
            assert torch.equal(a, b)
        for k, v in ref_sd["state"].items():
            for name in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(v[name], sd["state"][k][name])


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_shard_turns_data_parallel_on_without_changing_the_class(stage, swap_dir):
    """Regression (issue 19): ``shard(opt)`` swapped ``__class__`` in place and the two classes
    kept copies of step/state_dict/rebuild (one keyword added to the base broke data-parallel
    backward, 941f49d). Now data parallel is a setting of the one class: ``shard`` keeps the
    class, the state is carried over to the shard's engine unchanged, and the next steps give
    the bits of an optimizer that was data parallel from the start."""
    import strata.checkpoint.format as ckpt

    def model_and_batches():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(),
                                    torch.nn.Linear(32, 3))
        return model, [worker.global_batch(step, 0) for step in range(4)]

    def train(opt, model, batches):
        for x, y in batches:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[:, :8]), y % 3).backward()
            opt.step()

    cfg = config(stage, swap_dir)
    del cfg["gradient_clipping"]
    ref_model, batches = model_and_batches()
    with sharded.ShardedOffloadAdamW(ref_model.parameters(), lr=1e-2, config=cfg) as ref:
        assert ref.data_parallel and ref.zero_stage == stage
        assert ckpt._class_name(ref) == "OffloadAdamW", "checkpoints name the optimizer"
        train(ref, ref_model, batches)
        ref_sd = ref.state_dict()
    model, batches = model_and_batches()
    with strata.optim.OffloadAdamW(model.parameters(), lr=1e-2, config=cfg) as opt:
        assert not opt.data_parallel and not opt.layout.sharded
        train(opt, model, batches[:2])
        before = opt.state_dict()
        assert sharded.shard(opt) is opt and type(opt) is strata.optim.OffloadAdamW
        assert opt.data_parallel and opt.layout.sharded == (stage >= 1)
        assert ckpt._is_sharded(opt) == (stage >= 1)
        after = opt.state_dict()
        for k, v in before["state"].items():
            for name in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(v[name], after["state"][k][name])
        train(opt, model, batches[2:])
        for a, b in zip(ref_model.parameters(), model.parameters()):
            assert torch.equal(a, b)
        for k, v in ref_sd["state"].items():
            assert torch.equal(v["exp_avg_sq"], opt.state_dict()["state"][k]["exp_avg_sq"])


def test_comm_counts_collectives_and_says_what_the_backend_lacks():
    assert comm.backend() is None and not comm.has_reduce_scatter()
    comm.reset_stats()
    t = torch.ones(4)
    assert comm.all_reduce(t) is None and comm.stats() == {}  # no process group: nothing sent
    out = torch.zeros(4)
    comm.all_gather_into(out, torch.ones(4))
    assert torch.equal(out, torch.ones(4))
    comm._count(None, "reduce", 16, True)
    assert comm.stats() == {"reduce": {"calls": 1, "bytes": 16, "async": 1}}
    comm.reset_stats()
    argv = comm.launch_argv(["--nproc_per_node", "2", "train.py", "--tee", "0"])
    assert argv[:4] == ["--redirects", "2", "--tee", "2"] and argv[4] == "--master_port"
    assert argv[-3:] == ["train.py", "--tee", "0"]  # the script's own options untouched
    argv = comm.launch_argv(["--nnodes", "2", "-r", "3", "--nproc_per_node", "2", "t.py"])
    assert "--master_port" not in argv and argv.count("-r") == 1 and "--redirects" not in argv


def test_launch_sets_openmp_wait_policy_unless_the_environment_does(monkeypatch):
    """`python -m strata launch` gives the ranks OMP_WAIT_POLICY=PASSIVE (torch's OpenMP
    threads sleep between operations instead of spinning), and keeps a value the user set."""
    import subprocess

    from strata import comm

    seen = []
    monkeypatch.setattr(subprocess, "call", lambda cmd, env: seen.append(env) or 0)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    assert comm.launch(["--nproc_per_node", "1", "train.py"]) == 0
    assert seen[-1]["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    comm.launch(["--nproc_per_node", "1", "train.py"])
    assert seen[-1]["OMP_WAIT_POLICY"] == "ACTIVE"
    monkeypatch.delenv("OMP_WAIT_POLICY")
    monkeypatch.setenv("GOMP_SPINCOUNT", "1000")
    comm.launch(["--nproc_per_node", "1", "train.py"])
    assert "OMP_WAIT_POLICY" not in seen[-1]
