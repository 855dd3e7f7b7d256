"""Hostile and broken input: every case goes through the CLI against the emulator and must be refused with a
clear message naming the problem and its place (file; row and column where they apply), exit 2 (bad input or
usage) or 1 (the environment: an unwritable or full disk), no traceback, and not one API call.

Each case builds its input in a temp dir; `CASES` is the corpus (see docs/reliability.md for its size).
"""

from __future__ import annotations

import random
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image

from batcher.cli import main


@dataclass
class Case:
    name: str
    build: Callable[[Path], list[str]]  # writes files under tmp, returns the CLI arguments
    code: int = 2
    needles: tuple[str, ...] = ()  # each must appear in the output (case-insensitive)
    where: bool = True  # the output names the input file (the build's first path argument)
    command: str = "run"
    env: dict = field(default_factory=dict)


CASES: list[Case] = []


def case(name: str, *needles: str, code: int = 2, where: bool = True, command: str = "run"):
    def register(build):
        CASES.append(Case(name, build, code, needles, where, command))
        return build

    return register


def csv_file(tmp: Path, text: str | bytes, name: str = "m.csv") -> Path:
    p = tmp / name
    p.write_bytes(text.encode() if isinstance(text, str) else text)
    return p


def parquet_file(tmp: Path, columns: dict, name: str = "m.parquet", schema=None) -> Path:
    p = tmp / name
    pq.write_table(pa.table(columns, schema=schema), p)
    return p


def png(path: Path) -> Path:
    Image.new("RGB", (8, 8), (10, 200, 30)).save(path)
    return path


# ---- manifest files ------------------------------------------------------------------------------

@case("empty-file", "empty")
def _(t): return [str(csv_file(t, ""))]


@case("header-only-csv", "no rows")
def _(t): return [str(csv_file(t, "id,prompt\n"))]


@case("header-only-tsv", "no rows")
def _(t): return [str(csv_file(t, "id\tprompt\n", "m.tsv"))]


@case("header-only-parquet", "no rows")
def _(t): return [str(parquet_file(t, {"id": pa.array([], pa.string()), "prompt": pa.array([], pa.string())}))]


@case("blank-lines-only", "m.csv")
def _(t): return [str(csv_file(t, "\n\n   \n"))]


@case("no-prompt-column", "no prompt column", "'text'")
def _(t): return [str(csv_file(t, "id,text\na,hello\n"))]


@case("prompt-column-wrong-case", "did you mean 'Prompt'")
def _(t): return [str(csv_file(t, "id,Prompt\na,hello\n"))]


@case("duplicate-column-names", "'prompt'", "more than once")
def _(t): return [str(csv_file(t, "id,prompt,prompt\na,x,y\n"))]


@case("invalid-utf8", "utf-8", "row 3")
def _(t): return [str(csv_file(t, b"id,prompt\na,fine\nb,caf\xe9 au lait\n"))]


@case("latin1-header", "utf-8")
def _(t): return [str(csv_file(t, b"id,pr\xf6mpt,prompt\na,x,y\n"))]


@case("utf16-csv", "utf-8")
def _(t): return [str(csv_file(t, "id,prompt\na,hello\n".encode("utf-16")))]


@case("unclosed-quote", "quote")
def _(t): return [str(csv_file(t, 'id,prompt\na,fine\nb,"never closed\nc,more\n'))]


@case("ragged-row-too-many-fields", "row 3")
def _(t): return [str(csv_file(t, "id,prompt\na,fine\nb,two,three\n"))]


@case("binary-garbage-as-csv", "m.csv")
def _(t): return [str(csv_file(t, b"PK\x03\x04" + random.Random(1).randbytes(3000)))]


@case("corrupt-parquet", "parquet")
def _(t): return [str(csv_file(t, b"PAR1" + random.Random(2).randbytes(500) + b"PAR1", "m.parquet"))]


@case("truncated-parquet", "parquet")
def _(t):
    p = parquet_file(t, {"id": [f"r{i}" for i in range(200)], "prompt": [f"prompt {i}" for i in range(200)]})
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    return [str(p)]


