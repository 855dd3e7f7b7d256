"""Vertex AI batch prediction: the real google-genai SDK (vertexai=True) and google-cloud-storage against the
batcher emulator's batchPredictionJobs routes and an in-process gcp-storage-emulator."""

from __future__ import annotations

import hashlib
import io
import json
import re
import time
import urllib.error
import urllib.request

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image

import batcher.pipeline as pipeline
from tests import helpers
from batcher.cli import main
from tests.conftest import fast_retry
from tests.helpers import write_csv

PROJECT, LOCATION = "proj-1", "us-central1"
MODEL = "gemini-2.5-flash-image"
PROMPTS = [
    ["p1", "a red fox in snow", "", "1"],
    ["p2", "a blue vintage car", "16:9", "2"],
    ["p3", "a red fox in snow", "", "1"],  # same request as p1
    ["p4", "a bowl of ramen, studio light", "4:3", "1"],
    ["p5", "a mountain lake at dawn", "9:16", ""],
]
HEADER = ["id", "prompt", "aspect_ratio", "variants"]


@pytest.fixture(scope="session")
def gcs_server():
    from gcp_storage_emulator.server import create_server

    server = create_server("127.0.0.1", 0, in_memory=True)
    server.start()
    port = server._api._httpd.server_address[1]  # gcp-storage-emulator==2026.7.19 (pinned)
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def gcs(gcs_server, monkeypatch, tmp_path):
    """A storage client on the emulator and a fresh bucket for this test."""
    from google.cloud import storage

    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_server)
    client = storage.Client(project=PROJECT)
    bucket = client.create_bucket("b-" + hashlib.sha1(str(tmp_path).encode()).hexdigest()[:20])
    return client, bucket


@pytest.fixture
def vx(emulator, gcs, gcs_server):
    emulator.configure(gcs_endpoint=gcs_server)
    return emulator


def sdk(emu, token="fake"):
    from google import genai
    from google.genai import types
    from google.oauth2.credentials import Credentials

    return genai.Client(vertexai=True, project=PROJECT, location=LOCATION, credentials=Credentials(token=token),
                        http_options=types.HttpOptions(base_url=emu.url, api_version="v1"))


def factory(emu, bucket, **kw):
    from google.oauth2.credentials import Credentials

    from batcher.backends.vertex import VertexBackend, VertexConnection

    conn = VertexConnection(project=PROJECT, location=LOCATION, staging=f"gs://{bucket.name}/stage", base_url=emu.url,
                            timeout_s=30, credentials=Credentials(token="fake"))
    return lambda: VertexBackend(conn, retry=fast_retry(), **kw)


def put_input(bucket, name, prompts):
    lines = [{"request": {"contents": [{"role": "user", "parts": [{"text": p}]}],
                          "generationConfig": {"responseModalities": ["IMAGE"]}}} for p in prompts]
    bucket.blob(name).upload_from_string("".join(json.dumps(x) + "\n" for x in lines))
    return f"gs://{bucket.name}/{name}"


def wait(client, name, until=("JOB_STATE_SUCCEEDED", "JOB_STATE_PARTIALLY_SUCCEEDED", "JOB_STATE_FAILED",
                              "JOB_STATE_CANCELLED", "JOB_STATE_EXPIRED")):
    for _ in range(200):
        job = client.batches.get(name=name)
        if job.state.value in until:
            return job
        time.sleep(0.02)
    raise AssertionError(f"{name} stayed {job.state}")


def settings(tmp_path, **kw) -> pipeline.Settings:
    kw.setdefault("timeout", 30)
    return helpers.settings(tmp_path, **kw)


# ---- the emulator through the SDK -------------------------------------------------------------------

