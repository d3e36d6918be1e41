"""The one exception tree of runv-py. Each class carries its CLI exit code, the gRPC status
name the shim and agent map it to, and a kebab-case reference for logs and docs."""

from __future__ import annotations


class RunvError(Exception):
    exit_code = 1
    grpc_code = "UNKNOWN"
    reference = "runv-error"


class ConfigError(RunvError):
    """A configuration file or value is invalid; the message names the file and the key."""

    grpc_code = "INVALID_ARGUMENT"
    reference = "invalid-config"


class AssetError(RunvError):
    """The guest kernel or image is missing or does not match what this runv-py expects."""

    grpc_code = "FAILED_PRECONDITION"
    reference = "missing-asset"


class StorageError(RunvError):
    """A state or data directory cannot take what runv-py must write there: its file system
    is full, read-only, or the directory cannot be made; the message names the directory."""

    grpc_code = "RESOURCE_EXHAUSTED"
    reference = "storage-unavailable"


class AcceleratorError(RunvError):
    """The accelerator that was asked for cannot be used on this host."""

    grpc_code = "FAILED_PRECONDITION"
    reference = "accelerator-unavailable"


class HypervisorError(RunvError):
    """QEMU failed to start, died, or refused a command."""

    grpc_code = "INTERNAL"
    reference = "hypervisor-failed"


class BootTimeout(HypervisorError):
    """The guest did not reach 'agent ready' in time; the message carries the console tail."""

    grpc_code = "DEADLINE_EXCEEDED"
    reference = "boot-timeout"


class AgentError(RunvError):
    """The agent answered with an error or the channel to it broke. `code` is the gRPC status
    name the agent answered with ("NOT_FOUND", ...), or "UNAVAILABLE" when the channel itself
    failed: callers branch on it, never on the message."""

    grpc_code = "UNAVAILABLE"
    reference = "agent-error"

    def __init__(self, message: str, code: str = "UNAVAILABLE") -> None:
        super().__init__(message)
        self.code = code


class CommandNotFound(AgentError):
    """The container's program does not exist (hyperctl exits 127, as podman does)."""

    grpc_code = "FAILED_PRECONDITION"
    reference = "command-not-found"


class CommandNotExecutable(AgentError):
    """The container's program exists but cannot be run (hyperctl exits 126, as podman)."""

    grpc_code = "FAILED_PRECONDITION"
    reference = "command-not-executable"


class NotSupported(RunvError):
    """The operation exists in the interface but this build of runv-py cannot do it."""

    grpc_code = "UNIMPLEMENTED"
    reference = "not-supported"


class NotSavable(RunvError):
    """This sandbox cannot be checkpointed as it was set up (a host directory shared into its
    VM, a network interface, a pod); the message says why and what would allow it."""

    grpc_code = "FAILED_PRECONDITION"
    reference = "not-savable"


class SpecError(RunvError):
    """A bundle's config.json (or a process.json) is invalid; the message names the field."""

    grpc_code = "INVALID_ARGUMENT"
    reference = "invalid-spec"


class ContainerNotFound(RunvError):
    """No container with this id exists under the state root."""

    grpc_code = "NOT_FOUND"
    reference = "container-not-found"


class ContainerExists(RunvError):
    """A container with this id already exists."""

    grpc_code = "ALREADY_EXISTS"
    reference = "container-exists"


class InvalidState(RunvError):
    """The operation is not allowed in the container's current state (OCI runtime.md)."""

    grpc_code = "FAILED_PRECONDITION"
    reference = "invalid-state"


class HookError(RunvError):
    """An OCI hook failed or timed out."""

    grpc_code = "FAILED_PRECONDITION"
    reference = "hook-failed"


class TtrpcError(RunvError):
    """A ttrpc exchange with containerd failed: a bad frame, an error status, a closed
    connection."""

    grpc_code = "UNAVAILABLE"
    reference = "ttrpc-error"


class ProcessNotFound(RunvError):
    """No such process in the container, or it has already exited."""

    grpc_code = "NOT_FOUND"
    reference = "process-not-found"


class ImageError(RunvError):
    """An OCI image, manifest or archive is invalid or cannot be stored; the message names it."""

    grpc_code = "INVALID_ARGUMENT"
    reference = "image-error"


class ImageNotFound(ImageError):
    """No image with this name or digest is in the local store (pull or load it first)."""

    grpc_code = "NOT_FOUND"
    reference = "image-not-found"


class UnsafeLayer(ImageError):
    """A layer tarball tries to write outside its root, holds a device node in an untrusted
    image, or exceeds the unpack limits; nothing was written outside the target."""

    grpc_code = "PERMISSION_DENIED"
    reference = "unsafe-layer"


class UnsafeArchive(UnsafeLayer):
    """An archive made in a guest (Sandbox.copy_out) tries to write outside its destination,
    holds a device node or a link leading out, or is larger than the cap; nothing was written
    outside the destination."""

    reference = "unsafe-archive"


class DigestMismatch(ImageError):
    """Downloaded or loaded content does not match the digest (or size) that names it."""

    grpc_code = "DATA_LOSS"
    reference = "digest-mismatch"


class RegistryError(ImageError):
    """A registry refused a request, answered nonsense, or could not be reached."""

    grpc_code = "UNAVAILABLE"
    reference = "registry-error"


class SupervisorUnresponsive(RunvError):
    """A sandbox supervisor took a call but did not answer it in time (it hangs or is
    stopped)."""

    grpc_code = "DEADLINE_EXCEEDED"
    reference = "supervisor-unresponsive"


class ProtocolError(RunvError):
    """A control message (supervisor, pool) is malformed: the message names the field."""

    grpc_code = "INTERNAL"
    reference = "protocol-error"


class NetworkError(RunvError):
    """The sandbox's network namespace cannot be read or extended into the VM (taps, tc),
    or a CNI plugin failed."""

    grpc_code = "FAILED_PRECONDITION"
    reference = "network-failed"
