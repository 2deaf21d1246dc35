"""The package's shape: imports point down the layers, no cycles, light reports."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import qexp

ROOT = Path(qexp.__file__).parent

#: layer of each top-level part of the package: a module may import only from its own layer or
#: below (a new package must be placed here, which is the point)
LAYERS = {
    "qexp.cli": 5,
    "qexp.study": 5,
    "qexp.train": 4,
    "qexp.export": 4,  # export builds runs; its verifier and engine stay on layers 1-2 (a test)
    "qexp.analysis.command": 5,  # `qexp sensitivity`: rebuilds runs (export.write.load_run)
    "qexp.analysis": 3,
    "qexp.estimators": 3,
    "qexp.quant": 2,
    "qexp.models": 2,
    "qexp.data": 2,
    "qexp.config": 2,
    "qexp.report": 2,
    "qexp.curves": 1,
    "qexp.spec": 1,
    "qexp.record": 1,
    "qexp.bitops": 1,
    "qexp.bitwidth": 1,
    "qexp.rundir_lock": 1,
    "qexp.errors": 1,
    "qexp": 1,  # the package's __init__ only
}


def _modules() -> dict[str, Path]:
    mods = {}
    for f in ROOT.rglob("*.py"):
        parts = ("qexp", *f.relative_to(ROOT).with_suffix("").parts)
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = f
    return mods


def _imports(path: Path, mods: dict[str, Path]) -> set[str]:
    """qexp modules imported anywhere in ``path`` (late imports inside functions included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
        for name in names:
            while name and name not in mods:
                name = name.rpartition(".")[0]
            if name.startswith("qexp"):
                found.add(name)
    return found


def _layer(module: str) -> int:
    for prefix in sorted(LAYERS, key=len, reverse=True):
        if module == prefix or (prefix != "qexp" and module.startswith(prefix + ".")):
            return LAYERS[prefix]
    raise AssertionError(f"{module} belongs to no layer: add its package to LAYERS")


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    graph = {}
    for m, f in mods.items():
        deps = _imports(f, mods) - {m}
        # a package's own __init__ re-exporting its modules is not an arrow back up
        graph[m] = {d for d in deps if not (f.name == "__init__.py" and d.startswith(m + "."))}
    return graph


def test_every_import_points_down_or_sideways():
    wrong = [
        f"{m} (layer {_layer(m)}) imports {d} (layer {_layer(d)})"
        for m, deps in _graph().items()
        for d in deps
        if d != "qexp" and _layer(d) > _layer(m)
    ]
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles():
    graph = _graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    sys.setrecursionlimit(10_000)

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, cycles


def test_the_checker_sees_a_planted_cycle(tmp_path):
    """The import reader finds late imports too (so the tests above can fail)."""
    a = tmp_path / "a.py"
    a.write_text("def f():\n    from qexp.train.run import run_training\n")
    assert "qexp.train.run" in _imports(a, _modules())


def test_reports_and_records_import_without_torch():
    code = (
        "import sys\n"
        "import qexp.report.compare, qexp.report.runs, qexp.report.tb, qexp.record\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


#: the only modules that may import omegaconf or hydra: the config package, the Hydra app,
#: the composition roots of a run (run.py and its builders, the preflight) and of a study
CONFIG_READERS = ("qexp.config", "qexp.train.app", "qexp.train.run", "qexp.train.build",
                  "qexp.train.preflight", "qexp.study.runs")  # fmt: skip


def test_omegaconf_stays_at_the_root():
    """Below the composition root nothing reads the composed config: no other module imports
    omegaconf or hydra, late imports inside functions included."""
    bad = []
    for module, path in _modules().items():
        if any(module == r or module.startswith(r + ".") for r in CONFIG_READERS):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                if name.split(".")[0] in ("omegaconf", "hydra"):
                    bad.append(f"{path.relative_to(ROOT.parent)}:{node.lineno} imports {name}")
    assert not bad, "\n".join(bad)
