"""Errors the emulated services answer, in Google's envelope, and the status name of each HTTP code."""

from __future__ import annotations

from typing import Any

# The google.rpc.Code name Google's front end writes for an HTTP status (an injected fault's envelope).
STATUS_NAMES = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 402: "RESOURCE_EXHAUSTED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
                409: "ABORTED", 429: "RESOURCE_EXHAUSTED", 499: "CANCELLED", 500: "INTERNAL",
                501: "NOT_IMPLEMENTED", 502: "UNAVAILABLE", 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}


class ApiError(Exception):
    """An error answered in Google's envelope: ``{"error": {"code", "message", "status", "details"?}}``."""

    def __init__(self, code: int, status: str, message: str, details: list[dict[str, Any]] | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.code, self.status, self.message, self.details = code, status, message, details
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        e: dict[str, Any] = {"code": self.code, "message": self.message, "status": self.status}
        if self.details:
            e["details"] = self.details
        return {"error": e}
