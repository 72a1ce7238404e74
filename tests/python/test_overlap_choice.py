"""strata.overlap_mode auto: the engine decides once, from the second step's measured phases,
whether overlapped backwards can hide enough of the step (strata.overlap_choice), says which
and why, and otherwise runs a plain backward and then the step — with the same numbers."""

import logging

import pytest
import torch

import strata
from strata import overlap_choice
from strata import _C


def test_nothing_to_hide_without_io_and_a_free_core():
    # State in memory, torch's threads on every core: the update would only take cores from
    # backward, and there is no I/O.
    ok, why = overlap_choice.choose(forward_s=0.1, backward_s=0.3, step_s=0.02, update_s=0.02,
                                    io_s=0.0, free_cores=0, exact=False)
    assert not ok
    assert "hide at most 0 ms" in why and "fill every core" in why


def test_io_to_hide_overlaps_whatever_the_cores():
    ok, why = overlap_choice.choose(forward_s=0.1, backward_s=0.3, step_s=0.4, update_s=0.05,
                                    io_s=0.35, free_cores=0, exact=True)
    assert ok
    assert "I/O 350 ms" in why and "exact mode" in why


def test_a_free_core_hides_the_update_in_eager_mode_only():
    kw = dict(forward_s=0.1, backward_s=0.3, step_s=0.1, update_s=0.1, io_s=0.0, free_cores=1)
    assert overlap_choice.choose(exact=False, **kw)[0]
    assert not overlap_choice.choose(exact=True, **kw)[0]
    # A cheap update is not worth the overlapped path's own costs.
    kw.update(step_s=0.01, update_s=0.01)
    ok, why = overlap_choice.choose(exact=False, **kw)
    assert not ok and "2.4%" in why


def test_the_gain_is_bounded_by_backward():
    ok, why = overlap_choice.choose(forward_s=0.0, backward_s=0.01, step_s=1.0, update_s=0.1,
                                    io_s=1.0, free_cores=0, exact=False)
    assert not ok and "hide at most 10 ms" in why


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(),
                               torch.nn.Linear(256, 64))


def _config(mode, tmp_path, device="cpu", overlap=True):
    opt = {"device": device}
    if device == "nvme":
        opt.update(nvme_path=str(tmp_path), buffer_count=2)
    return {"train_micro_batch_size_per_gpu": 8,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
            "zero_optimization": {"stage": 2, "offload_optimizer": opt,
                                  "sub_group_size": 4096},
            "strata": {"overlap_backward": overlap, "overlap_mode": mode, "progress": "off"}}


def _train(cfg, steps=5):
    model = _model()
    engine, _, _, _ = strata.initialize(model=model, config=cfg,
                                        model_parameters=model.parameters())
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(1))
    overlapped = []
    for _ in range(steps):
        loss = engine(x).square().mean()
        engine.backward(loss)
        overlapped.append(engine._overlap_this_backward(False))  # what the next one does
        engine.step()
    weights = [p.detach().clone() for p in model.parameters()]
    decision = engine.overlap_decision
    engine.close()
    return weights, decision, overlapped


def test_the_engine_decides_once_says_why_and_keeps_the_numbers(tmp_path, monkeypatch, caplog):
    # A machine whose cores torch's threads fill, state in memory: nothing to hide.
    monkeypatch.setattr(_C, "usable_cpus", lambda: torch.get_num_threads())
    ref, none, _ = _train(_config("auto", tmp_path, overlap=False))
    assert none is None  # overlap off: nothing to decide
    with caplog.at_level(logging.INFO, logger="strata"):
        got, decision, overlapped = _train(_config("auto", tmp_path))
    assert decision is not None and decision["overlap"] is False
    assert decision["from_step"] == 3
    assert "fill every core" in decision["why"]
    assert overlapped[:2] == [True, True] and not any(overlapped[2:])
    said = [r.message for r in caplog.records if "overlap_mode auto" in r.message]
    assert len(said) == 1 and "a plain backward, then the step" in said[0]
    for a, b in zip(got, ref):
        assert torch.equal(a, b)
    # always: no decision, every backward overlapped.
    got2, decision2, overlapped2 = _train(_config("always", tmp_path))
    assert decision2 is None and all(overlapped2)
    for a, b in zip(got2, ref):
        assert torch.equal(a, b)


def test_state_on_nvme_keeps_overlapping(tmp_path, monkeypatch):
    monkeypatch.setattr(_C, "usable_cpus", lambda: torch.get_num_threads())
    # Any I/O at all hides (the model is tiny); without I/O nothing would (no free core).
    monkeypatch.setattr(overlap_choice, "MIN_GAIN", 1e-9)
    _, decision, overlapped = _train(_config("auto", tmp_path, device="nvme"))
    assert decision["overlap"] is True and all(overlapped)
    assert "I/O" in decision["why"]


def test_bad_overlap_mode_names_the_key(tmp_path):
    with pytest.raises(Exception, match="strata.overlap_mode"):
        _train(_config("sometimes", tmp_path), steps=1)


def test_a_plain_backward_after_an_overlapped_step_gets_its_own_norm(tmp_path):
    """A backward with retain_graph (never overlapped) after an overlapped step: its clip
    factor comes from its own gradients (it came from the step before's statistics)."""
    def run(overlap):
        cfg = _config("always", tmp_path, device="nvme", overlap=overlap)
        cfg["gradient_clipping"] = 1.0
        model = _model()
        engine, _, _, _ = strata.initialize(model=model, config=cfg,
                                            model_parameters=model.parameters())
        g = torch.Generator().manual_seed(2)
        norms = []
        for k in range(4):
            loss = engine(torch.randn(8, 64, generator=g)).square().mean()
            engine.backward(loss, retain_graph=(k % 2 == 1))
            engine.step()
            norms.append(engine.get_global_grad_norm())
        weights = [p.detach().clone() for p in model.parameters()]
        engine.close()
        return norms, weights

    ref_norms, ref = run(False)
    norms, got = run(True)
    assert len(set(ref_norms)) == 4
    assert norms == ref_norms
    for a, b in zip(got, ref):
        assert torch.equal(a, b)
