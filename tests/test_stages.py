"""The folders are the stages, and imports keep them apart: serving (the worker) imports only
itself; build (once per checkpoint) and ops (beside a live server) never import each other; the
client imports neither; nothing outside lab/ imports lab; and no module takes part in an import
circle, counting imports inside functions."""

from __future__ import annotations

from pathlib import Path

import pytest
from imported import imported_modules

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "b4serve"
TOP_LEVEL = ("handler.py", "export_torchscript.py")

# What each stage may import of the package; anything else under b4serve is out of bounds.
ALLOWED: dict[str, set[str]] = {
    "serving": {"serving"},
    "build": {"build", "serving"},
    "ops": {"ops", "serving"},
    "client": {"client", "ops", "serving"},  # ops: the endpoints and the key file
    "lab": {"lab", "build", "ops", "client", "serving"},
    "handler": {"serving"},
    "export_torchscript": {"build", "serving"},
}


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def stage_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if parts[0] == "b4serve" and len(parts) > 1 else parts[0]


def package_imports(path: Path) -> set[str]:
    """Modules of b4serve that ``path`` imports, at top level or inside functions."""
    return {
        name for name in imported_modules(path) if name == "b4serve" or name.startswith("b4serve.")
    }


def sources() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py")) + [ROOT / name for name in TOP_LEVEL]


def graph(paths: list[Path], root: Path = ROOT) -> dict[str, set[str]]:
    modules = {module_name(path, root): path for path in paths}
    return {
        name: {target for target in package_imports(path) if target in modules and target != name}
        for name, path in modules.items()
    }


def crossings(paths: list[Path], root: Path = ROOT) -> list[str]:
    return sorted(
        f"{name} -> {target}"
        for name, targets in graph(paths, root).items()
        for target in targets
        if stage_of(target) not in ALLOWED.get(stage_of(name), set())
    )


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in edges.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_every_stage_imports_only_what_it_may() -> None:
    assert crossings(sources()) == []


def test_no_import_circle_in_the_package() -> None:
    assert circles(graph(sources())) == []


def test_every_package_folder_is_a_known_stage() -> None:
    folders = {path.name for path in PACKAGE.iterdir() if (path / "__init__.py").exists()}
    assert folders == {"serving", "build", "ops", "client", "lab"}


@pytest.mark.parametrize(
    ("where", "code", "expected"),
    [
        ("b4serve/ops/leaky.py", "from b4serve.lab.demo import x\n", "b4serve.lab.demo"),
        ("b4serve/build/leaky.py", "def f():\n    import b4serve.ops.keys\n", "b4serve.ops.keys"),
        ("handler.py", "from b4serve.build.models import create_model\n", "b4serve.build.models"),
    ],
)
def test_the_check_sees_a_crossing(tmp_path: Path, where: str, code: str, expected: str) -> None:
    for name in ("lab/demo.py", "ops/keys.py", "build/models.py"):
        (tmp_path / "b4serve" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "b4serve" / name).write_text("x = 1\n")
    leaky = tmp_path / where
    leaky.parent.mkdir(parents=True, exist_ok=True)
    leaky.write_text(code)
    found = crossings(sorted(set((tmp_path / "b4serve").rglob("*.py")) | {leaky}), tmp_path)
    assert len(found) == 1 and found[0].endswith(f"-> {expected}")


def test_the_check_sees_a_circle() -> None:
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert circles(edges) == [["a", "b", "c"]]
