"""The README cannot drift: every shell example runs against the emulator, in order, in one folder (as a reader
would type them), unless an HTML comment just above it says why it cannot (`<!-- needs a real key ... -->`, or
`<!-- not run by tests/test_readme.py: REASON -->`); every job spec it names exists and is valid; every TOML example
is a valid job spec; the public objects have docstrings."""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import batcher
from batcher.settings import load_spec

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SHELL = ("sh", "cron")
MARKER = re.compile(r"<!-- (needs a real key[^>]*|not run by tests/test_readme\.py: [^>]+) -->")
RAN_FINE = (0, 3, 4)  # done; done with failed or blocked rows; still in progress (README "Exit codes")


@dataclasses.dataclass
class Block:
    lang: str
    line: int  # of the opening fence
    text: str
    why_not_run: str | None


def blocks(text: str) -> list[Block]:
    lines = text.splitlines()
    found, i = [], 0
    while i < len(lines):
        fence = re.fullmatch(r"```(\w+)", lines[i])
        if fence:
            end = lines.index("```", i + 1)
            marker = MARKER.fullmatch(lines[i - 1]) if i else None
            found.append(Block(fence[1], i + 1, "\n".join(lines[i + 1:end]), marker[1] if marker else None))
            i = end
        i += 1
    return found


def commands(block: Block) -> list[str]:
    """The block's command lines, without their comments (a `#` after spaces starts one)."""
    out = []
    for line in block.text.splitlines():
        line = re.sub(r"(^|\s+)#\s.*$", "", line).strip()
        if line:
            out.append(line)
    return out


def test_every_example_says_its_language():
    """An unlabelled fence would hide a shell example from the test below."""
    text = README.read_text(encoding="utf-8")
    fences = re.findall(r"^```(.*)$", text, flags=re.M)
    assert len(fences) % 2 == 0
    assert all(fences[i] for i in range(0, len(fences), 2)), "a README example without a language after its ```"


def test_every_shell_example_runs_or_says_why_not():
    shell = [b for b in blocks(README.read_text(encoding="utf-8")) if b.lang in SHELL]
    assert len(shell) >= 6
    for b in shell:
        if b.why_not_run is None:
            for command in commands(b):
                assert command.startswith(("batcher ", "export ")), \
                    f"README.md:{b.line}: {command!r} cannot run in tests: mark the block <!-- needs a real key -->"


@pytest.mark.slow
def test_the_readmes_shell_examples_run_against_the_emulator(tmp_path, emulator_env):
    """Each command exits 0, 3 or 4 (done, done with failures, in progress) and prints no traceback."""
    work = tmp_path / "reader"
    work.mkdir()
    for name in ("prompts.csv", "prompts.parquet", "refs"):
        src = ROOT / "samples" / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, work / name)
    shutil.copytree(ROOT / "samples", work / "samples")  # what the job specs under jobs/ name (../samples/...)
    shutil.copytree(ROOT / "jobs", work / "jobs")
    env = {**os.environ, "COLUMNS": "80"}
    ran = 0
    for b in blocks(README.read_text(encoding="utf-8")):
        if b.lang not in SHELL or b.why_not_run is not None:
            continue
        for command in commands(b):
            words = shlex.split(command)
            if words[0] == "export":
                env.update(w.split("=", 1) for w in words[1:])
                continue
            proc = subprocess.run([sys.executable, "-m", "batcher.cli", *words[1:]], cwd=work, env=env,
                                  capture_output=True, text=True, timeout=300)
            where = f"README.md:{b.line}: {command}\n{proc.stdout}{proc.stderr}"
            assert proc.returncode in RAN_FINE and "Traceback" not in proc.stderr, where
            ran += 1
    assert ran >= 8


def test_every_job_spec_named_exists_and_is_valid():
    named = set()
    for doc in [README, *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "batcher").rglob("*.py"))]:
        named |= set(re.findall(r"\bjobs/[\w.-]+\.toml\b", doc.read_text(encoding="utf-8")))
    assert "jobs/products.toml" in named
    for name in sorted(named):
        assert (ROOT / name).is_file(), f"{name} is named in the docs but does not exist"
        load_spec(ROOT / name)  # raises on an unknown key or a bad value


def test_every_toml_example_in_the_readme_is_a_valid_job_spec(tmp_path):
    examples = [b for b in blocks(README.read_text(encoding="utf-8")) if b.lang == "toml"]
    assert examples
    for i, b in enumerate(examples):
        text = b.text if re.search(r"^manifest\s*=", b.text, flags=re.M) else 'manifest = "m.csv"\n' + b.text
        spec = tmp_path / f"example{i}.toml"
        spec.write_text(text, encoding="utf-8")
        load_spec(spec)


def test_the_readmes_job_spec_is_jobs_products_toml():
    def values(text: str) -> list[str]:
        return [re.sub(r"\s+#.*$", "", line) for line in text.splitlines() if line.strip() and not line.startswith("#")]

    example = next(b for b in blocks(README.read_text(encoding="utf-8")) if b.lang == "toml" and "manifest =" in b.text)
    assert values(example.text) == values((ROOT / "jobs" / "products.toml").read_text(encoding="utf-8"))


def test_the_public_objects_have_docstrings():
    for name in batcher.__all__:
        obj = getattr(batcher, name)
        doc = obj.__dict__.get("__doc__") if isinstance(obj, type) else obj.__doc__
        generated = dataclasses.is_dataclass(obj) and (doc or "").startswith(f"{name}(")
        assert doc and doc.strip() and not generated, f"batcher.{name} has no docstring of its own"
