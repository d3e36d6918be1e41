"""The agent's error base: `code` is the gRPC status name the service answers with."""

from __future__ import annotations


class AgentError(Exception):
    code = "UNKNOWN"

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