def test_sdk_create_get_list_cancel_delete(vx, gcs):
    from google.genai import errors

    _, bucket = gcs
    client = sdk(vx)
    src = put_input(bucket, "in/a.jsonl", ["a cat", "a dog"])
    vx.configure(job_outcomes=["SUCCEEDED", "STUCK"])
    done = client.batches.create(model=MODEL, src=src, config={"display_name": "job-a", "dest": f"gs://{bucket.name}/out/a"})
    stuck = client.batches.create(model=MODEL, src=src, config={"display_name": "job-b", "dest": f"gs://{bucket.name}/out/b"})
    for job in (done, stuck):
        assert re.fullmatch(rf"projects/{PROJECT}/locations/{LOCATION}/batchPredictionJobs/\d+", job.name)
        assert job.model == f"publishers/google/models/{MODEL}" and job.state.value == "JOB_STATE_PENDING"
    done = wait(client, done.name)
    assert done.state.value == "JOB_STATE_SUCCEEDED" and done.display_name == "job-a"
    assert (done.completion_stats.successful_count, done.completion_stats.failed_count) == (2, 0)
    assert re.fullmatch(rf"gs://{bucket.name}/out/a/prediction-model-[0-9T:.\-]+Z/", done.output_info.gcs_output_directory)
    assert done.create_time and done.start_time and done.end_time and done.update_time
    assert done.src.gcs_uri == [src] and done.dest.gcs_uri == f"gs://{bucket.name}/out/a"
    # list pages through pageSize=1; the filter picks by state
    assert {j.name for j in client.batches.list(config={"page_size": 1})} == {done.name, stuck.name}
    assert [j.name for j in client.batches.list(config={"filter": 'state="JOB_STATE_SUCCEEDED"'})] == [done.name]
    assert [j.name for j in client.batches.list(config={"filter": 'state="JOB_STATE_RUNNING"'})] == [stuck.name]
    # a bare numeric id works too; a running job cannot be deleted, it is cancelled first
    job_id = stuck.name.rsplit("/", 1)[1]
    assert client.batches.get(name=job_id).name == stuck.name
    with pytest.raises(errors.ClientError) as info:
        client.batches.delete(name=stuck.name)
    assert info.value.code == 400
    client.batches.cancel(name=stuck.name)
    assert client.batches.get(name=stuck.name).state.value in ("JOB_STATE_CANCELLING", "JOB_STATE_CANCELLED")
    assert wait(client, stuck.name).state.value == "JOB_STATE_CANCELLED"
    with pytest.raises(errors.ClientError) as info:
        client.batches.cancel(name=stuck.name)  # terminal
    assert info.value.code == 400
    op = client.batches.delete(name=done.name)
    assert op.done and "/operations/" in op.name
    with pytest.raises(errors.ClientError) as info:
        client.batches.get(name=done.name)
    assert info.value.code == 404
    assert vx.stats()["vertex_jobs_created"] == 2


def test_partially_succeeded_output_layout_and_key_echo(vx, gcs):
    client_gcs, bucket = gcs
    client = sdk(vx)
    vx.configure(vertex_echo_key=True)
    lines = [{"key": f"k{i}", "request": {"contents": [{"role": "user", "parts": [{"text": t}]}]}}
             for i, t in enumerate(["a cat", "a broken one [emulator:line_error]", "a dog"])]
    bucket.blob("in/k.jsonl").upload_from_string("".join(json.dumps(x) + "\n" for x in lines))
    job = client.batches.create(model=MODEL, src=f"gs://{bucket.name}/in/k.jsonl",
                                config={"display_name": "job-k", "dest": f"gs://{bucket.name}/out/k"})
    job = wait(client, job.name)
    assert job.state.value == "JOB_STATE_PARTIALLY_SUCCEEDED" and not job.done  # the SDK does not call it done
    cs = job.completion_stats
    assert (cs.successful_count, cs.failed_count, cs.incomplete_count) == (2, 1, 0)
    out_dir = job.output_info.gcs_output_directory
    blob = bucket.blob(out_dir.split(f"gs://{bucket.name}/", 1)[1] + "predictions.jsonl")
    recs = [json.loads(x) for x in blob.download_as_bytes().splitlines()]
    assert [r["key"] for r in recs] == ["k0", "k1", "k2"]
    assert all(r["request"] == x["request"] for r, x in zip(recs, lines))
    assert recs[0]["status"] == "" and recs[0]["response"]["candidates"]
    assert "response" not in recs[1] and "INTERNAL" in recs[1]["status"]
    assert vx.stats()["vertex_job_states"] == {"PARTIALLY_SUCCEEDED": 1}


