import json
import math

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import trainmedic
from trainmedic.findings import Finding, RunReport, Verdict
from trainmedic.record.errors import ReadError
from trainmedic.report import jsonio


def _healthy() -> RunReport:
    return RunReport(
        path="runs/ok",
        layout="HF checkpoint",
        findings=[
            Finding("nonfinite", "nonfinite", Verdict.PASS, "all 300 values finite", 1.0, {"checked": 300}),
            Finding(
                "training_drift", "training_drift", Verdict.PASS, "loss 3.1 -> 0.9", 0.9, {"ratio": 0.29}
            ),
        ],
        run_label="checkpoint-300",
        sources=["runs/ok/checkpoint-300/trainer_state.json"],
        curves={"train_loss": {"steps": [10, 20, 30], "values": [3.1, None, 0.9]}},
        duration_s=0.012,
    )


def _failing() -> RunReport:
    return RunReport(
        path="store/bad",
        layout="dlm store",
        findings=[
            Finding(
                "training_drift",
                "training_drift",
                Verdict.FAIL,
                "loss rose 3.0 -> 10.0",
                0.0,
                {"events": [{"step": 20, "label": "spike", "severity": "fail"}]},
            ),
            Finding(
                "gradient_ghost",
                "gradient_ghost",
                Verdict.WARN,
                "layer 7 stands out",
                0.7,
                {
                    "per_layer": {
                        "metric": "m",
                        "layers": [0, 1, 7],
                        "values": [1.0, None, 9.0],
                        "flagged": [7],
                    }
                },
            ),
            Finding("overfit", "overfit", Verdict.SKIP, "no eval loss"),
        ],
        notes=["logs/train-1.jsonl:40: torn last line"],
        other_runs=[{"run_id": "abc", "steps": 100}],
    )


def _nonfinite() -> RunReport:
    return RunReport(
        path="store/nan",
        layout="dlm store",
        findings=[
            Finding(
                "nonfinite",
                "nonfinite",
                Verdict.FAIL,
                "non-finite grad norm at step 40",
                None,
                {"first": float("nan"), "nested": {"xs": [1.0, float("inf"), -float("inf")]}},
            )
        ],
        curves={"grad_norm": {"steps": [10, 20], "values": [1.0, float("nan")]}},
    )


def _raise_constant(token: str) -> None:
    raise AssertionError(f"non-standard JSON constant {token}")


def test_round_trip_gives_equal_reports():
    reports = [_healthy(), _failing(), RunReport("empty", "unknown", [])]
    assert jsonio.loads(jsonio.dumps(reports)) == reports


def test_nonfinite_values_become_null_with_a_note_naming_them():
    data = jsonio.dumps([_nonfinite()])
    for token in (b"NaN", b"Infinity"):
        assert token not in data
    doc = json.loads(data, parse_constant=_raise_constant)
    run = doc["runs"][0]
    assert run["findings"][0]["evidence"]["first"] is None
    assert run["findings"][0]["evidence"]["nested"]["xs"] == [1.0, None, None]
    assert run["curves"]["grad_norm"]["values"] == [1.0, None]
    note = run["notes"][-1]
    assert "4" in note and "findings[0].evidence.first" in note and "curves.grad_norm.values[1]" in note


def test_redumping_a_sanitised_report_is_stable():
    first = jsonio.dumps([_nonfinite()], generated_at="2024-01-01T00:00:00Z")
    again = jsonio.dumps(jsonio.loads(first), generated_at="2024-01-01T00:00:00Z")
    assert again == first


def test_document_carries_version_tool_fail_on_and_summary():
    doc = orjson.loads(jsonio.dumps([_healthy(), _failing(), RunReport("e", "unknown", [])], fail_on="warn"))
    assert doc["schema_version"] == jsonio.SCHEMA_VERSION
    assert doc["version"] == trainmedic.__version__
    assert doc["fail_on"] == "warn"
    assert doc["generated_at"].endswith("Z")
    assert doc["summary"] == {
        "runs": 3,
        "by_worst": {"pass": 1, "warn": 0, "fail": 1, "error": 0},
        "nothing_to_check": 1,
        "gate_fails": True,
    }
    run = doc["runs"][1]
    assert run["worst"] == "fail" and run["headline"] == "FAIL: training_drift"
    assert list(run["findings"][0]) == [
        "name",
        "kind",
        "verdict",
        "score",
        "message",
        "evidence",
        "duration_s",
    ]


