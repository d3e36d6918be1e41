"""RFC 3339 times in UTC from Unix times, as runc, containerd and the logs write them."""

from __future__ import annotations

import math
import time


def rfc3339(when: float, digits: int = 3) -> str:
    """`when` to `digits` (at least 1) decimal places of a second. The fraction is rounded
    as a whole number, so that 12:00:05.9996 becomes 12:00:06.000 and never 12:00:05.000."""
    seconds = math.floor(when)
    scale = 10 ** digits
    fraction = round((when - seconds) * scale)
    if fraction == scale:
        seconds, fraction = seconds + 1, 0
    text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
    return f"{text}.{fraction:0{digits}d}Z"