@case("csv-read-as-parquet", "parquet", "--format")
def _(t): return [str(csv_file(t, "id,prompt\na,hello\n")), "--format", "parquet"]


@case("parquet-read-as-csv", "m.parquet")
def _(t): return [str(parquet_file(t, {"id": ["a"], "prompt": ["hello"]})), "--format", "csv"]


@case("unknown-extension", "format")
def _(t): return [str(csv_file(t, "id,prompt\na,hello\n", "m.xlsx"))]


@case("directory-instead-of-file", "directory")
def _(t):
    (t / "m.csv").mkdir()
    return [str(t / "m.csv")]


@case("missing-file", "no such file")
def _(t): return [str(t / "nope.csv")]


@case("device-not-a-regular-file", "/dev/null", where=False)
def _(t): return ["/dev/null", "--format", "csv"]


# ---- manifest rows ---------------------------------------------------------------------------------

@case("empty-prompt", "row 3", "prompt")
def _(t): return [str(csv_file(t, "id,prompt\na,fine\nb,\n"))]


@case("whitespace-prompt", "row 2", "prompt")
def _(t): return [str(csv_file(t, 'id,prompt\na,"   "\n'))]


@case("null-prompt-parquet", "row 2", "prompt")
def _(t): return [str(parquet_file(t, {"id": ["a", "b"], "prompt": ["fine", None]}))]


@case("huge-prompt", "row 2", "prompt", "100,000")
def _(t): return [str(csv_file(t, "id,prompt\na," + "x" * 100_001 + "\n"))]


@case("temperature-not-a-number", "row 2", "temperature", "hot")
def _(t): return [str(csv_file(t, "id,prompt,temperature\na,hi,hot\n"))]


@case("temperature-out-of-range", "row 2", "temperature", "5")
def _(t): return [str(csv_file(t, "id,prompt,temperature\na,hi,5\n"))]


@case("temperature-nan", "row 2", "temperature", "nan")
def _(t): return [str(csv_file(t, "id,prompt,temperature\na,hi,nan\n"))]


@case("parquet-temperature-nan", "row 1", "temperature")
def _(t): return [str(parquet_file(t, {"id": ["a"], "prompt": ["hi"], "temperature": [float("nan")]}))]


@case("top-p-out-of-range", "row 2", "top_p", "1.5")
def _(t): return [str(csv_file(t, "id,prompt,top_p\na,hi,1.5\n"))]


@case("seed-not-an-integer", "row 2", "seed", "1.5")
def _(t): return [str(csv_file(t, "id,prompt,seed\na,hi,1.5\n"))]


@case("seed-too-large", "row 2", "seed")
def _(t): return [str(csv_file(t, f"id,prompt,seed\na,hi,{2**70}\n"))]


@case("variants-zero", "row 2", "variants")
def _(t): return [str(csv_file(t, "id,prompt,variants\na,hi,0\n"))]


@case("variants-not-a-number", "row 2", "variants", "many")
def _(t): return [str(csv_file(t, "id,prompt,variants\na,hi,many\n"))]


@case("variants-too-many", "row 2", "variants", "1000")
def _(t): return [str(csv_file(t, "id,prompt,variants\na,hi,1000\n"))]


@case("bad-aspect-ratio", "row 2", "aspect_ratio", "7:3")
def _(t): return [str(csv_file(t, "id,prompt,aspect_ratio\na,hi,7:3\n"))]


@case("bad-image-size", "row 2", "image_size", "8K")
def _(t): return [str(csv_file(t, "id,prompt,image_size\na,hi,8K\n"))]


@case("image-size-not-for-this-model", "row 2", "image_size", "8K")
def _(t): return [str(csv_file(t, "id,prompt,image_size\na,hi,8K\n"))]


@case("shut-down-model-in-column", "row 2", "model", "gemini-3-pro-image-preview", "use gemini-3-pro-image")
def _(t): return [str(csv_file(t, "id,prompt,model\na,hi,gemini-3-pro-image-preview\n"))]


@case("duplicate-ids", "row 3", "duplicate id")
def _(t): return [str(csv_file(t, "id,prompt\na,one\na,two\n"))]