def test_auth_is_a_bearer_token(vx, gcs):
    url = f"{vx.url}/v1beta1/projects/{PROJECT}/locations/{LOCATION}/batchPredictionJobs"
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(url)
    assert info.value.code == 401
    assert json.loads(info.value.read())["error"]["status"] == "UNAUTHENTICATED"
    ok = urllib.request.urlopen(urllib.request.Request(url, headers={"Authorization": "Bearer t"}))
    assert json.loads(ok.read()) == {"batchPredictionJobs": []}
    vx.configure(vertex_token="right")
    from google.genai import errors

    wrong, right = sdk(vx, token="wrong"), sdk(vx, token="right")
    with pytest.raises(errors.ClientError) as err:
        list(wrong.batches.list())
    assert err.value.code == 401
    assert list(right.batches.list()) == []


# ---- the pipeline on Vertex ---------------------------------------------------------------------------

@pytest.mark.slow
def test_a_vertex_run_completes_and_a_second_creates_no_job(tmp_path, vx, gcs):
    client_gcs, bucket = gcs
    vx.configure(vertex_shuffle_output=True, vertex_echo_key=False)  # correlation by the echoed request only
    m = write_csv(tmp_path / "m.csv", HEADER, PROMPTS)
    s = settings(tmp_path)
    result = pipeline.run(m, s, backend_factory=factory(vx, bucket))
    assert result.exit_code == 0, result.summary
    rows = pq.read_table(s.out / "metadata.parquet").to_pylist()
    assert [r["id"] for r in rows] == ["p1", "p2", "p2", "p3", "p4", "p5"]
    assert {r["status"] for r in rows} == {"ok"}
    ratio = {"p1": 1.0, "p2": 16 / 9, "p3": 1.0, "p4": 4 / 3, "p5": 9 / 16}
    for r in rows:
        with Image.open(s.out / r["file_name"]) as im:
            im.load()
            assert im.width / im.height == pytest.approx(ratio[r["id"]], rel=0.03)  # each key got its own image
    p2 = [r for r in rows if r["id"] == "p2"]
    assert (s.out / p2[0]["file_name"]).read_bytes() != (s.out / p2[1]["file_name"]).read_bytes()
    stats = vx.stats()
    assert stats["vertex_jobs_created"] == 1 and stats["lines_processed"] == 5
    # the job's staged files were deleted once collected
    assert [b.name for b in client_gcs.list_blobs(bucket.name, prefix="stage/")] == []
    s2 = pipeline.Settings(workdir=tmp_path / "work2", out=tmp_path / "out2", cache_dir=tmp_path / "cache",
                           poll_interval=0.05, timeout=30, quiet=True)
    assert pipeline.run(m, s2, backend_factory=factory(vx, bucket)).exit_code == 0
    assert vx.stats()["vertex_jobs_created"] == 1


@pytest.mark.slow
def test_failed_lines_of_a_partially_succeeded_job_are_retried(tmp_path, vx, gcs):
    _, bucket = gcs
    vx.configure(line_error_rate=0.5, seed=3, vertex_echo_key=True)
    m = write_csv(tmp_path / "m.csv", HEADER, PROMPTS)
    s = settings(tmp_path, max_attempts=8)
    result = pipeline.run(m, s, backend_factory=factory(vx, bucket))
    assert result.exit_code == 0, result.summary
    stats = vx.stats()
    assert stats["vertex_job_states"].get("PARTIALLY_SUCCEEDED", 0) >= 1
    assert stats["vertex_jobs_created"] >= 2 and stats["lines_failed"] >= 1
    rows = pq.read_table(s.out / "metadata.parquet").to_pylist()
    assert len(rows) == 6 and {r["status"] for r in rows} == {"ok"}


