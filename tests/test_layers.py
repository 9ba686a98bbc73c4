"""The package reads top-down: every module imports only its own layer or the layers below it,
there are no import cycles (function-level imports count), and loading a model imports neither
training code nor the command line."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import memory3

ROOT = Path(memory3.__file__).parent

# Lowest first. A module belongs to the layer of its longest matching prefix.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("memory3", "memory3.errors", "memory3.config", "memory3.device", "memory3.faults",
              "memory3.files", "memory3.shipped", "memory3.rope")),
    ("model", ("memory3.model", "memory3.kernels", "memory3.lora", "memory3.checkpoint",
               "memory3.families")),
    ("memory mechanism", ("memory3.memory.write", "memory3.memory.layout")),
    ("vectors", ("memory3.retrieval.base", "memory3.retrieval.embed", "memory3.retrieval.index",
                 "memory3.retrieval.leak")),
    ("bank", ("memory3.memory",)),
    ("retrieval", ("memory3.retrieval",)),
    ("generation engine", ("memory3.decoding", "memory3.generate", "memory3.scheduler",
                           "memory3.scoring")),
    ("data sets", ("memory3.data",)),
    ("evaluation and training", ("memory3.eval", "memory3.train")),
    ("server", ("memory3.serve",)),
    ("command line", ("memory3.cli", "memory3.__main__")),
]  # fmt: skip


def _modules() -> dict[str, Path]:
    out = {}
    for p in ROOT.rglob("*.py"):
        if "assets" in p.relative_to(ROOT).parts:  # task files lm-eval loads by path, not modules
            continue
        parts = p.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = p
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """memory3 modules `name` imports anywhere in its body (top level or inside functions)."""
    pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                mod = ".".join([*base, *([node.module] if node.module else [])])
            else:
                mod = node.module or ""
            targets = [mod, *(f"{mod}.{a.name}" for a in node.names)]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        found |= {t for t in targets if t in known and t != name}
    return found


def _layer(name: str) -> int:
    best, rank = -1, -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (name == p or name.startswith(p + ".")) and len(p) > best:
                best, rank = len(p), i
    assert rank >= 0, f"{name} belongs to no layer: add it to LAYERS"
    return rank


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {n: _imports(n, p, set(mods)) for n, p in mods.items()}


def test_no_module_imports_a_layer_above_its_own() -> None:
    bad = [
        f"{a} ({LAYERS[_layer(a)][0]}) imports {b} ({LAYERS[_layer(b)][0]})"
        for a, targets in _graph().items()
        for b in sorted(targets)
        if _layer(b) > _layer(a)
    ]
    assert not bad, "\n".join(bad)


def test_no_import_cycles() -> None:
    graph = _graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
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
                cycles.append(sorted(comp))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, cycles


@pytest.mark.slow
def test_loading_a_model_or_serving_imports_no_training_code_nor_the_cli() -> None:
    code = (
        "import sys, memory3.checkpoint, memory3.generate, memory3.serve, memory3.retrieval.open;"
        "print(sorted(m for m in sys.modules if m.startswith(('memory3.train', 'memory3.cli', 'memory3.eval'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


def test_every_module_has_a_layer() -> None:
    for name in _modules():
        _layer(name)


def test_no_training_module_reaches_the_evaluation_only_sets() -> None:
    """The natural and unseen sets measure what training never read: no `memory3.train` module
    imports them, directly or through another module."""
    graph = _graph()
    reach: set[str] = set()
    todo = [m for m in graph if m.startswith("memory3.train")]
    while todo:
        m = todo.pop()
        if m not in reach:
            reach.add(m)
            todo.extend(graph[m])
    assert not reach & {"memory3.data.natural", "memory3.data.unseen"}, sorted(reach)
