"""An example that runs far longer than any of its waits allows is stuck somewhere: say where.

Every wait of an example has its own deadline, so an example that outlives
:data:`EXAMPLE_BUDGET_S` waits on something without one. The watchdog prints the example's
last statements and every thread's stack (what it is waiting for), again each budget while it
stays stuck, so a stall in a long run is diagnosed instead of ending the run silently.
"""

from __future__ import annotations

import sys
import threading
import time
import traceback
from collections.abc import Callable

EXAMPLE_BUDGET_S = 600.0


class ExampleWatchdog:
    def __init__(self, example: str, last_lines: Callable[[], list[str]],
                 budget_s: float = EXAMPLE_BUDGET_S) -> None:
        self._example = example
        self._last_lines = last_lines
        self._budget_s = budget_s
        self._began = time.monotonic()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="fuzz-watchdog", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._done.wait(self._budget_s):
            print(self.report(), file=sys.stderr, flush=True)

    def report(self) -> str:
        lines = [f"fuzz watchdog: example {self._example} has run "
                 f"{time.monotonic() - self._began:.0f} s; its last steps:"]
        lines += [f"    {line[:200]}" for line in self._last_lines()[-12:]]
        names = {thread.ident: thread.name for thread in threading.enumerate()}
        for ident, frame in sys._current_frames().items():
            if ident == threading.get_ident():
                continue
            lines.append(f"  thread {names.get(ident, ident)}:")
            lines += [f"    {line.rstrip()}" for line in traceback.format_stack(frame)[-8:]]
        return "\n".join(lines)

    def stop(self) -> None:
        self._done.set()
