"""The control protocol of a sandbox supervisor and of the warm pool service, as types.

Every message is a frozen dataclass here; `to_wire()` and `decode_*()` are the only code that
knows the JSON keys. A message with no fields of its own is a plain subclass that inherits its
parent's generated methods: every runv command imports this module, and each decorated class
costs its start about 3 million instructions (the generated methods are compiled at import).

On the wire (control.py carries it: one JSON object per SOCK_SEQPACKET packet, file
descriptors as SCM_RIGHTS):

- a request is {"op": <Op>, <field>: ...}; its reply {"ok": true, <field>: ...}, or
  {"ok": false, "error": <message>, "kind": <RunvError class name>[, "code": <gRPC code>]};
- `attach` and `exec` keep their connection: the client sends Signal and Resize, the
  supervisor sends Exit once the process has exited and its output is written;
- `events` keeps its connection too: the supervisor sends an Event per OOM kill and exit
  (with `audit`, also per process record and dropped count).

The pool service (`runv pool serve`) answers Claim and PoolStatus on its own socket; a pooled
supervisor's link to it carries MemberHello, the member's CreateReply, Claimed and Ok."""

from __future__ import annotations

import json
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from enum import StrEnum
from typing import Any, ClassVar, Generic, Self, TypeVar

from .. import errors
from ..errors import AgentError, ProtocolError, RunvError
from .status import ContainerStatus

SUPERVISOR_MODULE = "runv_py.sandbox.supervisor"  # python -m: the creators and the pool
MAX_PACKET = 1 << 20
MAX_FDS = 64  # a log, a rootfs and bind-mount sources (storage.shared.Trees)
# A supervisor ends the VM of a guest that does not take a SIGKILL within this time (a
# SIGKILL cannot fail); then it waits up to KILL_EXIT_WAIT_S for the container's exit before
# it answers, so that a `delete` right after `kill` finds it stopped, as under runc.
SIGKILL_DELIVERY_S = 20.0
KILL_EXIT_WAIT_S = 5.0


class Op(StrEnum):
    """What a supervisor is asked to do; every request but ADOPT names its container."""

    CREATE = "create"          # another container of a pod joins the sandbox
    ATTACH = "attach"          # a stand-in takes a process's stdio, signals and exit status
    EXEC = "exec"              # a new process, then as ATTACH
    START = "start"
    KILL = "kill"
    DELETE = "delete"
    STATE = "state"
    PAUSE = "pause"
    RESUME = "resume"
    UPDATE = "update"
    STATS = "stats"
    PS = "ps"
    EVENTS = "events"
    NETWORK_SYNC = "network-sync"
    CHECKPOINT = "checkpoint"  # save the sandbox's VM (docs/snapshots.md)
    ADOPT = "adopt"            # a claimed pooled supervisor takes its container
    CLAIM = "claim"            # the pool service: an idle supervisor for a template key
    POOL_STATUS = "status"     # the pool service: counts and members


# -- the codec ----------------------------------------------------------------------------------

