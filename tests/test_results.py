"""Collect's parsing paths: decoder processes (the default on a local cache) and the in-process one (a gs://
cache, or BATCHER_COLLECT_PROCESSES=0) give the same outcomes, line for line, for good and hostile lines."""

from __future__ import annotations

import base64
import io
import json
import time

import pytest
from PIL import Image

import batcher.pipeline as pipeline
from batcher.results.collect import _spans
from batcher.results.decoder import DecoderPool, default_processes
from batcher.errors import CollectError
from batcher.ledger import Ledger
from batcher.planning.packing import ShardLimits
from batcher.storage.store import ImageStore
from tests.helpers import write_csv


def png(color=(10, 200, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format="PNG")
    return buf.getvalue()


def image_line(key: str, data: bytes | str, mime="image/png") -> bytes:
    b64 = data if isinstance(data, str) else base64.b64encode(data).decode()
    resp = {"candidates": [{"content": {"parts": [{"inlineData": {"mimeType": mime, "data": b64}}]}, "finishReason": "STOP"}],
            "usageMetadata": {"promptTokenCount": 7, "candidatesTokenCount": 1290}}
    return json.dumps({"key": key, "response": resp}).encode() + b"\n"


def test_spans_cover_every_line_across_block_boundaries():
    data = b'{"a":1}\n\n{"b":22}\n{"c":333}'
    for size in (1, 2, 3, 5, 8, 100):
        blocks = [data[i:i + size] for i in range(0, len(data), size)]
        assert [data[s:e] for s, e in _spans(blocks)] == data.splitlines(keepends=True)
    assert list(_spans([])) == [] and list(_spans([b"x\n"])) == [(0, 2)]


def test_decoder_processes_report_every_kind_of_line(tmp_path):
    good, other = png(), png((1, 2, 3))
    big = png((200, 0, 0)) + b"\0" * 3000  # trailing bytes after IEND: still a PNG
    keys = [f"{i:064x}" for i in range(8)]
    lines = [
        image_line(keys[0], good),
        b"\n",
        b"not json at all\n",
        json.dumps({"key": keys[1], "error": {"code": 500, "status": "INTERNAL", "message": "boom"}}).encode() + b"\n",
        image_line(keys[2], base64.b64encode(other).decode()[:-3] + "*=="),  # corrupt base64
        image_line(keys[3], b"this is not an image, it is text" * 100),  # decodes, but not an image
        json.dumps({"key": keys[4], "response": {"candidates": [{"content": {"parts": [{"text": "no"}]},
                                                                "finishReason": "IMAGE_SAFETY"}]}}).encode() + b"\n",
        image_line("f" * 64, good),  # a key this job does not wait for: not decoded, not cached
        image_line(keys[5], big),
    ]
    path = tmp_path / "results.jsonl"
    path.write_bytes(b"".join(lines))
    spans, pos = [], 0
    for line in lines:
        spans.append((pos, pos + len(line)))
        pos += len(line)
    store = ImageStore(tmp_path / "cache")
    pool = DecoderPool(2)
    try:
        pool.start_job(str(path), str(store.root), "m", keys[:6])
        replies = {msg[0]: msg for msg in pool.run(iter(spans))}
    finally:
        pool.close()
    assert sorted(replies) == list(range(1, len(lines) + 1))
    assert replies[1][1:4] == ["outcome", keys[0], "image"] and replies[1][-1] is True
    assert replies[2][1] == "blank" and replies[3][1] == "bad-json"
    assert replies[4][1:4] == ["outcome", keys[1], "error"] and "500 INTERNAL: boom" in replies[4][4]
    assert replies[5][3] == "error" and "corrupt base64" in replies[5][4]
    assert replies[6][3] == "error" and replies[6][4].startswith("returned image is invalid") and replies[6][-1] is True
    assert replies[7][3] == "blocked" and replies[7][5] == "IMAGE_SAFETY"
    assert replies[8][1:] == ["unwanted", "f" * 64]
    assert replies[9][3] == "image"
    assert store.find(keys[0]).read_bytes() == good and store.meta(keys[0])["output_tokens"] == 1290
    assert store.find(keys[5]).read_bytes() == big
    assert not store.has("f" * 64) and not store.has(keys[3]) and not store.has(keys[2])
    assert not list((tmp_path / "cache").rglob(".tmp-*"))


@pytest.mark.parametrize("corrupt", [
    lambda b64: b64[:-3] + "*==",  # a character outside the alphabet
    lambda b64: b64[:100] + "\\n" + b64[100:],  # a line break (an escaped one, as JSON carries it)
    lambda b64: b64[:100] + " " + b64[100:],  # whitespace
    lambda b64: b64[:-1],  # a length not a multiple of 4
    lambda b64: b64[:1000] + "==" + b64[1002:],  # padding inside the data
    lambda b64: b64 + "====",  # padding past a full group (binascii's strict mode let this one through)
    lambda b64: b64.replace("+", "-").replace("/", "_") if "+" in b64 or "/" in b64 else b64[:-1] + "-",  # urlsafe
])
def test_corrupt_base64_is_an_error_on_both_paths(corrupt):
    from batcher.results.lines import read_line

    for data in (png(), png() + bytes(range(256)) * 20):  # left to json.loads; cut out of the line (lines._BLOB_MIN)
        data += b"\0" * (-len(data) % 3)  # base64 without padding of its own
        b64 = corrupt(base64.b64encode(data).decode())
        for line in (image_line("k" * 64, b64), image_line("k" * 64, b64).replace(b'"data"', b'"data" ')):
            status, key, o = read_line(line, lambda k: True)
            assert (status, key, o.kind) == ("outcome", "k" * 64, "error") and "corrupt base64" in o.reason
        assert read_line(image_line("k" * 64, data), lambda k: True)[2].data == data


def test_a_cache_that_cannot_be_written_is_an_os_error_naming_it(tmp_path):
    (tmp_path / "cache").write_text("a file where the cache should be")
    path = tmp_path / "results.jsonl"
    path.write_bytes(image_line("a" * 64, png()))
    pool = DecoderPool(1)
    try:
        pool.start_job(str(path), str(tmp_path / "cache"), "m", ["a" * 64])
        (msg,) = list(pool.run(iter([(0, path.stat().st_size)])))
    finally:
        pool.close()
    assert msg[1] == "fatal" and msg[2] is not None and str(tmp_path / "cache") in msg[4]


def test_a_decoder_that_dies_is_a_collect_error(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_bytes(image_line("a" * 64, png()))
    pool = DecoderPool(1)
    try:
        pool.procs[0].kill()
        pool.procs[0].wait()
        with pytest.raises(CollectError, match="exited unexpectedly"):
            pool.start_job(str(path), str(tmp_path / "cache"), "m", ["a" * 64])
            list(pool.run(iter([(0, path.stat().st_size)])))
    finally:
        pool.close()


def test_processes_setting(monkeypatch):
    monkeypatch.setenv("BATCHER_COLLECT_PROCESSES", "0")
    assert default_processes() == 0
    monkeypatch.setenv("BATCHER_COLLECT_PROCESSES", "3")
    assert default_processes() == 3
    monkeypatch.delenv("BATCHER_COLLECT_PROCESSES")
    assert 1 <= default_processes() <= 8
    monkeypatch.setenv("BATCHER_COLLECT_PROCESSES", "many")
    with pytest.raises(ValueError, match="BATCHER_COLLECT_PROCESSES"):
        default_processes()


@pytest.mark.slow
@pytest.mark.parametrize("processes", ["0", "2"])
def test_both_paths_end_with_the_same_outcomes(tmp_path, emulator, backend_factory, monkeypatch, processes):
    """Corrupt and non-image payloads, blocked and erroring lines: requeued or final with the same reasons."""
    monkeypatch.setenv("BATCHER_COLLECT_PROCESSES", processes)
    emulator.configure(corrupt_base64_rate=0.25, not_image_rate=0.25, line_error_rate=0.2, seed=3)
    rows = [[f"r{i}", f"collect paths prompt {i}"] for i in range(12)] + [["b", "blocked [emulator:image_safety]"]]
    s = pipeline.Settings(workdir=tmp_path / "w", out=tmp_path / "o", cache_dir=tmp_path / "c", poll_interval=0.05,
                          timeout=60, quiet=True, max_attempts=10)
    result = pipeline.run(write_csv(tmp_path / "m.csv", ["id", "prompt"], rows), s, backend_factory=backend_factory)
    assert result.exit_code == 3, result.summary
    with pipeline.open_workspace(s, backend_factory) as ws:
        states = dict(ws.ledger.conn.execute("SELECT state, COUNT(*) FROM requests GROUP BY state").fetchall())
        errors = [e for (e,) in ws.ledger.conn.execute("SELECT error FROM requests WHERE error IS NOT NULL")]
    assert states == {"succeeded": 12, "blocked": 1}
    assert any("finish reason IMAGE_SAFETY" in e for e in errors)
    stats = emulator.stats()["faults"]
    assert stats.get("corrupt_base64", 0) + stats.get("not_image", 0) >= 1
    for p in (tmp_path / "c").rglob("*.png"):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_collect_never_imports_the_sdk_and_deletes_the_jobs_files(tmp_path, emulator, backend_factory):
    """The SDK costs a collect ~0.5 s and ~60 MB of its peak RSS: collect gets the job, downloads its results and
    deletes its files over plain HTTP. A file already gone is no error."""
    import os
    import subprocess
    import sys
    import time

    rows = [[f"r{i}", f"collect without the SDK {i}"] for i in range(3)]
    s = pipeline.Settings(workdir=tmp_path / "w", out=tmp_path / "o", cache_dir=tmp_path / "c", quiet=True)
    assert pipeline.submit(write_csv(tmp_path / "m.csv", ["id", "prompt"], rows), s, backend_factory=backend_factory).exit_code == 4
    time.sleep(0.5)  # the emulator's job runs for 0.15 s
    code = ("import sys\nfrom batcher.cli import main\ntry:\n    main(sys.argv[1:], prog_name='batcher')\n"
            "except SystemExit as exc:\n    print('sdk imported:', 'google.genai' in sys.modules)\n    raise\n")
    env = {**os.environ, "GEMINI_API_KEY": "test-key", "GOOGLE_GEMINI_BASE_URL": emulator.url, "GOOGLE_API_KEY": ""}
    p = subprocess.run([sys.executable, "-c", code, "collect", "--workdir", str(s.workdir), "--cache-dir", str(s.cache_dir),
                        "--out", str(s.out)], env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "sdk imported: False" in p.stdout
    assert emulator.stats()["files_deleted"] == 2  # the job's input and results files
    assert len(list((tmp_path / "c").rglob("*.png"))) == 3
    assert list(backend_factory().list_files()) == []
    backend_factory().delete_file("files/gone-already")  # 404: the goal is reached


def test_one_set_of_decoder_processes_collects_every_job(tmp_path, emulator, backend_factory, monkeypatch):
    """Starting decoders costs ~0.1 s: a collect of many small jobs starts them once, not once per job."""
    import batcher.results.collect as collect_mod

    monkeypatch.setenv("BATCHER_COLLECT_PROCESSES", "2")
    pools = []

    class CountedPool(DecoderPool):
        def __init__(self, processes):
            pools.append(self)
            super().__init__(processes)

    monkeypatch.setattr(collect_mod, "DecoderPool", CountedPool)
    rows = [[f"r{i}", f"many jobs prompt {i}"] for i in range(6)]
    s = pipeline.Settings(workdir=tmp_path / "w", out=tmp_path / "o", cache_dir=tmp_path / "c", poll_interval=0.05,
                          timeout=60, quiet=True, limits=ShardLimits(max_requests=2))
    m = write_csv(tmp_path / "m.csv", ["id", "prompt"], rows)
    assert pipeline.submit(m, s, backend_factory=backend_factory).exit_code == 4
    assert emulator.stats()["batches_created"] == 3
    ledger = Ledger(s.workdir)
    names = [j["batch_name"] for j in ledger.jobs()]
    ledger.close()
    backend, deadline = backend_factory(), time.monotonic() + 30
    while time.monotonic() < deadline:  # every job ended at the API, so one collect finds all three
        if all(backend.get_batch(name).state == "SUCCEEDED" for name in names):
            break
        time.sleep(0.05)
    result = pipeline.collect(s, backend_factory=backend_factory)  # one command
    assert result.exit_code == 0, result.summary
    assert len(list((tmp_path / "c").rglob("*.png"))) == 6
    assert len(pools) == 1 and all(p.poll() is not None for p in pools[0].procs)  # closed at the end
