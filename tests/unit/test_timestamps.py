"""RFC 3339 times: a fraction that rounds up to a whole second carries into the seconds."""

from __future__ import annotations

import pytest

from runv_py.timestamps import rfc3339


@pytest.mark.parametrize(("when", "digits", "text"), [
    (0.0, 3, "1970-01-01T00:00:00.000Z"),
    (1.25, 3, "1970-01-01T00:00:01.250Z"),
    (1.9994, 3, "1970-01-01T00:00:01.999Z"),
    (1.9996, 3, "1970-01-01T00:00:02.000Z"),
    (59.99999, 3, "1970-01-01T00:01:00.000Z"),
    (1.25, 9, "1970-01-01T00:00:01.250000000Z"),
    (1.9999999999, 9, "1970-01-01T00:00:02.000000000Z"),
    (1796601599.9997, 3, "2026-12-07T00:00:00.000Z"),
])
def test_a_time_is_written_to_its_digits(when: float, digits: int, text: str) -> None:
    assert rfc3339(when, digits) == text


def test_later_times_sort_later_as_text() -> None:
    """The audit's `--since` and its readers compare these strings."""
    times = [1796601600 + i / 10000 for i in range(0, 30000, 7)]
    texts = [rfc3339(t) for t in times]
    assert texts == sorted(texts)
