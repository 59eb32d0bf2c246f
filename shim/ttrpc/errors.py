"""gRPC status codes and the error type that carries one across ttrpc."""

from __future__ import annotations

import enum


class Code(enum.IntEnum):
    """google.rpc.Code values; containerd maps them back to its errdefs classes."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


class TTRPCError(Exception):
    """An error with a gRPC code: raised by handlers, and by the client for a failed call."""

    def __init__(self, code: int, message: str, details: tuple[bytes, ...] = ()) -> None:
        super().__init__(message)
        try:
            self.code: Code | int = Code(code)
        except ValueError:
            self.code = code
        self.message = message
        self.details = details  # serialized google.protobuf.Any values, kept opaque

    def __str__(self) -> str:
        name = self.code.name if isinstance(self.code, Code) else str(self.code)
        return f"{name}: {self.message}"

    def __repr__(self) -> str:
        return f"TTRPCError({self.code!r}, {self.message!r})"


class ClosedError(TTRPCError):
    """The connection closed while calls were pending (Go's ErrClosed: "ttrpc: closed")."""

    def __init__(self, message: str = "ttrpc: closed") -> None:
        super().__init__(Code.UNAVAILABLE, message)
