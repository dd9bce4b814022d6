"""The serving core stands alone: it imports neither TorchServe nor the operator's or the lab's
code, so the archive can carry it by itself and it runs under any server."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from imported import imported_modules

ROOT = Path(__file__).resolve().parents[2]
CORE = ROOT / "b4serve" / "serving"
# Outside the core: TorchServe, our operator and lab code, and export-time or client-only packages.
FORBIDDEN = ("ts", "b4serve.ops", "b4serve.lab", "geffnet", "requests", "psutil", "handler")


def is_forbidden(module: str) -> bool:
    return any(module == name or module.startswith(name + ".") for name in FORBIDDEN)


def test_core_sources_import_nothing_outside_the_core() -> None:
    found = {
        f"{path.name}: {module}"
        for path in sorted(CORE.glob("*.py"))
        for module in imported_modules(path)
        if is_forbidden(module)
        or (module.startswith("b4serve") and not module.startswith("b4serve.serving"))
    }
    assert not found


def test_importing_the_whole_core_loads_nothing_outside_it() -> None:
    modules = [f"b4serve.serving.{path.stem}" for path in sorted(CORE.glob("*.py"))]
    script = (
        "import importlib, sys\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        "print('\\n'.join(sorted(sys.modules)))\n"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    assert [m for m in loaded if is_forbidden(m)] == []
    assert "b4serve.serving.pipeline" in loaded  # the check saw the core itself


def test_the_boundary_check_sees_a_forbidden_import(tmp_path: Path) -> None:
    leaky = tmp_path / "leaky.py"
    leaky.write_text("def f():\n    from b4serve.ops.keys import KeyFile\n    import ts.context\n")
    assert {m for m in imported_modules(leaky) if is_forbidden(m)} == {
        "b4serve.ops.keys",
        "ts.context",
    }