@pytest.mark.slow
def test_reference_images_go_to_gcs_as_gs_uris(tmp_path, vx, gcs):
    client_gcs, bucket = gcs
    ref = tmp_path / "ref.png"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(ref)
    rows = [["a", "this product on a beach", "", "", "ref.png"], ["b", "this product in a kitchen", "", "", "ref.png"]]
    m = write_csv(tmp_path / "refs.csv", HEADER + ["reference_images"], rows)
    s = settings(tmp_path)
    result = pipeline.run(m, s, backend_factory=factory(vx, bucket))
    assert result.exit_code == 0, result.summary
    staged = [b.name for b in client_gcs.list_blobs(bucket.name, prefix="stage/")]
    assert staged and all(n.startswith("stage/refs/") for n in staged)  # kept for reuse; job files deleted
    jsonl = next((s.workdir / "jobs").glob("*.jsonl")).read_text()
    assert f'"fileUri":"gs://{bucket.name}/stage/refs/' in jsonl


@pytest.mark.slow
def test_cli_backend_vertex_and_job_spec(tmp_path, vx, gcs, monkeypatch):
    _, bucket = gcs
    monkeypatch.setenv("GOOGLE_VERTEX_BASE_URL", vx.url)
    monkeypatch.setenv("BATCHER_VERTEX_ACCESS_TOKEN", "fake")
    m = write_csv(tmp_path / "m.csv", HEADER, PROMPTS[:2])
    common = ["--workdir", str(tmp_path / "w"), "--cache-dir", str(tmp_path / "c"), "--out", str(tmp_path / "o"), "-q"]
    r = CliRunner().invoke(main, ["run", str(m), "--backend", "vertex", "--project", PROJECT, "--location", LOCATION,
                                  "--staging", f"gs://{bucket.name}/cli", "--poll-interval", "0.05"] + common)
    assert r.exit_code == 0, r.output
    assert len(pq.read_table(tmp_path / "o" / "metadata.parquet")) == 3
    # status needs no staging area (it reads jobs, stages no files); its --help does not offer one
    status_options = ["--workdir", str(tmp_path / "w"), "--backend", "vertex", "--project", PROJECT]
    r = CliRunner().invoke(main, ["status", "--json"] + status_options, env={"BATCHER_VERTEX_STAGING": ""})
    doc = json.loads(r.output)
    assert re.fullmatch(r"projects/.+/batchPredictionJobs/\d+", doc["jobs"][0]["name"])
    # The same through a job spec's [vertex] table
    spec = tmp_path / "job.toml"
    spec.write_text(f'manifest = "m.csv"\nworkdir = "w2"\nout = "o2"\ncache_dir = "c2"\nbackend = "vertex"\n'
                    f'[poll]\ninterval_seconds = 0.05\n'
                    f'[vertex]\nproject = "{PROJECT}"\nlocation = "{LOCATION}"\nstaging = "gs://{bucket.name}/spec"\n')
    r = CliRunner().invoke(main, ["run", str(spec), "-q"])
    assert r.exit_code == 0, r.output
    assert vx.stats()["vertex_jobs_created"] == 2
    # no project: a usage error naming the option
    monkeypatch.delenv("GOOGLE_CLOUD_PROJECT", raising=False)
    r = CliRunner().invoke(main, ["run", str(m), "--backend", "vertex", "--staging", f"gs://{bucket.name}/x"] + common)
    assert r.exit_code == 2 and "--project" in r.output
    # no staging area: run (which stages job files) says so before anything is planned
    r = CliRunner().invoke(main, ["run", str(m), "--backend", "vertex", "--project", PROJECT] + common,
                           env={"BATCHER_VERTEX_STAGING": ""})
    assert r.exit_code == 2 and "needs a staging area" in r.output and "--staging" in r.output


