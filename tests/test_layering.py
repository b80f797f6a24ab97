"""House rule: only ``*_operator.py`` files and ``apps/`` may import MONAI Deploy or Holoscan.

The cores must stay usable (and testable) without the Holoscan runtime, by PACS vendors who only
want the Python API and by the gRPC worker.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = ("monai.deploy", "holoscan")


def _core_modules():
    for folder in ("operators", "medgemma_deploy"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path.name.endswith("_operator.py") or "_proto" in path.parts:
                continue
            yield path


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
    return names


@pytest.mark.parametrize("path", list(_core_modules()), ids=lambda p: str(p.relative_to(ROOT)))
def test_core_module_does_not_import_holoscan(path):
    offending = [name for name in _imports(path) if name.startswith(FORBIDDEN)]
    assert not offending, f"{path.relative_to(ROOT)} imports {offending}; move that into an *_operator.py"


def test_the_check_sees_the_operator_modules():
    # Guards against the scan silently covering nothing (e.g. after a folder move).
    operators = [p for p in (ROOT / "operators").glob("*_operator.py")]
    assert operators, "no *_operator.py found"
    assert any(name.startswith("monai.deploy") for p in operators for name in _imports(p))
