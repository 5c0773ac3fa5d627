import math
import re
from html.parser import HTMLParser

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trainmedic.findings import Finding, RunReport, Verdict
from trainmedic.report import html, svg
from trainmedic.report.jsonio import dumps, loads

SCRIPT = "<script>alert('x')</script>"


class _Collector(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.stack: list[str] = []
        self.event_groups = 0
        self.scripts = 0
        self.titles: list[str] = []
        self._in_title = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append((tag, a))
        if tag == "script":
            self.scripts += 1
        if tag == "g" and "event" in (a.get("class") or "").split():
            self.event_groups += 1
        self._in_title = tag == "title"

    def handle_endtag(self, tag):
        self._in_title = False

    def handle_data(self, data):
        if self._in_title:
            self.titles.append(data)


def _parse(text: str) -> _Collector:
    p = _Collector()
    p.feed(text)
    p.close()
    return p


def _failing() -> RunReport:
    steps = list(range(0, 500, 5))
    loss = [3.0 * math.exp(-s / 150) + 0.4 for s in steps]
    loss[20] = None  # a gap where the logged value was non-finite
    events = [
        {"step": 100, "label": "spike x5", "severity": "fail"},
        {"step": 250, "label": "rise", "severity": "warn"},
        {"step": 400, "label": "spike", "severity": "warn"},
    ]
    return RunReport(
        path="store/bad",
        layout="dlm store",
        findings=[
            Finding(
                "training_drift",
                "training_drift",
                Verdict.FAIL,
                f"diverged {SCRIPT}",
                0.1,
                {"events": events},
            ),
            Finding(
                "nonfinite",
                "nonfinite",
                Verdict.FAIL,
                "NaN grad norm",
                None,
                {"events": [{"step": 105, "label": "grad_norm is nan", "severity": "fail"}], "count": 1},
            ),
            Finding(
                "gradient_ghost",
                "gradient_ghost",
                Verdict.WARN,
                "layer 3 stands out",
                0.7,
                {
                    "per_layer": {
                        "metric": "exp_avg_sq mean",
                        "layers": [0, 1, 2, 3, 4],
                        "values": [1e-8, 1.1e-8, None, 6e-8, 1e-8],
                        "flagged": [3],
                    }
                },
            ),
        ],
        notes=[f"note with {SCRIPT}"],
        curves={
            "train_loss": {"steps": steps, "values": loss},
            "grad_norm": {"steps": steps, "values": [1.0] * len(steps)},  # constant series
            "eval_loss": {"steps": [100, 300, 495], "values": [1.5, 0.9, 1.2]},
        },
    )


def _healthy(path: str) -> RunReport:
    return RunReport(
        path,
        "HF checkpoint",
        [Finding("nonfinite", "nonfinite", Verdict.PASS, "finite")],
        curves={"train_loss": {"steps": [1], "values": [2.0]}},
    )


def test_one_run_has_charts_event_markers_and_per_layer_bars():
    text = html.render([_failing()])
    p = _parse(text)
    svgs = [a for tag, a in p.tags if tag == "svg"]
    classes = [a["class"] for a in svgs]
    assert classes == ["chart loss", "chart grad-norm", "chart bars"]
    for a in svgs:
        assert float(a["width"]) > 0 and float(a["height"]) > 0
    assert p.event_groups == 4
    assert text.count('class="event ev-fail"') == 2 and text.count('class="event ev-warn"') == 2
    assert any("training_drift: spike x5 (step 100, failure)" in t for t in p.titles)
    flagged = [a for tag, a in p.tags if tag == "rect" and a.get("class") == "bar flagged"]
    assert len(flagged) == 1
    assert len([a for tag, a in p.tags if tag == "rect" and a.get("class") == "bar"]) == 3
    assert any("layer 2: no value" in t for t in p.titles)
    assert text.count("<polyline") >= 4  # two loss segments around the gap, eval, grad norm


def test_data_strings_are_escaped():
    text = html.render([_failing()])
    assert SCRIPT not in text
    assert "diverged &lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in text
    assert _parse(text).scripts == 0


def test_no_external_references():
    text = html.render([_failing(), _healthy("https://example.com/run")])
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:|//)""", text, re.I)
    assert "@import" not in text and "url(" not in text
    assert "http://" not in text  # not even an SVG namespace


def test_several_runs_get_a_linked_summary_table():
    reports = [_failing(), _healthy("runs/ok"), RunReport("empty", "unknown", [])]
    p = _parse(html.render(reports))
    links = [a["href"] for tag, a in p.tags if tag == "a"]
    ids = {a["id"] for tag, a in p.tags if tag == "section" and "id" in a}
    assert links == ["#run-1", "#run-2", "#run-3"]
    assert ids == {"run-1", "run-2", "run-3"}
    text = html.render(reports)
    assert "3 runs: 1 pass, 1 fail, 1 nothing to check" in text
    assert text.count("badge v-none") == 2  # summary row and the run's headline


def test_json_round_trip_renders_the_same_html():
    reports = [_failing(), _healthy("runs/ok")]
    assert html.render(loads(dumps(reports)), generated_at="t") == html.render(reports, generated_at="t")


def test_run_without_curves_or_findings_renders_without_charts():
    p = _parse(html.render([RunReport("bare", "unknown", [], notes=["nothing found"])]))
    assert not [t for t, _ in p.tags if t == "svg"]


@pytest.mark.parametrize(
    ("lo", "hi"),
    [(0.0, 1.0), (0.37, 0.41), (3.0, 3.0), (0.0, 0.0), (-2.0, 7.0), (1e-9, 7e-9), (0, 1_000_000)],
)
def test_axis_ticks_are_round_and_cover_the_data(lo, hi):
    axis = svg.nice_axis(lo, hi)
    assert axis.lo <= lo and axis.hi >= hi and axis.hi > axis.lo
    assert 2 <= len(axis.ticks) <= 12
    mantissa = axis.step / 10 ** math.floor(math.log10(axis.step))
    assert any(math.isclose(mantissa, m) for m in (1, 2, 2.5, 5, 10))
    labels = [svg.tick_label(t, axis.step) for t in axis.ticks]
    assert len(set(labels)) == len(labels)


def test_integer_axis_uses_whole_steps_and_short_labels():
    axis = svg.nice_axis(0, 1_000_000, integer=True)
    assert all(float(t).is_integer() for t in axis.ticks)
    assert svg.tick_label(1_000_000, axis.step) == "1M"
    assert svg.tick_label(250_000, 50_000) == "250k"


def test_line_chart_with_nothing_finite_is_empty():
    assert svg.line_chart([svg.Line("x", [1, 2], [None, float("nan")], "#000")], title="t") == ""


_scalars = st.none() | st.booleans() | st.integers(-(10**6), 10**6) | st.floats() | st.text(max_size=6)
_anything = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
)
_events = st.lists(
    st.fixed_dictionaries(
        {"step": _scalars, "label": _scalars, "severity": st.sampled_from(["warn", "fail", "x"])}
    ),
    max_size=5,
)
_per_layer = st.fixed_dictionaries(
    {"metric": _scalars, "layers": st.lists(_scalars, max_size=6), "values": st.lists(_scalars, max_size=6)},
    optional={"flagged": _anything},
)


