"""The layout keeps its promises (docs/ARCHITECTURE.md)."""

from __future__ import annotations

import re

import pytest

from tests.architecture import ROOT, cycles, import_graph, module_name, modules

# A statement (its keywords, or a SELECT that goes on in the next string), or any use of a connection.
SQL = re.compile(r"\b(SELECT(\s+[\w*(]|\s*\"\s*$)|(INSERT|REPLACE)\s+(OR\s+\w+\s+)?INTO|UPDATE\s+\w+\s+SET|DELETE\s+FROM|"
                 r"(CREATE|DROP|ALTER)\s+(TABLE|INDEX|VIEW|TRIGGER)|PRAGMA\s+\w+)|\.execute(many|script)?\(|sqlite3\.connect\(")


def test_no_import_cycle_in_batcher():
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_sql_only_in_the_ledger():
    """The ledger package is the one boundary to the database (the emulator is not batcher's database)."""
    outside = []
    for name, path in modules().items():
        if name.startswith(("batcher.ledger", "batcher.emulator")):
            continue
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if SQL.search(line):
                outside.append(f"{path.relative_to(ROOT.parent)}:{n}: {line.strip()}")
    assert outside == []


@pytest.mark.parametrize("line", [
    'c.execute("SELECT 1")', "UPDATE jobs SET state=?", 'c.executemany("REPLACE INTO uploads(sha256, uri) VALUES (?,?)", rows)',
    'c.executescript("DROP INDEX rows_by_id")', 'conn.executemany(INSERT_SQL, rows)', 'q = "PRAGMA journal_mode=DELETE"',
    '"ALTER TABLE jobs ADD COLUMN x"', 'sql = ("SELECT "', 'db = sqlite3.connect(path)',
])
def test_the_sql_finder_finds_sql(line):
    assert SQL.search(line)


def test_the_sql_finder_leaves_prose_alone():
    assert not SQL.search("select a model") and not SQL.search("we drop the table of contents")


def test_the_library_never_imports_the_emulator():
    graph = import_graph()
    library = {m for m in graph if not m.startswith("batcher.emulator")}
    # The in-process emulator backend (`--backend emulator`) and the demo start it on purpose, lazily.
    allowed = {"batcher.backends.factory", "batcher.demo", "batcher.cli"}
    assert sorted(m for m in library - allowed if any(d.startswith("batcher.emulator") for d in graph[m])) == []
    assert module_name(ROOT / "emulator" / "__init__.py") == "batcher.emulator"
