"""The vhost-user-vsock backend: hybrid vsock (guest ports <-> host unix sockets) for QEMU's
vhost-user-vsock device, run as its own process per sandbox (see docs/vsock.md)."""