def test_download_normalises_lines_without_keys_in_any_order(tmp_path, vx, gcs):
    """Unit-level: the output layout variants download() accepts (status string, status object, key echo)."""
    from batcher.backends.vertex import line_error, request_fingerprint

    _, bucket = gcs
    backend = factory(vx, bucket)()
    req = [{"contents": [{"parts": [{"text": f"t{i}"}]}]} for i in range(3)]
    inp = tmp_path / "batcher-x-job1.jsonl"
    inp.write_text("".join(json.dumps({"key": f"h{i}", "request": r}) + "\n" for i, r in enumerate(req)))
    backend.upload_jsonl(inp, "batcher-x-job1")
    out = [{"request": {"contents": [{"parts": [{"text": "t2"}]}]}, "status": {"code": 8, "message": "quota"}},
           {"status": 'Bad Request: {"error": {"code": 400, "message": "bad", "status": "INVALID_ARGUMENT"}}',
            "request": req[1]},
           {"status": "", "request": json.loads(json.dumps(req[0], sort_keys=True)), "response": {"candidates": []}}]
    d = "stage/outputs/batcher-x-job1/prediction-model-2026-01-01T00:00:00.000000Z/"
    bucket.blob(d + "predictions.jsonl").upload_from_string("".join(json.dumps(x) + "\n" for x in out))
    backend._local_inputs.clear()  # as after a restart: the key map comes from the staged input
    dest = tmp_path / "res.jsonl"
    backend.download(f"gs://{bucket.name}/{d}", dest)
    got = {x["key"]: x for x in map(json.loads, dest.read_text().splitlines())}
    assert got["h0"] == {"key": "h0", "response": {"candidates": []}}
    assert got["h1"]["error"] == {"code": 400, "message": "bad", "status": "INVALID_ARGUMENT"}
    assert got["h2"]["error"]["message"] == "quota"
    assert line_error({"response": {}}) is None and request_fingerprint({"a_b": 1}) == request_fingerprint({"aB": 1})


def test_an_output_line_as_googles_own_sample_writes_it_is_read(tmp_path, vx, gcs):
    """The layout of Google's sample (generative-ai, gemini/batch-prediction/intro_batch_prediction.ipynb): `status`
    "", `processed_time`, the request echoed with snake_case keys and null fields, the response; no key."""
    _, bucket = gcs
    backend = factory(vx, bucket)()
    sent = {"contents": [{"role": "user", "parts": [{"fileData": {"fileUri": "gs://b/ref.jpeg", "mimeType": "image/jpeg"}},
                                                    {"text": "List objects in this image."}]}],
            "generationConfig": {"temperature": 0.4}}
    inp = tmp_path / "batcher-x-job2.jsonl"
    inp.write_text(json.dumps({"key": "k0", "request": sent}) + "\n")
    backend.upload_jsonl(inp, "batcher-x-job2")
    echoed = {"contents": [{"parts": [{"file_data": {"file_uri": "gs://b/ref.jpeg", "mime_type": "image/jpeg"}, "text": None},
                                      {"file_data": None, "text": "List objects in this image."}], "role": "user"}],
              "generationConfig": {"temperature": 0.4}}
    sample = {"status": "", "processed_time": "2024-11-13T14:04:28.376+00:00", "request": echoed,
              "response": {"candidates": [{"avgLogprobs": -0.1, "content": {"parts": [{"text": "a rake"}], "role": "model"},
                                           "finishReason": "STOP"}], "modelVersion": "gemini-3-flash-preview@default",
                           "usageMetadata": {"candidatesTokenCount": 110, "promptTokenCount": 264, "totalTokenCount": 374}}}
    d = "stage/outputs/batcher-x-job2/prediction-model-2024-11-13T14:04:28.376Z/"
    bucket.blob(d + "predictions.jsonl").upload_from_string(json.dumps(sample) + "\n")
    backend._local_inputs.clear()
    dest = tmp_path / "res.jsonl"
    backend.download(f"gs://{bucket.name}/{d}", dest)
    (got,) = map(json.loads, dest.read_text().splitlines())
    assert got == {"key": "k0", "response": sample["response"]}


def test_interactive_generate_content_on_vertex(vx, gcs):
    _, bucket = gcs
    backend = factory(vx, bucket)()
    out = backend.generate_content(MODEL, {"contents": [{"role": "user", "parts": [{"text": "a lighthouse"}]}],
                                           "generationConfig": {"responseModalities": ["IMAGE"]}})
    data = out["candidates"][0]["content"]["parts"][-1]["inlineData"]["data"]
    with Image.open(io.BytesIO(data)) as im:
        im.load()
    assert vx.stats()["generate_content_calls"] == 1


