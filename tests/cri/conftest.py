"""A Kubernetes node of the test's own: containerd 1.6 with its CRI plugin on, two runtime
handlers (runc, and runv through containerd-shim-runv-v2), a CNI bridge network the test
makes, and a docker-registry on 127.0.0.1 that containerd reaches through its registry
mirrors for every image the CRI validation suite pulls (no other network here). Everything
lives under one temporary directory; closing the node leaves nothing behind (checked)."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cri.imagebuild import MIRRORED_HOSTS, free_port, registry_config
from tests.vm.conftest import processes_mentioning

VENV_BIN = Path(sys.executable).parent
NETNS_DIR = Path("/run/netns")


def sh(*argv: str, check: bool = True, timeout: float = 60) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(argv)}: exit {result.returncode}: "
                             f"{result.stderr.strip()}")
    return result.stdout


def mounts_under(path: Path) -> list[str]:
    with open("/proc/self/mountinfo") as table:
        return [line.split()[4] for line in table
                if line.split()[4].startswith(str(path) + "/")]


def iptables_chains() -> set[str]:
    """Chains and rules of the host's filter and nat tables, one line each."""
    lines: set[str] = set()
    for table in ("filter", "nat"):
        lines |= {f"{table}: {line}" for line in sh("iptables", "-t", table, "-S").splitlines()}
    return lines


# portmap's chains, made on first use and never removed by the plugin; per-pod chains
# (CNI-DN-*) hang off CNI-HOSTPORT-DNAT while a pod with host ports exists.
PORTMAP_CHAINS = ("CNI-HOSTPORT-DNAT", "CNI-HOSTPORT-SETMARK", "CNI-HOSTPORT-MASQ")


def remove_portmap_chains(before: set[str]) -> None:
    """The chains portmap made during the test, once no pod of anyone uses them."""
    rules = sh("iptables", "-t", "nat", "-S").splitlines()
    if any(line.startswith("-N CNI-DN-") for line in rules):
        return
    for chain in PORTMAP_CHAINS:
        if f"nat: -N {chain}" in before or f"-N {chain}" not in rules:
            continue
        for line in rules:
            if line.startswith("-A ") and line.endswith(f"-j {chain}"):
                sh("iptables", "-t", "nat", *shlex.split(line.replace("-A ", "-D ", 1)),
                   check=False)
        sh("iptables", "-t", "nat", "-F", chain, check=False)
        sh("iptables", "-t", "nat", "-X", chain, check=False)


class Registry:
    """Debian's docker-registry, read-only, serving the cached image set."""

    def __init__(self, storage: Path, top: Path) -> None:
        self.port = free_port()
        config = top / "registry.yml"
        config.write_text(registry_config(storage, self.port, readonly=True))
        self.log = open(top / "registry.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(["docker-registry", "serve", str(config)],
                                     stdout=self.log, stderr=self.log)
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/v2/", timeout=2).close()
                break
            except OSError:
                assert self.proc.poll() is None, (top / "registry.log").read_text()[-2000:]
                assert time.monotonic() < deadline, "docker-registry did not come up"
                time.sleep(0.1)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=20)
        self.log.close()


