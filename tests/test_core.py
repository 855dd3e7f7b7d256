"""Identities and state: golden request hashes, the ledger's migrations and transitions, the cache store."""

from __future__ import annotations

import io
import sqlite3

import pytest
from PIL import Image

from batcher.errors import LedgerError
from batcher.ledger import MIGRATIONS, Ledger, connect, migrate, schema_version
from batcher.requests import ImageRequest, ReferenceImage, request_body, request_hash, resolve_references
from batcher.store import ImageStore, InvalidImage

# Pinned: these values must never change without bumping HASH_SCHEMA_VERSION (every cache would go cold).
GOLDEN = [
    (ImageRequest(model="gemini-2.5-flash-image", prompt="a red fox in snow"),
     "507174e1630029e0279a0b37e8c015d613bfa5385457fc6168ccca9af697f99c"),
    (ImageRequest(model="gemini-3-pro-image-preview", prompt="a red fox in snow", variant=2, aspect_ratio="16:9",
                  image_size="2K", temperature=0.7, seed=42, system_instruction="photoreal",
                  references=(ReferenceImage("ab" * 32, "image/png", "/x.png"),)),
     "49502281de2688075c294ea7d55a40f3608b498ee5b2901c8c86c5a8e69d528f"),
]


@pytest.mark.parametrize("req, expected", GOLDEN)
def test_golden_request_hashes(req, expected):
    assert request_hash(req) == expected


def test_hash_depends_on_everything_that_determines_the_output():
    base = ImageRequest(model="gemini-2.5-flash-image", prompt="p")
    variants = [
        ImageRequest(model="gemini-3-pro-image-preview", prompt="p"),
        ImageRequest(model="gemini-2.5-flash-image", prompt="p "),
        ImageRequest(model="gemini-2.5-flash-image", prompt="p", variant=1),
        ImageRequest(model="gemini-2.5-flash-image", prompt="p", aspect_ratio="1:1"),
        ImageRequest(model="gemini-2.5-flash-image", prompt="p", seed=1),
        ImageRequest(model="gemini-2.5-flash-image", prompt="p", temperature=1.0),
        ImageRequest(model="gemini-2.5-flash-image", prompt="p", system_instruction="s"),
        ImageRequest(model="gemini-2.5-flash-image", prompt="p", references=(ReferenceImage("0" * 64, "image/png", "/a"),)),
    ]
    hashes = {request_hash(v) for v in variants} | {request_hash(base)}
    assert len(hashes) == len(variants) + 1
    # ...but not on where a reference image lives: the same bytes elsewhere are the same request.
    a = ImageRequest(model="m", prompt="p", references=(ReferenceImage("0" * 64, "image/png", "/a.png"),))
    b = ImageRequest(model="m", prompt="p", references=(ReferenceImage("0" * 64, "image/png", "/b/c.png"),))
    assert request_hash(a) == request_hash(b)
    assert request_hash(ImageRequest(model="models/m", prompt="p")) == request_hash(ImageRequest(model="m", prompt="p"))


def test_request_body_is_an_image_generate_content_request():
    body = request_body(ImageRequest(model="m", prompt="a cat", aspect_ratio="3:2", image_size="2K", seed=5,
                                     system_instruction="studio", references=(ReferenceImage("f" * 64, "image/jpeg", "/r.jpg"),)))
    assert body["generationConfig"] == {"responseModalities": ["IMAGE"], "imageConfig": {"aspectRatio": "3:2", "imageSize": "2K"}, "seed": 5}
    assert body["systemInstruction"] == {"parts": [{"text": "studio"}]}
    resolved = resolve_references(body, {"f" * 64: "https://x/v1beta/files/abc"})
    assert resolved["contents"][0]["parts"][0] == {"fileData": {"fileUri": "https://x/v1beta/files/abc", "mimeType": "image/jpeg"}}
    with pytest.raises(KeyError):
        resolve_references(body, {})


