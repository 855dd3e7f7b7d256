"""Vertex AI's URL table: route key (also its pattern, see core/routing.py) -> response method, kind.

    POST   batchPredictionJobs                 create (input JSONL read from GCS)
    GET    batchPredictionJobs                 list (pageSize, pageToken, filter: state / display_name)
    GET    batchPredictionJobs/{id}            get (numeric ids, as the SDK insists)
    POST   batchPredictionJobs/{id}:cancel     -> CANCELLING, then CANCELLED
    DELETE batchPredictionJobs/{id}            -> a done Operation (a running job must be cancelled first)
    POST   publishers/google/models/{m}:generateContent   interactive

all under ``/{v1,v1beta1}/projects/{p}/locations/{l}/``. The keys are what ``stats()["requests"]`` counts and fault
targets name: keep them as they are.
"""

from __future__ import annotations

from ..core.routing import Route, Urls
from .responses import VertexResponses as R

API_VERSIONS = r"v1|v1beta1"

URLS = Urls(API_VERSIONS, [
    Route("POST /{v}/projects/{p}/locations/{l}/batchPredictionJobs", R.create_job),
    Route("GET /{v}/projects/{p}/locations/{l}/batchPredictionJobs", R.list_jobs),
    Route("GET /{v}/projects/{p}/locations/{l}/batchPredictionJobs/{id}", R.get_job),
    Route("DELETE /{v}/projects/{p}/locations/{l}/batchPredictionJobs/{id}", R.delete_job),
    Route("POST /{v}/projects/{p}/locations/{l}/batchPredictionJobs/{id}:cancel", R.cancel_job),
    Route("POST /{v}/projects/{p}/locations/{l}/publishers/google/models/{model}:generateContent", R.generate),
])
