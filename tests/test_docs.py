"""A promise in the README or the docs names the test that keeps it: each
test they cite exists, so a renamed test cannot leave a promise unbacked."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CITED = re.compile(r"(test_\w+\.py)::(\w+)")


def _tests() -> dict[str, set[str]]:
    """{file name: its test functions}, of every test file."""
    return {
        path.name: {n.name for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.FunctionDef)}
        for path in (ROOT / "tests").rglob("test_*.py")
    }


def test_every_test_the_docs_cite_exists():
    tests = _tests()
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    cited = [(doc.name, *m.groups()) for doc in docs for m in CITED.finditer(doc.read_text())]
    assert len(cited) > 10
    missing = [f"{doc}: {file}::{name}" for doc, file, name in cited if name not in tests.get(file, ())]
    assert not missing