@case("row-after-quoted-newlines", "row 3", "prompt")
def _(t): return [str(csv_file(t, 'id,prompt\na,"line one\nline two, with ""quotes"", commas"\nb,\n'))]


@case("unknown-columns-are-fine-but-a-row-is-not", "row 3", "temperature", "warm")
def _(t): return [str(csv_file(t, "id,prompt,temperature,colour,weird col!\na,hi,0.5,red,1\nb,hi,warm,blue,2\n"))]


@case("missing-reference-file", "row 2", "reference_images", "nope.png")
def _(t): return [str(csv_file(t, "id,prompt,reference_images\na,hi,nope.png\n"))]


@case("too-many-references", "row 2", "reference_images", "14")
def _(t):
    refs = "|".join(png(t / f"r{i}.png").name for i in range(15))
    return [str(csv_file(t, f"id,prompt,reference_images\na,hi,{refs}\n"))]


@case("reference-not-an-image", "row 2", "reference_images", "fake.png")
def _(t):
    (t / "fake.png").write_text("this is text, not a PNG")
    return [str(csv_file(t, "id,prompt,reference_images\na,hi,fake.png\n"))]


@case("reference-is-a-directory", "row 2", "reference_images", "refdir")
def _(t):
    (t / "refdir").mkdir()
    return [str(csv_file(t, "id,prompt,reference_images\na,hi,refdir\n"))]


@case("parquet-wrong-type-temperature", "row 1", "temperature")
def _(t): return [str(parquet_file(t, {"id": ["a"], "prompt": ["hi"], "temperature": ["x"]}))]


@case("parquet-prompt-is-a-list", "row 1", "prompt")
def _(t): return [str(parquet_file(t, {"id": ["a"], "prompt": [["not", "text"]]}))]


@case("several-bad-rows-all-named", "row 2", "row 4", "row 5")
def _(t): return [str(csv_file(t, "id,prompt,aspect_ratio\na,,\nb,ok,\nc,hi,2:7\nd,hi,banana\n"))]


# ---- options ---------------------------------------------------------------------------------------

def ok_manifest(t: Path) -> str:
    return str(csv_file(t, "id,prompt\na,hello\n"))


@case("max-attempts-zero", "--max-attempts", where=False)
def _(t): return [ok_manifest(t), "--max-attempts", "0"]


@case("max-attempts-not-a-number", "--max-attempts", where=False)
def _(t): return [ok_manifest(t), "--max-attempts", "abc"]


@case("deadline-garbage", "--deadline", "garbage", where=False)
def _(t): return [ok_manifest(t), "--deadline", "garbage"]


@case("deadline-policy-unknown", "--deadline-policy", where=False)
def _(t): return [ok_manifest(t), "--deadline-policy", "pray"]


@case("shut-down-model-option", "--model", "gemini-3.1-flash-image-preview", "use gemini-3.1-flash-image", where=False)
def _(t): return [ok_manifest(t), "--model", "gemini-3.1-flash-image-preview"]


@case("format-xyz", "--format", "xyz", where=False)
def _(t): return [ok_manifest(t), "--format", "xyz"]


@case("default-aspect-ratio-bad", "--aspect-ratio", "banana", where=False)
def _(t): return [ok_manifest(t), "--aspect-ratio", "banana"]


@case("default-image-size-bad-for-model", "--image-size", "8K", where=False)
def _(t): return [ok_manifest(t), "--image-size", "8K"]


@case("max-requests-per-job-zero", "--max-requests-per-job", where=False)
def _(t): return [ok_manifest(t), "--max-requests-per-job", "0"]


@case("poll-interval-zero", "--poll-interval", where=False)
def _(t): return [ok_manifest(t), "--poll-interval", "0"]


@case("timeout-negative", "--timeout", where=False)
def _(t): return [ok_manifest(t), "--timeout", "-1"]


@case("budget-negative", "--budget-usd", where=False)
def _(t): return [ok_manifest(t), "--budget-usd", "-5"]


@case("token-cap-zero", "--token-cap", where=False)
def _(t): return [ok_manifest(t), "--token-cap", "0"]


