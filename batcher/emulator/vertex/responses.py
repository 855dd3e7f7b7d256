"""Vertex AI over HTTP: each route's request read and answer written, and the Bearer-token check (the
x-goog-api-key is not accepted on these routes). What the service does is ``VertexService``'s (models.py)."""

from __future__ import annotations

from typing import Any

from ..core.errors import ApiError
from ..core.server import RequestHandler
from .models import VertexService

MISSING_TOKEN = ("Request is missing required authentication credential. Expected OAuth 2 access token, login "
                 "cookie or other valid authentication credential. See "
                 "https://developers.google.com/identity/sign-in/web/devconsole-project.")
BAD_TOKEN = ("Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie or "
             "other valid authentication credential. See "
             "https://developers.google.com/identity/sign-in/web/devconsole-project.")


class VertexResponses:
    """The response methods of vertex/urls.py's routes: ``method(request, project, location, *more)``."""

    def __init__(self, service: VertexService) -> None:
        self.service = service

    def authenticate(self, req: RequestHandler) -> None:
        auth = req.headers.get("Authorization") or ""
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(401, "UNAUTHENTICATED", MISSING_TOKEN,
                           [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "CREDENTIALS_MISSING",
                             "domain": "googleapis.com", "metadata": {"service": "aiplatform.googleapis.com"}}])
        want = self.service.config.vertex_token
        if want is not None and token.strip() != want:
            raise ApiError(401, "UNAUTHENTICATED", BAD_TOKEN,
                           [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "ACCESS_TOKEN_TYPE_UNSUPPORTED",
                             "domain": "googleapis.com", "metadata": {"service": "aiplatform.googleapis.com"}}])

    def create_job(self, req: RequestHandler, project: str, location: str) -> None:
        vs = self.service
        req.send_json(vs.job_json(vs.create(project, location, req.read_json())))

    def list_jobs(self, req: RequestHandler, project: str, location: str) -> None:
        vs = self.service
        items, token = req.page(vs.list(project, location, (req.query.get("filter") or [""])[0]), 1000)
        out: dict[str, Any] = {"batchPredictionJobs": [vs.job_json(j) for j in items]}
        if token:
            out["nextPageToken"] = token
        req.send_json(out)

    def get_job(self, req: RequestHandler, project: str, location: str, job_id: str) -> None:
        req.send_json(self.service.job_json(self.service.get(project, location, job_id)))

    def delete_job(self, req: RequestHandler, project: str, location: str, job_id: str) -> None:
        req.drain()
        req.send_json(self.service.delete(project, location, job_id))

    def cancel_job(self, req: RequestHandler, project: str, location: str, job_id: str) -> None:
        req.drain()
        self.service.cancel(project, location, job_id)
        req.send_json({})

    def generate(self, req: RequestHandler, project: str, location: str, model: str) -> None:
        body = req.read_json()
        req.send_json(self.service.generate_content(project, location, model, body))
