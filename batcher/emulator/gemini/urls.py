"""The Gemini API's URL table: route key (also its pattern, see core/routing.py) -> response method, kind.

The keys are what ``stats()["requests"]`` counts and fault targets name (docs/EMULATOR.md, "HTTP surface"):
keep them as they are.
"""

from __future__ import annotations

from ..core.routing import Route, Urls
from .responses import GeminiResponses as R

API_VERSIONS = r"v1[a-z0-9]*"  # any v1* version segment: /v1/, /v1beta/, ...

URLS = Urls(API_VERSIONS, [
    # files
    Route("POST /upload/{v}/files?upload_id", R.upload_chunk, kind="chunk"),
    Route("POST /upload/{v}/files", R.upload_start),
    Route("GET /{v}/files/{id}:download", R.download, kind="download"),
    Route("GET /download/{v}/files/{id}:download", R.download, kind="download"),
    Route("GET /{v}/files", R.list_files),
    Route("GET /{v}/files/{id}", R.get_file),
    Route("DELETE /{v}/files/{id}", R.delete_file),
    # models
    Route("GET /{v}/models", R.list_models),
    Route("GET /{v}/models/{model}", R.get_model),
    Route("POST /{v}/models/{model}:batchGenerateContent", R.create_batch),
    Route("POST /{v}/models/{model}:generateContent", R.generate),
    # batches
    Route("GET /{v}/batches", R.list_batches),
    Route("GET /{v}/batches/{id}", R.get_batch),
    Route("DELETE /{v}/batches/{id}", R.delete_batch),
    Route("POST /{v}/batches/{id}:cancel", R.cancel_batch),
    Route("POST /{v}/batches/{id}:delete", R.delete_batch),
])