class Node:
    """containerd with CRI, its CNI network and its registry mirror, all under `top`."""

    def __init__(self, top: Path, assets: Path, env: dict[str, str], registry: Registry) -> None:
        self.top = top
        self.tools = assets / "cri-tools"
        self.address = top / "containerd.sock"
        self.endpoint = f"unix://{self.address}"
        self.env = env
        self.bridge = f"rvcri{os.getpid() % 100000}"
        self.subnet = f"10.{os.getpid() % 200 + 20}.250.0/24"
        self.iptables_before = iptables_chains()
        sh("ip", "link", "add", self.bridge, "type", "bridge")
        sh("ip", "link", "set", self.bridge, "up")
        self._write_configs(registry)
        self.log = open(top / "containerd.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(["containerd", "--config", str(top / "containerd.toml")],
                                     env=env, stdout=self.log, stderr=self.log)
        deadline = time.monotonic() + 60
        while self.crictl("info", check=False).returncode != 0:
            assert self.proc.poll() is None, (top / "containerd.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "containerd's CRI did not come up"
            time.sleep(0.3)

    def _write_configs(self, registry: Registry) -> None:
        top = self.top
        runv_config = top / "runv.toml"
        runv_config.write_text(Path(self.env["RUNV_CONFIG"]).read_text())
        net = top / "net.d"
        net.mkdir()
        (net / "10-runv-cri.conflist").write_text(json.dumps({
            "cniVersion": "1.0.0", "name": "runv-cri", "plugins": [
                {"type": "bridge", "bridge": self.bridge, "isGateway": True, "ipMasq": False,
                 "ipam": {"type": "host-local", "ranges": [[{"subnet": self.subnet}]],
                          "routes": [{"dst": "0.0.0.0/0"}], "dataDir": str(top / "ipam")}},
                {"type": "portmap", "capabilities": {"portMappings": True}},
            ]}, indent=1))
        for host in MIRRORED_HOSTS:
            hosts = top / "certs.d" / host
            hosts.mkdir(parents=True)
            # The local registry as the host's server too: no fallback to the real one, so
            # nothing leaves 127.0.0.1 (an image it lacks fails to pull at once).
            (hosts / "hosts.toml").write_text(
                f'server = "http://127.0.0.1:{registry.port}"\n\n'
                f'[host."http://127.0.0.1:{registry.port}"]\n'
                '  capabilities = ["pull", "resolve"]\n')
        cri = 'plugins."io.containerd.grpc.v1.cri"'
        (top / "containerd.toml").write_text(f"""version = 2
root = "{top / 'root'}"
state = "{top / 'state'}"
[grpc]
  address = "{self.address}"
[{cri}]
  sandbox_image = "registry.k8s.io/pause:3.6"
  # The host's bounding set lacks CAP_SYS_RESOURCE: runc could not lower oom_score_adj.
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
[{cri}.cni]
  bin_dir = "/usr/lib/cni"
  conf_dir = "{net}"
[{cri}.registry]
  config_path = "{top / 'certs.d'}"
[{cri}.containerd]
  default_runtime_name = "runc"
[{cri}.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"
[{cri}.containerd.runtimes.runc.options]
  Root = "{top / 'runc'}"
[{cri}.containerd.runtimes.runv]
  runtime_type = "io.containerd.runv.v2"
  privileged_without_host_devices = true
[{cri}.containerd.runtimes.runv.options]
  ConfigPath = "{runv_config}"
""")

    def crictl(self, *args: str, check: bool = True, timeout: float = 300,
               input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
        result = subprocess.run([str(self.tools / "crictl"), "--runtime-endpoint",
                                 self.endpoint, "--image-endpoint", self.endpoint,
                                 "--timeout", "120s", *args],
                                capture_output=True, timeout=timeout, check=False,
                                input=input, stdin=None if input is not None
                                else subprocess.DEVNULL)
        if check and result.returncode != 0:
            raise AssertionError(f"crictl {' '.join(args)}: exit {result.returncode}: "
                                 f"{result.stderr.decode(errors='replace')}")
        return result

    def close(self) -> None:
        """Remove every pod, stop containerd and what it left, and take the network down."""
        try:
            if self.proc.poll() is None:
                self.crictl("rmp", "--all", "--force", check=False)
        finally:
            self._stop()

    def _stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for line in processes_mentioning(str(self.address)):
            os.kill(int(line.split(":", 1)[0]), signal.SIGKILL)
        for bundle in (self.top / "state").glob("io.containerd.runtime.v2.task/*/*"):
            if (bundle / "runv.json").exists():
                subprocess.run(["containerd-shim-runv-v2", "-namespace", bundle.parent.name,
                                "-address", str(self.address), "-id", bundle.name, "-bundle",
                                str(bundle), "delete"], cwd=bundle, env=self.env,
                               capture_output=True, timeout=60, check=False)
        self.log.close()
        for path in sorted(mounts_under(self.top), reverse=True):
            subprocess.run(["umount", "-l", path], capture_output=True, check=False)
        sh("ip", "link", "del", self.bridge, check=False)
        remove_portmap_chains(self.iptables_before)


@pytest.fixture(scope="module")
def cri_assets(assets_dir: Path) -> Path:
    for name in ("cri-tools/critest", "cri-tools/crictl", "cri-images/registry"):
        if not (assets_dir / name).exists():
            pytest.fail(f"{assets_dir / name} not found: run `make cri-assets` first")
    return assets_dir


@pytest.fixture(scope="module")
def node(cri_assets: Path) -> Iterator[Node]:
    """One node for the module: both handlers' runs share it, as a kubelet's node would."""
    top = Path(tempfile.mkdtemp(prefix="runv-cri-"))
    state = top / "runv-state"
    config = top / "runv-config.toml"
    config.write_text(f'state_dir = "{state}"\n[hypervisor]\nboot_timeout_s = 120\n')
    env = dict(os.environ, RUNV_CONFIG=str(config), RUNV_ASSETS_DIR=str(cri_assets),
               PATH=f"{VENV_BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}")
    registry = Registry(cri_assets / "cri-images" / "registry", top)
    node = None
    try:
        node = Node(top, cri_assets, env, registry)
        yield node
    finally:
        if node is not None:
            node.close()
        registry.close()
        # A supervisor whose shim was killed above goes with its container: give it the time
        # a deleted sandbox takes to stop its VM, no more.
        deadline = time.monotonic() + 30
        while processes_mentioning(str(top)) and time.monotonic() < deadline:
            time.sleep(0.5)
        left = processes_mentioning(str(top))
        mounts = mounts_under(top)
        bridge = Path(f"/sys/class/net/{node.bridge}").exists() if node else False
        rules = {line for line in iptables_chains() - node.iptables_before
                 if node.bridge in line or node.subnet in line or "runv-cri" in line
                 or "CNI-HOSTPORT" in line
                 } if node else set()
        if not left and not mounts:
            shutil.rmtree(top, ignore_errors=True)
        assert not left and not mounts and not bridge and not rules, (
            f"left behind: processes {left}, mounts {mounts}, bridge {bridge}, "
            f"iptables {sorted(rules)}")
