"""Transient errors: bounded retries with backoff for hub pushes and reporters, nothing else."""

from __future__ import annotations

import errno
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from trainmedic.record.errors import ReadError
from trainmedic.watcher.events import Action
from trainmedic.watcher.retry import RetryPolicy, call_with_retries, install_retries, retrying, transient

NO_JITTER = RetryPolicy(attempts=4, base_delay=1.0, max_delay=3.0, jitter=False)


class Flaky:
    """Fails with `exc` on its first `failures` calls, then returns 'ok'."""

    def __init__(self, failures: int, exc: BaseException) -> None:
        self.failures = failures
        self.exc = exc
        self.calls = 0

    def __call__(self, *args: Any, **kwargs: Any) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.exc
        return "ok"


def _http_error(
    status: int, name: str = "HfHubHTTPError", module: str = "huggingface_hub.errors"
) -> Exception:
    cls = type(name, (OSError,), {"__module__": module})
    exc = cls(f"{status} Server Error")
    exc.response = SimpleNamespace(status_code=status)  # type: ignore[attr-defined]
    return exc


@pytest.mark.parametrize(
    "exc",
    [
        ConnectionResetError("reset by peer"),
        TimeoutError("timed out"),
        OSError(errno.ECONNRESET, "reset"),
        OSError(errno.ETIMEDOUT, "timed out"),
        OSError(errno.EAGAIN, "try again"),
        _http_error(503),
        _http_error(429, "HTTPError", "requests.exceptions"),
        _http_error(502, "HTTPStatusError", "httpx"),
        type("ReadTimeout", (Exception,), {"__module__": "requests.exceptions"})("read timed out"),
    ],
)
def test_network_errors_are_transient(exc: BaseException) -> None:
    assert transient(exc) is not None


@pytest.mark.parametrize(
    "exc",
    [
        ValueError("bad shape"),
        RuntimeError("CUDA error"),
        OSError(errno.EACCES, "permission denied"),
        FileNotFoundError("no such file"),
        _http_error(401),
        _http_error(404, "HTTPError", "requests.exceptions"),
        ReadError("x.safetensors", "truncated"),  # trainmedic's own ReadError is no network error
    ],
)
def test_other_errors_are_not_transient(exc: BaseException) -> None:
    assert transient(exc) is None


def test_a_call_failing_twice_succeeds_on_the_third_attempt_after_doubling_waits() -> None:
    flaky = Flaky(2, ConnectionResetError("reset by peer"))
    waits: list[float] = []
    heard: list[tuple[int, float]] = []
    out = call_with_retries(
        flaky,
        what="push",
        policy=NO_JITTER,
        sleep=waits.append,
        on_retry=lambda n, d, e, why: heard.append((n, d)),
    )
    assert out == "ok"
    assert flaky.calls == 3
    assert waits == [1.0, 2.0]
    assert heard == [(1, 1.0), (2, 2.0)]


def test_backoff_is_capped_and_jitter_stays_within_half_to_full_wait() -> None:
    assert [NO_JITTER.delay(k) for k in (1, 2, 3, 4)] == [1.0, 2.0, 3.0, 3.0]
    jittered = RetryPolicy(base_delay=4.0, jitter=True)
    assert all(2.0 <= jittered.delay(1) <= 4.0 for _ in range(50))


def test_after_the_budget_the_last_error_is_re_raised() -> None:
    error = TimeoutError("hub timed out")
    flaky = Flaky(10, error)
    waits: list[float] = []
    with pytest.raises(TimeoutError) as caught:
        call_with_retries(flaky, what="push", policy=NO_JITTER, sleep=waits.append)
    assert caught.value is error
    assert flaky.calls == 4
    assert len(waits) == 3


def test_an_unclassified_error_is_raised_at_once_without_retry() -> None:
    flaky = Flaky(1, _http_error(401))
    waits: list[float] = []
    with pytest.raises(OSError, match="401"):
        call_with_retries(flaky, what="push", policy=NO_JITTER, sleep=waits.append)
    assert flaky.calls == 1
    assert waits == []


def test_each_retry_is_an_action_at_the_current_step() -> None:
    actions: list[Action] = []
    fn = retrying(
        Flaky(2, ConnectionError("down")),
        what="_push_from_checkpoint",
        policy=NO_JITTER,
        act=actions.append,
        step=lambda: 17,
        sleep=lambda _: None,
    )
    assert fn() == "ok"
    assert [(a.step, a.action, a.detail["retry"]) for a in actions] == [(17, "retry", 1), (17, "retry", 2)]
    assert "_push_from_checkpoint failed" in actions[0].reason
    assert retrying(fn, what="x", policy=NO_JITTER, act=actions.append, step=lambda: 0) is fn