def test_numpy_values_in_evidence_are_converted():
    f = Finding(
        "p",
        "p",
        Verdict.PASS,
        "ok",
        evidence={"a": np.float32(1.5), "b": np.arange(3), "c": np.float64("nan")},
    )
    doc = orjson.loads(jsonio.dumps([RunReport("x", "y", [f])]))
    assert doc["runs"][0]["findings"][0]["evidence"] == {"a": 1.5, "b": [0, 1, 2], "c": None}


def test_undecodable_path_is_written_not_crashed():
    data = jsonio.dumps([RunReport("runs/\udcff-bad", "unknown", [])])
    assert jsonio.loads(data)[0].path == "runs/\\udcff-bad"


def test_gate_follows_fail_on():
    warn_only = [RunReport("w", "x", [Finding("p", "p", Verdict.WARN, "meh")])]
    errored = [RunReport("e", "x", [Finding("p", "p", Verdict.ERROR, "unreadable")])]
    assert not jsonio.gate_fails(warn_only, "fail")
    assert jsonio.gate_fails(warn_only, "warn")
    assert jsonio.gate_fails(errored, "fail")
    with pytest.raises(ValueError, match="fail_on must be one of"):
        jsonio.gate_fails(warn_only, "skip")


@pytest.mark.parametrize(
    ("doc", "expected"),
    [
        ({"runs": []}, "no 'schema_version'"),
        ([1, 2], "no 'schema_version'"),
        ({"schema_version": 99, "runs": []}, "version 99 is not supported.*newer"),
        ({"schema_version": "1", "runs": []}, "schema_version: expected an integer"),
        ({"schema_version": 1}, "missing field 'runs'"),
        ({"schema_version": 1, "runs": [{"findings": []}]}, r"runs\[0\]: missing field 'path'"),
        (
            {"schema_version": 1, "runs": [{"path": "p", "findings": [{"name": "n", "verdict": "great"}]}]},
            r"runs\[0\]\.findings\[0\]\.verdict: 'great' is not a verdict",
        ),
        (
            {"schema_version": 1, "runs": [{"path": "p", "findings": [], "notes": [3]}]},
            r"runs\[0\]\.notes\[0\]: expected a string",
        ),
        (
            {"schema_version": 1, "runs": [{"path": "p", "findings": [], "curves": {"l": {"steps": [1]}}}]},
            "curves.l: missing field 'values'",
        ),
    ],
)
def test_bad_documents_are_refused_with_the_field_named(doc, expected):
    with pytest.raises(ReadError, match=expected) as info:
        jsonio.loads(json.dumps(doc), source="report.json")
    assert str(info.value).startswith("report.json")


def test_invalid_json_names_file_and_line():
    with pytest.raises(ReadError, match="not valid JSON") as info:
        jsonio.loads(b'{\n"schema_version": 1,\n"runs": [NaN]}', source="r.json")
    assert info.value.line == 3 and str(info.value).startswith("r.json:3")


_finite_floats = st.floats(allow_nan=False, allow_infinity=False, width=64)
_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | _finite_floats | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=60, deadline=None)
@given(
    evidence=st.dictionaries(st.text(max_size=8), _json_values, max_size=5),
    message=st.text(max_size=40),
    verdict=st.sampled_from(list(Verdict)),
    score=st.none() | st.floats(0, 1),
)
def test_round_trip_holds_for_arbitrary_json_evidence(evidence, message, verdict, score):
    report = RunReport("p", "l", [Finding("n", "k", verdict, message, score, evidence)])
    assert jsonio.loads(jsonio.dumps([report])) == [report]


@settings(max_examples=40, deadline=None)
@given(values=st.lists(st.floats(width=64) | st.none(), max_size=20))
def test_any_float_curve_serialises_strictly(values):
    report = RunReport(
        "p", "l", [], curves={"train_loss": {"steps": list(range(len(values))), "values": values}}
    )
    doc = json.loads(jsonio.dumps([report]), parse_constant=_raise_constant)
    out = doc["runs"][0]["curves"]["train_loss"]["values"]
    assert out == [v if v is not None and math.isfinite(v) else None for v in values]
