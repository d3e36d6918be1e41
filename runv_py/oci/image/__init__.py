"""OCI images on the host: a content-addressed store, pulls from registries, loads from
archives, safe layer unpacking into cached root filesystems, and the built-in busybox image.
docs/images.md describes the store layout, the limits and what `trusted` allows."""

from __future__ import annotations

from .model import Image, ImageConfig, Platform
from .progress import Progress, ProgressTask
from .reference import Reference, normalize
from .registry import Credentials
from .store import ImageStore
from .unpack import UnpackLimits

__all__ = ["Credentials", "Image", "ImageConfig", "ImageStore", "Platform", "Progress",
           "ProgressTask", "Reference", "UnpackLimits", "normalize"]
