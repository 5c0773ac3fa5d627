"""Transient errors: a hub push or a tracker's logging call that fails for a moment is retried.

A dropped connection while pushing a checkpoint or sending metrics to W&B should not end a
week-long run, but a wrong token, a missing repository or a bug must not be retried into a hang.
So only errors classified as transient are retried (network resets and timeouts, HTTP 408/425/429
and 5xx), a bounded number of times with exponential backoff; each retry is an `Action` in the
run log, and after the last attempt the error is re-raised (the supervisor then writes its
postmortem). `requests`, `httpx` and `huggingface_hub` errors are recognised by class name, so
nothing is imported to recognise them.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from trainmedic.watcher.events import Action

logger = logging.getLogger("trainmedic")
T = TypeVar("T")

TRANSIENT_ERRNOS = frozenset({errno.ECONNRESET, errno.ETIMEDOUT, errno.EAGAIN, errno.ECONNABORTED})
# Network-layer failures of requests, urllib3, httpx and huggingface_hub, by class name.
TRANSIENT_NAMES = frozenset(
    {
        "ConnectionError",  # requests (also the builtin, matched by type below)
        "Timeout",
        "ConnectTimeout",
        "ReadTimeout",
        "ChunkedEncodingError",
        "ProtocolError",  # urllib3: connection dropped mid-response
        "TimeoutException",  # httpx
        "ConnectError",
        "ReadError",
        "WriteError",
        "RemoteProtocolError",
        "PoolTimeout",
    }
)
NETWORK_PACKAGES = frozenset({"requests", "urllib3", "httpx", "httpcore", "huggingface_hub", "aiohttp"})
HTTP_ERROR_NAMES = frozenset({"HTTPError", "HfHubHTTPError", "HTTPStatusError"})
TRANSIENT_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
_MARK = "__trainmedic_retry__"


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to try: `attempts` calls in all, waiting `base_delay * 2**k` seconds (at most
    `max_delay`) between them; `jitter` spreads the waits so many workers do not retry at once."""

    attempts: int = 4
    base_delay: float = 2.0
    max_delay: float = 60.0
    jitter: bool = True

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"attempts must be at least 1, got {self.attempts}")
        if self.base_delay < 0 or self.max_delay < 0:
            raise ValueError("retry delays must not be negative")

    def delay(self, retry: int) -> float:
        """Seconds to wait before retry number `retry` (1 for the first)."""
        wait = min(self.max_delay, self.base_delay * 2 ** (retry - 1))
        return wait * random.uniform(0.5, 1.0) if self.jitter else wait


def transient(exc: BaseException) -> str | None:
    """Why `exc` is worth retrying, in a few words; None when it is not (retrying cannot help)."""
    # only network libraries' classes count by name (trainmedic has a ReadError of its own)
    names = {c.__name__ for c in type(exc).__mro__ if c.__module__.split(".")[0] in NETWORK_PACKAGES}
    if names & HTTP_ERROR_NAMES:
        status = _status(exc)
        if status is None or status in TRANSIENT_STATUS or status >= 500:
            return f"HTTP {status}" if status is not None else "HTTP error without a status"
        return None
    if isinstance(exc, ConnectionError | TimeoutError):
        return type(exc).__name__
    if isinstance(exc, OSError) and exc.errno in TRANSIENT_ERRNOS:
        return errno.errorcode.get(exc.errno, str(exc.errno))
    found = names & TRANSIENT_NAMES
    return type(exc).__name__ if found else None


def call_with_retries(
    fn: Callable[..., T],
    *args: Any,
    what: str,
    policy: RetryPolicy,
    on_retry: Callable[[int, float, BaseException, str], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
    **kwargs: Any,
) -> T:
    """Call `fn`; on a transient error wait and call again, up to `policy.attempts` calls.

    `on_retry(retry, delay, exc, why)` hears of each retry before its wait. The last transient
    error, and any other error at once, propagates unchanged.
    """
    retry = 0
    while True:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            why = transient(exc)
            if why is None or retry + 1 >= policy.attempts:
                if why is not None:
                    logger.error("[trainmedic] %s failed %d times (%s); giving up", what, retry + 1, why)
                raise
            retry += 1
            delay = policy.delay(retry)
            if on_retry is not None:
                on_retry(retry, delay, exc, why)
            sleep(delay)


def retrying(
    fn: Callable[..., T],
    *,
    what: str,
    policy: RetryPolicy,
    act: Callable[[Action], None],
    step: Callable[[], int],
    sleep: Callable[[float], None] = time.sleep,
) -> Callable[..., T]:
    """`fn` wrapped by `call_with_retries`, each retry reported to `act` as a `retry` Action."""
    if getattr(fn, _MARK, False):
        return fn  # already wrapped: nesting would multiply the attempts

    def report(retry: int, delay: float, exc: BaseException, why: str) -> None:
        reason = (
            f"{what} failed ({why}: {type(exc).__name__}: {exc}); "
            f"retry {retry} of {policy.attempts - 1} in {delay:.3g} s"
        )
        detail = {"call": what, "retry": retry, "of": policy.attempts - 1, "delay_s": delay, "error": why}
        act(Action(step(), "retry", reason, detail))

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        return call_with_retries(fn, *args, what=what, policy=policy, on_retry=report, sleep=sleep, **kwargs)

    setattr(wrapper, _MARK, True)
    return wrapper


def install_retries(
    trainer: Any,
    act: Callable[[Action], None],
    policy: RetryPolicy | None = None,
    *,
    sleep: Callable[[float], None] = time.sleep,
) -> list[str]:
    """Retry transient errors in the trainer's hub pushes and its reporters' logging calls.

    Wraps `trainer._push_from_checkpoint` (the push at each save), `trainer.push_to_hub` and the
    `on_log` of every reporting integration among the trainer's callbacks (W&B, TensorBoard,
    MLflow, trackio, ...: the callbacks transformers adds for `report_to`). Each callback is
    wrapped alone, so a retry does not call the others again. Returns what was wrapped.
    """
    policy = policy or RetryPolicy()
    if getattr(trainer, "_trainmedic_retries", None) is not None:  # a second watch(): wrapped once
        return list(trainer._trainmedic_retries)

    def step() -> int:
        return int(getattr(getattr(trainer, "state", None), "global_step", 0) or 0)

    wrapped = []
    for name in ("_push_from_checkpoint", "push_to_hub"):
        fn = getattr(trainer, name, None)
        if callable(fn):
            setattr(trainer, name, retrying(fn, what=name, policy=policy, act=act, step=step, sleep=sleep))
            wrapped.append(name)
    for cb in getattr(getattr(trainer, "callback_handler", None), "callbacks", []):
        if not is_reporter(cb):
            continue
        what = f"{type(cb).__name__}.on_log"
        cb.on_log = retrying(cb.on_log, what=what, policy=policy, act=act, step=step, sleep=sleep)
        wrapped.append(what)
    with contextlib.suppress(AttributeError, TypeError):  # a trainer that refuses attributes
        trainer._trainmedic_retries = tuple(wrapped)
    return wrapped


def is_reporter(callback: Any) -> bool:
    """A callback that sends logs somewhere (the integrations transformers adds for `report_to`)."""
    return type(callback).__module__.startswith("transformers.integrations")


def _status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    code = getattr(response, "status_code", None)
    if code is None:
        code = getattr(exc, "status_code", None)
    return code if isinstance(code, int) else None