@case("tier-unknown", "--tier", where=False)
def _(t): return [ok_manifest(t), "--tier", "9"]


@case("prompt-column-missing", "no prompt column", "'nope'")
def _(t): return [ok_manifest(t), "--prompt-column", "nope"]


@case("id-column-missing", "no id column", "'nope'")
def _(t): return [ok_manifest(t), "--id-column", "nope"]


@case("submit-with-bad-option", "--max-attempts", where=False, command="submit")
def _(t): return [ok_manifest(t), "--max-attempts", "0"]


@case("estimate-of-corrupt-parquet", "parquet", command="estimate")
def _(t): return [str(csv_file(t, b"not parquet at all", "m.parquet"))]


# ---- job specs -------------------------------------------------------------------------------------

def spec(t: Path, body: str, name: str = "job.toml") -> str:
    ok_manifest(t)
    p = t / name
    p.write_text(body)
    return str(p)


@case("spec-unknown-key", "unknown key", "limits.max_attemps")
def _(t): return [spec(t, 'manifest = "m.csv"\n[limits]\nmax_attemps = 3\n')]


@case("spec-wrong-type", "limits.max_attempts", "must be a int")
def _(t): return [spec(t, 'manifest = "m.csv"\n[limits]\nmax_attempts = "three"\n')]


@case("spec-invalid-toml", "not valid toml")
def _(t): return [spec(t, 'manifest = "m.csv\n[limits\n')]


@case("spec-missing-manifest", "'manifest' is required")
def _(t): return [spec(t, '[limits]\nmax_attempts = 3\n')]


@case("spec-manifest-does-not-exist", "gone.csv", where=False)
def _(t): return [spec(t, 'manifest = "gone.csv"\n')]


@case("spec-table-is-a-value", "'defaults' must be a table")
def _(t): return [spec(t, 'manifest = "m.csv"\ndefaults = 3\n')]


@case("spec-shut-down-model", "gemini-3-pro-image-preview", "use gemini-3-pro-image", where=False)
def _(t): return [spec(t, 'manifest = "m.csv"\n[defaults]\nmodel = "gemini-3-pro-image-preview"\n')]


@case("spec-bad-aspect-ratio", "7:3", where=False)
def _(t): return [spec(t, 'manifest = "m.csv"\n[defaults]\naspect_ratio = "7:3"\n')]


@case("spec-bad-policy", "window.policy", "pray")
def _(t): return [spec(t, 'manifest = "m.csv"\n[window]\npolicy = "pray"\n')]


@case("spec-bad-deadline", "window.deadline", "garbage")
def _(t): return [spec(t, 'manifest = "m.csv"\n[window]\ndeadline = "garbage"\n')]


@case("spec-tier-unknown", "limits.tier", "'9'")
def _(t): return [spec(t, 'manifest = "m.csv"\n[limits]\ntier = "9"\n')]


@case("spec-format-unknown", "manifest_columns.format", "xyz")
def _(t): return [spec(t, 'manifest = "m.csv"\n[manifest_columns]\nformat = "xyz"\n')]


@case("spec-poll-interval-negative", "poll.interval_seconds")
def _(t): return [spec(t, 'manifest = "m.csv"\n[poll]\ninterval_seconds = -1\n')]


@case("spec-max-attempts-zero", "limits.max_attempts", "at least 1")
def _(t): return [spec(t, 'manifest = "m.csv"\n[limits]\nmax_attempts = 0\n')]


@case("spec-bad-price", "batch_discount")
def _(t): return [spec(t, 'manifest = "m.csv"\n[prices."gemini-2.5-flash-image"]\nbatch_discount = "half"\n')]


@case("spec-is-a-directory", "directory")
def _(t):
    (t / "job.toml").mkdir()
    return [str(t / "job.toml")]


# ---- the environment (exit 1) ---------------------------------------------------------------------

@case("out-under-a-regular-file", "--out", "a_file", "not a directory", code=1, where=False)
def _(t):
    (t / "a_file").write_text("x")
    return [ok_manifest(t), "--out", str(t / "a_file" / "sub")]


