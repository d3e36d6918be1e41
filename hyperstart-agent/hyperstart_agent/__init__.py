"""hyperstart: runv-py's guest agent. Runs as PID 1 inside the VM and serves hyperstart.v1."""
from __future__ import annotations

__version__ = "0.1.0"
API_VERSION = 1
