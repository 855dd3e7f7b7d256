"""Errors the emulated service answers, in Google's envelope."""

from __future__ import annotations

from typing import Any


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
