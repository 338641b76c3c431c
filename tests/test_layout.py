"""The house rules of docs/architecture.md that a test can hold: small modules that say what they own, a base layer
that loads without torch, no test hooks in the package, and docs that name only files that exist."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "paadet"
BASE_LAYER = ("errors", "console", "fileio", "classes", "preprocess", "detections", "version", "zoo", "cpu")


def modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_every_module_is_small_and_says_what_it_owns() -> None:
    assert len(modules()) > 90
    for path in modules():
        lines = path.read_text(encoding="utf-8").count("\n")
        assert lines <= 600, f"{path.relative_to(ROOT)}: {lines} lines; split it by concept"
        if path.name not in ("__main__.py",):
            doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
            assert doc and len(doc) > 20, f"{path.relative_to(ROOT)} has no docstring saying what it owns"


def test_the_base_layer_and_the_command_line_load_without_torch() -> None:
    names = [f"paadet.{name}" for name in BASE_LAYER] + ["paadet.cli", "paadet.runtime.spec", "paadet.bench.settings"]
    script = "import sys\n" + "".join(f"import {n}\n" for n in names) + "print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_no_test_hook_in_the_package() -> None:
    for path in modules():
        text = path.read_text(encoding="utf-8")
        assert "PAADET_TEST" not in text and "FAULT_AFTER" not in text, path.relative_to(ROOT)
        for node in ast.walk(ast.parse(text)):  # nothing reads an environment variable that only tests would set
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                assert not node.value.startswith("PAADET_TEST"), path.relative_to(ROOT)


def test_docs_name_only_files_that_exist() -> None:
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    pattern = re.compile(r"(?<![\w/.-])((?:benchmarks|tools|scripts|docs|tests)/[\w./-]+\.(?:py|sh|md|png|json))")
    named = 0
    for doc in docs:
        for match in pattern.finditer(doc.read_text(encoding="utf-8")):
            named += 1
            assert (ROOT / match.group(1)).exists(), (
                f"{doc.relative_to(ROOT)} names {match.group(1)}, which does not exist"
            )
    assert named > 20


def test_cli_reference_is_up_to_date() -> None:
    """docs/cli.md is generated from the parsers; regenerate it with ``python tools/gen_cli_docs.py``."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "gen_cli_docs.py"), "--check"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
