"""Webhooks (webhook_config): the real SDK passes our listeners at create; the emulator POSTs each job's end."""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.server
import json
import sqlite3
import threading
import time

import pytest
from click.testing import CliRunner

from batcher.cli import main
from batcher.emulator import EmulatorConfig
from tests.helpers import write_csv


class Listener:
    """A local webhook listener: records every POST; answers `statuses` in turn, then 204."""

    def __init__(self, statuses=()):
        self.received: list[tuple[dict, bytes]] = []
        self.statuses = list(statuses)
        listener = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                listener.received.append(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(listener.statuses.pop(0) if listener.statuses else 204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}"

    def wait_for(self, n: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.received) < n and time.monotonic() < deadline:
            time.sleep(0.02)

    def close(self):
        self.server.shutdown()


@pytest.fixture
def listener():
    lst = Listener()
    yield lst
    lst.close()


def signature_ok(headers: dict, body: bytes) -> bool:
    key = base64.b64decode(EmulatorConfig().webhook_secret.removeprefix("whsec_"))
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
    expected = "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    return expected in headers["webhook-signature"].split()


@pytest.mark.slow
def test_each_job_tells_the_listener_it_ended_and_the_token_stays_secret(tmp_path, emulator, monkeypatch, listener):
    token = "canary-HOOK-51d2e8"
    monkeypatch.setenv("GEMINI_API_KEY", "k")
    monkeypatch.setenv("GOOGLE_GEMINI_BASE_URL", emulator.url)
    m = write_csv(tmp_path / "m.csv", ["id", "prompt"], [[f"w{i}", f"webhook prompt {i}"] for i in range(5)])
    r = CliRunner().invoke(main, ["run", str(m), "--workdir", str(tmp_path / "w"), "--out", str(tmp_path / "o"),
                                  "--cache-dir", str(tmp_path / "c"), "-vv", "--poll-interval", "0.05",
                                  "--max-requests-per-job", "2", "--webhook-uri", f"{listener.url}/hooks/batch?token={token}"])
    assert r.exit_code == 0, r.output
    listener.wait_for(3)
    con = sqlite3.connect(tmp_path / "w" / "ledger.sqlite")
    jobs = {name: ledger_id for name, ledger_id in con.execute("SELECT display_name, batch_name FROM jobs")}
    ledger_id = con.execute("SELECT value FROM meta WHERE key='ledger_id'").fetchone()[0]
    con.close()
    assert len(jobs) == 3 and len(listener.received) == 3
    told = {}
    for headers, body in listener.received:
        assert signature_ok(headers, body)
        event = json.loads(body)
        assert event["type"] == "batch.succeeded"
        assert event["data"]["user_metadata"]["batcher_ledger"] == ledger_id
        told[event["data"]["user_metadata"]["batcher_job"]] = event["data"]["name"]
    assert told == jobs  # every job, once, named as batcher knows it
    assert token not in r.output
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert token.encode() not in path.read_bytes(), path


@pytest.mark.slow
def test_a_listener_that_fails_gets_the_event_again(tmp_path, emulator, backend_factory):
    import batcher.pipeline as pipeline

    flaky = Listener(statuses=[500, 503])
    try:
        m = write_csv(tmp_path / "m.csv", ["id", "prompt"], [["a", "retry my webhook"]])
        s = pipeline.Settings(workdir=tmp_path / "w", out=tmp_path / "o", cache_dir=tmp_path / "c", poll_interval=0.05,
                              timeout=60, quiet=True, webhook_uris=(f"{flaky.url}/hook",))
        assert pipeline.run(m, s, backend_factory=backend_factory).exit_code == 0
        flaky.wait_for(3)
        assert len(flaky.received) == 3
        assert len({h["webhook-id"] for h, _ in flaky.received}) == 1  # the same message, delivered again
        deadline = time.monotonic() + 10  # the emulator logs a delivery once the listener's answer is back
        while len(emulator.stats()["webhook_deliveries"]) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        attempts = [d["status"] for d in emulator.stats()["webhook_deliveries"]]
        assert attempts == [500, 503, 204]
    finally:
        flaky.close()


@pytest.mark.parametrize("args, message", [
    (["--webhook-uri", "ftp://example.com/x?token=zzz-secret"], "webhook URI 'ftp://example.com/…' is not an http(s) URL"),
    (["--webhook-uri", "not a url"], "is not an http(s) URL"),
    (["--webhook-uri", "https://hooks.example.com/x", "--backend", "vertex", "--project", "p", "--staging", "gs://b/s"],
     "Vertex AI batch jobs don't take them"),
])
def test_bad_webhook_options_are_refused_before_anything_is_sent(tmp_path, emulator, monkeypatch, args, message):
    monkeypatch.setenv("GEMINI_API_KEY", "k")
    monkeypatch.setenv("GOOGLE_GEMINI_BASE_URL", emulator.url)
    m = write_csv(tmp_path / "m.csv", ["id", "prompt"], [["a", "x"]])
    r = CliRunner().invoke(main, ["submit", str(m), "--workdir", str(tmp_path / "w"), *args])
    assert r.exit_code == 2, r.output
    assert message in r.output and "zzz-secret" not in r.output
    assert emulator.stats()["requests"] == {}


def test_webhook_uris_in_a_job_spec_must_be_strings(tmp_path):
    from batcher.errors import UsageError
    from batcher.settings import load_spec

    p = tmp_path / "job.toml"
    p.write_text('manifest = "m.csv"\n[notify]\nwebhook_uris = ["https://hooks.example.com/a", 3]\n')
    with pytest.raises(UsageError, match="'notify.webhook_uris' must be a list of URL strings"):
        load_spec(p)
    p.write_text('manifest = "m.csv"\n[notify]\nwebhook_uris = ["https://hooks.example.com/a"]\n')
    assert load_spec(p).get("notify.webhook_uris") == ["https://hooks.example.com/a"]
