"""ZeRO-3 across ranks (docs/stage3.md, "Several ranks"): two Gloo processes started from the
test (tests/python/workers/dist_sharded.py) against the same worker as one process, the model
built under strata.zero.Init.

- offload_param none, cpu and nvme with offload_optimizer nvme, 20 steps: the final weights of
  2 ranks equal one process on the same global batch (assert_close rtol 1e-5, atol 1e-6), both
  ranks hold the same bits, and a second run gives the same bits; with accumulation, clipping
  and overlap_comm on the NVMe tiers, the same bits as stage 2 on the same ranks;
- per-rank bytes of resident weights, gradients, the param tier and the optimizer tier are at
  most 0.55 x one process's (printed; persistent parameters stay whole on every rank);
- the window's all-gathers coalesced up to allgather_bucket_size (fewer calls, same bytes and bits);
- save_16bit_model across 2 ranks writes the gathered weights (rank 0's file);
- a 2-rank checkpoint loads with 1 and with 2 ranks bit-identically, a 1-rank one with 2 ranks;
- no "runs as stage 2" anywhere.
"""

import pytest
import torch

from test_distributed import launch
from test_distributed_checkpoint import state_equal

STEPS = 20
# lr 1e-3: at 1e-2 Adam turns the summation-order roundoff of one near-zero gradient element
# into 1.4e-6 after 20 steps, at stage 2 across ranks as at stage 3 (the same element).
ADAMW = {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.01}}


def config(swap_dir, param_device, **extra):
    z = {"stage": 3, "sub_group_size": 4000,
         "stage3_param_persistence_threshold": 64,  # the 4-element bias stays whole
         "reduce_bucket_size": 2000,
         "offload_optimizer": {"device": "nvme", "nvme_path": str(swap_dir), "buffer_count": 2},
         "offload_param": {"device": param_device, "nvme_path": str(swap_dir),
                           "buffer_count": 8, "buffer_size": 200000}}
    z.update(extra.pop("zero", {}))
    cfg = {"optimizer": ADAMW, "zero_optimization": z,
           "aio": {"block_size": 65536, "queue_depth": 8}}
    cfg.update(extra)
    return cfg


def scenario(name, cfg, **kw):
    return dict({"name": name, "config": cfg, "steps": STEPS, "model": "wide",
                 "zero_init": True}, **kw)


def assert_same_bits(a, b, what):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), (what, k)


