from __future__ import annotations

from pathlib import Path

import pytest

from runv_py.errors import AcceleratorError
from runv_py.vm.accel import HostFacts, choose, host_tsc_khz, kvm_problem


def _facts(tmp_path: Path, *, flags: str = "fpu vmx sse", pvm: bool = False,
           api: int | type[OSError] = 12) -> HostFacts:
    (tmp_path / "cpuinfo").write_text(
        f"processor\t: 0\nflags\t\t: {flags}\ncpu MHz\t\t: 2100.000\n")
    (tmp_path / "modules/kvm").mkdir(parents=True, exist_ok=True)
    if pvm:
        (tmp_path / "modules/kvm_pvm").mkdir()

    def api_version(device: Path) -> int:
        if isinstance(api, int):
            return api
        raise api(13, "Permission denied")

    return HostFacts(kvm_device=tmp_path / "kvm", cpuinfo=tmp_path / "cpuinfo",
                     modules=tmp_path / "modules", api_version=api_version)


def test_real_kvm_is_used(tmp_path: Path) -> None:
    assert kvm_problem(_facts(tmp_path)) is None
    assert choose("auto", _facts(tmp_path)).accel == "kvm"


def test_pvm_nested_kvm_falls_back_to_tcg_and_says_why(tmp_path: Path) -> None:
    choice = choose("auto", _facts(tmp_path, pvm=True))
    assert choice.accel == "tcg" and "kvm_pvm" in choice.reason


def test_no_virtualization_flags_falls_back(tmp_path: Path) -> None:
    choice = choose("auto", _facts(tmp_path, flags="fpu sse hypervisor"))
    assert choice.accel == "tcg" and "vmx/svm" in choice.reason


def test_missing_or_unopenable_device(tmp_path: Path) -> None:
    assert "does not exist" in (kvm_problem(_facts(tmp_path, api=FileNotFoundError)) or "")
    assert "Permission denied" in (kvm_problem(_facts(tmp_path, api=PermissionError)) or "")
    assert "API version 11" in (kvm_problem(_facts(tmp_path, api=11)) or "")


def test_forcing(tmp_path: Path) -> None:
    assert choose("tcg", _facts(tmp_path)).accel == "tcg"
    with pytest.raises(AcceleratorError, match="kvm_pvm"):
        choose("kvm", _facts(tmp_path, pvm=True))


def test_tsc_rate_from_cpuinfo(tmp_path: Path) -> None:
    facts = _facts(tmp_path)
    assert host_tsc_khz(facts.cpuinfo, tmp_path / "none") == 2100000
    (tmp_path / "tsc").write_text("2400123\n")
    assert host_tsc_khz(facts.cpuinfo, tmp_path / "tsc") == 2400123