@settings(max_examples=60, deadline=None)
@given(
    events=_events | _anything,
    per_layer=_per_layer | _anything,
    values=st.lists(st.floats() | st.none(), max_size=12),
    message=st.text(max_size=20),
)
def test_odd_evidence_and_curves_never_break_the_page(events, per_layer, values, message):
    finding = Finding("p", "p", Verdict.WARN, message, evidence={"events": events, "per_layer": per_layer})
    curves = {"train_loss": {"steps": list(range(len(values))), "values": values}}
    text = html.render([RunReport("r", "l", [finding], curves=curves)])
    p = _parse(text)
    assert p.scripts == 0
    for tag, a in p.tags:
        if tag == "svg":
            assert float(a["width"]) > 0 and float(a["height"]) > 0
    coords = re.findall(r' (?:x|y|x1|x2|y1|y2|cx|cy|height|width)="([^"]*)"', text)
    coords += [c for pts in re.findall(r'points="([^"]*)"', text) for c in re.split("[ ,]", pts)]
    assert all(math.isfinite(float(c)) for c in coords)


def test_undecodable_file_names_still_encode_as_utf8():
    report = RunReport("runs/\udcff", "x", [Finding("p\udc80", "p", Verdict.PASS, "ok")])
    text = html.render([report])
    assert "runs/\\udcff" in text.encode("utf-8").decode("utf-8")


