"""The public Python API: `import batcher` and its names, pinned."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import subprocess
import sys

import batcher

PUBLIC = ["run", "submit", "collect", "status", "cancel", "estimate", "export", "prune", "describe_models", "Settings", "ManifestOptions",
          "ShardLimits", "Quota", "Outcome", "Estimate", "BatcherError", "UsageError", "ManifestError", "ApiError",
          "QuotaError", "SpendLimitError", "LedgerError"]


def test_the_public_names_are_pinned_and_each_resolves():
    assert sorted(batcher.__all__) == sorted(PUBLIC) == sorted(batcher._EXPORTS)
    for name in PUBLIC:
        assert getattr(batcher, name).__name__ == name
    assert set(PUBLIC) <= set(dir(batcher))


def test_no_public_name_is_a_submodule():
    submodules = {m.name for m in pkgutil.iter_modules(batcher.__path__)}
    assert "pipeline" in submodules and not submodules & set(PUBLIC)


def test_a_command_stays_a_function_after_every_module_is_imported():
    """`batcher.collect` once turned into the module batcher/collect.py once anything imported it."""
    for info in pkgutil.walk_packages(batcher.__path__, "batcher."):
        if not info.name.endswith("__main__"):
            importlib.import_module(info.name)
    for name in PUBLIC:
        value = getattr(batcher, name)
        assert not inspect.ismodule(value), name
    assert inspect.isfunction(batcher.collect) and inspect.isfunction(batcher.run)


def test_import_batcher_loads_neither_the_sdk_nor_pyarrow():
    code = "import sys, batcher; print(any(m.startswith(('google.genai', 'pyarrow')) for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_a_job_spec_runs_from_python_as_from_the_command_line(tmp_path, emulator, backend_factory):
    """batcher.submit("jobs/demo.toml") once failed: "cannot tell the manifest format from the extension '.toml'"."""
    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / "m.csv").write_text("id,prompt\na,a teapot\nb,a kettle\n", encoding="utf-8")
    (tmp_path / "jobs" / "demo.toml").write_text(
        'manifest = "m.csv"\nworkdir = "../w"\nout = "../o"\ncache_dir = "../c"\n[poll]\ninterval_seconds = 0.05\n', encoding="utf-8")
    out = batcher.submit(tmp_path / "jobs" / "demo.toml", backend_factory=backend_factory)
    assert out.exit_code == 4 and "1 job(s) created" in out.summary, out.summary  # 4: submitted, not yet done
    assert out.counts["queued"] == 2 and (tmp_path / "w").is_dir()
    assert emulator.stats()["batches_created"] == 1
    est = batcher.estimate(str(tmp_path / "jobs" / "demo.toml"))
    assert est.rows == 2 and est.manifest == str(tmp_path / "jobs" / "m.csv")
