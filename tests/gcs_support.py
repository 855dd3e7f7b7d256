"""An in-process GCS emulator (gcp-storage-emulator) that also enforces `ifGenerationMatch=0`.

The emulator ignores generation preconditions (see shared docs); real GCS answers 412 when the object
exists. We wrap its insert handler to do the same for multipart and resumable-start uploads, so tests of
create-if-absent writes can fail. Pinned to gcp-storage-emulator 2026.7.19 (its route table is used).
"""

from __future__ import annotations

import collections
import contextlib
import os
import threading
import uuid
from datetime import datetime, timezone
from http import HTTPStatus

import pytest
from gcp_storage_emulator import server as gcs_server
from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects

_lock = threading.Lock()
_installed = False
_running: dict[str, object] = {}  # URL -> the emulator's server
# How many times each object was written (an upload the emulator accepted): "gs://BUCKET/NAME" -> count.
writes: collections.Counter = collections.Counter()


def _object_name(request) -> str | None:
    if request.query.get("name"):
        return request.query["name"][0]
    data = request.data
    if isinstance(data, dict):
        meta = data.get("meta")
        return (meta or {}).get("name") if isinstance(meta, dict) else data.get("name")
    return None


def _guarded(original):
    def insert(request, response, storage, *args, **kwargs):
        match = request.query.get("ifGenerationMatch")
        if match and match[0] == "0":
            name = _object_name(request)
            try:
                storage.get_file_obj(request.params["bucket_name"], name)
                exists = True
            except NotFound:
                exists = False
            if exists:
                response.status = HTTPStatus.PRECONDITION_FAILED
                response.json({"error": {"code": 412, "message": "At least one of the pre-conditions you specified did not hold.",
                                         "errors": [{"reason": "conditionNotMet"}]}})
                response.status = HTTPStatus.PRECONDITION_FAILED
                return
        result = original(request, response, storage, *args, **kwargs)
        if response.status < 300:
            writes[f"gs://{request.params['bucket_name']}/{_object_name(request)}"] += 1
        return result

    return insert


def install_preconditions() -> None:
    global _installed
    with _lock:
        if _installed:
            return
        for _regex, handlers in gcs_server.HANDLERS:
            for method, handler in list(handlers.items()):
                if handler is objects.insert:
                    handlers[method] = _guarded(objects.insert)
        _installed = True


@contextlib.contextmanager
def gcs_emulator():
    """Yields the emulator's base URL; the caller sets STORAGE_EMULATOR_HOST to it."""
    install_preconditions()
    srv = gcs_server.create_server("127.0.0.1", 0, in_memory=True)
    srv.start()
    url = None
    try:
        srv._api.is_running.wait(5)
        host, port = srv._api._httpd.server_address[:2]  # port 0: the OS chose it
        url = f"http://{host}:{port}"
        _running[url] = srv
        yield url
    finally:
        _running.pop(url, None)
        srv.stop()


def set_updated(uri: str, when: float) -> None:
    """Make the emulator show gs://BUCKET/NAME as last written at `when` (epoch seconds), as an object written
    that long ago shows on real GCS (which sets the time itself). Uses the emulator STORAGE_EMULATOR_HOST names."""
    srv = _running[os.environ["STORAGE_EMULATOR_HOST"]]
    bucket, _, name = uri.removeprefix("gs://").partition("/")
    srv._storage.objects[bucket][name]["updated"] = datetime.fromtimestamp(when, timezone.utc).strftime(
        "%Y-%m-%dT%H:%M:%S.%fZ")


@pytest.fixture(scope="module")
def gcs_url():
    with gcs_emulator() as url:
        yield url


@pytest.fixture
def bucket(gcs_url, monkeypatch):
    """A fresh bucket (gs://NAME) on the module's GCS emulator, with the client pointed at it."""
    from batcher.storage import gcs

    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_url)
    gcs.client.cache_clear()
    name = f"b-{uuid.uuid4().hex[:10]}"
    gcs.client().create_bucket(name)
    yield f"gs://{name}"
    gcs.client.cache_clear()
