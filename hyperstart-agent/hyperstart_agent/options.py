"""The agent's options, read from the kernel command line (`hyperstart.<key>=<value>`)."""

from __future__ import annotations

from dataclasses import dataclass, fields

DEFAULT_CHANNEL = "serial:agent.channel.0"
SERVER_SOCKET = "/run/hyperstart/agent.sock"


@dataclass(frozen=True, slots=True)
class Options:
    channel: str = DEFAULT_CHANNEL
    debug: bool = False
    audit: bool = True      # read the proc connector (process audit); "0" for none

    @property
    def channels(self) -> list[tuple[str, str]]:
        """(kind, name) of each channel, e.g. `serial:agent.channel.0,vsock:1024` serves both
        (a template VM: serial while it is built, vsock in its clones, which hot-plug the
        device)."""
        return [(kind, name) for kind, _, name in
                (spec.partition(":") for spec in self.channel.split(",") if spec)]

    @property
    def channel_kind(self) -> str:
        return self.channels[0][0] if self.channels else ""

    @property
    def channel_name(self) -> str:
        return self.channels[0][1] if self.channels else ""


def parse(cmdline: str) -> Options:
    """Unknown `hyperstart.*` keys are ignored (with a warning by the caller) so that an older
    agent still boots with a newer host."""
    values: dict[str, str] = {}
    for word in cmdline.split():
        key, _, value = word.partition("=")
        if key.startswith("hyperstart."):
            values[key.removeprefix("hyperstart.")] = value
    return Options(
        channel=values.get("channel", DEFAULT_CHANNEL),
        debug=values.get("debug", "0") in ("1", "true", "yes", "on", ""),
        audit=values.get("audit", "1") not in ("0", "false", "no", "off"),
    )


def unknown_keys(cmdline: str) -> list[str]:
    known = {f"hyperstart.{f.name}" for f in fields(Options)}
    keys = [word.partition("=")[0] for word in cmdline.split()]
    return [key for key in keys if key.startswith("hyperstart.") and key not in known]
