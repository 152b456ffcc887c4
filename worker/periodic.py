"""A daemon thread that does one piece of cluster housekeeping every interval."""

from __future__ import annotations

import logging
import threading

log = logging.getLogger(__name__)


class Periodic:
    """Calls :meth:`tick` every ``interval_s`` seconds until :meth:`stop`.

    A tick that raises (a database or broker outage) is logged and tried again
    at the next interval: housekeeping must outlive the outages it mends.
    """

    def __init__(self, interval_s: float, *, name: str) -> None:
        self._interval_s = interval_s
        self._name = name
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"genq-{name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def tick(self) -> object:
        """One round of the housekeeping (subclasses)."""
        raise NotImplementedError

    def _loop(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                self.tick()
            except Exception:
                log.warning("%s failed; retrying next interval", self._name, exc_info=True)
