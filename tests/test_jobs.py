"""Jobs (jobs.lifecycle): the JSONL a job is made of."""

from __future__ import annotations


import pytest

from batcher.errors import LedgerError
from batcher.ledger import Ledger


def test_a_job_whose_requests_changed_under_it_writes_no_jsonl(tmp_path):
    """write_jsonl takes a job's requests by job id; if that ever disagrees with the job's size, it is loud
    and leaves no file, rather than sending a job short of requests."""
    from batcher.jobs.lifecycle import jsonl_path, write_jsonl
    from batcher.ledger import PLANNED
    from batcher.manifest import ManifestOptions
    from batcher.planning.planner import ShardLimits, plan_manifest, shard

    from .helpers import write_csv

    m = write_csv(tmp_path / "m.csv", ["id", "prompt"], [[f"r{i}", f"prompt {i}"] for i in range(5)])
    ledger = Ledger(tmp_path / "wd")
    plan_manifest(ledger, None, m, ManifestOptions())
    (job_id,) = shard(ledger, ShardLimits())
    path = write_jsonl(ledger, job_id, {})
    assert len(path.read_text().splitlines()) == 5
    path.unlink()
    ledger.conn.execute("UPDATE requests SET state=?, job_id=NULL WHERE rowid=(SELECT MIN(rowid) FROM requests)", (PLANNED,))
    with pytest.raises(LedgerError, match="4 queued requests in the ledger, but the job was made with 5"):
        write_jsonl(ledger, job_id, {})
    assert not jsonl_path(ledger, ledger.job(job_id)["display_name"]).exists()
    assert not list((tmp_path / "wd" / "jobs").glob("*.tmp"))