_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _decode(value: Any, hint: Any, where: str) -> Any:
    """`value` from JSON as the type `hint` says, or ProtocolError naming `where`."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for inner in (a for a in args if a is not type(None)):
            try:
                return _decode(value, inner, where)
            except ProtocolError:
                continue
        raise ProtocolError(f"{where}: expected {hint}, got {value!r:.80}")
    if isinstance(hint, type) and issubclass(hint, Message) and isinstance(value, dict):
        return hint.from_fields(value, where)
    if isinstance(hint, type) and issubclass(hint, StrEnum):
        try:
            return hint(value)
        except ValueError:
            raise ProtocolError(f"{where}: {value!r} is not a {hint.__name__}") from None
    if hint is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if hint in (str, int, bool):
        if type(value) is not hint:
            raise ProtocolError(f"{where}: expected {hint.__name__}, got {value!r:.80}")
        return value
    if origin is tuple and isinstance(value, list | tuple):
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_decode(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ProtocolError(f"{where}: expected {len(args)} items")
        return tuple(_decode(v, a, f"{where}[{i}]") for i, (v, a) in
                     enumerate(zip(value, args, strict=True)))
    if origin is dict and isinstance(value, dict):
        return {_decode(k, args[0], where): _decode(v, args[1], f"{where}[{k!r}]")
                for k, v in value.items()}
    raise ProtocolError(f"{where}: expected {hint}, got {value!r:.80}")


def _encode(value: Any) -> Any:
    if isinstance(value, Message):
        return value.fields()
    if isinstance(value, tuple):
        return [_encode(v) for v in value]
    if isinstance(value, dict):
        return {k: _encode(v) for k, v in value.items()}
    return value


@dataclass(frozen=True, kw_only=True, eq=False, repr=False)
class Message:
    """Fields on the wire under their own names. Every runv command and stand-in imports
    this module, and what the dataclasses generate is compiled at import: messages are never
    compared (eq=False: the generated __eq__ and __hash__ of 40 classes cost a fifth of its
    import time), have no slots and share this class's __repr__ (a fifth of the rest)."""

    def __repr__(self) -> str:
        values = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in fields(self))
        return f"{type(self).__name__}({values})"

    def fields(self) -> dict[str, Any]:
        return {f.name: _encode(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_fields(cls, wire: Mapping[str, Any], what: str) -> Self:
        hints = _hints(cls)
        values = {}
        for f in fields(cls):
            if f.name in wire:
                values[f.name] = _decode(wire[f.name], hints[f.name], f"{what}.{f.name}")
        try:
            return cls(**values)
        except TypeError as exc:  # a required field is missing
            raise ProtocolError(f"{what}: {exc}") from None


@dataclass(frozen=True, kw_only=True, eq=False, repr=False)
class Reply(Message):
    def to_wire(self) -> dict[str, Any]:
        return {"ok": True, **self.fields()}


R = TypeVar("R", bound=Reply)


@dataclass(frozen=True, kw_only=True, eq=False, repr=False)
class Request(Message, Generic[R]):
    OP: ClassVar[Op]
    REPLY: ClassVar[type[Reply]]

    def to_wire(self) -> dict[str, Any]:
        return {"op": self.OP.value, **self.fields()}

    def decode_reply(self, wire: Mapping[str, Any]) -> R:
        """The reply to this request, or the error it carries raised."""
        return typing.cast(R, self.REPLY.from_fields(raise_for(wire), f"{self.OP} reply"))


# -- replies ------------------------------------------------------------------------------------

class Ok(Reply):
    """A reply that carries nothing but success."""


@dataclass(frozen=True, kw_only=True, eq=False, repr=False)
class CreateReply(Reply):
    """A sandbox's (or a pod container's) VM is ready and its container created in it."""

    vm_dir: str
    timings: dict[str, float] = field(default_factory=dict)  # phase -> seconds
    start_path: str = ""   # cold, template, template-built, cold-fallback, pool
    channel: str = ""      # vsock or serial
    qemu_pid: int = 0


@dataclass(frozen=True, kw_only=True, eq=False, repr=False)
class StateReply(Reply):
    status: ContainerStatus
    vm: str = "gone"               # QEMU's run state
    exit_code: int | None = None   # of the init process, once stopped


@dataclass(frozen=True, kw_only=True, eq=False, repr=False)
class DeleteReply(Reply):
    sandbox_gone: bool   # the supervisor exits: its VM and the sandbox's state go with it


@dataclass(frozen=True, kw_only=True, eq=False, repr=False)
class StatsReply(Reply):
    stats: dict[str, int]   # the container's cgroup v2 counters in the guest


@dataclass(frozen=True, kw_only=True, eq=False, repr=False)
class PsReply(Reply):
    processes: tuple[tuple[int, tuple[str, ...]], ...]   # guest pid, argv


@dataclass(frozen=True, kw_only=True, eq=False, repr=False)
class NetworkSyncReply(Reply):
    added: tuple[str, ...]
    removed: tuple[str, ...]


@dataclass(frozen=True, kw_only=True, eq=False, repr=False)
class CheckpointReply(Reply):
    save_s: float        # the VM paused, saved and (with leave_running) running again
    snapshot_bytes: int  # what the snapshot directory takes on disk


@dataclass(frozen=True, kw_only=True, eq=False, repr=False)
class ClaimReply(Reply):
    """An idle pooled supervisor, already out of the pool; `ctl` None when there is none."""

    ctl: str | None = None
    why: str = ""
    vm_dir: str = ""
    pid: int = 0
    start: int = 0
    qemu_pid: int = 0
    sandbox: str = ""


@dataclass(frozen=True, kw_only=True, eq=False, repr=False)
class PoolKeyStatus(Message):
    """The pool's VMs of one template key (one VM size)."""

    memory_mib: int
    vcpus: int
    idle: int
    starting: int
    claimed_running: int


@dataclass(frozen=True, kw_only=True, eq=False, repr=False)
class PoolMemberStatus(Message):
    sandbox: str
    key: str
    state: str   # starting, idle, claimed, retired, gone
    pid: int
    qemu_pid: int | None = None


@dataclass(frozen=True, kw_only=True, eq=False, repr=False)
class PoolStatusReply(Reply):
    size: int
    idle_state: str
    memory_mib: int
    memory_ceiling_mib: int
    claims: int
    keys: dict[str, PoolKeyStatus]   # template key -> its VMs
    members: tuple[PoolMemberStatus, ...]


# -- requests to a supervisor -------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True, eq=False, repr=False)
class ContainerRequest(Request[R]):
    container: str


@dataclass(frozen=True, kw_only=True, eq=False, repr=False)
class Create(ContainerRequest[CreateReply]):
    """Fds: the detached trees `trees` names ("root" or a mount index per fd)."""

    OP = Op.CREATE
    REPLY = CreateReply
    bundle: str
    trees: tuple[str | int, ...] = ()


@dataclass(frozen=True, kw_only=True, eq=False, repr=False)
class Attach(ContainerRequest[Ok]):
    """Fds: the process's stdin, stdout and stderr, or one terminal fd."""

    OP = Op.ATTACH
    REPLY = Ok
    exec_id: str = ""
    size: tuple[int, int] | None = None   # the terminal's rows, columns


def new_exec_id() -> str:
    """A random id for an exec'd process (os.urandom, as `secrets.token_hex`, whose import
    pulls hmac, random and base64 onto `runv exec`'s start)."""
    return os.urandom(8).hex()


@dataclass(frozen=True, kw_only=True, eq=False, repr=False)
class Exec(ContainerRequest[Ok]):
    OP = Op.EXEC
    REPLY = Ok
    exec_id: str
    process: dict[str, Any]   # the OCI process
    size: tuple[int, int] | None = None


class Start(ContainerRequest[Ok]):
    OP = Op.START
    REPLY = Ok


@dataclass(frozen=True, kw_only=True, eq=False, repr=False)
class Kill(ContainerRequest[Ok]):
    OP = Op.KILL
    REPLY = Ok
    signal: int
    all: bool = False


@dataclass(frozen=True, kw_only=True, eq=False, repr=False)
class Delete(ContainerRequest[DeleteReply]):
    OP = Op.DELETE
    REPLY = DeleteReply
    force: bool = False


class State(ContainerRequest[StateReply]):
    OP = Op.STATE
    REPLY = StateReply


class Pause(ContainerRequest[Ok]):
    OP = Op.PAUSE
    REPLY = Ok


class Resume(ContainerRequest[Ok]):
    OP = Op.RESUME
    REPLY = Ok


@dataclass(frozen=True, kw_only=True, eq=False, repr=False)
class Update(ContainerRequest[Ok]):
    OP = Op.UPDATE
    REPLY = Ok
    resources: dict[str, Any]   # OCI LinuxResources


class Stats(ContainerRequest[StatsReply]):
    OP = Op.STATS
    REPLY = StatsReply


class Ps(ContainerRequest[PsReply]):
    OP = Op.PS
    REPLY = PsReply


@dataclass(frozen=True, kw_only=True, eq=False, repr=False)
class Events(ContainerRequest[Ok]):
    """With `audit`, also the container's process records (bounded: sandbox/audit.py)."""

    OP = Op.EVENTS
    REPLY = Ok
    audit: bool = False


class NetworkSync(ContainerRequest[NetworkSyncReply]):
    OP = Op.NETWORK_SYNC
    REPLY = NetworkSyncReply


@dataclass(frozen=True, kw_only=True, eq=False, repr=False)
class Checkpoint(ContainerRequest[CheckpointReply]):
    """Save the sandbox (the container must be its sandbox container) into `directory`;
    without `leave_running` its containers stop."""

    OP = Op.CHECKPOINT
    REPLY = CheckpointReply
    directory: str
    leave_running: bool = False


@dataclass(frozen=True, kw_only=True, eq=False, repr=False)
class Adopt(Request[CreateReply]):
    """Fds: the container's supervisor.log, then the detached trees `trees` names."""

    OP = Op.ADOPT
    REPLY = CreateReply
    id: str
    root: str
    bundle: str
    debug: bool = False
    spawned_at: float = 0.0
    cgroups: dict[str, str] = field(default_factory=dict)  # hierarchy -> the claimant's path
    trees: tuple[str | int, ...] = ()


@dataclass(frozen=True, kw_only=True, eq=False, repr=False)
class Claim(Request[ClaimReply]):
    OP = Op.CLAIM
    REPLY = ClaimReply
    key: str   # the template key of the sandbox's size


class PoolStatus(Request[PoolStatusReply]):
    OP = Op.POOL_STATUS
    REPLY = PoolStatusReply


SUPERVISOR_REQUESTS: dict[Op, type[Request[Any]]] = {cls.OP: cls for cls in (
    Create, Attach, Exec, Start, Kill, Delete, State, Pause, Resume, Update, Stats, Ps, Events,
    NetworkSync, Checkpoint, Adopt)}
POOL_REQUESTS: dict[Op, type[Request[Any]]] = {cls.OP: cls for cls in (Claim, PoolStatus)}


def decode_request(wire: Mapping[str, Any],
                   known: Mapping[Op, type[Request[Any]]]) -> Request[Any]:
    try:
        op = Op(str(wire.get("op")))
        cls = known[op]
    except (ValueError, KeyError):
        raise ProtocolError(f"unknown control operation {wire.get('op')!r}") from None
    return cls.from_fields(wire, op.value)


# -- what flows on a kept connection ------------------------------------------------------------

@dataclass(frozen=True, kw_only=True, eq=False, repr=False)
class Signal(Message):
    """Client -> supervisor on an attach: deliver this signal to the process."""

    signal: int


@dataclass(frozen=True, kw_only=True, eq=False, repr=False)
class Resize(Message):
    """Client -> supervisor on an attach: the terminal's new size."""

    size: tuple[int, int]   # rows, columns


@dataclass(frozen=True, kw_only=True, eq=False, repr=False)
class Exit(Message):
    """Supervisor -> client on an attach: the process's exit status (128+N for signal N), sent
    after all its output."""

    exit: int


@dataclass(frozen=True, kw_only=True, eq=False, repr=False)
class ProcessRecord(Message):
    """An execve in a container as its guest reported it, cut to the host's bounds."""

    time: float                 # the host's clock when the supervisor received it
    guest_time: float           # the guest's clock when its agent read /proc
    role: str                   # init, exec (started by the host: exec_id) or execve
    exec_id: str
    pid: int                    # in the guest's initial pid namespace
    ppid: int
    uid: int                    # real; -1 when not read
    euid: int
    argv: tuple[str, ...]
    argv_truncated: bool        # cut by the guest's or the host's bounds
    complete: bool              # False: the process was gone before all of it was read
    comm: str = ""              # the task's name, 15 characters (also after its exit)


@dataclass(frozen=True, kw_only=True, eq=False, repr=False)
class Event(Message):
    """Supervisor -> client on `events`."""

    type: str                       # "oom", "exit", "process" or "dropped"
    id: str                         # the container ("" for a process of an unknown one)
    exit_status: int | None = None  # of an exit
    process: ProcessRecord | None = None
    dropped: int = 0                # process records dropped (over the sandbox's bounds)
    time: float = 0.0               # of a dropped count


def decode_client_message(wire: Mapping[str, Any]) -> Signal | Resize:
    kind: type[Signal | Resize] = Signal if "signal" in wire else Resize
    return kind.from_fields(wire, "attach message")


def decode_exit(wire: Mapping[str, Any]) -> Exit | None:
    """The Exit in a message on an attach, or None for anything else."""
    return Exit.from_fields(wire, "attach message") if "exit" in wire else None


def decode_event(wire: Mapping[str, Any]) -> Event:
    return Event.from_fields(wire, "event")


def to_wire(message: Message) -> dict[str, Any]:
    """A session message (Signal, Resize, Exit, Event, MemberHello, Claimed) as JSON."""
    return message.fields()


# -- the pool service's link to a pooled supervisor ---------------------------------------------

@dataclass(frozen=True, kw_only=True, eq=False, repr=False)
class MemberHello(Message):
    """Pool -> member, first: who it is and its VM's size."""

    id: str
    memory_mib: int
    vcpus: int
    idle: str = "paused"   # paused or running


@dataclass(frozen=True, kw_only=True, eq=False, repr=False)
class Claimed(Message):
    """Pool -> member: you are taken; acknowledge (Ok) and wait for your claimant's Adopt."""

    claimed: bool = True


def decode_hello(wire: Mapping[str, Any]) -> MemberHello:
    return MemberHello.from_fields(wire, "pool hello")


def is_claimed(wire: Mapping[str, Any]) -> bool:
    return wire.get("claimed") is True


def is_ok(wire: Mapping[str, Any]) -> bool:
    return wire.get("ok") is True


# -- errors -------------------------------------------------------------------------------------

def error_reply(exc: BaseException) -> dict[str, Any]:
    """The wire form of a failure; raise_for() raises it again on the other side."""
    kind = type(exc).__name__ if isinstance(exc, RunvError) else "RunvError"
    wire = {"ok": False, "error": str(exc) or type(exc).__name__, "kind": kind}
    if isinstance(exc, AgentError):
        wire["code"] = exc.code
    return wire


def raise_for(wire: Mapping[str, Any]) -> Mapping[str, Any]:
    """`wire` if it is a success; else the RunvError it carries, raised."""
    if wire.get("ok") is True:
        return wire
    cls = getattr(errors, str(wire.get("kind")), RunvError)
    if not (isinstance(cls, type) and issubclass(cls, RunvError)):
        cls = RunvError
    message = str(wire.get("error") or "the supervisor failed")
    if issubclass(cls, AgentError):
        raise cls(message, str(wire.get("code") or "UNAVAILABLE"))
    raise cls(message)


def encode(wire: Mapping[str, Any]) -> bytes:
    data = json.dumps(wire).encode()
    if len(data) > MAX_PACKET:
        raise ProtocolError(f"control message of {len(data)} bytes is too large")
    return data


def decode(data: bytes) -> dict[str, Any]:
    try:
        wire = json.loads(data)
    except ValueError as exc:
        raise ProtocolError(f"control message is not JSON: {exc}") from None
    if not isinstance(wire, dict):
        raise ProtocolError("control message is not an object")
    return wire