@case("workdir-under-a-regular-file", "--workdir", "a_file", "not a directory", code=1, where=False)
def _(t):
    (t / "a_file").write_text("x")
    return [ok_manifest(t), "--workdir", str(t / "a_file" / "w")]


@case("cache-dir-under-a-regular-file", "--cache-dir", "a_file", "not a directory", code=1, where=False)
def _(t):
    (t / "a_file").write_text("x")
    return [ok_manifest(t), "--cache-dir", str(t / "a_file" / "c")]


# ---- the runner ------------------------------------------------------------------------------------

def invoke(tmp_path: Path, c: Case):
    inputs = tmp_path / "in"
    inputs.mkdir()
    args = c.build(inputs)
    common = ["--workdir", str(tmp_path / "w"), "--cache-dir", str(tmp_path / "c"), "-q"]
    if c.command in ("run", "submit"):
        common += ["--out", str(tmp_path / "o")]
    if c.command == "run":
        common += ["--poll-interval", "0.05", "--timeout", "20"]
    if c.command == "estimate":
        common = ["--cache-dir", str(tmp_path / "c")]
    # options given by the case win over the defaults (click takes the last one)
    return args, CliRunner().invoke(main, [c.command, args[0]] + common + args[1:])


def assert_refused(emu, args, r, code: int, needles, where: bool):
    out = r.output
    assert r.exit_code == code, f"exit {r.exit_code}, wanted {code}: {out}"
    assert "Traceback" not in out, out
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    assert out.strip(), "no message at all"
    for n in needles:
        assert n.lower() in out.lower(), f"{n!r} not in: {out}"
    if where:
        assert Path(args[0]).name in out, f"the file {args[0]} is not named: {out}"
    stats = emu.stats()
    assert stats["files_uploaded"] == 0 and stats["batches_created"] == 0
    assert stats["requests"] == {}, f"API calls were made: {stats['requests']}"


@pytest.mark.parametrize("c", CASES, ids=[c.name for c in CASES])
def test_hostile_input_is_refused_without_any_api_call(tmp_path, emulator_env, c):
    args, r = invoke(tmp_path, c)
    assert_refused(emulator_env, args, r, c.code, c.needles, c.where)


def test_the_corpus_is_large_enough():
    assert len(CASES) + 1 >= 40  # + the full-disk case below
    assert len({c.name for c in CASES}) == len(CASES)


# ---- a full disk (a real 64 KiB tmpfs; needs root and mount) ---------------------------------------

@pytest.fixture
def tiny_fs(tmp_path):
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.decode(errors='replace').strip()})")
    try:
        with open(mnt / "filler", "wb") as f:  # fill it up
            while True:
                f.write(b"\0" * 4096)
                f.flush()
    except OSError:
        pass
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk_workdir_is_refused_without_any_api_call(tmp_path, emulator_env, tiny_fs):
    m = ok_manifest(tmp_path)
    r = CliRunner().invoke(main, ["run", m, "--workdir", str(tiny_fs / "w"), "--cache-dir", str(tmp_path / "c"),
                                  "--out", str(tmp_path / "o"), "-q", "--timeout", "20"])
    assert_refused(emulator_env, [m], r, 1, ("--workdir", "no space left"), where=False)


@pytest.mark.slow
def test_full_disk_output_fails_cleanly_and_a_rerun_pays_nothing_twice(tmp_path, emulator_env, tiny_fs):
    """The disk fills only when the dataset is written (after the images were paid for): exit 1, a clear
    message, and once there is room the same command finishes from the cache and the ledger, no new job."""
    m = ok_manifest(tmp_path)
    args = ["run", m, "--workdir", str(tmp_path / "w"), "--cache-dir", str(tmp_path / "c"),
            "--out", str(tiny_fs / "o"), "-q", "--poll-interval", "0.05", "--timeout", "20"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 1, r.output
    assert "Traceback" not in r.output and "no space left" in r.output.lower() and str(tiny_fs / "o") in r.output
    assert emulator_env.stats()["batches_created"] == 1
    (tiny_fs / "filler").unlink()
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert emulator_env.stats()["batches_created"] == 1
    assert (tiny_fs / "o" / "metadata.parquet").exists()
