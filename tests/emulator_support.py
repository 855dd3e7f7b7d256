"""The emulator as the emulator tests use it: a module-scoped emulator (`emu`, reset around each test that takes it),
an SDK client (`c`), and helpers to drive it over raw HTTP and JSONL jobs."""

from __future__ import annotations

import io
import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from google import genai
from google.genai import types

from batcher.emulator import Emulator, EmulatorConfig

FLASH = "gemini-2.5-flash-image"
PRO = "gemini-3-pro-image"
FLASH31 = "gemini-3.1-flash-image"
ROOT = Path(__file__).resolve().parents[1]

BASE = dict(pending_seconds=0.05, running_seconds=0.1, image_bytes=3_000, seed=0, time_scale=1.0)


@pytest.fixture(scope="module")
def emu():
    with Emulator(EmulatorConfig(**BASE)) as e:
        baseline = {k: v for k, v in e.config.to_dict().items() if k not in ("host", "port")}
        yield e
        e.configure(**baseline)


@pytest.fixture(autouse=True)
def _fresh(request):
    if "emu" not in request.fixturenames:
        yield
        return
    e = request.getfixturevalue("emu")
    baseline = {k: v for k, v in e.config.to_dict().items() if k not in ("host", "port")}
    e.reset()
    yield
    e.configure(**baseline)
    e.reset()


def client(emu: Emulator, key: str = "test-key", **http: Any) -> genai.Client:
    opts = dict(base_url=emu.url, api_version="v1beta", timeout=30000)
    opts.update(http)
    return genai.Client(api_key=key, http_options=types.HttpOptions(**opts))


@pytest.fixture
def c(emu):
    return client(emu)


def line(key: str, prompt: str, aspect: str = "1:1", size: str | None = None, snake: bool = True) -> str:
    ic: dict[str, Any] = {"aspect_ratio" if snake else "aspectRatio": aspect}
    if size:
        ic["image_size" if snake else "imageSize"] = size
    if snake:
        gen = {"response_modalities": ["IMAGE"], "image_config": ic}
        req = {"contents": [{"parts": [{"text": prompt}]}], "generation_config": gen}
    else:
        gen = {"responseModalities": ["IMAGE"], "imageConfig": ic}
        req = {"contents": [{"parts": [{"text": prompt}]}], "generationConfig": gen}
    return json.dumps({"key": key, "request": req})


def upload_lines(c: genai.Client, lines: list[str], mime: str = "jsonl") -> types.File:
    data = ("\n".join(lines) + "\n").encode()
    return c.files.upload(file=io.BytesIO(data), config={"mime_type": mime, "display_name": "requests"})


def wait(c: genai.Client, name: str, timeout: float = 15.0) -> types.BatchJob:
    deadline = time.monotonic() + timeout
    while True:
        job = c.batches.get(name=name)
        if job.done:
            return job
        assert time.monotonic() < deadline, f"{name} still {job.state}"
        time.sleep(0.03)


def run_file_job(c: genai.Client, lines: list[str], model: str = FLASH) -> list[dict[str, Any]]:
    f = upload_lines(c, lines)
    job = wait(c, c.batches.create(model=model, src=f.name).name)
    assert job.state == types.JobState.JOB_STATE_SUCCEEDED
    return [json.loads(x) for x in c.files.download(file=job.dest.file_name).decode().splitlines()]

def raw(emu: Emulator, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None,
        key: str | None = "test-key") -> tuple[int, dict[str, str], bytes]:
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    h = dict(headers or {})
    if key:
        h["x-goog-api-key"] = key
    url = path if path.startswith("http") else emu.url + path
    req = urllib.request.Request(url, data=data, method=method, headers=h)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()
