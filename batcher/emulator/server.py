"""HTTP surface of the emulator: routing, auth, fault injection, wire shapes and error envelopes."""

from __future__ import annotations

import json
import os
import re
import socket
import sys
import email.utils
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Iterator
from urllib.parse import parse_qs, urlsplit

from .billing import PREPAY_DEPLETED
from .errors import ApiError
from .faults import route_matches
from .generate import LineError, billed_usd
from .schema import BadPayload, check_fields, loads
from .state import Service

VERSION_RE = re.compile(r"^v1[a-z0-9]*$")
STREAM_CHUNK = 1024 * 1024

MISSING_KEY = ApiError(
    403, "PERMISSION_DENIED",
    "Method doesn't allow unregistered callers (callers without established identity). "
    "Please use API Key or other form of API consumer identity to call this API.")


def bad_key() -> ApiError:
    msg = "API key not valid. Please pass a valid API key."
    return ApiError(400, "INVALID_ARGUMENT", msg, [
        {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID",
         "domain": "googleapis.com", "metadata": {"service": "generativelanguage.googleapis.com"}},
        {"@type": "type.googleapis.com/google.rpc.LocalizedMessage", "locale": "en-US", "message": msg}])


STATUS_NAMES = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 402: "RESOURCE_EXHAUSTED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
                409: "ABORTED", 429: "RESOURCE_EXHAUSTED", 499: "CANCELLED", 500: "INTERNAL",
                501: "NOT_IMPLEMENTED", 502: "UNAVAILABLE", 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}
FAULT_MESSAGES = {402: PREPAY_DEPLETED, 500: "Internal error encountered.", 503: "The service is currently unavailable.",
                  502: "Bad gateway.", 504: "Deadline expired before operation could complete."}


class Route:
    def __init__(self, key: str, handler: Callable[..., None], args: tuple[str, ...] = (),
                 kind: str = "json") -> None:
        self.key, self.handler, self.args, self.kind = key, handler, args, kind  # kind: json|chunk|download


class EmulatorHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, addr: tuple[str, int], svc: Service) -> None:
        self.svc = svc
        super().__init__(addr, Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, BrokenPipeError, TimeoutError, OSError)):
            return
        super().handle_error(request, client_address)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: EmulatorHTTPServer
    server_version = "ESF"
    sys_version = ""
    # TCP_NODELAY, as real front ends set. Without it a response's body, written after its headers, waits in
    # Nagle's buffer for the client's delayed ACK: ~40 ms per response on a kept-alive connection, which made
    # each 8 MiB upload chunk cost ~50 ms more than its bytes (docs/benchmarks.md, upload).
    disable_nagle_algorithm = True

    def date_time_string(self, timestamp: float | None = None) -> str:
        # The Date header tells the emulated time, as a real server tells its own clock.
        return email.utils.formatdate(self.svc.clock.now() if timestamp is None else timestamp, usegmt=True)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        if os.environ.get("BATCHER_EMULATOR_LOG"):
            super().log_message(format, *args)

    # ----- plumbing --------------------------------------------------------------------------------
    @property
    def svc(self) -> Service:
        return self.server.svc

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

    def _content_length(self) -> int:
        try:
            return int(self.headers.get("Content-Length") or 0)
        except ValueError:
            return 0

    def _body_stream(self, length: int) -> Iterator[bytes]:
        left = length
        while left > 0:
            data = self.rfile.read(min(STREAM_CHUNK, left))
            if not data:
                raise ConnectionError("client closed the connection mid-body")
            left -= len(data)
            self._body_left -= len(data)
            yield data

    def _drain(self) -> None:
        if self._body_left > 0:
            for _ in self._body_stream(self._body_left):
                pass

    def _read_json(self) -> Any:
        n = self._body_left
        limit = self.svc.config.max_inline_request_bytes
        if n >= limit:
            self._drain()
            raise ApiError(400, "INVALID_ARGUMENT", f"Request payload size exceeds the limit: {limit} bytes.")
        raw = b"".join(self._body_stream(n))
        if not raw.strip():
            return {}
        try:
            return loads(raw)  # Google's lenient syntax (single-quoted strings) too
        except BadPayload as bad:
            raise ApiError(400, "INVALID_ARGUMENT", bad.message) from None

    def _send(self, code: int, body: bytes, headers: dict[str, str] | None = None,
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

    def _json(self, obj: Any, code: int = 200, headers: dict[str, str] | None = None) -> None:
        self._send(code, json.dumps(obj).encode(), headers)

    def _error(self, e: ApiError, headers: dict[str, str] | None = None) -> None:
        if self._body_left > 0:
            try:
                self._drain()
            except Exception:
                self.close_connection = True
        self.svc.count("http_errors")
        self._json(e.body(), e.code, {**e.headers, **(headers or {})})

    # ----- routing ---------------------------------------------------------------------------------
    def _route(self, method: str, segs: list[str], query: dict[str, list[str]]) -> Route | None:
        prefix = ""
        if segs and segs[0] in ("upload", "download"):
            prefix = segs.pop(0)
        if not segs or not VERSION_RE.match(segs[0]):
            return None
        rest = segs[1:]
        if rest and rest[0] == "projects" and not prefix:  # Vertex AI mode: batcher/emulator/vertex.py
            from .vertex import route as vertex_route
            return vertex_route(self, method, segs[0], rest)
        if prefix == "upload":
            if method == "POST" and rest == ["files"]:
                if "upload_id" in query:
                    return Route("POST /upload/{v}/files?upload_id", self.h_upload_chunk, kind="chunk")
                return Route("POST /upload/{v}/files", self.h_upload_start)
            return None
        if len(rest) == 2 and rest[0] == "files" and rest[1].endswith(":download") and method == "GET":
            key = "GET /download/{v}/files/{id}:download" if prefix else "GET /{v}/files/{id}:download"
            return Route(key, self.h_download, (rest[1][: -len(":download")],), kind="download")
        if prefix:
            return None
        if rest == ["files"]:
            if method == "GET":
                return Route("GET /{v}/files", self.h_list_files)
            return None
        if len(rest) == 2 and rest[0] == "files" and ":" not in rest[1]:
            if method == "GET":
                return Route("GET /{v}/files/{id}", self.h_get_file, (rest[1],))
            if method == "DELETE":
                return Route("DELETE /{v}/files/{id}", self.h_delete_file, (rest[1],))
            return None
        if rest == ["models"] and method == "GET":
            return Route("GET /{v}/models", self.h_list_models)
        if len(rest) == 2 and rest[0] == "models" and method == "GET" and ":" not in rest[1]:
            return Route("GET /{v}/models/{model}", self.h_get_model, (rest[1],))
        if len(rest) == 2 and rest[0] == "models" and method == "POST" and ":" in rest[1]:
            model, _, verb = rest[1].partition(":")
            if verb == "batchGenerateContent":
                return Route("POST /{v}/models/{model}:batchGenerateContent", self.h_create_batch, (model,))
            if verb == "generateContent":
                return Route("POST /{v}/models/{model}:generateContent", self.h_generate, (model,))
            return None
        if rest == ["batches"] and method == "GET":
            return Route("GET /{v}/batches", self.h_list_batches)
        if len(rest) == 2 and rest[0] == "batches":
            bid, _, verb = rest[1].partition(":")
            if not verb and method == "GET":
                return Route("GET /{v}/batches/{id}", self.h_get_batch, (bid,))
            if not verb and method == "DELETE":
                return Route("DELETE /{v}/batches/{id}", self.h_delete_batch, (bid,))
            if verb == "cancel" and method == "POST":
                return Route("POST /{v}/batches/{id}:cancel", self.h_cancel_batch, (bid,))
            if verb == "delete" and method == "POST":
                return Route("POST /{v}/batches/{id}:delete", self.h_delete_batch, (bid,))
        return None

    def _dispatch(self, method: str) -> None:
        self._body_left = self._content_length()
        split = urlsplit(self.path)
        self._query = parse_qs(split.query)
        segs = [s for s in split.path.split("/") if s]
        try:
            if segs and segs[0] == "_emulator":
                self._control(method, segs[1:])
                return
            route = self._route(method, list(segs), self._query)
            if route is None:
                self.close_connection = True
                raise ApiError(404, "NOT_FOUND", f"not emulated: {method} {split.path}")
            n = self.svc.count_route(route.key)
            if route.kind != "chunk":
                (getattr(route, "auth", None) or self._check_auth)()
            self._inject_faults(route, n)
            route.handler(*route.args)
        except _Handled:
            pass
        except ApiError as e:
            self._error(e)
        except LineError as e:
            self._error(ApiError(*_http_of(e)))
        except (ConnectionError, BrokenPipeError):
            self.close_connection = True
        except Exception as exc:  # a bug in the emulator: say so loudly, in the envelope
            import traceback
            traceback.print_exc()
            self.close_connection = True
            self._error(ApiError(500, "INTERNAL", f"emulator bug: {type(exc).__name__}: {exc}"))

    def _check_auth(self) -> None:
        key = self.headers.get("x-goog-api-key") or (self._query.get("key") or [None])[0]
        if not key:
            raise MISSING_KEY
        want = self.svc.config.api_key
        if want is not None and key != want:
            raise bad_key()

    def _inject_faults(self, route: Route, n: int) -> None:
        cfg = self.svc.config
        chunk_headers: dict[str, str] = {}

        def nth(spec: dict[str, list[int]]) -> bool:
            return any(route_matches(t, route.key) and n in ns for t, ns in (spec or {}).items())

        def targeted() -> bool:
            if route.kind != "json":
                return False
            return not cfg.fail_routes or any(route_matches(t, route.key) for t in cfg.fail_routes)

        err: ApiError | None = None
        if nth(cfg.rate_limit_nth) or (targeted() and self.svc.injector.chance("rate_limit", cfg.rate_limit_rate)):
            err = ApiError(429, "RESOURCE_EXHAUSTED", "Resource has been exhausted (e.g. check quota).", [
                {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": cfg.retry_delay}])
            kind = "rate_limit"
        elif nth(cfg.fail_nth) or (targeted() and self.svc.injector.chance("fail", cfg.fail_rate)):
            code = int(cfg.fail_status)
            err = ApiError(code, STATUS_NAMES.get(code, "UNKNOWN"), FAULT_MESSAGES.get(code, "Injected failure."))
            kind = "fail"
        if err is not None:
            with self.svc.lock:
                self.svc.counters["faults_injected"] += 1
                self.svc.fault_counts[kind] = self.svc.fault_counts.get(kind, 0) + 1
            self._error(err, chunk_headers)
            raise _Handled()

    # ----- control API -----------------------------------------------------------------------------
    def _control(self, method: str, segs: list[str]) -> None:
        what = "/".join(segs)
        try:
            if what == "stats" and method == "GET":
                return self._json(self.svc.stats())
            if what == "reset" and method == "POST":
                self._read_json()
                self.svc.reset()
                return self._json({})
            if what == "config" and method == "GET":
                return self._json(self.svc.config.to_dict())
            if what == "config" and method == "POST":
                body = self._read_json()
                if not isinstance(body, dict):
                    raise ApiError(400, "INVALID_ARGUMENT", "config body must be a JSON object")
                self.svc.configure(**body)
                return self._json(self.svc.config.to_dict())
            if what == "clock" and method in ("GET", "POST"):
                body = self._read_json() if method == "POST" else {}
                if body.get("advance"):
                    self.svc.advance(float(body["advance"]))
                from .state import rfc3339
                return self._json({"now": rfc3339(self.svc.clock.now())})
        except (ValueError, TypeError) as exc:
            raise ApiError(400, "INVALID_ARGUMENT", str(exc)) from None
        self.close_connection = True
        raise ApiError(404, "NOT_FOUND", f"not emulated: {method} /_emulator/{what}")

    # ----- files -----------------------------------------------------------------------------------
    def h_upload_start(self) -> None:
        body = self._read_json()
        meta = body.get("file") if isinstance(body, dict) else None
        meta = meta if isinstance(meta, dict) else {}
        declared = self.headers.get("X-Goog-Upload-Header-Content-Length")
        if (self.headers.get("X-Goog-Upload-Protocol") or "").lower() != "resumable" or \
                (self.headers.get("X-Goog-Upload-Command") or "").lower() != "start":
            raise ApiError(400, "INVALID_ARGUMENT",
                           "Only resumable uploads are emulated: send X-Goog-Upload-Protocol: resumable and "
                           "X-Goog-Upload-Command: start.")
        try:
            declared_n = int(declared) if declared is not None else None
        except ValueError:
            raise ApiError(400, "INVALID_ARGUMENT", f"Invalid X-Goog-Upload-Header-Content-Length: {declared}") from None
        s = self.svc.start_upload(meta, declared_n, self.headers.get("X-Goog-Upload-Header-Content-Type"))
        version = self.path.split("/")[2]
        url = f"{self.svc.base_url}/upload/{version}/files?upload_id={s.upload_id}&upload_protocol=resumable"
        self._json({}, headers={"X-Goog-Upload-URL": url, "X-Goog-Upload-Status": "active",
                                "X-Goog-Upload-Chunk-Granularity": "8388608",
                                "X-Goog-Upload-Control-URL": url})

    def h_upload_chunk(self) -> None:
        upload_id = self._query["upload_id"][0]
        final_hdr = {"X-Goog-Upload-Status": "final"}
        try:
            s = self.svc.upload_session(upload_id)
        except ApiError as e:
            return self._error(e, final_hdr)
        command = [c.strip().lower() for c in (self.headers.get("X-Goog-Upload-Command") or "").split(",")]
        if "query" in command:
            return self._json({}, headers={"X-Goog-Upload-Status": "active",
                                           "X-Goog-Upload-Size-Received": str(s.received)})
        if "cancel" in command:
            self.svc.abort_upload(s)
            return self._json({}, headers={"X-Goog-Upload-Status": "cancelled"})
        if "upload" not in command and "finalize" not in command:
            return self._error(ApiError(400, "INVALID_ARGUMENT", f"Unsupported X-Goog-Upload-Command: "
                                        f"{self.headers.get('X-Goog-Upload-Command')}"), final_hdr)
        try:
            offset = int(self.headers.get("X-Goog-Upload-Offset") or "-1")
        except ValueError:
            offset = -1
        length = self._body_left
        if not s.lock.acquire(blocking=False):
            return self._error(ApiError(409, "ABORTED", "Another chunk of this upload is in progress."), final_hdr)
        try:
            try:
                self.svc.upload_chunk(s, offset, self._body_stream(length), length)
            except ApiError as e:
                return self._error(e, final_hdr)
            if "finalize" not in command:
                return self._json({}, headers={"X-Goog-Upload-Status": "active",
                                               "X-Goog-Upload-Size-Received": str(s.received)})
            cfg = self.svc.config
            if s.mime_type in (cfg.finalize_error_mime_types or []):
                self.svc.abort_upload(s)
                with self.svc.lock:
                    self.svc.counters["faults_injected"] += 1
                    self.svc.fault_counts["finalize_error"] = self.svc.fault_counts.get("finalize_error", 0) + 1
                return self._json({"error": {"code": 400, "message": f"Unsupported MIME type: {s.mime_type}",
                                             "status": "INVALID_ARGUMENT"}}, headers=final_hdr)
            try:
                f = self.svc.finalize_upload(s)
            except ApiError as e:
                return self._error(e, final_hdr)
            self._json({"file": self.svc.file_json(f)}, headers=final_hdr)
        finally:
            s.lock.release()

    def h_get_file(self, file_id: str) -> None:
        self._json(self.svc.file_json(self.svc.get_file(file_id)))

    def h_delete_file(self, file_id: str) -> None:
        self.svc.delete_file(file_id)
        self._json({})

    def h_list_files(self) -> None:
        self._list(self.svc.list_files(), 100, "files", self.svc.file_json)

    def _list(self, items: list[Any], max_size: int, field: str, to_json) -> None:
        """A list response: one page of `items` under `field` (omitted when empty), and the next page's token."""
        page, token = self._page(items, max_size)
        out: dict[str, Any] = {}
        if page:
            out[field] = [to_json(x) for x in page]
        if token:
            out["nextPageToken"] = token
        self._json(out)

    def _page(self, items: list[Any], max_size: int) -> tuple[list[Any], str | None]:
        try:
            size = int((self._query.get("pageSize") or [0])[0]) or self.svc.config.list_default_page_size
            start = int((self._query.get("pageToken") or ["0"])[0] or 0)
        except ValueError:
            raise ApiError(400, "INVALID_ARGUMENT", "Invalid pageSize or pageToken.") from None
        if size < 0 or start < 0:
            raise ApiError(400, "INVALID_ARGUMENT", "Invalid pageSize or pageToken.")
        size = min(size, max_size)
        page = items[start:start + size]
        return page, (str(start + size) if start + size < len(items) else None)

    def h_download(self, file_id: str) -> None:
        f = self.svc.get_file(file_id)
        if f.source != "GENERATED":
            raise ApiError(400, "FAILED_PRECONDITION",
                           f"Only generated files can be downloaded; {f.name} was uploaded (source UPLOADED).")
        size = f.size
        start, end = 0, size - 1
        code = 200
        headers = {"Accept-Ranges": "bytes"}
        rng = self.headers.get("Range")
        if rng:
            m = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", rng)
            if m and (m.group(1) or m.group(2)):
                a, b = m.group(1), m.group(2)
                if a:
                    start = int(a)
                    end = min(int(b), size - 1) if b else size - 1
                    bad = start >= size or (b and int(b) < start)
                else:
                    n = int(b)
                    start, end = max(0, size - n), size - 1
                    bad = n == 0 or size == 0
                if bad:
                    raise ApiError(416, "OUT_OF_RANGE", f"Requested range not satisfiable: {rng} (size {size}).",
                                   headers={"Content-Range": f"bytes */{size}"})
                code = 206
                headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        length = max(0, end - start + 1)
        cfg = self.svc.config
        drop_after: int | None = None
        with self.svc.lock:
            if cfg.drop_download_after_bytes is not None and (
                    cfg.drop_download_times is None or cfg.drop_download_times > 0):
                drop_after = int(cfg.drop_download_after_bytes)
                if cfg.drop_download_times is not None:
                    cfg.drop_download_times -= 1
                self.svc.counters["faults_injected"] += 1
                self.svc.counters["downloads_dropped"] += 1
                self.svc.fault_counts["drop_download"] = self.svc.fault_counts.get("drop_download", 0) + 1
            self.svc.counters["downloads"] += 1
        self.send_response(code)
        self.send_header("Content-Type", f.mime_type if "/" in f.mime_type else "application/octet-stream")
        self.send_header("Content-Length", str(length))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        sent = 0
        try:
            with open(f.path, "rb") as fh:
                fh.seek(start)
                left = length
                while left > 0:
                    want = min(STREAM_CHUNK, left)
                    if drop_after is not None:
                        want = min(want, drop_after - sent)
                        if want <= 0:
                            break
                    data = fh.read(want)
                    if not data:
                        break
                    self.wfile.write(data)
                    sent += len(data)
                    left -= len(data)
        finally:
            self.svc.count("bytes_downloaded", sent)
        if sent < length:  # dropped (or the file shrank): cut the connection
            self.close_connection = True
            try:
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    # ----- models ----------------------------------------------------------------------------------
    def h_list_models(self) -> None:
        models = sorted(self.svc.models().values(), key=lambda m: m.name)
        self._list(models, 1000, "models", lambda m: m.resource())

    def h_get_model(self, model: str) -> None:
        m = self.svc.models().get(model)
        if m is None:
            raise ApiError(404, "NOT_FOUND", f"models/{model} is not found for API version v1beta, or is not supported "
                           "for getModel. Call ListModels to see the list of available models and their supported methods.")
        self._json(m.resource())

    # ----- batches ---------------------------------------------------------------------------------
    def h_create_batch(self, model: str) -> None:
        body = self._read_json()
        try:
            check_fields(body, "BatchGenerateContentRequest")
        except BadPayload as bad:
            raise ApiError(400, "INVALID_ARGUMENT", bad.message, bad.details()) from None
        if not isinstance(body, dict) or not isinstance(body.get("batch"), dict):
            raise ApiError(400, "INVALID_ARGUMENT", "* BatchGenerateContentRequest.batch: batch is required.\n")
        b = self.svc.create_batch(model, body["batch"])
        with self.svc.lock:
            lost_reply = self.svc.config.create_then_fail_times > 0
            if lost_reply:
                self.svc.config.create_then_fail_times -= 1
                self.svc.counters["faults_injected"] += 1
                self.svc.fault_counts["create_then_fail"] = self.svc.fault_counts.get("create_then_fail", 0) + 1
        if lost_reply:
            raise ApiError(503, "UNAVAILABLE", "The service is currently unavailable.")
        self._json(self.svc.batch_json(b))

    def h_get_batch(self, batch_id: str) -> None:
        self._json(self.svc.batch_json(self.svc.get_batch(batch_id)))

    def h_list_batches(self) -> None:
        self._list(self.svc.list_batches(), 1000, "operations", self.svc.batch_json)

    def h_cancel_batch(self, batch_id: str) -> None:
        self._drain()
        self.svc.cancel_batch(batch_id)
        self._json({})

    def h_delete_batch(self, batch_id: str) -> None:
        self._drain()
        self.svc.delete_batch(batch_id)
        self._json({})

    def h_generate(self, model: str) -> None:
        body = self._read_json()
        m = self.svc.model(model, "generateContent")
        self.svc.billing.check()
        self.svc.count("generate_content_calls")
        resp, produced = self.svc.generator.generate(m, body, os.urandom(8).hex())
        self.svc.billing.charge(billed_usd(m, resp, batch=False))
        if produced:
            self.svc.count("images_generated")
        self._json(resp)


class _Handled(Exception):
    """Raised after a response was already sent (fault injection)."""


def _http_of(e: LineError) -> tuple[int, str, str, list | None]:
    from .generate import HTTP_CODES
    return HTTP_CODES[e.status], e.status, e.message, e.details
