"""A bounded ring buffer of recent chat traffic (for the dashboard): newest first, alerts kept apart."""

from __future__ import annotations

import threading
from collections import deque
from typing import Any


class RecentTraffic:
    """The last `size` completions, and separately the last `size` that raised an alert."""

    def __init__(self, size: int = 200) -> None:
        self._all: deque[dict[str, Any]] = deque(maxlen=size)
        self._alerts: deque[dict[str, Any]] = deque(maxlen=size)
        self._lock = threading.Lock()

    def add(self, entry: dict[str, Any]) -> None:
        """Record `{"id", "created", "messages", "answer", "steer", "monitor"}`."""
        alerted = any(v.get("alert") for v in entry.get("monitor", {}).values())
        with self._lock:
            self._all.append(entry)
            if alerted:
                self._alerts.append(entry)

    def snapshot(self, limit: int) -> dict[str, list[dict[str, Any]]]:
        """`{"data": [...], "alerts": [...]}`, newest first, at most `limit` of each."""
        with self._lock:
            return {"data": list(reversed(self._all))[:limit], "alerts": list(reversed(self._alerts))[:limit]}
