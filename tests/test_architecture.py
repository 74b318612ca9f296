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


def _module_name(path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root=PKG) -> dict[str, set[str]]:
    """module -> the package's modules it imports, read with ast from every import statement, those inside
    functions and under TYPE_CHECKING included. Importing a.b.c also runs a/__init__ and a/b/__init__, so those
    count too, except the packages the importer itself lives in (Python has begun them already)."""
    paths = {_module_name(p): p for p in root.rglob("*.py")}
    graph = {}
    for mod, path in paths.items():
        package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
        own = {".".join(mod.split(".")[:i]) for i in range(1, mod.count(".") + 2)}
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    name = ".".join(base + ([node.module] if node.module else []))
                else:
                    name = node.module or ""
                targets = [name, *(f"{name}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            for t in targets:
                if t in paths:
                    deps |= {p for p in (".".join(t.split(".")[:i]) for i in range(1, t.count(".") + 2))
                             if p in paths and p not in own}
        graph[mod] = deps - {mod}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert len(graph) > 50 and graph["fedpipe_dist.job"] >= {"fedpipe_dist.config", "fedpipe_dist.methods"}
    assert not cycles(graph), cycles(graph)
    # the check can fail: the cycle config.validate opened through a lazy import of the methods (issue 30)
    graph["fedpipe_dist.config"].add("fedpipe_dist.methods")
    assert any({"fedpipe_dist.config", "fedpipe_dist.methods"} <= set(c) for c in cycles(graph))


def test_config_never_imports_the_methods_and_algorithm_never_imports_the_job():
    graph = import_graph()
    config = [m for m in graph if m == "fedpipe_dist.config" or m.startswith("fedpipe_dist.config.")]
    assert len(config) == 5  # the package and its four modules (sections, validation, jobconfig, reading)
    assert not {d for m in config for d in graph[m] if d.startswith("fedpipe_dist.methods")}
    for path in _modules("algorithm"):
        text = path.read_text()
        assert "JobConfig" not in text and "fedpipe_dist.config" not in text and "..config" not in text, path


# Where the job is read whole (issue 30): loading and checking it, set-up, the round engine's start, and the
# methods' own checks that the loader calls (job.check_method -> Method.validate).
JOB_LOADERS = {"config/__init__.py", "config/sections.py", "config/validation.py", "config/jobconfig.py",
               "config/reading.py", "job.py", "preflight.py", "cli.py", "runtime/setup.py", "runtime/engine.py",
               "runtime/central.py"}
MAX_JOB_READERS = 8  # the rest, named in the test's message when it fails; the target was "under 10"


def job_readers(source: str, module: str) -> list[str]:
    """Functions in `source` with a parameter that is the whole job: annotated JobConfig, or unannotated and
    named cfg or job (the package's names for it). A method's `validate` hook counts as loading."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or node.name == "validate":
            continue
        a = node.args
        for arg in a.posonlyargs + a.args + a.kwonlyargs:
            ann = ast.unparse(arg.annotation) if arg.annotation is not None else ""
            if "JobConfig" in ann or (not ann and arg.arg in ("cfg", "job")):
                out.append(f"{module}:{node.name}")
                break
    return out


def test_few_functions_outside_the_loaders_take_the_whole_job():
    readers = []
    for path in sorted(PKG.rglob("*.py")):
        module = str(path.relative_to(PKG))
        if module not in JOB_LOADERS:
            readers += job_readers(path.read_text(), module)
    assert len(readers) <= MAX_JOB_READERS, readers
    assert "runtime/client.py:of" in readers  # client training reads a small settings object built once
    # the check can fail: a function that takes the job whole, annotated or by its name, is found
    assert job_readers("def f(x, cfg: 'JobConfig'): pass\ndef g(cfg): pass\ndef h(cfg: TrainConfig): pass",
                       "m.py") == ["m.py:f", "m.py:g"]
