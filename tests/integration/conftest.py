"""Real container managers driving runv: containerd 1.6 and podman, each started by the test
with its own root, state and socket under a temporary directory."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cli.conftest import RUNV
from tests.cli.image import build
from tests.vm.conftest import processes_mentioning

IMAGE = "docker.io/library/runvtest:latest"


@pytest.fixture
def runtime_env(tmp_path: Path, assets_dir: Path, hypervisor_toml: str
                ) -> Iterator[dict[str, str]]:
    """RUNV_CONFIG for runv as the managers start it (they pass their environment on)."""
    state = Path(tempfile.mkdtemp(prefix="runv-i-"))
    config = tmp_path / "runv.toml"
    config.write_text(f'state_dir = "{state}"\n[hypervisor]\nboot_timeout_s = 90\n'
                      + hypervisor_toml)
    env = dict(os.environ, RUNV_CONFIG=str(config), RUNV_ASSETS_DIR=str(assets_dir))
    yield env
    left = processes_mentioning(str(state))
    sandboxes = list((state / "sandboxes").iterdir()) if (state / "sandboxes").exists() else []
    shutil.rmtree(state, ignore_errors=True)
    assert not left and not sandboxes, f"left behind: {left} {sandboxes}"


@pytest.fixture
def image_archive(tmp_path: Path, busybox_rootfs: Path) -> Path:
    archive = tmp_path / "image.tar"
    build(busybox_rootfs, archive, IMAGE, ["sh"])
    return archive


class Containerd:
    def __init__(self, top: Path, env: dict[str, str]) -> None:
        self.top = top
        self.address = str(top / "containerd.sock")
        self.env = env
        self.runc_root = top / "runc-root"
        config = top / "containerd.toml"
        config.write_text(f"""version = 2
root = "{top / 'root'}"
state = "{top / 'state'}"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "{self.address}"
""")
        self.log = open(top / "containerd.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(["containerd", "--config", str(config)], env=env,
                                     stdout=self.log, stderr=self.log)
        deadline = time.monotonic() + 30
        while self.ctr("version", check=False).returncode != 0:
            assert self.proc.poll() is None, (top / "containerd.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "containerd did not come up"
            time.sleep(0.2)

    def ctr(self, *args: str, check: bool = True, timeout: float = 300
            ) -> subprocess.CompletedProcess[bytes]:
        result = subprocess.run(["ctr", "--address", self.address, "--namespace", "runvtest",
                                 *args], capture_output=True, timeout=timeout, check=False,
                                stdin=subprocess.DEVNULL)
        if check and result.returncode != 0:
            raise AssertionError(f"ctr {' '.join(args)}: exit {result.returncode}: "
                                 f"{result.stderr.decode(errors='replace')}")
        return result

    def run_args(self) -> list[str]:
        return ["--runtime", "io.containerd.runc.v2", "--runc-binary", RUNV,
                "--runc-root", str(self.runc_root)]

    def close(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        # Shims the test's containerd started (they name its socket) and that outlived it.
        for line in processes_mentioning(self.address):
            pid = int(line.split(":", 1)[0])
            os.kill(pid, signal.SIGKILL)
        # What containerd would do for those shims' tasks (runv's shim leaves runv.json in
        # their bundles): its `delete` stops their VMs and unmounts their rootfs.
        for bundle in (self.top / "state").glob("io.containerd.runtime.v2.task/*/*"):
            if (bundle / "runv.json").exists():
                subprocess.run(["containerd-shim-runv-v2", "-namespace", bundle.parent.name,
                                "-address", self.address, "-id", bundle.name, "-bundle",
                                str(bundle), "delete"], cwd=bundle, env=self.env,
                               capture_output=True, timeout=60, check=False)
        self.log.close()
        subprocess.run(["umount", "-R", str(self.top / "root")], capture_output=True,
                       check=False)


@pytest.fixture
def containerd(tmp_path: Path, runtime_env: dict[str, str]) -> Iterator[Containerd]:
    daemon = Containerd(tmp_path, runtime_env)
    try:
        yield daemon
    finally:
        daemon.close()
