"""Issue 18 items 7 and 8, from Python: the config is parsed once and the engine gets the
parsed handle; defaults come from the schema only; keys that said one thing and did another."""

import pytest
import torch

import strata
from strata.optim import OffloadAdamW
from strata import _C
from strata import config as _config

from conftest import nvme_config


def test_load_config_carries_the_parsed_handle():
    cfg = strata.load_config({"aio": {"queue_depth": 64}})
    assert isinstance(cfg, dict) and cfg["aio"]["queue_depth"] == 64
    assert isinstance(cfg.handle, _C.Config)
    assert _config.handle_of(cfg) is cfg.handle


def test_engine_takes_the_handle_not_json_text(swap_dir):
    # Before: the optimizer re-serialised its dict (minus train_batch_size, so that the
    # binding's second parse for one process would pass) and the binding parsed it again.
    p = torch.zeros(1000)
    spec = [("p", p.numel(), "float32", 0, p.data_ptr())]
    with pytest.raises(TypeError):
        _C.Engine('{"zero_optimization": {}}', spec, [{"kind": "adamw"}])
    cfg = strata.load_config(nvme_config(swap_dir))
    eng = _C.Engine(cfg.handle, spec, [{"kind": "adamw"}])
    eng.close()


def test_optimizer_engine_reads_the_parsed_config(swap_dir, monkeypatch):
    seen = []
    real = _C.Engine

    def spy(config, *args, **kwargs):
        seen.append(config)
        return real(config, *args, **kwargs)

    monkeypatch.setattr(_C, "Engine", spy)
    model = torch.nn.Linear(8, 4)
    # A world-size-dependent key the engine never needed to see stripped any more.
    opt = OffloadAdamW(model.parameters(), lr=1e-3,
                       config=nvme_config(swap_dir, train_batch_size=4))
    try:
        assert seen and all(isinstance(c, _C.Config) for c in seen)
        assert seen[0] is opt.config.handle
    finally:
        opt.close()


def test_get_falls_back_to_the_schema_default():
    assert _config.get({}, "aio.queue_depth") == _config.schema_default("aio.queue_depth") == 8
    assert _config.get({}, "strata.progress") == "auto"
    assert _config.get({}, "strata.dram_budget") is None
    assert _config.get({}, "strata.dram_budget", 5) == 5


def test_speculative_clip_mode_is_refused_by_name():
    with pytest.raises(_C.ConfigError, match=r"strata\.clip_mode: \"speculative\" is no longer "
                                             r"accepted .*allowed: exact"):
        strata.load_config({"strata": {"clip_mode": "speculative"}})


def test_intra_op_parallelism_has_one_range():
    with pytest.raises(_C.ConfigError, match=r"aio\.intra_op_parallelism: 65 is out of range"):
        strata.load_config({"aio": {"intra_op_parallelism": 65}})
    assert strata.load_config({"aio": {"intra_op_parallelism": 64}})["aio"][
        "intra_op_parallelism"] == 64


def test_pipeline_keys_are_accepted_not_acted_on():
    rows = {r["path"]: r for r in strata.schema()}
    for key in ("pipeline_read", "pipeline_write"):
        row = rows["zero_optimization.offload_optimizer." + key]
        assert row["support"] == "accepted-ignored"
        assert "strata always pipelines reads and writes" in row["note"]
