"""Layer: the package's structure (the team's design rules, issue 15; docs/architecture.md), read from the
source with ast: algorithm/ is pure math, runtime/ never branches on a method's name, and every runtime
function fits on a screen.

Run: .venv/bin/python -m pytest tests/test_architecture.py -q      (under a second)
"""

import ast
import re

from ._util import REPO

PKG = REPO / "fedpipe_dist"


def _modules(folder: str):
    return sorted((PKG / folder).rglob("*.py"))


def _imports(path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
    return out


def test_algorithm_imports_no_distributed_code_and_no_files():
    for path in _modules("algorithm"):
        bad = {m for m in _imports(path) if m.split(".")[0] in ("mpi4py", "h5py")
               or m.startswith("torch.distributed") or m.split(".")[0] in ("comm", "runtime", "io")}
        assert not bad, f"{path.relative_to(REPO)} imports {bad}"


def _method_branches(source: str) -> list[str]:
    """Comparisons of something named `method` (cfg.method, method) with ==, !=, in, not in."""
    hits = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare) and any(isinstance(op, (ast.Eq, ast.NotEq, ast.In, ast.NotIn))
                                                 for op in node.ops):
            for side in (node.left, *node.comparators):
                name = side.attr if isinstance(side, ast.Attribute) else side.id if isinstance(side, ast.Name) else ""
                if name == "method":
                    hits.append(ast.unparse(node))
    return hits


def test_runtime_holds_no_branch_on_a_method_name():
    grep = re.compile(r"method ==|method in|method !=")
    for path in _modules("runtime"):
        text = path.read_text()
        assert not grep.search(text), f"{path.relative_to(REPO)}: {grep.search(text).group()}"
        assert not _method_branches(text), f"{path.relative_to(REPO)}: {_method_branches(text)}"
    # the check can fail: it finds the branches the engine used to have
    assert _method_branches('if cfg.method == "ft":\n    pass\nx = m if method in ("a",) else 0\n') == [
        "cfg.method == 'ft'", "method in ('a',)"]


def test_every_runtime_function_is_under_80_lines():
    long = []
    for path in _modules("runtime"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n >= 80:
                    long.append(f"{path.name}:{node.name} ({n} lines)")
    assert not long, long
