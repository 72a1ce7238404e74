"""What a user sees: the timeline report, progress output, and docs that match the schema."""

import io
import os
import re

import torch
import torch.nn as nn

import strata
import strata.optim
from strata import _C, report
from strata.progress import Progress
from conftest import ROOT, nvme_config


def test_report_has_the_engine_lanes(swap_dir, tmp_path):
    model = nn.Sequential(nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 64))
    opt = strata.optim.OffloadAdamW(model.parameters(), config=nvme_config(swap_dir, strata__trace__steps=2))
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(4, 64)).sum().backward()
        opt.step()
    trace = tmp_path / "trace.json"
    opt.write_trace(trace)
    opt.close()
    events, other = report.load_trace(trace)
    fig, lanes = report.build_figure(events, other)
    assert lanes == ["NVMe read", "CPU update", "NVMe write"]
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == lanes
    assert len(ax.patches) >= 3  # a bar per sub-group and stage of the last step
    fig_all, _ = report.build_figure(events, other, steps=None)
    assert len(fig_all.axes[0].patches) >= 2 * len(ax.patches)
    assert any("bound" in (l.get_label() or "") for l in ax.get_lines())
    caption = " ".join(t.get_text() for t in fig.texts)
    assert "I/O busy" in caption and "stall" in caption
    out = tmp_path / "step.png"
    assert report.render(trace, out) == lanes
    assert out.stat().st_size > 1000


def test_progress_log_mode_has_no_control_characters():
    buf = io.StringIO()  # not a terminal: auto -> log lines
    with Progress(5, "train", unit="step", stream=buf, interval=0.0) as p:
        for i in range(5):
            p.update(1, loss=1.0 / (i + 1))
    text = buf.getvalue()
    assert "[strata] train: 5/5 step" in text
    assert "\r" not in text and "\x1b" not in text


def test_progress_follows_the_time_budget_that_ends_the_run(monkeypatch):
    # Regression: the demo's progress showed an ETA for 300 steps (27 minutes) while the run
    # stops at its 3-minute budget. The total and the ETA now follow the end that comes first.
    import strata.progress as progress_mod

    clock = [1000.0]
    monkeypatch.setattr(progress_mod.time, "monotonic", lambda: clock[0])
    buf = io.StringIO()
    with Progress(300, "train", unit="step", stream=buf, interval=0.0, budget_s=20.0) as p:
        for _ in range(4):
            clock[0] += 1.0  # one step a second: the 20 s budget ends the run near step 20
            p.update(1)
        assert 19 <= p.expected_total() <= 21
    last = [l for l in buf.getvalue().splitlines() if l.startswith("[strata] train: 4/")][-1]
    assert "/300" not in last, last
    assert "time budget 00:20" in last and "eta 00:16" in last, last
    # Without a budget the step count is the end, as before.
    with Progress(300, "train", unit="step", stream=io.StringIO(), interval=0.0) as q:
        clock[0] += 1.0
        q.update(1)
        assert q.expected_total() == 300


def test_progress_bar_mode_on_a_terminal():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    buf = Tty()
    with Progress(3, "train", unit="step", stream=buf) as p:
        for _ in range(3):
            p.update(1)
    assert p.mode == "bar"
    assert "\r" in buf.getvalue()  # tqdm redraws the line


def test_config_doc_matches_the_schema():
    path = os.path.join(ROOT, "docs", "config.md")
    with open(path) as f:
        doc = f.read()
    assert doc == _C.config_markdown(), "docs/config.md is stale: regenerate it from the schema"
    keys = {r["path"] for r in _C.config_schema()}
    documented = set(re.findall(r"^\|\s*`([A-Za-z0-9_.]+)`\s*\|", doc, flags=re.M))
    assert keys <= documented, sorted(keys - documented)
    assert documented <= keys, sorted(documented - keys)


def test_engine_reports_progress_of_long_creation_work(swap_dir):
    from strata.progress import EngineProgress

    calls = []
    params = [torch.zeros(100_000), torch.zeros(50_000)]
    cfg = strata.load_config(nvme_config(swap_dir))
    specs = [(f"p{i}", p.numel(), "float32", 0, p.data_ptr()) for i, p in enumerate(params)]
    eng = _C.Engine(cfg.handle, specs, [{"kind": "adamw"}],
                    progress=lambda phase, done, total: calls.append((phase, done, total)))
    eng.close()
    phases = [c[0] for c in calls]
    assert "pinning memory" in phases and "writing the initial optimizer state" in phases
    last = [c for c in calls if c[0] == "writing the initial optimizer state"][-1]
    assert last[1] == last[2] >= 12 * 150_000
    # The bar/log helper: log lines (not a terminal) with the phase and MiB.
    buf = io.StringIO()
    prog = EngineProgress(mode="log", min_bytes=0)
    prog.bar_stream = buf
    import strata.progress as sp
    orig = sp.Progress
    sp.Progress = lambda *a, **k: orig(*a, **{**k, "stream": buf, "interval": 0.0})
    try:
        prog("writing the initial optimizer state", 0, 64 << 20)
        prog("writing the initial optimizer state", 64 << 20, 64 << 20)
    finally:
        sp.Progress = orig
    assert "[strata] writing the initial optimizer state: 64/64 MiB" in buf.getvalue()
