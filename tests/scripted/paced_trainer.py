"""The real trainer (`python -m ftstudio.train`), with a floor on how long a step takes.

Tests that act on a run midway (SIGKILL it past its first checkpoint, restart the studio under it,
pause it) start their studios with FTSTUDIO_TRAINER_MODULE=paced_trainer: on a fast, idle machine
builtin:tiny trains 30 steps in under two seconds, which can fall whole between the test seeing a
step and acting on it. Each step here lasts at least FTSTUDIO_TEST_PACE_S seconds (default 0.2);
a step that already takes longer (a loaded machine) is not slowed at all. Everything else is the
product's trainer, unchanged: whichever `ftstudio` package is first on the path (an older release's
too, for the upgrade test).
"""

from __future__ import annotations

import os
import runpy
import time
from typing import Any

from transformers.trainer_callback import CallbackHandler

PACE_S = float(os.environ.get("FTSTUDIO_TEST_PACE_S", "0.2"))
TRAINER = "ftstudio.train"
"""What the tests look for in a process's command line to find a trainer: this module's name holds it too."""

_step_end = CallbackHandler.on_step_end
_last = time.monotonic()


def _paced_step_end(self: CallbackHandler, args: Any, state: Any, control: Any) -> Any:
    global _last
    wait = PACE_S - (time.monotonic() - _last)
    if wait > 0:
        time.sleep(wait)
    _last = time.monotonic()
    return _step_end(self, args, state, control)


if __name__ == "__main__":
    CallbackHandler.on_step_end = _paced_step_end  # type: ignore[method-assign]
    runpy.run_module(TRAINER, run_name="__main__", alter_sys=True)
