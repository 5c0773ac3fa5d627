import xml.etree.ElementTree as ET

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trainmedic.findings import Finding, RunReport, Verdict
from trainmedic.report import junit


def _reports() -> list[RunReport]:
    mixed = RunReport(
        "store/<bad> & co",
        "dlm store",
        [
            Finding(
                "training_drift",
                "training_drift",
                Verdict.FAIL,
                'loss rose "3" -> <10>',
                0.0,
                duration_s=0.01,
            ),
            Finding("gradient_ghost", "gradient_ghost", Verdict.WARN, "layer 7 stands out"),
            Finding("adapter_weights", "adapter_weights", Verdict.ERROR, "bad header\x00\x1b"),
            Finding("overfit", "overfit", Verdict.SKIP, "no eval loss"),
            Finding("nonfinite", "nonfinite", Verdict.PASS, "finite"),
        ],
        notes=["torn last line"],
        duration_s=0.5,
    )
    healthy = RunReport(
        "runs/ok", "HF checkpoint", [Finding("nonfinite", "nonfinite", Verdict.PASS, "finite")]
    )
    return [mixed, healthy, RunReport("empty", "", [])]


def _counts(node: ET.Element) -> dict[str, int]:
    return {k: int(node.get(k, "-1")) for k in ("tests", "failures", "errors", "skipped")}


@pytest.mark.parametrize(("fail_on", "failures"), [("fail", 1), ("warn", 2), ("error", 1)])
def test_outcomes_and_counts_match(fail_on, failures):
    root = ET.fromstring(junit.render(_reports(), fail_on=fail_on))
    assert root.tag == "testsuites"
    suites = root.findall("testsuite")
    assert [s.get("name") for s in suites] == ["store/<bad> & co", "runs/ok", "empty"]
    first = suites[0]
    assert _counts(first) == {"tests": 5, "failures": failures, "errors": 1, "skipped": 1}
    assert len(first.findall("testcase/failure")) == failures
    assert len(first.findall("testcase/error")) == 1
    assert len(first.findall("testcase/skipped")) == 1
    assert _counts(root) == {"tests": 7, "failures": failures, "errors": 1, "skipped": 2}
    for suite in suites:  # suite attributes agree with their own children
        cases = suite.findall("testcase")
        assert int(suite.get("tests")) == len(cases)
        assert int(suite.get("failures")) == len(suite.findall("testcase/failure"))


def test_cases_are_named_after_probes_with_layout_classname():
    root = ET.fromstring(junit.render(_reports()))
    cases = root.find("testsuite").findall("testcase")
    assert [c.get("name") for c in cases] == [
        "training_drift",
        "gradient_ghost",
        "adapter_weights",
        "overfit",
        "nonfinite",
    ]
    assert {c.get("classname") for c in cases} == {"dlm store"}
    failure = cases[0].find("failure")
    assert failure.get("message") == 'loss rose "3" -> <10>' and failure.get("type") == "fail"
    assert float(cases[0].get("time")) == pytest.approx(0.01)


def test_warn_passes_with_message_unless_fail_on_warn():
    root = ET.fromstring(junit.render(_reports(), fail_on="fail"))
    warn_case = root.find("testsuite").findall("testcase")[1]
    assert warn_case.find("failure") is None
    assert "WARN: layer 7 stands out" in warn_case.find("system-out").text


def test_nothing_to_check_is_a_skipped_case_not_an_empty_suite():
    root = ET.fromstring(junit.render(_reports()))
    empty = root.findall("testsuite")[2]
    assert _counts(empty) == {"tests": 1, "failures": 0, "errors": 0, "skipped": 1}
    assert "nothing to check" in empty.find("testcase/skipped").get("message")
    assert empty.find("testcase").get("classname") == "run"


def test_control_characters_cannot_break_the_xml():
    text = junit.render(_reports())
    assert "\x00" not in text and "\x1b" not in text
    error = ET.fromstring(text).find("testsuite").findall("testcase")[2].find("error")
    assert error.get("message").startswith("bad header")


def test_no_reports_is_still_valid_xml():
    root = ET.fromstring(junit.render([]))
    assert _counts(root) == {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}


@settings(max_examples=80, deadline=None)
@given(message=st.text(max_size=30), path=st.text(max_size=12), verdict=st.sampled_from(list(Verdict)))
def test_any_text_survives_as_parseable_xml(message, path, verdict):
    report = RunReport(path, "x", [Finding("probe", "probe", verdict, message)])
    case = ET.fromstring(junit.render([report], fail_on="warn")).find("testsuite/testcase")
    expected = junit._INVALID_XML.sub("\ufffd", message)
    child = case[0]
    if child.tag == "system-out":
        # XML parsers normalise line ends in element text
        assert child.text.endswith(expected.replace("\r\n", "\n").replace("\r", "\n"))
    else:
        assert child.get("message") == expected
