"""The core's messages reach Python's logging under the "strata" logger.

Regression (issue 18, item 6): the C++ core printed its warnings and notes to stderr itself, out
of reach of logging (no level, no handler, no way to capture or silence them). The binding now
installs the core's one log sink, which hands every message to logging.getLogger("strata")."""

import logging

import torch

import strata
import strata.optim
from strata import _C
from conftest import nvme_config


def strata_records(caplog):
    return [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "strata"]


def test_a_core_message_goes_to_the_strata_logger(swap_dir, caplog, capfd):
    # A swap file no live process holds: the engine's swap file removes it and says so (INFO).
    (swap_dir / "strata-rank0-dead.swap").write_bytes(b"left behind")
    with caplog.at_level(logging.INFO, logger="strata"):
        opt = strata.optim.OffloadAdamW([torch.nn.Parameter(torch.zeros(1000))], lr=1e-3,
                                        config=nvme_config(swap_dir))
        opt.close()
    records = strata_records(caplog)
    assert any(level == logging.INFO and "removed 1 stale swap file(s) of dead processes in" in m
               for level, m in records), records
    assert "stale swap file" not in capfd.readouterr().err, "the core wrote to stderr itself"


def test_levels_and_messages_from_cpp_worker_threads(caplog):
    with caplog.at_level(logging.INFO, logger="strata"):
        _C._log_for_testing(0, "an info")
        _C._log_for_testing(1, "a warning from a worker", from_worker=True)
        _C._log_for_testing(2, "an error from a worker", from_worker=True)
        _C.flush_log()  # worker messages wait for a Python thread; every failing call flushes too
    assert strata_records(caplog) == [(logging.INFO, "an info"),
                                      (logging.WARNING, "a warning from a worker"),
                                      (logging.ERROR, "an error from a worker")]
