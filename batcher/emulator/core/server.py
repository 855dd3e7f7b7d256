"""The HTTP server and its request handler, the same for every service: reading bodies (streamed, or as Google's
JSON front end reads them), sending answers and error envelopes, the control API, and for a service's route:
counting it, the service's auth check, HTTP fault injection, then the route's response method."""

from __future__ import annotations

import email.utils
import json
import os
import sys
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator, Sequence
from urllib.parse import parse_qs, urlsplit

from ..generate import HTTP_CODES, LineError
from ..schema import BadPayload, loads
from . import control
from .errors import ApiError
from .faults import http_fault
from .project import Project
from .routing import Mount, Route

STREAM_CHUNK = 1024 * 1024


class EmulatorHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, addr: tuple[str, int], project: Project, mounts: Sequence[Mount]) -> None:
        self.project = project
        self.mounts = tuple(mounts)
        super().__init__(addr, RequestHandler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, BrokenPipeError, TimeoutError, OSError)):
            return
        super().handle_error(request, client_address)


class RequestHandler(BaseHTTPRequestHandler):
    """One request. What a service's responses use: ``headers``, ``query``, ``api_version``, ``body_left``,
    ``body_stream()``, ``drain()``, ``read_json()``, ``page()``, ``send_json()``, ``send_body()``,
    ``send_api_error()``, and for streamed answers BaseHTTPRequestHandler's own ``send_response()``,
    ``send_header()``, ``end_headers()``, ``wfile``, ``connection`` and ``close_connection``."""

    protocol_version = "HTTP/1.1"
    server: EmulatorHTTPServer
    server_version = "ESF"
    sys_version = ""
    # TCP_NODELAY, as real front ends set. Without it a response's body, written after its headers, waits in
    # Nagle's buffer for the client's delayed ACK: ~40 ms per response on a kept-alive connection, which made
    # each 8 MiB upload chunk cost ~50 ms more than its bytes (docs/benchmarks.md, upload).
    disable_nagle_algorithm = True

    query: dict[str, list[str]]
    api_version: str = ""  # the {v} of the route's path
    body_left: int = 0  # request body bytes not read yet

    def date_time_string(self, timestamp: float | None = None) -> str:
        # The Date header tells the emulated time, as a real server tells its own clock.
        return email.utils.formatdate(self.project.clock.now() if timestamp is None else timestamp, usegmt=True)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        if os.environ.get("BATCHER_EMULATOR_LOG"):
            super().log_message(format, *args)

    @property
    def project(self) -> Project:
        return self.server.project

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    # ----- reading ---------------------------------------------------------------------------------
    def _content_length(self) -> int:
        try:
            return int(self.headers.get("Content-Length") or 0)
        except ValueError:
            return 0

    def body_stream(self, length: int) -> Iterator[bytes]:
        left = length
        while left > 0:
            data = self.rfile.read(min(STREAM_CHUNK, left))
            if not data:
                raise ConnectionError("client closed the connection mid-body")
            left -= len(data)
            self.body_left -= len(data)
            yield data

    def drain(self) -> None:
        if self.body_left > 0:
            for _ in self.body_stream(self.body_left):
                pass

    def read_json(self) -> Any:
        n = self.body_left
        limit = self.project.config.max_inline_request_bytes
        if n >= limit:
            self.drain()
            raise ApiError(400, "INVALID_ARGUMENT", f"Request payload size exceeds the limit: {limit} bytes.")
        raw = b"".join(self.body_stream(n))
        if not raw.strip():
            return {}
        try:
            return loads(raw)  # Google's lenient syntax (single-quoted strings) too
        except BadPayload as bad:
            raise ApiError(400, "INVALID_ARGUMENT", bad.message) from None

    def page(self, items: list[Any], max_size: int) -> tuple[list[Any], str | None]:
        """One page of a list call (``pageSize``, ``pageToken``), and the next page's token."""
        try:
            size = int((self.query.get("pageSize") or [0])[0]) or self.project.config.list_default_page_size
            start = int((self.query.get("pageToken") or ["0"])[0] or 0)
        except ValueError:
            raise ApiError(400, "INVALID_ARGUMENT", "Invalid pageSize or pageToken.") from None
        if size < 0 or start < 0:
            raise ApiError(400, "INVALID_ARGUMENT", "Invalid pageSize or pageToken.")
        size = min(size, max_size)
        page = items[start:start + size]
        return page, (str(start + size) if start + size < len(items) else None)

    # ----- answering -------------------------------------------------------------------------------
    def send_body(self, code: int, body: bytes, headers: dict[str, str] | None = None,
             content_type: str = "application/json; charset=UTF-8") -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def send_json(self, obj: Any, code: int = 200, headers: dict[str, str] | None = None) -> None:
        self.send_body(code, json.dumps(obj).encode(), headers)

    def send_api_error(self, e: ApiError, headers: dict[str, str] | None = None) -> None:
        """Google's error envelope (after reading what is left of the request body)."""
        if self.body_left > 0:
            try:
                self.drain()
            except Exception:
                self.close_connection = True
        self.project.count("http_errors")
        self.send_json(e.body(), e.code, {**e.headers, **(headers or {})})

    # ----- dispatch --------------------------------------------------------------------------------
    def _dispatch(self, method: str) -> None:
        self.body_left = self._content_length()
        split = urlsplit(self.path)
        self.query = parse_qs(split.query)
        segs = [s for s in split.path.split("/") if s]
        try:
            if segs and segs[0] == "_emulator":
                control.answer(self, method, "/".join(segs[1:]))
                return
            found = self._route(method, segs)
            if found is None:
                self.close_connection = True
                raise ApiError(404, "NOT_FOUND", f"not emulated: {method} {split.path}")
            mount, route, params = found
            self.api_version = params.pop("v", "")
            n = self.project.count_route(route.key)
            if route.kind != "chunk":
                mount.responses.authenticate(self)
            fault = http_fault(self.project.config, self.project.injector, route.key, route.kind, n)
            if fault is not None:
                kind, err = fault
                self.project.count_fault(kind)
                self.send_api_error(err)
                return
            route.respond(mount.responses, self, *params.values())
        except ApiError as e:
            self.send_api_error(e)
        except LineError as e:
            self.send_api_error(ApiError(HTTP_CODES[e.status], e.status, e.message, e.details))
        except (ConnectionError, BrokenPipeError):
            self.close_connection = True
        except Exception as exc:  # a bug in the emulator: say so loudly, in the envelope
            traceback.print_exc()
            self.close_connection = True
            self.send_api_error(ApiError(500, "INTERNAL", f"emulator bug: {type(exc).__name__}: {exc}"))

    def _route(self, method: str, segs: list[str]) -> tuple[Mount, Route, dict[str, str]] | None:
        """The first service whose URL table has a route for the request."""
        for mount in self.server.mounts:
            found = mount.urls.match(method, segs, self.query)
            if found is not None:
                route, params = found
                return mount, route, params
        return None
