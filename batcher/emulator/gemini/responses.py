"""The Gemini API over HTTP: each route's request read and answer written (wire shapes, headers, upload protocol,
downloads with ``Range``), and the API-key check. What the service does is ``GeminiService``'s (models.py)."""

from __future__ import annotations

import re
import socket
from typing import Any, Callable

from ..core.errors import ApiError
from ..core.server import STREAM_CHUNK, RequestHandler
from ..schema import BadPayload, check_fields
from .models import GeminiService

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


class GeminiResponses:
    """The response methods of gemini/urls.py's routes: ``method(request, *path parameters)``."""

    def __init__(self, service: GeminiService) -> None:
        self.service = service

    def authenticate(self, req: RequestHandler) -> None:
        key = req.headers.get("x-goog-api-key") or (req.query.get("key") or [None])[0]
        if not key:
            raise MISSING_KEY
        want = self.service.config.api_key
        if want is not None and key != want:
            raise bad_key()

    @staticmethod
    def _list(req: RequestHandler, items: list[Any], max_size: int, field: str, to_json: Callable[[Any], Any]) -> None:
        """A list response: one page of `items` under `field` (omitted when empty), and the next page's token."""
        page, token = req.page(items, max_size)
        out: dict[str, Any] = {}
        if page:
            out[field] = [to_json(x) for x in page]
        if token:
            out["nextPageToken"] = token
        req.send_json(out)

    # ----- files -----------------------------------------------------------------------------------
    def upload_start(self, req: RequestHandler) -> None:
        svc = self.service
        body = req.read_json()
        meta = body.get("file") if isinstance(body, dict) else None
        meta = meta if isinstance(meta, dict) else {}
        declared = req.headers.get("X-Goog-Upload-Header-Content-Length")
        if (req.headers.get("X-Goog-Upload-Protocol") or "").lower() != "resumable" or \
                (req.headers.get("X-Goog-Upload-Command") or "").lower() != "start":
            raise ApiError(400, "INVALID_ARGUMENT",
                           "Only resumable uploads are emulated: send X-Goog-Upload-Protocol: resumable and "
                           "X-Goog-Upload-Command: start.")
        try:
            declared_n = int(declared) if declared is not None else None
        except ValueError:
            raise ApiError(400, "INVALID_ARGUMENT", f"Invalid X-Goog-Upload-Header-Content-Length: {declared}") from None
        s = svc.start_upload(meta, declared_n, req.headers.get("X-Goog-Upload-Header-Content-Type"))
        url = f"{svc.base_url}/upload/{req.api_version}/files?upload_id={s.upload_id}&upload_protocol=resumable"
        req.send_json({}, headers={"X-Goog-Upload-URL": url, "X-Goog-Upload-Status": "active",
                                   "X-Goog-Upload-Chunk-Granularity": "8388608",
                                   "X-Goog-Upload-Control-URL": url})

    def upload_chunk(self, req: RequestHandler) -> None:
        svc = self.service
        upload_id = req.query["upload_id"][0]
        final_hdr = {"X-Goog-Upload-Status": "final"}
        try:
            s = svc.upload_session(upload_id)
        except ApiError as e:
            return req.send_api_error(e, final_hdr)
        command = [c.strip().lower() for c in (req.headers.get("X-Goog-Upload-Command") or "").split(",")]
        if "query" in command:
            return req.send_json({}, headers={"X-Goog-Upload-Status": "active",
                                              "X-Goog-Upload-Size-Received": str(s.received)})
        if "cancel" in command:
            svc.abort_upload(s)
            return req.send_json({}, headers={"X-Goog-Upload-Status": "cancelled"})
        if "upload" not in command and "finalize" not in command:
            return req.send_api_error(ApiError(400, "INVALID_ARGUMENT", f"Unsupported X-Goog-Upload-Command: "
                                               f"{req.headers.get('X-Goog-Upload-Command')}"), final_hdr)
        try:
            offset = int(req.headers.get("X-Goog-Upload-Offset") or "-1")
        except ValueError:
            offset = -1
        length = req.body_left
        if not s.lock.acquire(blocking=False):
            return req.send_api_error(ApiError(409, "ABORTED", "Another chunk of this upload is in progress."), final_hdr)
        try:
            try:
                svc.upload_chunk(s, offset, req.body_stream(length), length)
            except ApiError as e:
                return req.send_api_error(e, final_hdr)
            if "finalize" not in command:
                return req.send_json({}, headers={"X-Goog-Upload-Status": "active",
                                                  "X-Goog-Upload-Size-Received": str(s.received)})
            if svc.refuse_finalize(s):
                return req.send_json({"error": {"code": 400, "message": f"Unsupported MIME type: {s.mime_type}",
                                                "status": "INVALID_ARGUMENT"}}, headers=final_hdr)
            try:
                f = svc.finalize_upload(s)
            except ApiError as e:
                return req.send_api_error(e, final_hdr)
            req.send_json({"file": svc.file_json(f)}, headers=final_hdr)
        finally:
            s.lock.release()

    def get_file(self, req: RequestHandler, file_id: str) -> None:
        req.send_json(self.service.file_json(self.service.get_file(file_id)))

    def delete_file(self, req: RequestHandler, file_id: str) -> None:
        self.service.delete_file(file_id)
        req.send_json({})

    def list_files(self, req: RequestHandler) -> None:
        self._list(req, self.service.list_files(), 100, "files", self.service.file_json)

    def download(self, req: RequestHandler, file_id: str) -> None:
        svc = self.service
        f = svc.get_file(file_id)
        if f.source != "GENERATED":
            raise ApiError(400, "FAILED_PRECONDITION",
                           f"Only generated files can be downloaded; {f.name} was uploaded (source UPLOADED).")
        size = f.size
        start, end = 0, size - 1
        code = 200
        headers = {"Accept-Ranges": "bytes"}
        rng = req.headers.get("Range")
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
        drop_after = svc.start_download()
        req.send_response(code)
        req.send_header("Content-Type", f.mime_type if "/" in f.mime_type else "application/octet-stream")
        req.send_header("Content-Length", str(length))
        for k, v in headers.items():
            req.send_header(k, v)
        req.end_headers()
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
                    req.wfile.write(data)
                    sent += len(data)
                    left -= len(data)
        finally:
            svc.count_downloaded(sent)
        if sent < length:  # dropped (or the file shrank): cut the connection
            req.close_connection = True
            try:
                req.wfile.flush()
                req.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    # ----- models ----------------------------------------------------------------------------------
    def list_models(self, req: RequestHandler) -> None:
        models = sorted(self.service.models().values(), key=lambda m: m.name)
        self._list(req, models, 1000, "models", lambda m: m.resource())

    def get_model(self, req: RequestHandler, model: str) -> None:
        m = self.service.models().get(model)
        if m is None:
            raise ApiError(404, "NOT_FOUND", f"models/{model} is not found for API version v1beta, or is not supported "
                           "for getModel. Call ListModels to see the list of available models and their supported methods.")
        req.send_json(m.resource())

    # ----- batches ---------------------------------------------------------------------------------
    def create_batch(self, req: RequestHandler, model: str) -> None:
        body = req.read_json()
        try:
            check_fields(body, "BatchGenerateContentRequest")
        except BadPayload as bad:
            raise ApiError(400, "INVALID_ARGUMENT", bad.message, bad.details()) from None
        if not isinstance(body, dict) or not isinstance(body.get("batch"), dict):
            raise ApiError(400, "INVALID_ARGUMENT", "* BatchGenerateContentRequest.batch: batch is required.\n")
        b = self.service.create_batch(model, body["batch"])
        if self.service.lost_create_reply():
            raise ApiError(503, "UNAVAILABLE", "The service is currently unavailable.")
        req.send_json(self.service.batch_json(b))

    def get_batch(self, req: RequestHandler, batch_id: str) -> None:
        req.send_json(self.service.batch_json(self.service.get_batch(batch_id)))

    def list_batches(self, req: RequestHandler) -> None:
        self._list(req, self.service.list_batches(), 1000, "operations", self.service.batch_json)

    def cancel_batch(self, req: RequestHandler, batch_id: str) -> None:
        req.drain()
        self.service.cancel_batch(batch_id)
        req.send_json({})

    def delete_batch(self, req: RequestHandler, batch_id: str) -> None:
        req.drain()
        self.service.delete_batch(batch_id)
        req.send_json({})

    def generate(self, req: RequestHandler, model: str) -> None:
        req.send_json(self.service.generate_content(model, req.read_json()))
