"""The agent's error base: `code` is the gRPC status name the service answers with; `reason`,
if any, goes with it as the trailing metadata `runv-reason` (REASON_KEY), for the host to tell
apart errors that share a code."""

from __future__ import annotations

REASON_KEY = "runv-reason"


class AgentError(Exception):
    code = "UNKNOWN"

    def __init__(self, code: str, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
