"""`runv run` starts from a template by default and says so under --debug; the
org.runv.template annotation turns it off for one container."""

from __future__ import annotations

from typing import Any

from tests.cli.conftest import Runv, runv, subreaper  # noqa: F401


def test_runv_run_takes_the_template_path_and_the_annotation_turns_it_off(
        runv: Runv) -> None:  # noqa: F811
    bundle = runv.bundle(["sh", "-c", "echo hello; hostname"])
    result = runv("--debug", "run", "--bundle", str(bundle), "t1")
    assert result.stdout == b"hello\nrunvbox\n"
    log = (runv.top / "log.json").read_text()
    assert "created (template" in log, log[-2000:]
    assert "restore" in log and "identity" in log
    # the default channel, vsock, also in a clone (hot-plugged after restore)
    assert "agent over vsock" in log and "vsock " in log

    def off(spec: dict[str, Any]) -> None:
        spec["annotations"] = {"org.runv.template": "off"}

    cold = runv.bundle(["echo", "cold"], edit=off)
    result = runv("--debug", "run", "--bundle", str(cold), "t2")
    assert result.stdout == b"cold\n"
    assert "created (cold, agent over vsock)" in (runv.top / "log.json").read_text()
    assert runv.leftovers() == []
