"""live_events: the watcher's detections, treatments and ending, judged by documented rules."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trainmedic.findings import RunReport, Verdict
from trainmedic.probes.base import REGISTRY, run_probe
from trainmedic.probes.live_events import LiveEventsSpec, live_events
from trainmedic.record.load import load_run
from trainmedic.report import jsonio
from trainmedic.run import Run, Series
from trainmedic.watcher.runlog import RunLog

SPEC = LiveEventsSpec()


def ev(step: int, rule: str, severity: str = "fail", message: str = "m") -> dict[str, Any]:
    return {
        "type": "event",
        "step": step,
        "rule": rule,
        "severity": severity,
        "message": message,
        "evidence": {},
    }


def act(step: int, action: str, reason: str = "r") -> dict[str, Any]:
    return {"type": "action", "step": step, "action": action, "reason": reason, "detail": {}}


def end(status: str, step: int = 200, reason: str = "", superseded: bool = False) -> dict[str, Any]:
    rec = {
        "type": "run_complete",
        "run_id": "r",
        "step": step,
        "status": status,
        "reason": reason,
        "steps": step,
    }
    return rec | ({"superseded": True} if superseded else {})


def live_run(
    events: list[dict[str, Any]] | None = None,
    actions: list[dict[str, Any]] | None = None,
    ending: dict[str, Any] | None = None,
    steps: int = 200,
    layout: str = "watched HF output dir",
) -> Run:
    run = Run(Path("out"), layout)
    s = np.arange(1, steps + 1)
    run.train_loss = Series.of(s, 2.0 * np.exp(-s / 50) + 0.5)
    run.events = list(events or []) + ([ending] if ending else [])
    run.actions = list(actions or [])
    return run


def judge(run: Run, spec: LiveEventsSpec = SPEC) -> Any:
    return live_events(run, spec)


def test_registered_as_a_log_probe() -> None:
    probe = REGISTRY["live_events"]
    assert probe.needs == ("log",) and probe.spec_cls is LiveEventsSpec


@pytest.mark.parametrize("layout", ["HF output dir", "dlm store", "JSONL log", "trainer_state.json"])
def test_runs_without_a_live_record_are_skipped(layout: str) -> None:
    f = judge(live_run(ending=end("completed"), layout=layout))
    assert f.verdict is Verdict.SKIP
    assert layout in f.message


def test_clean_completed_run_passes() -> None:
    f = judge(live_run(ending=end("completed")))
    assert f.verdict is Verdict.PASS, f.message
    assert f.message == "watcher: no warnings, failures or treatments in 200 step(s); run completed"
    assert f.evidence["events"] == []


def test_info_events_and_few_clips_do_not_warn() -> None:
    clips = [act(s, "clip") for s in (40, 90, 150)]
    f = judge(live_run([ev(10, "warmup_done", "info")], clips, end("completed")))
    assert f.verdict is Verdict.PASS, f.message
    assert f.message == "watcher: 1 info event, 3 grad clips; run completed"
    assert f.evidence["events"] == []  # info events are not drawn


def test_treated_nan_warns_and_says_what_was_done() -> None:
    events = [ev(37, "nonfinite_loss")]
    actions = [act(37, "skip", "non-finite loss")] + [act(s, "clip") for s in (50, 60, 70)]
    f = judge(live_run(events, actions, end("completed")))
    assert f.verdict is Verdict.WARN
    assert (
        f.message
        == "watcher: 1 non-finite loss (step 37, skipped), 3 grad clips, 1 skipped update; run completed"
    )
    assert f.evidence["events"] == [
        {"step": 37, "label": "watcher: non-finite loss (skipped)", "severity": "treated"}
    ]
    assert f.evidence["untreated"] == []
    assert f.evidence["listed_events"][0]["treatment"] == "skip"


def test_untreated_fail_event_fails() -> None:
    f = judge(live_run([ev(37, "nonfinite_grad")], [act(60, "skip")], end("completed")))
    assert f.verdict is Verdict.FAIL
    assert "1 non-finite gradient (step 37, untreated)" in f.message
    assert [u["step"] for u in f.evidence["untreated"]] == [37]


def test_treatment_within_the_window_counts_and_later_does_not() -> None:
    events = [ev(37, "divergence")]
    assert judge(live_run(events, [act(39, "rollback")], end("completed"))).verdict is Verdict.WARN
    assert judge(live_run(events, [act(40, "rollback")], end("completed"))).verdict is Verdict.FAIL
    wide = LiveEventsSpec(treat_within=5)
    assert judge(live_run(events, [act(40, "rollback")], end("completed")), wide).verdict is Verdict.WARN


def test_an_event_is_credited_with_the_strongest_treatment_of_its_step() -> None:
    events = [ev(135, "divergence")]
    actions = [act(135, "clip"), act(135, "rollback")]  # ZClip acted in the same step
    f = judge(live_run(events, actions, end("completed")))
    assert "1 divergence (step 135, rolled back)" in f.message
    assert f.evidence["listed_events"][0]["treatment"] == "rollback"
    # a spike skipped in its own step keeps that treatment, whatever comes two steps later
    later = [act(133, "skip"), act(135, "rollback")]
    spike = judge(live_run([ev(133, "loss_spike")], later, end("completed")))
    assert spike.evidence["listed_events"][0]["treatment"] == "skip"


def test_a_stop_is_not_a_treatment_and_a_watcher_stop_fails() -> None:
    f = judge(
        live_run(
            [ev(120, "divergence")], [act(120, "stop", "diverged")], end("stopped", 120, "loss diverged")
        )
    )
    assert f.verdict is Verdict.FAIL
    assert "1 divergence (step 120, stopped), 1 stop by the watcher;" in f.message
    assert [u["step"] for u in f.evidence["untreated"]] == [120]  # a stop ends the run, it treats nothing
    assert f.message.endswith("run stopped at step 120: loss diverged")
    assert "stopped by the watcher" in f.evidence["reasons"]["fail"]


def test_crash_fails_even_without_events() -> None:
    f = judge(live_run(ending=end("crashed", 37, "RuntimeError: CUDA out of memory")))
    assert f.verdict is Verdict.FAIL
    assert f.message.endswith("run crashed at step 37: RuntimeError: CUDA out of memory")


def test_stopped_without_a_watcher_stop_only_warns() -> None:
    f = judge(live_run(ending=end("stopped", 80, "interrupted by the user")))
    assert f.verdict is Verdict.WARN
    assert "stopped early" in f.evidence["reasons"]["warn"]


def test_log_without_run_complete_warns_unless_told_not_to() -> None:
    f = judge(live_run())
    assert f.verdict is Verdict.WARN
    assert f.message.endswith(
        "no run_complete record after step 200: still running, or the process was killed"
    )
    assert judge(live_run(), LiveEventsSpec(warn_unfinished=False)).verdict is Verdict.PASS


def test_skips_above_the_fraction_fail() -> None:
    events = [ev(s, "nonfinite_loss") for s in range(100, 112)]
    actions = [act(s, "skip") for s in range(100, 112)]
    f = judge(live_run(events, actions, end("completed")))
    assert f.verdict is Verdict.FAIL  # 12 of 200 = 6% > 5%
    assert "12 non-finite losses (first at step 100, skipped)" in f.message
    assert "12 skipped updates (6% of 200 steps, over 5%)" in f.message
    f = judge(live_run(events[:10], actions[:10], end("completed")))
    assert f.verdict is Verdict.WARN  # 5%: at the limit, still a warning


def test_clips_above_the_allowance_warn() -> None:
    clips = [act(s, "clip") for s in range(1, 7)]
    f = judge(live_run(actions=clips, ending=end("completed")))
    assert f.verdict is Verdict.WARN  # 6 > max(5, 2% of 200 = 4)
    assert "6 grad clips (over the 5 tolerated)" in f.message
    long = judge(live_run(actions=clips, ending=end("completed"), steps=1000))
    assert long.verdict is Verdict.PASS  # 6 <= 2% of 1000


def test_rescue_across_steps_warns() -> None:
    f = judge(live_run(actions=[act(90, "rollback")], ending=end("completed")))
    assert f.verdict is Verdict.WARN
    assert "1 rollback" in f.message and "rollback needed" in f.evidence["reasons"]["warn"]


def test_warn_events_warn_and_are_drawn() -> None:
    f = judge(live_run([ev(55, "loss_spike", "warn"), ev(80, "loss_spike", "warn")], ending=end("completed")))
    assert f.verdict is Verdict.WARN
    assert "2 loss spikes (first at step 55)" in f.message
    assert [e["step"] for e in f.evidence["events"]] == [55, 80]
    assert {e["severity"] for e in f.evidence["events"]} == {"warn"}


def test_unknown_rules_and_actions_are_named_as_logged() -> None:
    f = judge(live_run([ev(5, "my_rule", "warn")], [act(9, "halve_batch")], end("completed")))
    assert "1 my_rule event (step 5)" in f.message and "1 halve_batch action" in f.message


def test_resume_after_a_crash_is_mentioned() -> None:
    run = live_run(ending=end("completed"))
    run.events.insert(0, end("crashed", 70, "killed", superseded=True))
    f = judge(run)
    assert f.verdict is Verdict.WARN  # it finished, but only because it was restarted
    assert f.message.endswith("run completed (resumed after it crashed at step 70)")
    assert f.evidence["reasons"] == {"fail": [], "warn": ["resumed after an early end"]}


def test_evidence_is_strict_json_and_capped() -> None:
    events = [ev(s, "loss_spike", "warn") for s in range(1, 200)]
    events[0]["evidence"] = {"z": math.inf, "loss": math.nan}
    f = judge(live_run(events, ending=end("completed")), LiveEventsSpec(max_listed=5, max_events=7))
    assert len(f.evidence["listed_events"]) == 5 and len(f.evidence["events"]) == 7
    assert f.evidence["listed_events"][0]["evidence"] == {"z": None, "loss": None}
    report = RunReport("out", "watched HF output dir", [f])
    data = json.loads(jsonio.dumps([report]), parse_constant=lambda c: pytest.fail(f"literal {c}"))
    assert data["runs"][0]["findings"][0]["verdict"] == "warn"


def test_written_run_log_is_judged_end_to_end(tmp_path: Path) -> None:
    with RunLog.open(tmp_path, run_id="e2e", max_steps=50) as log:
        for s in range(1, 51):
            log.step(s, loss=math.nan if s == 20 else 1.0 / s, lr=1e-4, grad_norm=0.3, skipped=s == 20)
        log.event(20, "nonfinite_loss", "fail", "loss is NaN")
        log.action(20, "skip", "non-finite loss")
        log.run_complete(50, "completed", "reached max_steps", 50)
    run = load_run(tmp_path)
    f = run_probe(REGISTRY["live_events"], run, SPEC)
    assert f.verdict is Verdict.WARN
    assert f.message == "watcher: 1 non-finite loss (step 20, skipped), 1 skipped update; run completed"


json_scalars = st.none() | st.booleans() | st.integers(-(2**66), 2**66) | st.floats() | st.text(max_size=6)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)
live_record = st.fixed_dictionaries(
    {"type": st.sampled_from(["event", "action", "eval", "run_complete", "banner", "step"])},
    optional={
        "step": st.integers(-5, 300) | json_values,
        "rule": st.sampled_from(["nonfinite_loss", "loss_spike"]) | json_values,
        "severity": st.sampled_from(["info", "warn", "fail"]) | json_values,
        "action": st.sampled_from(["skip", "clip", "stop", "rollback"]) | json_values,
        "status": st.sampled_from(["completed", "stopped", "crashed"]) | json_values,
        "reason": json_values,
        "message": json_values,
        "evidence": json_values,
        "eval_loss": json_values,
        "loss": json_values,
        "run_id": st.sampled_from(["a", "b"]),
    },
)


@settings(max_examples=120, deadline=None)
@given(st.lists(live_record, max_size=15))
def test_random_live_records_never_break_the_reader_or_the_probe(records: list[dict[str, Any]]) -> None:
    banner = {"type": "banner", "writer": "trainmedic", "run_id": "a"}
    text = "".join(json.dumps(r, allow_nan=True) + "\n" for r in [banner, *records])
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "log.jsonl"
        path.write_text(text)
        run = load_run(path)
    assert run.layout == "trainmedic run log"
    assert not any("internal error" in p.message for p in run.problems)
    f = run_probe(REGISTRY["live_events"], run, SPEC)
    assert "failed internally" not in f.message
    assert f.verdict is not Verdict.SKIP
    assert f.verdict is not Verdict.ERROR or f.message.startswith("could not read the log"), f.message
    json.loads(jsonio.dumps([RunReport(str(path), run.layout, [f])]), parse_constant=_refuse)


def _refuse(literal: str) -> None:
    raise AssertionError(f"non-strict JSON literal {literal}")