def _curve(steps: list[int]) -> dict[str, list[float]]:
    return {"steps": [float(s) for s in steps], "values": [1.0 + 0.001 * s for s in steps]}


def _x_ticks(svg_text: str) -> list[str]:
    """The step-axis labels of one chart (the ticks drawn under its plot)."""
    return re.findall(
        r'<text class="tick" x="[0-9.]+" y="[0-9.]+" text-anchor="middle">([^<]*)</text>', svg_text
    )


def test_every_curve_chart_of_a_run_shares_one_step_axis() -> None:
    report = RunReport(
        "r",
        "HF output dir",
        [],
        curves={"train_loss": _curve(list(range(1, 201))), "grad_norm": _curve(list(range(1, 61)))},
    )
    page = html.render([report])
    charts = re.findall(r"<svg class=\"chart [^\"]*\".*?</svg>", page)
    assert len(charts) == 2
    assert _x_ticks(charts[0]) == _x_ticks(charts[1]) and _x_ticks(charts[0])[-1] == "200"


def test_ticks_in_steps_of_two_and_a_half_keep_their_decimal() -> None:
    axis = svg.nice_axis(0.0, 10.0, target=4)
    assert [svg.tick_label(t, axis.step) for t in axis.ticks] == ["0", "2.5", "5.0", "7.5", "10.0"]


def test_treated_events_have_their_own_colour_and_a_legend_says_what_each_colour_means() -> None:
    events = [
        {"step": 10, "label": "non-finite loss", "severity": "fail"},
        {"step": 20, "label": "watcher: non-finite loss (skipped)", "severity": "treated"},
    ]
    report = RunReport(
        "r",
        "watched HF output dir",
        [Finding("live_events", "live_events", Verdict.WARN, "m", None, {"events": events})],
        curves={"train_loss": _curve(list(range(1, 31)))},
    )
    page = html.render([report])
    fail_dot = f'fill="{html.SEVERITY_COLORS["fail"]}"'
    treated_dot = f'fill="{html.SEVERITY_COLORS["treated"]}"'
    assert fail_dot in page and treated_dot in page and fail_dot != treated_dot
    legend = re.search(r'<p class="legend">(.*?)</p>', page)
    assert legend is not None
    words = re.sub(r"<[^>]+>", " ", legend.group(1))
    assert "failure" in words and "treated by the watcher" in words and "warning" not in words


def test_an_event_list_cut_by_a_probe_says_how_many_are_not_shown() -> None:
    events = [{"step": s, "label": "loss spike", "severity": "warn"} for s in range(50)]
    finding = Finding(
        "training_drift", "training_drift", Verdict.WARN, "m", None, {"events": events, "events_total": 73}
    )
    page = html.render([RunReport("r", "HF output dir", [finding], curves={"train_loss": _curve([1, 50])})])
    assert "50 flagged event(s) (and more" in page
    assert "training_drift: 23 more not shown (50 of 73, failures first)" in page


def test_a_preface_tells_the_story_first_and_is_escaped() -> None:
    preface = html.Preface(
        "what the demo did",
        paragraphs=[f"faults were injected {SCRIPT}"],
        items=["step 60: a NaN batch"],
        table_headers=["", "nll round", "kl_rev round"],
        table_rows=[["KL to the original", "0.7688", "0.2218"]],
        table_caption="heal, on held-out names",
    )
    page = html.render([RunReport("r", "unknown", [])], preface=preface)
    assert page.index("what the demo did") < page.index('<section class="run"')
    assert SCRIPT not in page and "step 60: a NaN batch" in page and "0.2218" in page
    assert "<caption>heal, on held-out names</caption>" in page
