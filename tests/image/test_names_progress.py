"""Image references as the store names them, and progress output."""

from __future__ import annotations

import io

import pytest

from runv_py.errors import ImageError
from runv_py.oci.image import Credentials, Platform, Progress, Reference


@pytest.mark.parametrize(("text", "registry", "repository", "name"), [
    ("busybox", "docker.io", "library/busybox", "busybox:latest"),
    ("docker.io/library/busybox:1.36", "docker.io", "library/busybox", "busybox:1.36"),
    ("team/app", "docker.io", "team/app", "team/app:latest"),
    ("127.0.0.1:5000/team/app:v2", "127.0.0.1:5000", "team/app", "127.0.0.1:5000/team/app:v2"),
    ("localhost/app", "localhost", "app", "localhost/app:latest"),
    ("registry.example.com/a/b/c", "registry.example.com", "a/b/c",
     "registry.example.com/a/b/c:latest"),
    ("app@sha256:" + "a" * 64, "docker.io", "library/app", "app@sha256:" + "a" * 64),
])
def test_reference_parsing(text: str, registry: str, repository: str, name: str) -> None:
    ref = Reference.parse(text)
    assert (ref.registry, ref.repository, ref.name) == (registry, repository, name)


@pytest.mark.parametrize(("text", "message"), [
    ("UPPER", "lowercase"),
    ("app:bad tag", "tag"),
    ("app@sha256:123", "not a sha256 digest"),
    ("", "lowercase"),
])
def test_bad_references_name_the_problem(text: str, message: str) -> None:
    with pytest.raises(ImageError, match=message):
        Reference.parse(text)


def test_platform_parsing_and_matching() -> None:
    assert str(Platform.parse("linux/arm64/v8")) == "linux/arm64/v8"
    assert Platform.parse("arm64").matches(Platform("linux", "arm64", "v8"))
    assert not Platform.parse("linux/amd64").matches(Platform("linux", "arm64"))
    with pytest.raises(ImageError, match="OS/ARCH"):
        Platform.parse("linux/")


def test_progress_plain_lines_when_not_a_terminal() -> None:
    out = io.StringIO()
    task = Progress(out, tty=False).task("pull 0123456789ab", 2_000_000, 500_000)
    task.advance(1_500_000)
    task.finish("pulled")
    lines = out.getvalue().splitlines()
    assert lines[0] == "pull 0123456789ab (2.0 MB), resuming at 500.0 kB"
    assert lines[1].startswith("pull 0123456789ab: pulled (2.0 MB in ")
    assert "\x1b" not in out.getvalue()


def test_progress_bars_on_a_terminal() -> None:
    out = io.StringIO()
    progress = Progress(out, tty=True)
    a = progress.task("pull aaa", 1000)
    b = progress.task("pull bbb", 1000)
    a.finish()
    b.advance(1000)
    b.finish()
    text = out.getvalue()
    assert "[--------------------] 0 B/1.0 kB" in text
    assert "\x1b[2F\x1b[J" in text       # two bars redrawn in place
    assert "pull aaa: done" in text and "pull bbb: done (1.0 kB" in text


def test_credentials_parse_and_hide_the_password() -> None:
    creds = Credentials.parse("me:pa:ss")
    assert (creds.username, creds.password) == ("me", "pa:ss")
    assert "pa:ss" not in repr(creds)
    with pytest.raises(ImageError, match="USER:PASSWORD"):
        Credentials.parse("nopassword")
