"""The package's shape: imports point down the stages, no import cycle, old paths still work.

The stages, in order (``mtl_dist/__init__.py``): a module may import its own stage and the
ones before it, never one after it. Every import counts — at module level, inside functions
and under ``TYPE_CHECKING`` — since each is a dependency a reader has to follow.
"""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mtl_dist"
STAGES = [
    ("config", "files"),
    ("distributed",),
    ("data",),
    ("models",),
    ("balancing",),
    ("loop",),
    ("checkpoint",),
    ("observe",),
    ("serve",),
    ("train",),
    ("tools",),
]
RANK = {name: i for i, names in enumerate(STAGES) for name in names}
# old paths kept as aliases for one release: old → new
ALIASES = {
    "mtl_dist.losses": "mtl_dist.loop.losses",
    "mtl_dist.guard": "mtl_dist.loop.guard",
    "mtl_dist.monitoring": "mtl_dist.observe.telemetry",
    "mtl_dist.serving": "mtl_dist.serve.program",
    "mtl_dist.export": "mtl_dist.serve.export",
    "mtl_dist.compare": "mtl_dist.tools.compare",
    "mtl_dist.bench.e2e": "mtl_dist.tools.bench.e2e",
    "data_tools.synth": "mtl_dist.data.synth",
}


def is_alias(path: Path) -> bool:
    return "sys.modules[__name__] = _moved" in path.read_text()


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every ``mtl_dist`` module ``path`` imports (``from a import b`` counts ``a.b`` when that
    is a module, else ``a``)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("mtl_dist")}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mtl_dist"):
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                is_module = (ROOT / sub.replace(".", "/")).with_suffix(".py").exists() or (
                    ROOT / sub.replace(".", "/")
                ).is_dir()
                found.add(sub if is_module else node.module)
    return found


def stage(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def library() -> dict[str, set[str]]:
    """module → the mtl_dist modules it imports, aliases left out."""
    return {
        module_name(p): imports(p)
        for p in sorted(PACKAGE.rglob("*.py"))
        if not is_alias(p) and p.parent.name != "bench" or p.is_relative_to(PACKAGE / "tools")
    }


def test_every_module_belongs_to_a_stage():
    unplaced = {
        m for m in library() if m != "mtl_dist" and stage(m) not in RANK and stage(m) != "bench"
    }
    assert not unplaced, f"modules outside the stages {STAGES}: {sorted(unplaced)}"


def test_imports_point_down_the_stages():
    up = [
        f"{m} ({stage(m)}) imports {i} ({stage(i)})"
        for m, deps in library().items()
        if stage(m) in RANK
        for i in deps
        if stage(i) in RANK and RANK[stage(i)] > RANK[stage(m)]
    ]
    assert not up, "imports pointing up the stages:\n" + "\n".join(up)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of ``graph`` as a path ``[a, b, …, a]``, or None (depth-first, iterative)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in sorted(graph):
        if state.get(start):
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif nxt not in graph or state.get(nxt) == 2:
                continue
            elif state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            else:
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph[nxt])))
    return None


def test_find_cycle_finds_one_and_only_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle():
    graph = library()
    # a package's __init__ re-exporting its modules is not a cycle with them
    graph = {m: {i for i in deps if not m.startswith(i + ".")} for m, deps in graph.items()}
    graph = {m: {i for i in deps if not i.startswith(m + ".")} for m, deps in graph.items()}
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " → ".join(cycle)


def test_models_use_no_collectives():
    """models/ runs on one CPU: no torch.distributed, no torchrec.distributed."""
    offenders = {}
    for p in (PACKAGE / "models").rglob("*.py"):
        for node in ast.walk(ast.parse(p.read_text())):
            names = (
                [a.name for a in node.names] if isinstance(node, ast.Import)
                else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            )  # fmt: skip
            bad = [n for n in names if n.startswith(("torch.distributed", "torchrec.distributed"))]
            if bad:
                offenders[str(p.relative_to(ROOT))] = bad
    assert not offenders, offenders


@pytest.mark.parametrize("old,new", sorted(ALIASES.items()))
def test_old_paths_are_the_new_modules(old, new):
    assert importlib.import_module(old) is importlib.import_module(new)


def test_old_command_paths_run():
    """``python -m mtl_dist.score`` (an alias path) still runs the command."""
    proc = subprocess.run(
        [sys.executable, "-m", "mtl_dist.score", "--help"], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert "--model" in proc.stdout


def test_paths_computed_from_module_files_exist():
    """A module that finds the repository from its own file (``parents[N]``) must follow it
    when it moves a level down (the peers' config, the checkout put on PYTHONPATH)."""
    from mtl_dist.tools.bench import e2e

    assert Path(e2e.CONFIG).is_file(), e2e.CONFIG
    text = (PACKAGE / "tools" / "bench" / "peers.py").read_text()
    assert "Path(__file__).resolve().parents[3])  # the repository root" in text
    assert (Path(e2e.__file__).resolve().parents[3] / "pyproject.toml").is_file()
