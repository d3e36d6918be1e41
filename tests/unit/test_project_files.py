"""The generated protobuf code matches the .proto, and both packages pin the same versions."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib

from tests.conftest import TOP


def test_generated_code_matches_proto() -> None:
    result = subprocess.run([sys.executable, str(TOP / "scripts/gen-proto"), "--check"],
                            check=False, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def _pins(requirements: list[str]) -> dict[str, str]:
    pins = {}
    for req in requirements:
        name, _, version = req.partition("==")
        pins[name.strip().lower()] = version.strip()
    return pins


def test_host_agent_and_image_pin_the_same_versions() -> None:
    host = _pins(tomllib.loads((TOP / "pyproject.toml").read_text())["project"]["dependencies"])
    agent = _pins(tomllib.loads(
        (TOP / "hyperstart-agent/pyproject.toml").read_text())["project"]["dependencies"])
    image = _pins([line for line in (TOP / "images/requirements-guest.txt").read_text().splitlines()
                   if line and not line.startswith("#")])
    assert agent == image
    for name, version in agent.items():
        assert host[name] == version, name
    assert all(re.fullmatch(r"[0-9.]+", v) for v in host.values()), host


def test_agent_and_host_versions_agree() -> None:
    import hyperstart_agent

    import runv_py

    assert hyperstart_agent.__version__ == runv_py.__version__
