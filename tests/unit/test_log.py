from __future__ import annotations

import io
import json
import logging

from runv_py import log


def test_json_lines_have_logrus_keys_and_context() -> None:
    out = io.StringIO()
    log.setup(fmt="json", stream=out)
    logging.getLogger("runv_py.x").error("boom %d", 7, extra={"sandbox": "sb1"})
    entry = json.loads(out.getvalue().strip())
    assert entry["level"] == "error" and entry["msg"] == "boom 7" and entry["sandbox"] == "sb1"
    assert entry["time"].endswith("Z") and "T" in entry["time"]


def test_debug_level_only_with_debug() -> None:
    out = io.StringIO()
    log.setup(fmt="text", stream=out)
    logging.getLogger("runv_py.y").debug("hidden")
    log.setup(fmt="text", stream=out, debug=True)
    logging.getLogger("runv_py.y").debug("shown")
    assert "hidden" not in out.getvalue() and "y: debug: shown" in out.getvalue()
