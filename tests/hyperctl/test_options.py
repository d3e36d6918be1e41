"""What `hyperctl run` makes of its flags and an image, without a VM: the bundle, the errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from runv_py.errors import (
    ConfigError,
    ContainerExists,
    ContainerNotFound,
    NetworkError,
    NotSupported,
)
from runv_py.oci.image import ImageConfig
from runv_py.sandbox.policy import ROOTFS_OVERLAY_ANNOTATION
from runv_py.workload import bundle, options
from runv_py.workload.images import ResolvedImage
from runv_py.workload.records import Records, Workload
from tests.hyperctl.conftest import Hyperctl


def _image(tmp_path: Path, **config: object) -> ResolvedImage:
    rootfs = tmp_path / "lower"
    (rootfs / "etc").mkdir(parents=True, exist_ok=True)
    (rootfs / "etc" / "passwd").write_text("root:x:0:0::/:/bin/sh\nweb:x:33:44::/:/bin/sh\n")
    (rootfs / "etc" / "group").write_text("root:x:0:\nstaff:x:50:\n")
    return ResolvedImage("img:latest", "sha256:0", rootfs, ImageConfig(**config))  # type: ignore[arg-type]


def _spec(tmp_path: Path, image: ResolvedImage, **opts: object) -> dict[str, object]:
    run = options.RunOptions(image="img", **opts)  # type: ignore[arg-type]
    return bundle.spec_document(image, run,
                                rootfs=bundle.overlay_rootfs(image, tmp_path / "u", tmp_path / "w"),
                                hostname="hc-1")


def test_command_follows_dockers_entrypoint_and_cmd_rules(tmp_path: Path) -> None:
    image = _image(tmp_path, entrypoint=("/entry",), cmd=("default",))
    run = options.RunOptions
    assert bundle.command(image, run("img")) == ["/entry", "default"]
    assert bundle.command(image, run("img", command=("x", "y"))) == ["/entry", "x", "y"]
    assert bundle.command(image, run("img", entrypoint=("/bin/sh",))) == ["/bin/sh"]
    assert bundle.command(image, run("img", entrypoint=("/bin/sh",), command=("-c", "true"))
                          ) == ["/bin/sh", "-c", "true"]
    with pytest.raises(ConfigError, match="has no command"):
        bundle.command(_image(tmp_path), run("img"))


def test_spec_carries_the_flags_and_the_overlay(tmp_path: Path) -> None:
    image = _image(tmp_path, cmd=("sh",), env=("PATH=/x", "A=image"), working_dir="/srv",
                   user="web")
    vol = tmp_path / "vol"
    vol.mkdir()
    spec = _spec(tmp_path, image, env=("A=flag", "B=2"), cpus=1.5, memory=256 << 20,
                 volumes=(options.parse_volume(f"{vol}:/data:ro"),), read_only=True, tty=True)
    process = spec["process"]
    assert isinstance(process, dict)
    assert process["args"] == ["sh"]
    assert process["env"][:3] == ["PATH=/x", "A=flag", "B=2"]
    assert process["cwd"] == "/srv"
    assert process["user"] == {"uid": 33, "gid": 44}
    assert process["terminal"] is True
    assert spec["root"] == {"path": "rootfs", "readonly": True}
    assert spec["hostname"] == "hc-1"
    linux = spec["linux"]
    assert isinstance(linux, dict)
    assert linux["resources"]["memory"] == {"limit": 256 << 20}
    assert linux["resources"]["cpu"] == {"quota": 150000, "period": 100000}
    mounts = spec["mounts"]
    assert isinstance(mounts, list)
    assert {"destination": "/data", "type": "bind", "source": str(vol),
            "options": ["rbind", "ro"]} in mounts
    annotations = spec["annotations"]
    assert isinstance(annotations, dict)
    assert json.loads(annotations[ROOTFS_OVERLAY_ANNOTATION]) == {
        "lower": [str(image.rootfs)], "upper": str(tmp_path / "u"), "work": str(tmp_path / "w")}


def test_users_by_name_and_number(tmp_path: Path) -> None:
    rootfs = _image(tmp_path).rootfs
    assert bundle.resolve_user(rootfs, "1000:1000", "-u") == (1000, 1000)
    assert bundle.resolve_user(rootfs, "web", "-u") == (33, 44)
    assert bundle.resolve_user(rootfs, "web:staff", "-u") == (33, 50)
    with pytest.raises(ConfigError, match="-u 'nobody': no user 'nobody'"):
        bundle.resolve_user(rootfs, "nobody", "-u")


@pytest.mark.parametrize(("text", "value"), [("512m", 512 << 20), ("1g", 1 << 30),
                                             ("1.5GiB", 3 << 29), ("4096", 4096)])
def test_sizes(text: str, value: int) -> None:
    assert options.parse_size(text, "--memory") == value


@pytest.mark.parametrize(("text", "value"), [("30", 30.0), ("30s", 30.0), ("1.5m", 90.0),
                                             ("2h", 7200.0), ("500ms", 0.5)])
def test_durations(text: str, value: float) -> None:
    assert options.parse_duration(text, "--timeout") == value


@pytest.mark.parametrize(("call", "message"), [
    (lambda: options.parse_size("lots", "--memory"), "--memory 'lots': not a size"),
    (lambda: options.parse_duration("soon", "--timeout"), "--timeout 'soon': not a duration"),
    (lambda: options.parse_cpus("0"), "--cpus '0': must be more than 0"),
    (lambda: options.parse_env("1X=2"), "-e '1X=2': use NAME=VALUE"),
    (lambda: options.parse_volume("/nonexistent-hc:/x"), "/nonexistent-hc does not exist"),
    (lambda: options.parse_volume("/tmp:rel"), "the container path must be absolute"),
    (lambda: options.parse_volume("/tmp:/x:rx"), "the mode must be ro or rw"),
    (lambda: options.parse_user("a:b"), "use UID"),
])
def test_bad_values_name_the_flag(call: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        call()  # type: ignore[operator]


def test_env_file(tmp_path: Path) -> None:
    path = tmp_path / "env"
    path.write_text("# comment\n\nA=1\nB=two words\n")
    assert options.read_env_file(str(path)) == ("A=1", "B=two words")
    path.write_text("A=1\n=bad\n")
    with pytest.raises(ConfigError, match=r"--env-file .*:2:"):
        options.read_env_file(str(path))


def test_network_modes_in_the_spec(tmp_path: Path) -> None:
    image = _image(tmp_path, cmd=("sh",))

    def network_of(spec: dict[str, Any]) -> list[dict[str, str]]:
        return [ns for ns in spec["linux"]["namespaces"] if ns["type"] == "network"]

    assert network_of(_spec(tmp_path, image)) == [{"type": "network"}]  # loopback only
    run = options.RunOptions(image="img", network="default", publish=("8080:80",))
    spec = bundle.spec_document(image, run,
                                rootfs=bundle.overlay_rootfs(image, tmp_path / "u", tmp_path / "w"),
                                hostname="hc-1", netns="/run/netns/runv-hc-1")
    assert network_of(spec) == [{"type": "network", "path": "/run/netns/runv-hc-1"}]
    with pytest.raises(NotSupported, match="-p 8080:80: --network none has no ports"):
        _spec(tmp_path, image, publish=("8080:80",))
    with pytest.raises(NotSupported, match="--network 'bridge': use none or default"):
        _spec(tmp_path, image, network="bridge")
    with pytest.raises(NetworkError, match="port mapping '80'"):
        _spec(tmp_path, image, network="default", publish=("80",))


def _workload(workload_id: str, name: str, created_at: float) -> Workload:
    return Workload(id=workload_id, bundle="/b", rootfs="/b/rootfs", created="then", name=name,
                    image="i", command=("x",), created_at=created_at)


def test_records_find_by_name_id_and_prefix(tmp_path: Path) -> None:
    records = Records(tmp_path)
    one = _workload("ab12" + "0" * 28, "one", 1.0)
    two = _workload("ab34" + "0" * 28, "two", 2.0)
    records.create(one)
    records.create(two)
    assert records.find("one") == one
    assert records.find("ab34") == two
    assert records.find(one.id) == one
    with pytest.raises(ConfigError, match="ambiguous"):
        records.find("ab")
    with pytest.raises(ContainerNotFound, match="no such container: zz"):
        records.find("zz")
    with pytest.raises(ContainerExists, match="the name 'one' is already in use"):
        records.create(_workload("cd" + "0" * 30, "one", 3.0))
    records.remove(one)
    with pytest.raises(ContainerNotFound):
        records.find("one")
    assert [w.name for w in records.all()] == ["two"]


@pytest.mark.parametrize(("args", "message"), [
    (["run", "-p", "80:80", "busybox", "true"],
     "hyperctl: error: -p 80:80: --network none has no ports to publish"),
    (["run", "--network", "default", "-p", "x:80", "busybox", "true"],
     "hyperctl: error: port mapping 'x:80'"),
    (["run", "--memory", "lots", "busybox", "true"], "hyperctl: error: --memory 'lots'"),
    (["run", "-v", "/nonexistent-hc:/x", "busybox", "true"],
     "hyperctl: error: -v '/nonexistent-hc:/x': /nonexistent-hc does not exist"),
    (["run", "-d", "-t", "busybox", "sh"], "hyperctl: error: -t with -d"),
    (["run", "--rm", "127.0.0.1:1/none:1", "true"],
     "hyperctl: error: image '127.0.0.1:1/none:1' is not in the local store and pulling"),
])
def test_cli_run_refuses_bad_input_with_one_line_and_125(hyperctl: Hyperctl, args: list[str],
                                                          message: str) -> None:
    result = hyperctl(*args, check=False)
    assert result.returncode == 125
    err = result.stderr.decode()
    assert err.splitlines()[-1].startswith(message), err
    assert hyperctl("ps", "-a", "-q").stdout == b""


def test_cli_commands_on_unknown_containers(hyperctl: Hyperctl) -> None:
    for command in (["logs", "nope"], ["stop", "nope"], ["kill", "nope"], ["rm", "nope"],
                    ["wait", "nope"], ["exec", "nope", "true"], ["inspect", "nope"]):
        result = hyperctl(*command, check=False)
        assert result.returncode == 1, command
        assert "no such container: nope" in result.stderr.decode(), command
