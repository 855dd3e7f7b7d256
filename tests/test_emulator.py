"""The emulator driven by the REAL google-genai SDK (never mocked), plus raw HTTP where the SDK cannot reach."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Any

import pytest
from google import genai
from google.genai import errors, types
from PIL import Image

from batcher.emulator import Emulator, EmulatorConfig

from tests.emulator_support import BASE, FLASH, FLASH31, PRO, ROOT, client, line, raw, run_file_job, upload_lines, wait


def png_of(resp: dict[str, Any]) -> Image.Image:
    part = resp["candidates"][0]["content"]["parts"][-1]
    im = Image.open(io.BytesIO(base64.b64decode(part["inlineData"]["data"])))
    im.load()
    return im



# --------------------------------------------------------------------------------------------------
# The "done when" script
# --------------------------------------------------------------------------------------------------

def test_done_when_script(emu):
    c = client(emu)
    aspects = ["1:1", "16:9", "9:16", "3:2"]
    f = upload_lines(c, [line(f"req-{i}", f"a red fox number {i}", a) for i, a in enumerate(aspects)])
    assert f.mime_type == "jsonl" and f.state == types.FileState.ACTIVE and f.size_bytes > 0
    job = c.batches.create(model=FLASH, src=f.name, config={"display_name": "done-when"})
    assert job.state == types.JobState.JOB_STATE_PENDING and job.display_name == "done-when"
    job = wait(c, job.name)
    assert job.state == types.JobState.JOB_STATE_SUCCEEDED
    assert job.dest.file_name == f"files/batch-{job.name.split('/')[1]}"
    out = [json.loads(x) for x in c.files.download(file=job.dest.file_name).decode().splitlines()]
    assert [o["key"] for o in out] == [f"req-{i}" for i in range(4)]
    dims = {"1:1": (1024, 1024), "16:9": (1344, 768), "9:16": (768, 1344), "3:2": (1248, 832)}
    for o, a in zip(out, aspects):
        im = png_of(o["response"])
        assert im.format == "PNG" and im.size == dims[a]
    with pytest.raises(errors.ClientError) as ei:
        c.batches.get(name="batches/missing")
    assert ei.value.code == 404 and ei.value.status == "NOT_FOUND"
    assert ei.value.message == "Batch batches/missing not found."
    s = emu.stats()
    assert s["files_uploaded"] == 1 and s["batches_created"] == 1 and s["lines_processed"] == 4
    assert s["images_generated"] == 4 and s["bytes_downloaded"] > 0
    assert s["requests"]["POST /{v}/models/{model}:batchGenerateContent"] == 1
    assert s["requests"]["GET /{v}/batches/{id}"] >= 2


def test_default_api_version_v1_works(emu):
    c = genai.Client(api_key="k", http_options=types.HttpOptions(base_url=emu.url, timeout=30000))
    f = upload_lines(c, [line("a", "x")])
    job = wait(c, c.batches.create(model=FLASH, src=f.name).name)
    assert job.state == types.JobState.JOB_STATE_SUCCEEDED
    assert "GET /{v}/batches/{id}" in emu.stats()["requests"]


# --------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------

def test_multichunk_upload_9mib(emu, c):
    data = os.urandom(9 * 1024 * 1024)
    f = c.files.upload(file=io.BytesIO(data), config={"mime_type": "application/octet-stream", "name": "big-one"})
    assert f.name == "files/big-one" and f.size_bytes == len(data) and f.source == types.FileSource.UPLOADED
    assert base64.b64decode(f.sha256_hash).decode() == hashlib.sha256(data).hexdigest()
    assert f.expiration_time - f.create_time == __import__("datetime").timedelta(hours=48)
    s = emu.stats()
    assert s["upload_chunks"] == 2 and s["bytes_uploaded"] == len(data)
    g = c.files.get(name="big-one")
    assert g.size_bytes == len(data) and g.uri == f"{emu.url}/v1beta/files/big-one"
    with pytest.raises(errors.ClientError) as ei:  # duplicate name
        c.files.upload(file=io.BytesIO(b"x"), config={"mime_type": "text/plain", "name": "big-one"})
    assert ei.value.code == 409


def test_keep_alive_responses_are_not_held_by_nagle(emu):
    # Each response is written as headers, then body. Without TCP_NODELAY the body waits for the client's
    # delayed ACK of the headers: ~40 ms per response on a kept-alive connection (20 calls took 0.84 s, and
    # every 8 MiB upload chunk paid it). With it, 20 calls take a few ms.
    import http.client
    import urllib.parse

    u = urllib.parse.urlsplit(emu.url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    t0 = time.perf_counter()
    for _ in range(20):
        conn.request("GET", "/v1beta/files", headers={"x-goog-api-key": "k"})
        resp = conn.getresponse()
        assert resp.status == 200, (resp.status, resp.read())
        resp.read()
    elapsed = time.perf_counter() - t0
    conn.close()
    assert elapsed < 0.4, f"20 kept-alive calls took {elapsed:.2f} s (Nagle + delayed ACK is ~0.8 s)"


def test_upload_offset_mismatch_and_size_mismatch_raw(emu):
    hdr = {"X-Goog-Upload-Protocol": "resumable", "X-Goog-Upload-Command": "start",
           "X-Goog-Upload-Header-Content-Length": "10", "X-Goog-Upload-Header-Content-Type": "text/plain",
           "Content-Type": "application/json"}
    code, h, _ = raw(emu, "POST", "/upload/v1beta/files", {"file": {"displayName": "camel"}}, hdr)
    assert code == 200 and h["X-Goog-Upload-Status"] == "active", (code, h, _)
    url = h["X-Goog-Upload-URL"]
    assert url.startswith(emu.url + "/upload/v1beta/files?upload_id=")
    code, h, body = raw(emu, "POST", url, b"12345", {"X-Goog-Upload-Command": "upload", "X-Goog-Upload-Offset": "3"}, key=None)
    assert code == 400 and json.loads(body)["error"]["status"] == "INVALID_ARGUMENT", (code, h, body)
    assert "Offset" in json.loads(body)["error"]["message"], body
    code, h, body = raw(emu, "POST", url, b"12345", {"X-Goog-Upload-Command": "upload", "X-Goog-Upload-Offset": "0"}, key=None)
    assert code == 200 and h["X-Goog-Upload-Status"] == "active", (code, h, body)
    # finalize with too few bytes: declared 10, got 8
    code, h, body = raw(emu, "POST", url, b"678", {"X-Goog-Upload-Command": "upload, finalize", "X-Goog-Upload-Offset": "5"}, key=None)
    assert code == 400 and h["X-Goog-Upload-Status"] == "final", (code, h, body)
    # a good one, camelCase body, display name echoed
    hdr["X-Goog-Upload-Header-Content-Length"] = "3"
    code, h, _ = raw(emu, "POST", "/upload/v1/files", {"file": {"displayName": "camel", "mimeType": "text/plain"}}, hdr)
    code, h, body = raw(emu, "POST", h["X-Goog-Upload-URL"], b"abc",
                        {"X-Goog-Upload-Command": "upload, finalize", "X-Goog-Upload-Offset": "0"}, key=None)
    assert code == 200 and h["X-Goog-Upload-Status"] == "final", (code, h, body)
    f = json.loads(body)["file"]
    assert f["displayName"] == "camel" and f["sizeBytes"] == "3" and f["state"] == "ACTIVE"


def test_files_paging_get_delete(emu, c):
    names = [upload_lines(c, [line("a", f"p{i}")]).name for i in range(5)]
    listed = [f.name for f in c.files.list(config={"page_size": 2})]
    assert sorted(listed) == sorted(names)
    assert emu.stats()["requests"]["GET /{v}/files"] == 3
    code, _, body = raw(emu, "GET", "/v1beta/files?pageSize=2")
    assert code == 200 and len(json.loads(body)["files"]) == 2 and json.loads(body)["nextPageToken"]
    c.files.delete(name=names[0])
    with pytest.raises(errors.ClientError) as ei:
        c.files.get(name=names[0])
    assert ei.value.code == 404
    assert emu.stats()["files_deleted"] == 1
    for n in names[1:]:
        c.files.delete(name=n)
    code, _, body = raw(emu, "GET", "/v1beta/files")
    assert code == 200 and json.loads(body) == {}
    assert list(c.files.list()) == []


def test_download_streamed_and_ranged(emu, c, tmp_path):
    emu.configure(image_bytes=20_000)
    f = upload_lines(c, [line(f"k{i}", f"dog {i}") for i in range(6)])
    job = wait(c, c.batches.create(model=FLASH, src=f.name).name)
    dest = tmp_path / "out.jsonl"
    as_bytes = c.files.download(file=job.dest.file_name)
    assert c.files.download(file=job.dest.file_name, destination=str(dest)) is None  # streamed to disk
    full = dest.read_bytes()
    assert full == as_bytes
    buf = io.BytesIO()
    c.files.download(file=job.dest.file_name, destination=buf)
    assert buf.getvalue() == full
    assert len(full.splitlines()) == 6 and len(full) > 6 * 20_000
    meta = c.files.get(name=job.dest.file_name)
    assert meta.source == types.FileSource.GENERATED and meta.size_bytes == len(full)
    assert meta.download_uri.startswith(emu.url + "/download/v1beta/files/batch-")
    fid = job.dest.file_name.split("/")[1]
    code, h, body = raw(emu, "GET", f"/v1beta/files/{fid}:download?alt=media")
    assert code == 200 and h["Accept-Ranges"] == "bytes" and body == full
    code, h, body = raw(emu, "GET", f"/download/v1beta/files/{fid}:download?alt=media", headers={"Range": "bytes=10-109"})
    assert code == 206 and body == full[10:110] and h["Content-Range"] == f"bytes 10-109/{len(full)}"
    code, h, body = raw(emu, "GET", f"/v1beta/files/{fid}:download?alt=media", headers={"Range": "bytes=1000-"})
    assert code == 206 and body == full[1000:]
    code, h, body = raw(emu, "GET", f"/v1beta/files/{fid}:download?alt=media", headers={"Range": "bytes=-50"})
    assert code == 206 and body == full[-50:]
    code, h, body = raw(emu, "GET", f"/v1beta/files/{fid}:download?alt=media", headers={"Range": f"bytes={len(full)}-"})
    assert code == 416 and json.loads(body)["error"]["code"] == 416 and h["Content-Range"] == f"bytes */{len(full)}"


def test_uploaded_files_cannot_be_downloaded(emu, c):
    f = upload_lines(c, [line("a", "x")])
    with pytest.raises(errors.ClientError) as ei:
        c.files.download(file=f.name)
    assert ei.value.code == 400 and ei.value.status == "FAILED_PRECONDITION"


def test_file_size_and_storage_limits(emu, c):
    emu.configure(max_file_bytes=100)
    with pytest.raises(errors.ClientError) as ei:
        c.files.upload(file=io.BytesIO(b"x" * 101), config={"mime_type": "text/plain"})
    assert ei.value.code == 400
    emu.configure(max_file_bytes=2 * 1024**3, max_storage_bytes=150)
    c.files.upload(file=io.BytesIO(b"x" * 100), config={"mime_type": "text/plain"})
    with pytest.raises(errors.ClientError) as ei:
        c.files.upload(file=io.BytesIO(b"x" * 100), config={"mime_type": "text/plain"})
    assert ei.value.code == 429


def test_finalize_200_with_error_body_raises_keyerror(emu, c):
    emu.configure(finalize_error_mime_types=["jsonl"])
    with pytest.raises(KeyError):
        upload_lines(c, [line("a", "x")], mime="jsonl")
    f = upload_lines(c, [line("a", "x")], mime="application/jsonl")  # other MIME types still work
    assert f.mime_type == "application/jsonl"
    assert emu.stats()["files_uploaded"] == 1 and emu.stats()["faults"]["finalize_error"] == 1


def test_file_expiry_with_clock(emu, c):
    f = upload_lines(c, [line("a", "x")])
    other = c.files.upload(file=io.BytesIO(b"\x89PNG fake"), config={"mime_type": "image/png"})
    emu.advance(47 * 3600)
    assert c.files.get(name=f.name).name == f.name
    emu.advance(2 * 3600)
    with pytest.raises(errors.ClientError) as ei:
        c.files.get(name=f.name)
    assert ei.value.code == 404
    with pytest.raises(errors.ClientError) as ei:
        c.batches.create(model=FLASH, src=f.name)
    assert ei.value.code == 404
    # a request referencing an expired file through fileData fails per line
    req = {"contents": [{"parts": [{"text": "edit"}, {"file_data": {"file_uri": other.uri, "mime_type": "image/png"}}]}]}
    f2 = upload_lines(c, [json.dumps({"key": "e", "request": req})])
    job = wait(c, c.batches.create(model=FLASH, src=f2.name).name)
    out = json.loads(c.files.download(file=job.dest.file_name))
    assert out["key"] == "e" and out["error"]["status"] == "PERMISSION_DENIED" and "response" not in out
    assert emu.stats()["files_expired"] >= 2


def test_filedata_reference_to_live_file_counts_image_tokens(emu, c):
    img = c.files.upload(file=io.BytesIO(b"\x89PNG fake"), config={"mime_type": "image/png"})
    r = c.models.generate_content(model=FLASH, contents=[types.Content(role="user", parts=[
        types.Part(text="abcdefgh"), types.Part(file_data=types.FileData(file_uri=img.uri, mime_type="image/png"))])])
    assert r.usage_metadata.prompt_token_count == 2 + 258
    assert r.usage_metadata.candidates_token_count == 1290


# --------------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------------

def test_inline_batch_and_raw_operation_shape(emu, c):
    job = c.batches.create(model=PRO, src=[
        {"contents": [{"parts": [{"text": "a"}], "role": "user"}], "metadata": {"key": "m1"},
         "config": {"response_modalities": ["TEXT", "IMAGE"], "image_config": {"aspect_ratio": "4:3", "image_size": "2K"}}},
        {"contents": [{"parts": [{"text": "b"}], "role": "user"}], "config": {"image_config": {"image_size": "1k"}}},
    ], config={"display_name": "inline"})
    job = wait(c, job.name)
    assert job.state == types.JobState.JOB_STATE_SUCCEEDED
    r0, r1 = job.dest.inlined_responses
    parts = r0.response.candidates[0].content.parts
    assert parts[0].text and parts[1].inline_data.mime_type == "image/png"
    assert Image.open(io.BytesIO(parts[1].inline_data.data)).size == (2400, 1792)
    assert r0.metadata == {"key": "m1"}
    assert r1.error is not None and r1.error.code == 3 and "1k" in r1.error.message
    code, _, body = raw(emu, "GET", f"/v1beta/{job.name}")
    op = json.loads(body)
    md = op["metadata"]
    assert md["@type"].endswith("GenerateContentBatch") and md["model"] == f"models/{PRO}"
    assert md["state"] == "BATCH_STATE_SUCCEEDED" and op["done"] is True
    assert md["batchStats"] == {"requestCount": "2", "successfulRequestCount": "1", "failedRequestCount": "1"}
    assert md["createTime"].endswith("Z") and len(md["createTime"].split(".")[1]) == 10
    assert op["response"]["inlinedResponses"] == md["output"]["inlinedResponses"]
    assert op["response"]["@type"].endswith("GenerateContentBatchOutput")


def test_running_progress_and_batch_stats(emu, c):
    emu.configure(pending_seconds=100, running_seconds=100, time_scale=0.0)
    f = upload_lines(c, [line(f"k{i}", f"p{i}") for i in range(10)])
    job = c.batches.create(model=FLASH, src=f.name)
    md = json.loads(raw(emu, "GET", f"/v1beta/{job.name}")[2])["metadata"]
    assert md["state"] == "BATCH_STATE_PENDING" and "done" not in md
    assert md["batchStats"] == {"requestCount": "10", "pendingRequestCount": "10"}
    emu.advance(150)  # half way through running
    deadline = time.monotonic() + 5
    while True:
        md = json.loads(raw(emu, "GET", f"/v1beta/{job.name}")[2])["metadata"]
        if md["batchStats"].get("successfulRequestCount") == "5":
            break
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert md["state"] == "BATCH_STATE_RUNNING"
    assert md["batchStats"] == {"requestCount": "10", "successfulRequestCount": "5", "pendingRequestCount": "5"}
    assert c.batches.get(name=job.name).state == types.JobState.JOB_STATE_RUNNING
    emu.advance(60)
    job = wait(c, job.name)
    assert job.state == types.JobState.JOB_STATE_SUCCEEDED and job.end_time >= job.create_time


def test_batches_paging_cancel_delete(emu, c):
    emu.configure(pending_seconds=1000)
    f = upload_lines(c, [line("a", "x")])
    names = [c.batches.create(model=FLASH, src=f.name).name for _ in range(5)]
    listed = [j.name for j in c.batches.list(config={"page_size": 2})]
    assert sorted(listed) == sorted(names)
    assert emu.stats()["requests"]["GET /{v}/batches"] == 3
    assert c.batches.cancel(name=names[0]) is None
    j = c.batches.get(name=names[0])
    assert j.state == types.JobState.JOB_STATE_CANCELLED and j.done
    op = json.loads(raw(emu, "GET", f"/v1beta/{names[0]}")[2])
    assert op["error"]["code"] == 1 and op["done"] is True and "output" not in op["metadata"]
    c.batches.delete(name=names[0])
    with pytest.raises(errors.ClientError) as ei:
        c.batches.get(name=names[0])
    assert ei.value.code == 404
    code, _, body = raw(emu, "POST", f"/v1beta/{names[1]}:delete", b"")
    assert code == 200 and json.loads(body) == {}
    s = emu.stats()
    assert s["batches_cancelled"] == 1 and s["batches_deleted"] == 2
    for n in names[2:]:
        c.batches.delete(name=n)
    assert json.loads(raw(emu, "GET", "/v1beta/batches")[2]) == {}


def test_cancel_of_succeeded_job_is_failed_precondition(emu, c):
    f = upload_lines(c, [line("a", "x")])
    job = wait(c, c.batches.create(model=FLASH, src=f.name).name)
    with pytest.raises(errors.ClientError) as ei:
        c.batches.cancel(name=job.name)
    assert ei.value.code == 400 and ei.value.status == "FAILED_PRECONDITION"


@pytest.mark.parametrize("outcome,state,code", [
    ("FAILED", "JOB_STATE_FAILED", 13), ("EXPIRED", "JOB_STATE_EXPIRED", 4),
    ("CANCELLED", "JOB_STATE_CANCELLED", 1)])
def test_job_outcomes(emu, c, outcome, state, code):
    emu.configure(job_outcomes=[outcome])
    f = upload_lines(c, [line("a", "x")])
    job = wait(c, c.batches.create(model=FLASH, src=f.name).name)
    assert job.state.value == state and job.dest is None
    op = json.loads(raw(emu, "GET", f"/v1beta/{job.name}")[2])
    assert op["done"] is True and op["error"]["code"] == code and "response" not in op
    # the next job is back to normal
    assert wait(c, c.batches.create(model=FLASH, src=f.name).name).state == types.JobState.JOB_STATE_SUCCEEDED


def test_stuck_job_expires_after_48h(emu, c):
    emu.configure(job_outcomes=["STUCK"])
    f = upload_lines(c, [line("a", "x")])
    job = c.batches.create(model=FLASH, src=f.name)
    time.sleep(0.3)
    assert c.batches.get(name=job.name).state == types.JobState.JOB_STATE_PENDING
    emu.advance(47 * 3600)
    time.sleep(0.1)
    assert c.batches.get(name=job.name).state == types.JobState.JOB_STATE_PENDING
    emu.advance(2 * 3600)
    job = wait(c, job.name)
    assert job.state == types.JobState.JOB_STATE_EXPIRED and job.dest is None
    assert emu.stats()["batches_expired"] == 1


def test_time_scale_drives_expiry(emu, c):
    emu.configure(job_outcomes=["STUCK"])
    f = upload_lines(c, [line("a", "x")])
    job = c.batches.create(model=FLASH, src=f.name)
    emu.configure(time_scale=48 * 3600 * 4)  # 48 emulated hours every 0.25 s
    job = wait(c, job.name)
    assert job.state == types.JobState.JOB_STATE_EXPIRED


def test_job_state_style(emu, c):
    emu.configure(state_style="JOB_STATE")
    f = upload_lines(c, [line("a", "x")])
    job = c.batches.create(model=FLASH, src=f.name)
    assert job.state == types.JobState.JOB_STATE_PENDING
    job = wait(c, job.name)
    assert job.state == types.JobState.JOB_STATE_SUCCEEDED and job.dest.file_name
    assert json.loads(raw(emu, "GET", f"/v1beta/{job.name}")[2])["metadata"]["state"] == "JOB_STATE_SUCCEEDED"


def test_omit_optional_fields(emu, c):
    emu.configure(omit_optional_fields=True)
    f = upload_lines(c, [line("a", "x")])
    job = wait(c, c.batches.create(model=FLASH, src=f.name, config={"display_name": "d"}).name)
    assert job.state == types.JobState.JOB_STATE_SUCCEEDED and job.display_name is None
    md = json.loads(raw(emu, "GET", f"/v1beta/{job.name}")[2])["metadata"]
    assert "batchStats" not in md and "updateTime" not in md
    assert c.files.get(name=f.name).update_time is None


def test_unknown_model_and_bad_create(emu, c):
    f = upload_lines(c, [line("a", "x")])
    with pytest.raises(errors.ClientError) as ei:
        c.batches.create(model="gemini-9-ultra", src=f.name)
    assert ei.value.code == 404 and ei.value.status == "NOT_FOUND"
    with pytest.raises(errors.ClientError) as ei:
        c.batches.create(model=FLASH, src="files/nope")
    assert ei.value.code == 404
    code, _, body = raw(emu, "POST", f"/v1beta/models/{FLASH}:batchGenerateContent", b"{not json")
    assert code == 400 and json.loads(body)["error"]["status"] == "INVALID_ARGUMENT"


def test_per_line_validation(emu, c):
    lines = [
        line("ok", "fine", "21:9", snake=False),
        line("bad-size-lower", "x", size="1k"),
        line("bad-size-flash", "x", size="2K"),
        line("bad-aspect", "x", aspect="7:3"),
        line("extra-aspect-not-on-flash", "x", aspect="1:4"),
        "{this is not json",
        json.dumps({"key": "no-contents", "request": {}}),
    ]
    out = run_file_job(c, lines)
    assert len(out) == 7
    assert png_of(out[0]["response"]).size == (1536, 672)
    for o in out[1:]:
        assert "response" not in o and o["error"]["code"] == 3 and o["error"]["status"] == "INVALID_ARGUMENT"
    assert [o.get("key") for o in out[1:5]] == ["bad-size-lower", "bad-size-flash", "bad-aspect",
                                                 "extra-aspect-not-on-flash"]
    assert "key" not in out[5]


# Pixel sizes and tokens as the image-generation guide's tables give them (typed here from the guide, not read
# from batcher/catalog.toml, so a wrong number in the table fails this test).
@pytest.mark.parametrize("model,aspect,size,dims,tokens", [
    (PRO, "16:9", "1K", (1376, 768), 1120),
    (PRO, "1:1", "2K", (2048, 2048), 1120),
    (PRO, "9:16", "4K", (3072, 5504), 2000),
    (PRO, "21:9", "2K", (3168, 1344), 1120),
    (FLASH31, "5:4", "512", (576, 464), 747),
    (FLASH31, "1:4", "1K", (512, 2048), 1120),
    (FLASH31, "8:1", "2K", (6144, 768), 1680),
    (FLASH31, "1:8", "4K", (1536, 12288), 2520),
    (FLASH31, "3:2", None, (1264, 848), 1120),
    (FLASH, "4:5", None, (896, 1152), 1290),
    (FLASH, "16:9", None, (1344, 768), 1290),
])
def test_sizes_and_aspect_ratios_interactive(emu, c, model, aspect, size, dims, tokens):
    ic = {"aspect_ratio": aspect, **({"image_size": size} if size else {})}
    r = c.models.generate_content(model=model, contents="a lighthouse",
                                  config={"response_modalities": ["IMAGE"], "image_config": ic})
    part = r.candidates[0].content.parts[0]
    im = Image.open(io.BytesIO(part.inline_data.data))
    im.load()
    assert im.format == "PNG" and im.size == dims
    assert r.candidates[0].finish_reason == types.FinishReason.STOP
    u = r.usage_metadata
    assert u.candidates_token_count == tokens and u.prompt_token_count == 3
    thinks = model != FLASH  # the Gemini 3 image models think, and bill it
    assert (u.thoughts_token_count or 0) > 0 if thinks else u.thoughts_token_count is None
    assert u.total_token_count == tokens + 3 + (u.thoughts_token_count or 0)
    assert u.candidates_tokens_details[0].modality == types.MediaModality.IMAGE
    assert r.model_version == model and r.response_id


def test_interactive_invalid_size_is_400(emu, c):
    with pytest.raises(errors.ClientError) as ei:
        c.models.generate_content(model=PRO, contents="x", config={"image_config": {"image_size": "1k"}})
    assert ei.value.code == 400 and ei.value.status == "INVALID_ARGUMENT"
    with pytest.raises(errors.ClientError) as ei:
        c.models.generate_content(model=PRO, contents="x", config={"image_config": {"image_size": "512"}})
    assert ei.value.code == 400
    with pytest.raises(errors.ClientError) as ei:
        c.models.generate_content(model="imagen-4.0-generate-001", contents="x")
    assert ei.value.code == 404


def test_image_determinism_and_size(emu, c):
    emu.configure(image_bytes=50_000)
    cfg = {"response_modalities": ["IMAGE"]}

    def img(prompt: str, **extra: Any) -> bytes:
        r = c.models.generate_content(model=FLASH, contents=prompt, config={**cfg, **extra})
        return r.candidates[0].content.parts[0].inline_data.data

    a, b = img("a cat"), img("a cat")
    assert a == b and abs(len(a) - 50_000) < 100
    assert img("a dog") != a
    assert img("a cat", seed=7) != a
    seeded = img("a cat", seed=7)

    def body(seed: int | None) -> dict[str, Any]:
        gen: dict[str, Any] = {"response_modalities": ["IMAGE"], **({"seed": seed} if seed is not None else {})}
        return {"contents": [{"parts": [{"text": "a cat"}], "role": "user"}], "generation_config": gen}

    out = run_file_job(c, [json.dumps({"key": k, "request": body(s)}) for k, s in
                           [("v0", None), ("v1", None), ("v0", None), ("s0", 7), ("s1", 7)]])
    got = [base64.b64decode(o["response"]["candidates"][0]["content"]["parts"][0]["inlineData"]["data"]) for o in out]
    # unseeded: the key (e.g. a variant) changes the image, the same key replays it
    assert got[0] != got[1] and got[0] == got[2] and got[0] != a
    # seeded: batch (snake_case) and interactive (camelCase from the SDK) give the same bytes, whatever the key
    assert got[3] == got[4] == seeded


# --------------------------------------------------------------------------------------------------
# Faults
# --------------------------------------------------------------------------------------------------

def test_prompt_markers(emu, c):
    out = run_file_job(c, [
        line("safety", "x [emulator:image_safety]"),
        line("blocked", "x [emulator:prompt_blocked]"),
        line("text", "x [emulator:text_only]"),
        line("err", "x [emulator:line_error]"),
        line("ok", "x"),
    ])
    by = {o["key"]: o for o in out}
    assert by["safety"]["response"]["candidates"][0]["finishReason"] == "IMAGE_SAFETY"
    assert "content" not in by["safety"]["response"]["candidates"][0]
    assert by["blocked"]["response"]["promptFeedback"]["blockReason"] == "SAFETY"
    assert "candidates" not in by["blocked"]["response"]
    parts = by["text"]["response"]["candidates"][0]["content"]["parts"]
    assert len(parts) == 1 and "text" in parts[0]
    assert by["err"]["error"] == {"code": 13, "message": "Internal error encountered.", "status": "INTERNAL"}
    assert "inlineData" in by["ok"]["response"]["candidates"][0]["content"]["parts"][0]
    s = emu.stats()
    assert s["images_generated"] == 1 and s["lines_failed"] == 1
    r = c.models.generate_content(model=FLASH, contents="y [emulator:image_safety]")
    assert r.candidates[0].finish_reason == types.FinishReason.IMAGE_SAFETY
    with pytest.raises(errors.ServerError) as ei:
        c.models.generate_content(model=FLASH, contents="y [emulator:line_error]")
    assert ei.value.code == 500


@pytest.mark.parametrize("field,check", [
    ("line_error_rate", lambda o: o["error"]["code"] == 13),
    ("safety_block_rate", lambda o: o["response"]["candidates"][0]["finishReason"] == "IMAGE_SAFETY"),
    ("prompt_block_rate", lambda o: o["response"]["promptFeedback"]["blockReason"] == "SAFETY"),
    ("text_only_rate", lambda o: "text" in o["response"]["candidates"][0]["content"]["parts"][0]),
])
def test_line_fault_rates(emu, c, field, check):
    emu.configure(**{field: 1.0})
    out = run_file_job(c, [line(f"k{i}", f"p{i}") for i in range(3)])
    assert all(check(o) for o in out)
    assert emu.stats()["faults_injected"] == 3


def test_line_error_http_style_and_seeded_replay(emu, c):
    emu.configure(line_error_rate=0.5, line_error_style="http", seed=42)
    lines = [line(f"k{i}", f"p{i}") for i in range(20)]
    first = ["error" in o for o in run_file_job(c, lines)]
    assert 0 < sum(first) < 20
    emu.reset()  # reseeds the RNG from the config seed
    out = run_file_job(c, lines)
    assert ["error" in o for o in out] == first
    assert all(o["error"]["code"] == 500 for o in out if "error" in o)


def test_fail_nth_and_rate_and_sdk_errors(emu, c):
    emu.configure(fail_nth={"POST batchGenerateContent": [1]})
    f = upload_lines(c, [line("a", "x")])
    with pytest.raises(errors.ServerError) as ei:
        c.batches.create(model=FLASH, src=f.name)
    assert ei.value.code == 503 and ei.value.status == "UNAVAILABLE"
    c.batches.create(model=FLASH, src=f.name)  # the 2nd succeeds
    emu.configure(fail_rate=1.0, fail_status=500, fail_routes=["GET /{v}/files"])
    with pytest.raises(errors.ServerError) as ei:
        list(c.files.list())
    assert ei.value.code == 500 and ei.value.status == "INTERNAL"
    c.files.get(name=f.name)  # not targeted
    assert emu.stats()["faults_injected"] == 2


def test_rate_limit_429_with_retry_info(emu, c):
    emu.configure(rate_limit_nth={"GET /{v}/batches/{id}": [1]}, retry_delay="7s")
    with pytest.raises(errors.ClientError) as ei:
        c.batches.get(name="batches/whatever")
    assert ei.value.code == 429 and ei.value.status == "RESOURCE_EXHAUSTED"
    assert {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "7s"} in ei.value.details["error"]["details"]
    emu.configure(rate_limit_rate=1.0)
    with pytest.raises(errors.ClientError) as ei:
        c.models.generate_content(model=FLASH, contents="x")
    assert ei.value.code == 429


def test_sdk_retry_options_ride_over_faults(emu):
    c = client(emu, retry_options=types.HttpRetryOptions(attempts=3, initial_delay=0.01, max_delay=0.02))
    emu.configure(fail_nth={"GET /{v}/batches": [1, 2]})
    assert list(c.batches.list()) == []
    assert emu.stats()["requests"]["GET /{v}/batches"] == 3


def test_dropped_download(emu, c, tmp_path):
    emu.configure(image_bytes=10_000)
    f = upload_lines(c, [line(f"k{i}", f"p{i}") for i in range(3)])
    job = wait(c, c.batches.create(model=FLASH, src=f.name).name)
    emu.configure(drop_download_after_bytes=1000, drop_download_times=1)
    with pytest.raises(Exception) as ei:
        c.files.download(file=job.dest.file_name)
    assert not isinstance(ei.value, errors.APIError)
    data = c.files.download(file=job.dest.file_name)  # only the first was cut
    assert len(data.splitlines()) == 3
    s = emu.stats()
    assert s["downloads_dropped"] == 1 and s["faults"]["drop_download"] == 1


# --------------------------------------------------------------------------------------------------
# Limits
# --------------------------------------------------------------------------------------------------

def test_concurrent_job_limit(emu, c):
    emu.configure(max_concurrent_jobs=2, pending_seconds=1000)
    f = upload_lines(c, [line("a", "x")])
    a = c.batches.create(model=FLASH, src=f.name)
    c.batches.create(model=FLASH, src=f.name)
    with pytest.raises(errors.ClientError) as ei:
        c.batches.create(model=FLASH, src=f.name)
    assert ei.value.code == 429
    c.batches.cancel(name=a.name)
    c.batches.create(model=FLASH, src=f.name)


def test_enqueued_token_cap(emu, c):
    emu.configure(pending_seconds=1000, enqueued_token_cap=3 * 1291)
    f = upload_lines(c, [line(f"k{i}", "abcd") for i in range(2)])  # 2 x (1 + 1290) tokens
    c.batches.create(model=FLASH, src=f.name)
    with pytest.raises(errors.ClientError) as ei:
        c.batches.create(model=FLASH, src=f.name)
    assert ei.value.code == 429 and ei.value.status == "RESOURCE_EXHAUSTED"
    types_ = [d["@type"] for d in ei.value.details["error"]["details"]]
    assert "type.googleapis.com/google.rpc.QuotaFailure" in types_
    assert "type.googleapis.com/google.rpc.RetryInfo" in types_
    c.batches.create(model=PRO, src=f.name)  # caps are per model
    # tier table: tier 1 flash = 3M tokens
    emu.configure(enqueued_token_cap=None, tier="1")
    emu.reset()
    big = upload_lines(c, [line(f"k{i}", "abcd") for i in range(2400)])  # 2400 * 1291 > 3M
    with pytest.raises(errors.ClientError) as ei:
        c.batches.create(model=FLASH, src=big.name)
    assert ei.value.code == 429
    emu.configure(tier="2")
    c.batches.create(model=FLASH, src=big.name)


def test_inline_request_size_limit(emu, c):
    emu.configure(max_inline_request_bytes=5_000)
    with pytest.raises(errors.ClientError) as ei:
        c.batches.create(model=FLASH, src=[{"contents": [{"parts": [{"text": "x" * 6000}]}]}])
    assert ei.value.code == 400 and "exceeds" in ei.value.message


# --------------------------------------------------------------------------------------------------
# Auth, routing, control API
# --------------------------------------------------------------------------------------------------

def test_auth(emu):
    emu.configure(api_key="right")
    good, bad = client(emu, key="right"), client(emu, key="wrong")
    assert list(good.batches.list()) == []
    with pytest.raises(errors.ClientError) as ei:
        list(bad.batches.list())
    assert ei.value.code == 400 and ei.value.status == "INVALID_ARGUMENT"
    assert ei.value.message == "API key not valid. Please pass a valid API key."
    code, _, body = raw(emu, "GET", "/v1beta/batches", key=None)
    assert code == 403 and json.loads(body)["error"]["status"] == "PERMISSION_DENIED"
    # upload chunks carry no key: the SDK upload must work
    f = good.files.upload(file=io.BytesIO(b"hello"), config={"mime_type": "text/plain"})
    assert f.size_bytes == 5


def test_unknown_routes_are_loud(emu):
    for method, path in [("GET", "/v1beta/tunedModels"), ("GET", "/v2/batches"), ("PATCH", "/v1beta/batches/x"),
                         ("GET", "/nothing"), ("GET", "/_emulator/nope")]:
        code, _, body = raw(emu, method, path)
        assert code == 404, path
        assert json.loads(body)["error"]["message"].startswith("not emulated: ")


def test_control_api_over_http(emu, c):
    code, _, body = raw(emu, "POST", "/_emulator/config", {"image_bytes": 4321, "job_outcomes": ["FAILED"]}, key=None)
    assert code == 200 and json.loads(body)["image_bytes"] == 4321
    assert emu.config.image_bytes == 4321
    code, _, body = raw(emu, "POST", "/_emulator/config", {"no_such_field": 1}, key=None)
    assert code == 400
    code, _, body = raw(emu, "GET", "/_emulator/config", key=None)
    assert json.loads(body)["job_outcomes"] == ["FAILED"]
    before = json.loads(raw(emu, "GET", "/_emulator/clock", key=None)[2])["now"]
    after = json.loads(raw(emu, "POST", "/_emulator/clock", {"advance": 86400}, key=None)[2])["now"]
    assert after[:10] > before[:10]
    upload_lines(c, [line("a", "x")])
    stats = json.loads(raw(emu, "GET", "/_emulator/stats", key=None)[2])
    assert stats["files_uploaded"] == 1 and stats == {**emu.stats(), "emulated_time": stats["emulated_time"]}
    for k in ("batches_created", "files_uploaded", "bytes_uploaded", "bytes_downloaded", "requests",
              "batches_cancelled", "files_deleted", "generate_content_calls", "lines_processed",
              "images_generated", "faults_injected"):
        assert k in stats
    assert raw(emu, "POST", "/_emulator/reset", key=None)[0] == 200
    assert emu.stats()["files_uploaded"] == 0 and list(c.files.list()) == []


def test_stats_count_what_happened(emu, c):
    f = upload_lines(c, [line("a", "x"), line("b", "y")])
    job = wait(c, c.batches.create(model=FLASH, src=f.name).name)
    data = c.files.download(file=job.dest.file_name)
    c.models.generate_content(model=FLASH, contents="z")
    c.files.delete(name=f.name)
    s = emu.stats()
    assert s["files_uploaded"] == 1 and s["files_deleted"] == 1
    assert s["bytes_uploaded"] == f.size_bytes and s["bytes_downloaded"] == len(data)
    assert s["batches_created"] == 1 and s["batches_succeeded"] == 1
    assert s["generate_content_calls"] == 1 and s["lines_processed"] == 2 and s["images_generated"] == 3
    assert s["requests"]["POST /upload/{v}/files"] == 1 and s["requests"]["DELETE /{v}/files/{id}"] == 1


def test_emulator_start_stop_without_with(tmp_path):
    e = Emulator(EmulatorConfig(**BASE), data_dir=str(tmp_path / "d"))
    e.start()
    try:
        c = client(e)
        upload_lines(c, [line("a", "x")])
        assert any((tmp_path / "d" / "files").iterdir())
    finally:
        e.stop()
    assert (tmp_path / "d").exists()  # a given data_dir is kept


# --------------------------------------------------------------------------------------------------
# The `batcher emulator` command as a subprocess
# --------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_cli_subprocess():
    proc = subprocess.Popen(
        [sys.executable, "-m", "batcher.emulator", "--port", "0", "--api-key", "secret", "--pending-seconds", "0.05",
         "--running-seconds", "0.1", "--image-bytes", "2000", "--job-outcome", "SUCCEEDED", "--job-outcome",
         "SUCCEEDED", "--state-style", "JOB_STATE", "--line-error-rate", "0", "--safety-block-rate", "0",
         "--fail-rate", "0", "--drop-download-after-bytes", "100000000", "--drop-download-times", "0",
         "--config-json", '{"retry_delay": "9s"}'],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:")
        c = genai.Client(api_key="secret", http_options=types.HttpOptions(base_url=url, api_version="v1beta", timeout=30000))
        f = c.files.upload(file=io.BytesIO((line("a", "x", "16:9") + "\n").encode()), config={"mime_type": "jsonl"})
        job = wait(c, c.batches.create(model=FLASH, src=f.name).name)
        out = json.loads(c.files.download(file=job.dest.file_name))
        assert png_of(out["response"]).size == (1344, 768)
        bad = genai.Client(api_key="nope", http_options=types.HttpOptions(base_url=url, api_version="v1beta", timeout=30000))
        with pytest.raises(errors.ClientError) as ei:
            bad.batches.get(name=job.name)
        assert ei.value.code == 400
        with urllib.request.urlopen(url + "/_emulator/stats", timeout=10) as r:
            stats = json.loads(r.read())
        assert stats["batches_created"] == 1 and stats["files_uploaded"] == 1
        with urllib.request.urlopen(url + "/_emulator/config", timeout=10) as r:
            cfg = json.loads(r.read())
        assert cfg["state_style"] == "JOB_STATE" and cfg["job_outcomes"] == ["SUCCEEDED"]
        assert cfg["retry_delay"] == "9s" and cfg["api_key"] == "secret" and cfg["image_bytes"] == 2000
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert proc.returncode == 0


def test_cli_on_a_port_in_use_says_so_in_one_line():
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "batcher.emulator", "--port", str(port)], cwd=ROOT,
                              capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.splitlines() == [f"Error: cannot listen on 127.0.0.1:{port}: Address already in use "
                                        "(use another --port, or --port 0 for a free one)"]


@pytest.mark.slow
def test_fault_on_upload_chunk_is_retried_by_sdk(emu, c):
    # A failed chunk answer without X-Goog-Upload-Status makes the real SDK re-send the chunk (after 1 s).
    emu.configure(fail_nth={"POST /upload/{v}/files?upload_id": [1]})
    f = c.files.upload(file=io.BytesIO(b"x" * 1000), config={"mime_type": "text/plain"})
    assert f.size_bytes == 1000
    s = emu.stats()
    assert s["requests"]["POST /upload/{v}/files?upload_id"] == 2 and s["faults_injected"] == 1
    assert s["bytes_uploaded"] == 1000


@pytest.mark.slow
def test_reset_during_running_job_is_clean(emu, c):
    emu.configure(running_seconds=0.5)
    f = upload_lines(c, [line(f"k{i}", f"p{i}") for i in range(50)])
    c.batches.create(model=FLASH, src=f.name)
    time.sleep(0.3)
    emu.reset()
    time.sleep(0.3)
    s = emu.stats()
    assert s["batches"] == 0 and s.get("worker_errors", 0) == 0


def test_running_job_longer_than_48h_expires_without_output(emu, c):
    emu.configure(running_seconds=50 * 3600, time_scale=0.0)
    f = upload_lines(c, [line(f"k{i}", f"p{i}") for i in range(4)])
    job = c.batches.create(model=FLASH, src=f.name)
    emu.advance(24 * 3600)
    deadline = time.monotonic() + 5
    while json.loads(raw(emu, "GET", f"/v1beta/{job.name}")[2])["metadata"]["batchStats"].get(
            "successfulRequestCount") != "1":
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert c.batches.get(name=job.name).state == types.JobState.JOB_STATE_RUNNING
    emu.advance(25 * 3600)
    job = wait(c, job.name)
    assert job.state == types.JobState.JOB_STATE_EXPIRED and job.dest is None
    op = json.loads(raw(emu, "GET", f"/v1beta/{job.name}")[2])
    assert op["metadata"]["endTime"] and op["error"]["code"] == 4
    assert list(c.files.list()) == []  # no output file (and the input itself expired at 48 h)


def test_cancel_running_job_discards_partial_output(emu, c):
    emu.configure(running_seconds=100, time_scale=0.0)
    f = upload_lines(c, [line(f"k{i}", f"p{i}") for i in range(4)])
    job = c.batches.create(model=FLASH, src=f.name)
    emu.advance(60)
    time.sleep(0.2)
    c.batches.cancel(name=job.name)
    job = c.batches.get(name=job.name)
    assert job.state == types.JobState.JOB_STATE_CANCELLED and job.dest is None
    assert [x.name for x in c.files.list()] == [f.name]