def test_two_ranks_match_one_process_and_hold_half_the_memory(tmp_path, swap_dir):
    scenarios = [scenario(d, config(swap_dir, d)) for d in ("none", "cpu", "nvme")]
    # accumulation, clipping and asynchronous reductions on the NVMe tiers
    scenarios.append(scenario("nvme_gas_clip_overlap", config(
        swap_dir, "nvme", gradient_clipping=0.5, zero={"overlap_comm": True}), gas=2))
    # the second nvme run also writes save_16bit_model (gathered, streamed by rank 0)
    scenarios.append(dict(scenarios[2], name="nvme_again", config=dict(
        scenarios[2]["config"], zero_optimization=dict(
            scenarios[2]["config"]["zero_optimization"],
            stage3_gather_16bit_weights_on_model_save=True)),
        save16=str(tmp_path / "model16")))
    stage2 = scenario("stage2", config(swap_dir, "none", zero={"stage": 2}), zero_init=False)
    # NCCL's path (one reduce_scatter_tensor per group of parameters), Gloo standing in
    scatter = dict(scenarios[2], name="nvme_reduce_scatter", emulate_reduce_scatter=True)
    # allgather_bucket_size 1: one all-gather per parameter instead of coalesced ones
    one_by_one = scenario("cpu_allgather_1", config(swap_dir, "cpu",
                                                   zero={"allgather_bucket_size": 1}))
    stage2_clip = scenario("stage2_gas_clip_overlap", config(
        swap_dir, "none", gradient_clipping=0.5, zero={"stage": 2, "overlap_comm": True}),
        gas=2, zero_init=False)
    one, _ = launch(tmp_path, scenarios, world=1, name="one")
    two, logs = launch(tmp_path, scenarios + [stage2, stage2_clip, scatter, one_by_one],
                       world=2, name="two")
    for text in logs:
        assert "runs as stage 2" not in text and "not partitioned" not in text, text[-3000:]
    rows = []
    for i, sc in enumerate(scenarios):
        ref, r0, r1 = one[0][i], two[0][i], two[1][i]
        assert r0["stats"]["stage"] == 3 and r0["param_tier"]["world_size"] == 2
        assert_same_bits(r0["model"], r1["model"], sc["name"])
        if sc["name"] == "nvme_gas_clip_overlap":
            # With clipping at 0.5 and 2 micro-steps one near-zero element's Adam step
            # turns the ranks' summation order into 1.2e-5 after 20 steps, at stage 2 across
            # ranks the same (measured): compared with stage 2 on the same ranks, bit for bit.
            assert_same_bits(r0["model"], two[0][len(scenarios) + 1]["model"], sc["name"])
            torch.testing.assert_close(torch.cat([v.flatten() for v in r0["model"].values()]),
                                       torch.cat([v.flatten() for v in ref["model"].values()]),
                                       rtol=1e-3, atol=2e-5)
        else:
            for k, v in ref["model"].items():
                torch.testing.assert_close(r0["model"][k], v, rtol=1e-5, atol=1e-6,
                                           msg=lambda m, k=k: f"{sc['name']} {k}: {m}")
        torch.testing.assert_close(torch.tensor(r0["norms"]), torch.tensor(ref["norms"]),
                                   rtol=1e-5, atol=1e-6)
        for r in (r0, r1):
            for key, single in ref["memory"].items():
                if key == "resident_weight_bytes" and single < 1024:
                    continue  # nvme: only the persistent 4-element bias (whole on every rank)
                ratio = r["memory"][key] / single if single else None
                if single:
                    assert ratio <= 0.55, (sc["name"], key, r["memory"][key], single)
                if r is r0:
                    rows.append((sc["name"], key, single, r["memory"][key], ratio))
        # the window all-gathers every partitioned parameter before use
        assert r0["param_tier"]["comm"]["all_gather"]["calls"] > 0
    assert_same_bits(two[0][2]["model"], two[0][4]["model"], "two runs")
    assert_same_bits(two[0][4]["saved16"], two[0][4]["model"], "save_16bit_model")
    assert two[1][4]["saved16"] is None
    # reduce-scattered: the same sums, the same bits; no reduce left
    rs = two[0][len(scenarios) + 2]
    assert_same_bits(rs["model"], two[0][2]["model"], "reduce_scatter vs reduce")
    assert rs["stats"]["comm"]["reduce_scatter"]["calls"] > 0, rs["stats"]["comm"]
    assert "reduce" not in rs["stats"]["comm"], rs["stats"]["comm"]
    assert "reduce_scatter" not in two[0][2]["stats"]["comm"]
    # the window's all-gathers: coalesced up to allgather_bucket_size (the default 5e8: a
    # module's parameters in one), the same bytes and bits as one per parameter
    single = two[0][len(scenarios) + 3]
    assert_same_bits(single["model"], two[0][1]["model"], "allgather_bucket_size 1")
    many, few = single["param_tier"]["comm"]["all_gather"], \
        two[0][1]["param_tier"]["comm"]["all_gather"]
    assert few["bytes"] == many["bytes"] and few["calls"] < many["calls"], (few, many)
    print(f"\nall-gathers in 20 steps: {many['calls']} one per parameter, {few['calls']} coalesced")
    # stage 3 against stage 2 across the same 2 ranks: the same sums, the same bits
    assert two[0][len(scenarios)]["stats"]["stage"] == 2
    assert two[0][len(scenarios) + 1]["stats"]["stage"] == 2
    assert_same_bits(two[0][len(scenarios)]["model"], two[0][2]["model"], "stage 2 vs 3")
    print("\nscenario                 figure                   1 process   rank     ratio")
    for name, key, single, mine, ratio in rows:
        print(f"{name:24s} {key:24s} {single:9d} {mine:9d}  "
              + ("n/a" if ratio is None else f"{ratio:.3f}"))


def test_checkpoints_load_across_world_sizes(tmp_path, swap_dir):
    cfg = config(swap_dir, "nvme")
    steps, at = 6, 3
    two_dir, one_dir = tmp_path / "ck2", tmp_path / "ck1"
    saved2, _ = launch(tmp_path, [scenario("save2", cfg, steps=steps,
                                           save={"dir": str(two_dir), "at": at})],
                       world=2, name="save2")
    saved1, _ = launch(tmp_path, [scenario("save1", cfg, steps=steps,
                                           save={"dir": str(one_dir), "at": at})],
                       world=1, name="save1")
    back2, _ = launch(tmp_path, [scenario("load2", cfg, steps=steps, load=str(two_dir)),
                                 scenario("load1into2", cfg, steps=steps, load=str(one_dir))],
                      world=2, name="load2")
    back1, _ = launch(tmp_path, [scenario("load2into1", cfg, steps=steps, load=str(two_dir))],
                      world=1, name="load1")
    at_save2, at_save1 = saved2[0][0], saved1[0][0]
    # 2 ranks -> 2 ranks: what was saved comes back, and training goes on bit for bit
    for r in (0, 1):
        assert_same_bits(at_save2["model_at_save"], back2[r][0]["loaded_model"], "2->2")
        state_equal(at_save2["state_at_save"], back2[r][0]["loaded_state"])
        assert_same_bits(saved2[r][0]["model"], back2[r][0]["model"], "2->2 continued")
    # 2 ranks -> 1 process
    assert_same_bits(at_save2["model_at_save"], back1[0][0]["loaded_model"], "2->1")
    state_equal(at_save2["state_at_save"], back1[0][0]["loaded_state"])
    # 1 process -> 2 ranks
    for r in (0, 1):
        assert_same_bits(at_save1["model_at_save"], back2[r][1]["loaded_model"], "1->2")
        state_equal(at_save1["state_at_save"], back2[r][1]["loaded_state"])
    # and a 2-rank continuation from the 1-process checkpoint ends where 1 process does
    for k, v in saved1[0][0]["model"].items():
        torch.testing.assert_close(back2[0][1]["model"][k], v, rtol=1e-5, atol=1e-6)


if __name__ == "__main__":  # pragma: no cover
    pytest.main([__file__, "-s", "-q"])
