"""Workloads from images: what `hyperctl` and the Python API (`runv_py.api`) share. An image
becomes a bundle (the image's unpacked rootfs as the lower layer of an overlayfs with a writable
layer of the container's own) and runs through the same `Runtime`, supervisor and stand-ins as
`runv`. Records live under two roots: runtime state (default /run/hyperctl) and data (bundles,
writable layers, logs, images; default /var/lib/hyperctl)."""

from __future__ import annotations
