"""Every option of guest-kernel/fragment.config must survive into the built kernel's .config:
Kconfig silently drops options whose dependencies are off."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import TOP


def _options(text: str) -> dict[str, str]:
    out = {}
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("CONFIG_") and "=" in line:
            key, _, value = line.partition("=")
            out[key] = value
        elif line.startswith("# CONFIG_") and line.endswith(" is not set"):
            out[line[2:].split()[0]] = "n"
    return out


def test_every_fragment_option_is_in_the_final_config(assets_dir: Path) -> None:
    wanted = _options((TOP / "guest-kernel/fragment.config").read_text())
    final = _options((assets_dir / "kernel/config").read_text())
    dropped = {k: v for k, v in wanted.items() if final.get(k, "n") != v}
    assert not dropped, f"Kconfig dropped or changed: {dropped}"


def test_no_loadable_modules(assets_dir: Path) -> None:
    final = _options((assets_dir / "kernel/config").read_text())
    assert final.get("CONFIG_MODULES", "n") == "n"
    assert not [k for k, v in final.items() if v == "m"]
