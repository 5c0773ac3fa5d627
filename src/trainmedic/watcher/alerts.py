"""Alerts to the experiment tracker the user already watches."""

from __future__ import annotations

from typing import Any

from trainmedic.watcher.events import Event


def trackio_alert(trainer: Any, event: Event) -> None:
    """Raise a trackio alert for warnings and errors when trackio is the active reporter."""
    if event.severity == "info" or trainer is None:
        return
    report_to = getattr(getattr(trainer, "args", None), "report_to", None) or []
    if "trackio" not in report_to:
        return
    try:
        import trackio
    except ImportError:
        return
    level = trackio.AlertLevel.ERROR if event.severity == "fail" else trackio.AlertLevel.WARN
    trackio.alert(title=f"trainmedic: {event.rule}", text=event.message, level=level)
