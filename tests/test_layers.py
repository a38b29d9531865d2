"""The package layers, read from the source with ``ast``: what each DVC stage's code really
imports (its ``deps`` must cover it), no upward imports, no import circles."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
FIRST_PARTY = ("bbam", "tasks", "flows", "bench")
# Only checks a params file (every config class fans in here); results never depend on it.
CHECK_ONLY = "flows.params_schema"


def module_file(name: str) -> Path | None:
    base = ROOT.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def with_packages(name: str) -> list[str]:
    """``a.b.c`` -> [``a``, ``a.b``, ``a.b.c``]: importing a module runs its packages too."""
    parts = name.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def imports_of(name: str) -> set[str]:
    """First-party modules ``name`` imports (top level and function-local alike)."""
    path = module_file(name)
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # `from pkg import module` imports the module; `from module import name` does not
            targets = [
                f"{base}.{a.name}" if module_file(f"{base}.{a.name}") else base for a in node.names
            ]
        else:
            continue
        for target in targets:
            if target.split(".")[0] in FIRST_PARTY:
                found.update(m for m in with_packages(target) if module_file(m))
    found.discard(name)
    return found


def closure(start: str, skip: tuple[str, ...] = (CHECK_ONLY,)) -> set[str]:
    seen: set[str] = set()
    todo = [m for m in with_packages(start) if module_file(m)]
    while todo:
        name = todo.pop()
        if name in seen or name in skip:
            continue
        seen.add(name)
        todo.extend(imports_of(name))
    return seen


def all_modules(*packages: str) -> list[str]:
    names = []
    for package in packages:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
            names.append(".".join(parts))
    return names


def stages() -> dict[str, dict]:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def covered(path: Path, deps: list[str]) -> bool:
    rel = path.relative_to(ROOT)
    return any(rel == Path(d) or Path(d) in rel.parents for d in deps)


@pytest.mark.parametrize("stage", sorted(stages()))
def test_dvc_deps_cover_stage_imports(stage):
    spec = stages()[stage]
    command = re.search(r"python -m ([\w.]+)", spec["cmd"])
    assert command, f"{stage}: cmd {spec['cmd']!r} does not run a module"
    deps = [d if isinstance(d, str) else next(iter(d)) for d in spec.get("deps", [])]
    reached = sorted(str(module_file(m).relative_to(ROOT)) for m in closure(command.group(1)))
    missing = [f for f in reached if not covered(ROOT / f, deps)]
    assert not missing, f"dvc.yaml stage {stage!r}: deps do not cover {missing}"


def test_lower_layers_never_import_upward():
    layers = {"bbam": (), "tasks": ("bbam",), "flows": ("bbam", "tasks")}
    wrong = []
    for layer, allowed in layers.items():
        for name in all_modules(layer):
            for target in imports_of(name):
                top = target.split(".")[0]
                if top != layer and top not in allowed:
                    wrong.append(f"{name} -> {target}")
    assert not wrong, wrong


def test_bbam_imports_no_orchestration():
    pattern = re.compile(r"^\s*(from|import)\s+(prefect|dvc|flows|tasks)\b", re.M)
    hits = [
        str(p.relative_to(ROOT))
        for p in (ROOT / "bbam").rglob("*.py")
        if pattern.search(p.read_text())
    ]
    assert not hits, hits


def test_no_import_circle():
    names = all_modules(*FIRST_PARTY)
    graph = {n: {m for m in imports_of(n) if m in names} for n in names}
    # a package's __init__ is entered by every import below it: drop those edges
    graph = {n: {m for m in ms if not n.startswith(m + ".")} for n, ms in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt) :] + [nxt]
                raise AssertionError("import circle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for name in names:
        if name not in state:
            visit(name)