class _Reporter:
    """Stands in for a `report_to` integration (W&B, TensorBoard...): same module family."""

    __module__ = "transformers.integrations.integration_utils"

    def __init__(self, failures: int) -> None:
        self.flaky = Flaky(failures, ConnectionResetError("tracker unreachable"))
        self.logged: list[dict[str, Any]] = []

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> Any:
        self.flaky()
        self.logged.append(dict(logs or {}))
        return control


class _Own:
    def on_log(self, *args: Any, **kwargs: Any) -> None:
        raise ConnectionError("not a reporter: must not be retried")


def test_install_wraps_pushes_and_reporters_only_once_each() -> None:
    reporter, own = _Reporter(1), _Own()
    trainer = SimpleNamespace(
        state=SimpleNamespace(global_step=3),
        _push_from_checkpoint=Flaky(1, ConnectionResetError("reset")),
        push_to_hub=Flaky(0, ConnectionResetError("reset")),
        callback_handler=SimpleNamespace(callbacks=[own, reporter]),
    )
    actions: list[Action] = []
    policy = RetryPolicy(attempts=3, base_delay=0.0, jitter=False)
    wrapped = install_retries(trainer, actions.append, policy, sleep=lambda _: None)
    assert wrapped == ["_push_from_checkpoint", "push_to_hub", "_Reporter.on_log"]
    install_retries(trainer, actions.append, policy, sleep=lambda _: None)  # a second watch()
    assert trainer._push_from_checkpoint("checkpoint-3") == "ok"
    assert reporter.on_log(None, None, None, logs={"loss": 1.0}) is None
    assert reporter.logged == [{"loss": 1.0}]
    with pytest.raises(ConnectionError):
        own.on_log()
    assert [a.detail["call"] for a in actions] == ["_push_from_checkpoint", "_Reporter.on_log"]


# -- under watch(): a real toy run -----------------------------------------------------------------
@pytest.fixture(scope="module")
def base() -> Path:
    pytest.importorskip("torch")
    from trainmedic.toy.base import toy_base

    return toy_base()


def _trainer(base: Path, out: Path, push: Flaky) -> Any:
    from trainmedic.toy.training import toy_trainer

    trainer = toy_trainer(
        out, base=base, steps=4, batch_size=1, seq_len=16, save_strategy="steps", save_steps=2
    )
    trainer.args.push_to_hub = True  # after construction: the hub repo is never created
    trainer._push_from_checkpoint = push
    return trainer


def test_watch_retries_a_flaky_hub_push_and_reporter_and_logs_each_retry(base: Path, tmp_path: Path) -> None:
    from trainmedic.watcher import watch

    push = Flaky(2, ConnectionResetError("connection reset by peer"))
    from transformers import TrainerCallback

    trainer = _trainer(base, tmp_path, push)
    live = type("_Reporter", (_Reporter, TrainerCallback), {"__module__": _Reporter.__module__})
    reporter = live(1)
    trainer.add_callback(reporter)
    policy = RetryPolicy(attempts=3, base_delay=0.0, jitter=False)
    result = watch(trainer, echo=lambda _: None, preflight=0, retry=policy)
    assert result.status == "completed"
    assert push.calls == 4  # two saves, the first one retried twice
    retries = [a for a in result.actions if a.action == "retry"]
    assert [a.detail["call"] for a in retries] == [
        "_Reporter.on_log",
        "_push_from_checkpoint",
        "_push_from_checkpoint",
    ]
    assert len(reporter.logged) >= 4
    assert result.log_path is not None
    logged = [json.loads(line) for line in result.log_path.read_text().splitlines()]
    assert sum(r["type"] == "action" and r["action"] == "retry" for r in logged) == 3


def test_watch_re_raises_a_push_that_keeps_failing_with_a_postmortem(base: Path, tmp_path: Path) -> None:
    from trainmedic.watcher import watch

    push = Flaky(100, TimeoutError("hub timed out"))
    trainer = _trainer(base, tmp_path, push)
    policy = RetryPolicy(attempts=3, base_delay=0.0, jitter=False)
    with pytest.raises(TimeoutError, match="hub timed out"):
        watch(trainer, echo=lambda _: None, preflight=0, retry=policy)
    assert push.calls == 3
    pm = json.loads((tmp_path / "trainmedic-postmortem.json").read_text())
    assert pm["status"] == "crashed"
    assert sum(a["action"] == "retry" for a in pm["actions"]) == 2
