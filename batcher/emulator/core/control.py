"""The control API, ``/_emulator/``: stats, reset, config, clock. No API key; not counted as a route; no faults.

    GET  /_emulator/stats                      counters (Project.stats)
    POST /_emulator/reset                      drop all files and jobs, zero counters, reseed
    GET  /_emulator/config                     the live EmulatorConfig
    POST /_emulator/config {...}               change fields (unknown field -> 400)
    GET  /_emulator/clock                      {"now": RFC 3339}
    POST /_emulator/clock {"advance": s}       advance the emulated clock
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .clock import rfc3339
from .errors import ApiError

if TYPE_CHECKING:
    from .server import RequestHandler


def answer(request: RequestHandler, method: str, what: str) -> None:
    """Answer ``METHOD /_emulator/<what>``."""
    project = request.project
    try:
        if what == "stats" and method == "GET":
            return request.send_json(project.stats())
        if what == "reset" and method == "POST":
            request.read_json()
            project.reset()
            return request.send_json({})
        if what == "config" and method == "GET":
            return request.send_json(project.config.to_dict())
        if what == "config" and method == "POST":
            body = request.read_json()
            if not isinstance(body, dict):
                raise ApiError(400, "INVALID_ARGUMENT", "config body must be a JSON object")
            project.configure(**body)
            return request.send_json(project.config.to_dict())
        if what == "clock" and method in ("GET", "POST"):
            body = request.read_json() if method == "POST" else {}
            if body.get("advance"):
                project.advance(float(body["advance"]))
            return request.send_json({"now": rfc3339(project.clock.now())})
    except (ValueError, TypeError) as exc:
        raise ApiError(400, "INVALID_ARGUMENT", str(exc)) from None
    request.close_connection = True
    raise ApiError(404, "NOT_FOUND", f"not emulated: {method} /_emulator/{what}")
