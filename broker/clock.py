"""Time as a value that can be passed in: the broker reads the wall clock only through this."""

from __future__ import annotations

import time
from collections.abc import Callable

Clock = Callable[[], float]

system_clock: Clock = time.time
