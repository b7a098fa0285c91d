"""Noticing an event loop that stopped running: a plugin action that calls a blocking
function (requests.get, time.sleep, a synchronous driver) holds the whole process, every
other execution and the lease renewals with it, and asyncio's timeouts cannot interrupt it.
The operator is told where the loop's thread is and whose execution it was running, once
per blocked period, so the plugin can be fixed instead of guessed at."""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
from typing import Any

from ipaas.lifecycle import innermost_frames
from ipaas.plugin_host import RUNNING_ACTIONS

log = logging.getLogger("ipaas.loop")

BLOCKED_AFTER = 2.0  # seconds without a turn of the loop; a healthy loop turns in milliseconds
_BEAT = 0.5
_FRAMES = 8


class LoopWatch:
    def __init__(self, loop: asyncio.AbstractEventLoop, blocked_after: float = BLOCKED_AFTER, beat: float = _BEAT) -> None:
        self.loop = loop
        self.blocked_after = blocked_after
        self.beat = beat
        self._last = time.monotonic()
        self._loop_thread = threading.get_ident()
        self._stopped = threading.Event()
        self._handle: asyncio.TimerHandle | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """From the loop's own thread."""
        self._loop_thread = threading.get_ident()
        self._tick()
        self._thread = threading.Thread(target=self._watch, name="ipaas-loop-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        if self._handle is not None:
            self._handle.cancel()

    def _tick(self) -> None:
        self._last = time.monotonic()
        self._handle = self.loop.call_later(self.beat, self._tick)

    def _watch(self) -> None:
        reported = False
        while not self._stopped.wait(self.beat):
            lag = time.monotonic() - self._last
            if lag < self.blocked_after:
                reported = False
            elif not reported:
                reported = True
                log.warning("loop.blocked", extra={"seconds": round(lag, 1), **self._where()})

    def _where(self) -> dict[str, Any]:
        """The loop thread's innermost frames and, when the task it runs is in a connector's
        action, that connector, action, tenant and execution. Read from this thread while
        the loop's thread may resume, so best effort."""
        found: dict[str, Any] = {}
        frame = sys._current_frames().get(self._loop_thread)
        if frame is not None:
            found["where"] = innermost_frames(frame, _FRAMES)
        try:
            task = asyncio.current_task(self.loop)
            if task is not None:
                found["task"] = task.get_name()
                found.update(RUNNING_ACTIONS.get(task) or {})
        except Exception:
            pass
        return found