def test_blank_ledger_gets_every_migration(tmp_path):
    ledger = Ledger(tmp_path)
    assert schema_version(ledger.conn) == len(MIGRATIONS)
    tables = {r[0] for r in ledger.conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"runs", "rows", "requests", "jobs", "job_requests", "uploads", "reference_files", "meta"} <= tables
    assert ledger.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert ledger.integrity_ok()
    ledger_id = ledger.ledger_id
    ledger.close()
    assert Ledger(tmp_path).ledger_id == ledger_id  # stable: display names depend on it


def test_a_newer_ledger_is_refused(tmp_path):
    conn = connect(tmp_path / "ledger.sqlite")
    migrate(conn)
    conn.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    with pytest.raises(LedgerError, match="upgrade batcher"):
        migrate(conn)


def test_impossible_transitions_are_refused(tmp_path):
    ledger = Ledger(tmp_path)
    with ledger.transaction() as c:
        c.execute("INSERT INTO jobs(display_name, model, state, request_count, created_at, updated_at) VALUES ('j','m','planned',1,0,0)")
    with pytest.raises(LedgerError, match="cannot go from planned to submitted"):
        with ledger.transaction() as c:
            ledger.job_transition(c, 1, ("creating",), "submitted")
    with ledger.transaction() as c:
        ledger.job_transition(c, 1, ("planned",), "uploading")
    assert ledger.job(1)["state"] == "uploading"


def png_bytes(color=(10, 20, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, "PNG")
    return buf.getvalue()


def test_store_verifies_and_writes_atomically(tmp_path):
    store = ImageStore(tmp_path)
    h = "a" * 64
    assert not store.has(h)
    path = store.put(h, png_bytes(), {"model": "m"})
    assert store.find(h) == path and path.suffix == ".png" and store.meta(h) == {"model": "m"}
    with pytest.raises(InvalidImage):
        store.put("b" * 64, b"not an image at all")
    with pytest.raises(InvalidImage):
        store.put("c" * 64, png_bytes()[:40])  # truncated
    assert not store.has("b" * 64) and not store.has("c" * 64)
    assert not list(tmp_path.rglob(".tmp-*"))
    with pytest.raises(ValueError):
        store.find("../../etc/passwd")


def test_an_old_ledger_is_upgraded_in_place(tmp_path):
    conn = connect(tmp_path / "ledger.sqlite")
    for statement in MIGRATIONS[0].split(";"):  # a ledger written by the first release
        if statement.strip():
            conn.execute(statement)
    conn.execute("PRAGMA user_version = 1")
    conn.execute("INSERT INTO jobs(display_name, model, state, request_count, created_at, updated_at) VALUES ('j','m','submitted',3,0,0)")
    conn.execute("INSERT INTO requests(hash, model, body_json, state, updated_at) VALUES ('h','m','{}','queued',0)")
    conn.close()
    ledger = Ledger(tmp_path)
    assert schema_version(ledger.conn) == len(MIGRATIONS)
    job = ledger.job(1)
    assert job["state"] == "submitted" and job["est_tokens"] == 0
    req = ledger.conn.execute("SELECT * FROM requests WHERE hash='h'").fetchone()
    assert req["state"] == "queued" and req["variant"] == 0 and req["fallback_of"] is None


def test_reference_placeholders_are_spliced_only_as_whole_values():
    import json

    from batcher.jobs import splice_references

    sha = "a" * 64
    req = ImageRequest(model="m", prompt=f'see "batcher-ref:sha256:{sha}" here',
                       references=(ReferenceImage(sha, "image/png", "/r.png"),))
    body_json = json.dumps(request_body(req), ensure_ascii=False)
    out = json.loads(splice_references(body_json, {sha: "https://x/files/f1"}))
    assert out["contents"][0]["parts"][0]["fileData"]["fileUri"] == "https://x/files/f1"
    assert out["contents"][0]["parts"][1]["text"] == f'see "batcher-ref:sha256:{sha}" here'  # the prompt is untouched
    with pytest.raises(KeyError):
        splice_references(body_json, {})
