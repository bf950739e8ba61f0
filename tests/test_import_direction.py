"""Imports point one way: `engine/` (vLLM glue) uses the models, attention, kernels, policies,
grammar and the reference decoder; none of those imports `engine/`."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "vllm_blockdiff"
BELOW_ENGINE = ["models", "attention", "kernels", "policies", "grammar", "reference"]


@pytest.mark.parametrize("package", BELOW_ENGINE)
def test_no_import_of_the_engine(package):
    for path in sorted((PACKAGE / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                assert not name.startswith("vllm_blockdiff.engine"), f"{path}: imports {name}"