@pytest.mark.slow
def test_a_vertex_run_with_manifest_cache_and_dataset_on_gcs(tmp_path, vx, gcs):
    """Issue 7's done-when on the Vertex backend: everything on gs://, same cache guarantee as Gemini."""
    from batcher.storage import gcs as gcs_mod

    gcs_mod.client.cache_clear()  # STORAGE_EMULATOR_HOST was just set for this test
    _, bucket = gcs
    root = f"gs://{bucket.name}"
    local = write_csv(tmp_path / "m.csv", HEADER, PROMPTS)
    gcs_mod.upload_file(f"{root}/manifests/m.csv", str(local))
    s = pipeline.Settings(workdir=tmp_path / "w", out=f"{root}/datasets/d", cache_dir=f"{root}/cache",
                          poll_interval=0.05, timeout=30, quiet=True)
    result = pipeline.run(f"{root}/manifests/m.csv", s, backend_factory=factory(vx, bucket))
    assert result.exit_code == 0, result.summary
    with gcs_mod.open_read(f"{root}/datasets/d/metadata.parquet") as f:
        rows = pq.read_table(f).to_pylist()
    assert len(rows) == 6 and {r["status"] for r in rows} == {"ok"}
    assert all(gcs_mod.exists(f"{root}/datasets/d/{r['file_name']}") for r in rows)
    s2 = pipeline.Settings(workdir=tmp_path / "w2", out=f"{root}/datasets/d2", cache_dir=f"{root}/cache",
                           poll_interval=0.05, timeout=30, quiet=True)
    assert pipeline.run(f"{root}/manifests/m.csv", s2, backend_factory=factory(vx, bucket)).exit_code == 0
    assert vx.stats()["vertex_jobs_created"] == 1  # the second run was served by the gs:// cache
    gcs_mod.client.cache_clear()


def test_a_partial_download_resumes_where_it_stopped(tmp_path, vx, gcs):
    """A predictions file copied half-way (a killed collect, a dropped read) is continued with a ranged read,
    not fetched again; the lines that come out are whole and the local copies are removed."""
    _, bucket = gcs
    backend = factory(vx, bucket)()
    lines = [json.dumps({"key": f"k{i}", "request": {"contents": []}, "status": "",
                         "response": {"candidates": [{"content": {"parts": [{"text": "x" * 3000}]}}]}}) + "\n"
             for i in range(1000)]
    data = "".join(lines).encode()
    d = "stage/outputs/batcher-x-job9/prediction-model-2026-01-01T00:00:00.000000Z/"
    bucket.blob(d + "predictions.jsonl").upload_from_string(data)
    dest = tmp_path / "res.jsonl.part"
    raw = dest.with_name(dest.name + ".raw")
    raw.mkdir()
    cut = 1_234_567  # mid-line, as a kill leaves it
    (raw / "00000-predictions.jsonl").write_bytes(data[:cut])
    fetched = []
    size = backend.download(f"gs://{bucket.name}/{d}", dest, on_bytes=fetched.append)
    assert sum(fetched) == len(data) - cut  # only the rest came over the wire
    got = [json.loads(x) for x in dest.read_text().splitlines()]
    assert [g["key"] for g in got] == [f"k{i}" for i in range(1000)] and size == dest.stat().st_size
    assert got[500]["response"]["candidates"][0]["content"]["parts"][0]["text"] == "x" * 3000
    assert not raw.exists()


def test_webhooks_are_refused_on_vertex_before_anything_is_uploaded(tmp_path, vx, gcs):
    import batcher.pipeline as pipeline
    from batcher.errors import UsageError

    _, bucket = gcs
    m = tmp_path / "m.csv"
    m.write_text("id,prompt\na,a vertex webhook\n", encoding="utf-8")
    s = settings(tmp_path, webhook_uris=("https://hooks.example.com/x",))
    with pytest.raises(UsageError, match="Vertex AI batch jobs don't take them"):
        pipeline.submit(m, s, backend_factory=factory(vx, bucket))
    assert not [b.name for b in bucket.list_blobs()]  # nothing staged
