"""House rules on who may import whom, read from the source with ``ast`` (nothing is imported, except
where the ``_HOMES`` tables are resolved).

One import namespace over three folders (pyproject's ``package-dir``): ``medgemma_deploy/``,
``operators/`` (``medgemma_deploy.operators``) and ``apps/`` (``medgemma_deploy.apps``). Layers,
bottom to top: the base modules (value types, settings, errors; no heavy dependencies), the
operators (plain-Python cores; only their ``operator`` modules import MONAI Deploy / Holoscan), the
pipeline steps, the worker's engine core, the backends, the engine, the worker's gRPC edge, the
listener, search, the CLI, the developer tools and, on top, the apps.

Every import counts: module level, inside functions and under ``if TYPE_CHECKING:``. Imports of our
own modules are resolved to the module that runs: ``from medgemma_deploy.steps import X`` names the
module that ``steps._HOMES`` says defines ``X``. Each rule has a control: the same checker, run on a
tiny synthetic source, must flag the forbidden import.
"""

from __future__ import annotations

import ast
import importlib
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

from tests.support import REPO

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10: pytest depends on tomli there
    import tomli as tomllib

PKG = "medgemma_deploy"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
SETUPTOOLS = PYPROJECT["tool"]["setuptools"]
#: package → folder (relative to the repository root), as pyproject's ``package-dir`` maps them
PACKAGE_DIR: dict[str, str] = dict(SETUPTOOLS["package-dir"])
#: the three folders of the namespace: folder → the package it holds
FOLDERS: dict[str, str] = {folder: package for package, folder in PACKAGE_DIR.items()}
#: generated gRPC stubs: not scanned (a target only)
PROTO = f"{PKG}._proto"

HOLOSCAN = ("monai.deploy", "holoscan")
#: what the value types and the DICOM writers must never pull in (the gRPC helper packages count as gRPC)
HEAVY = ("torch", "transformers", "grpc", "grpc_health", "grpc_reflection", "google.protobuf", PROTO)
#: modules the base modules may import: each other, and the root package (``__version__``)
BASE = tuple(
    f"{PKG}.{name}"
    for name in (
        "errors",
        "exports",
        "precision",
        "domain",
        "settings",
        "triage",
        "results",
        "logs",
        "arrivals",
        "model_dir",
    )
)
#: the base modules the base rule is checked on (``model_dir`` is allowed as a target)
BASE_CHECKED = BASE[:-1]
#: services above the operators
ABOVE_OPERATORS = tuple(
    f"{PKG}.{name}" for name in ("worker", "listener", "backends", "engine", "cli", "dev", "search")
)
#: what the worker's engine core must not see
ABOVE_WORKER_ENGINE = tuple(
    f"{PKG}.{name}" for name in ("worker.edge", "backends", "engine", "listener", "cli")
)
APPS = f"{PKG}.apps"
#: the nodes of the package-level graph, most specific first; ``base`` is ``domain`` and its peers.
#: Any other module of ours is a node of its own (``worker.config``); so are the package ``__init__``s
#: in EXACT, which run whenever one of their submodules is imported.
EXACT = {PKG: "base", f"{PKG}.worker": "worker"}
CAPABILITIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("base", (*BASE, f"{PKG}.config")),
    ("operators", (f"{PKG}.operators",)),
    ("steps", (f"{PKG}.steps",)),
    ("worker.engine", (f"{PKG}.worker.engine",)),
    ("worker.edge", (f"{PKG}.worker.edge",)),
    ("backends", (f"{PKG}.backends",)),
    ("engine", (f"{PKG}.engine",)),
    ("listener", (f"{PKG}.listener",)),
    ("search", (f"{PKG}.search",)),
    ("cli", (f"{PKG}.cli",)),
    ("dev", (f"{PKG}.dev",)),
    ("apps", (APPS,)),
    ("_proto", (PROTO,)),
)


# --- reading the source --------------------------------------------------------------------------


def _within(name: str, prefixes: Iterable[str]) -> bool:
    """``name`` is one of ``prefixes`` or a submodule of one (``torch.nn`` is within ``torch``)."""
    return any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes)


def _ours(name: str) -> bool:
    return _within(name, (PKG,))


@dataclass(frozen=True)
class Module:
    name: str  # dotted, as imported
    rel: str  # the path shown in messages
    tree: ast.Module
    is_package: bool


@dataclass(frozen=True)
class Import:
    name: str  # our imports: the module that runs; others: as written (``from a import b`` → ``a.b``)
    line: int
    top_level: bool  # runs when the importing module is imported (not inside a function)


def _import_statements(tree: ast.AST) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Every import statement, with whether it runs at import time (class bodies and ``if`` blocks do)."""

    def visit(node: ast.AST, top_level: bool) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child, top_level
            nested = isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            yield from visit(child, top_level and not nested)

    yield from visit(tree, True)


def _homes_table(tree: ast.Module) -> dict[str, str] | None:
    """The literal ``_HOMES = {name: "relative.module"}`` of a package ``__init__``, if it has one."""
    for node in tree.body:
        target = node.target if isinstance(node, ast.AnnAssign) else None
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target = node.targets[0]
        if isinstance(target, ast.Name) and target.id == "_HOMES" and node.value is not None:
            table = ast.literal_eval(node.value)
            assert isinstance(table, dict), "_HOMES must be a literal dict"
            return table
    return None


class Tree:
    """Our modules, parsed, and the resolution of their imports."""

    def __init__(self, modules: Iterable[Module], known: Iterable[str] = ()) -> None:
        self.modules = {module.name: module for module in modules}
        #: every module name that exists, scanned or not (the generated stubs)
        self.known = set(self.modules) | set(known)
        self.homes = {
            name: table
            for name, module in self.modules.items()
            if module.is_package and (table := _homes_table(module.tree)) is not None
        }
        self._imports: dict[str, list[Import]] = {}

    def _absolute(self, module: Module, node: ast.ImportFrom) -> str:
        if not node.level:
            return node.module or ""
        package = module.name if module.is_package else module.name.rpartition(".")[0]
        parts = package.split(".")
        base = parts[: len(parts) - (node.level - 1)]
        return ".".join([*base, node.module] if node.module else base)

    def _resolve_from(self, source: str, name: str) -> str:
        if name == "*":
            return source
        if not _ours(source):
            return f"{source}.{name}"
        if f"{source}.{name}" in self.known:
            return f"{source}.{name}"
        home = self.homes.get(source, {}).get(name)
        return f"{source}.{home}" if home else source

    def imports(self, name: str) -> list[Import]:
        """What module ``name`` imports, at every level, ours resolved to the module that runs."""
        if name not in self._imports:
            module = self.modules[name]
            found = []
            for node, top_level in _import_statements(module.tree):
                if isinstance(node, ast.Import):
                    targets = [alias.name for alias in node.names]
                else:
                    source = self._absolute(module, node)
                    targets = [self._resolve_from(source, alias.name) for alias in node.names]
                found.extend(Import(target, node.lineno, top_level) for target in targets)
            self._imports[name] = found
        return self._imports[name]

    def executed(self, name: str) -> list[str]:
        """Our scanned modules that importing ``name`` runs: its packages' ``__init__``s and itself."""
        parts = name.split(".")
        chain = (".".join(parts[:i]) for i in range(1, len(parts) + 1))
        return [module for module in chain if module in self.modules]


def _module_name(path: Path) -> str:
    rel = path.relative_to(REPO)
    parts = [FOLDERS[rel.parts[0]], *rel.parts[1:-1]]
    if path.stem != "__init__":
        parts.append(path.stem)
    return ".".join(parts)


def _parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _namespace_files() -> list[Path]:
    """Every ``.py`` file under the three folders, the generated stubs included."""
    return sorted(
        p for folder in FOLDERS for p in (REPO / folder).rglob("*.py") if "__pycache__" not in p.parts
    )


def _other_files() -> list[Path]:
    """The repository's other Python (deploy/, scripts/…): no tests, no virtual environment, no builds."""
    skip = {*FOLDERS, "tests", "build", "dist"}
    files = list(REPO.glob("*.py"))
    for top in REPO.iterdir():
        if (
            top.is_dir()
            and top.name not in skip
            and not top.name.startswith(".")
            and top.suffix != ".egg-info"
        ):
            files.extend(p for p in top.rglob("*.py") if "__pycache__" not in p.parts)
    return sorted(files)


@cache
def _tree() -> Tree:
    modules = [
        Module(_module_name(path), str(path.relative_to(REPO)), _parse(path), path.name == "__init__.py")
        for path in _namespace_files()
        if "_proto" not in path.relative_to(REPO).parts
    ]
    others = [
        Module(
            str(path.relative_to(REPO).with_suffix("")).replace("/", "."),
            str(path.relative_to(REPO)),
            _parse(path),
            False,
        )
        for path in _other_files()
    ]
    return Tree([*modules, *others], known=(_module_name(path) for path in _namespace_files()))


def _synthetic(sources: Mapping[str, str]) -> Tree:
    """A tree from ``{module: source}``; a name ending in ``.__init__`` is that package's ``__init__``."""
    modules = []
    for name, source in sources.items():
        is_package = name.endswith(".__init__")
        dotted = name.removesuffix(".__init__")
        modules.append(Module(dotted, dotted, ast.parse(source), is_package))
    return Tree(modules)


def _params(names: Iterable[str]) -> list:
    tree = _tree()
    return [
        pytest.param(name, id=tree.modules[name].rel)
        for name in sorted(names, key=lambda n: tree.modules[n].rel)
    ]


def _ours_scanned() -> list[str]:
    return [name for name in _tree().modules if _ours(name)]


def _is_operator_module(rel: str) -> bool:
    """``operators/**/operator.py`` and ``operators/writers/*_operator.py``: MONAI Deploy's side."""
    path = Path(rel)
    if path.parts[0] != "operators":
        return False
    return path.name == "operator.py" or (
        path.parent == Path("operators/writers") and path.stem.endswith("_operator")
    )


def _forbidden(tree: Tree, module: str, targets: Sequence[str]) -> list[str]:
    """Imports of ``module`` (every level) within ``targets``."""
    return [
        f"{tree.modules[module].rel}:{imp.line} imports {imp.name}"
        for imp in tree.imports(module)
        if _within(imp.name, targets)
    ]


# --- MONAI Deploy / Holoscan only in the operator modules and the apps -------------------------


def _core_modules() -> list[str]:
    return [
        name
        for name in _ours_scanned()
        if not _within(name, (APPS,)) and not _is_operator_module(_tree().modules[name].rel)
    ]


def _operator_modules() -> list[str]:
    return [name for name in _ours_scanned() if _is_operator_module(_tree().modules[name].rel)]


@pytest.mark.parametrize("module", _params(_core_modules()))
def test_core_module_does_not_import_holoscan(module):
    offending = _forbidden(_tree(), module, HOLOSCAN)
    assert not offending, (
        f"{offending}; only the operator modules and apps/ may import MONAI Deploy / Holoscan"
    )


def test_the_check_sees_the_operator_modules():
    # Guards against the scan silently covering nothing (e.g. after a folder move).
    tree = _tree()
    operators = _operator_modules()
    rels = {tree.modules[name].rel for name in operators}
    assert {"operators/writers/seg_operator.py", "operators/writers/sr_operator.py"} <= rels, rels
    assert any(rel.endswith("/operator.py") for rel in rels), rels
    for name in operators:
        assert any(_within(imp.name, ("monai.deploy",)) for imp in tree.imports(name)), tree.modules[name].rel
    cores = {tree.modules[name].rel for name in _core_modules()}
    assert "operators/writers/seg.py" in cores and "medgemma_deploy/domain.py" in cores
    assert not cores & rels


def test_holoscan_check_flags_a_core_import():
    tree = _synthetic({f"{PKG}.operators.writers.seg": "def f():\n    from holoscan.core import Operator\n"})
    assert _forbidden(tree, f"{PKG}.operators.writers.seg", HOLOSCAN)
    assert not _forbidden(_synthetic({"m": "import holoscanner\n"}), "m", HOLOSCAN)


# --- rule 1: no torch / transformers / gRPC / protobuf under the value types and the writers -----


def heavy_imports(tree: Tree, module: str) -> list[str]:
    """Heavy imports of ``module`` (at any level) and of what it imports at module level, transitively.

    Function-level imports count for ``module`` itself only: they do not run when it is imported.
    """
    found = [f"{problem} (directly)" for problem in _forbidden(tree, module, HEAVY)]
    seen = {module}
    queue = [(module, (module,))]
    while queue:
        current, chain = queue.pop(0)
        for imp in tree.imports(current):
            if not imp.top_level:
                continue
            if current != module and _within(imp.name, HEAVY):
                found.append(
                    f"{tree.modules[current].rel}:{imp.line} imports {imp.name} (via {' -> '.join(chain)})"
                )
            for dep in tree.executed(imp.name):
                if dep not in seen:
                    seen.add(dep)
                    queue.append((dep, (*chain, dep)))
    return found


def _light_modules() -> list[str]:
    writers = f"{PKG}.operators.writers"
    return [
        name
        for name in _ours_scanned()
        if name == f"{PKG}.domain"
        or (_within(name, (writers,)) and not _is_operator_module(_tree().modules[name].rel))
    ]


@pytest.mark.parametrize("module", _params(_light_modules()))
def test_value_types_and_writers_stay_light(module):
    found = heavy_imports(_tree(), module)
    assert not found, "\n".join(found)


def test_heavy_check_follows_module_level_imports():
    tree = _synthetic(
        {
            f"{PKG}.domain": f"from {PKG}.operators.writers import helper\n",
            f"{PKG}.operators.writers.__init__": (
                f"_HOMES = {{'helper': 'common'}}\nfrom {PKG}.exports import x\n"
            ),
            f"{PKG}.operators.writers.common": "import numpy\nfrom google.protobuf import message\n",
            f"{PKG}.exports": "def f():\n    import torch\n",  # function level, not followed
        }
    )
    found = heavy_imports(tree, f"{PKG}.domain")
    assert len(found) == 1 and "google.protobuf" in found[0] and "common" in found[0], found
    assert heavy_imports(tree, f"{PKG}.exports")  # but direct function-level imports count
    assert heavy_imports(
        _synthetic({"m": "if TYPE_CHECKING:\n    from medgemma_deploy._proto import x\n"}), "m"
    )


# --- rule 1b: the base modules import none of our higher packages ------------------------------


def base_violations(tree: Tree, module: str) -> list[str]:
    return [
        f"{tree.modules[module].rel}:{imp.line} imports {imp.name}"
        for imp in tree.imports(module)
        if _ours(imp.name) and imp.name != PKG and not _within(imp.name, BASE)
    ]


@pytest.mark.parametrize("module", _params(BASE_CHECKED))
def test_base_module_imports_only_base(module):
    found = base_violations(_tree(), module)
    assert not found, found


def test_base_check_flags_a_higher_import():
    tree = _synthetic(
        {
            f"{PKG}.settings": f"from {PKG} import __version__\nfrom {PKG}.errors import E\n"
            f"def f():\n    from {PKG}.steps.classify import g\n"
        }
    )
    assert base_violations(tree, f"{PKG}.settings") == [f"{PKG}.settings:4 imports {PKG}.steps.classify"]


# --- rule 2: the operators import no service above them -----------------------------------------


@pytest.mark.parametrize("module", _params(n for n in _ours_scanned() if _within(n, (f"{PKG}.operators",))))
def test_operators_do_not_import_services(module):
    found = _forbidden(_tree(), module, ABOVE_OPERATORS)
    assert not found, found


def test_operators_check_flags_a_service_import():
    tree = _synthetic(
        {
            f"{PKG}.operators.medgemma.runner": (
                f"from {PKG} import engine\nfrom {PKG}.worker import WorkerServer\n"
            ),
            f"{PKG}.worker.__init__": "_HOMES = {'WorkerServer': 'edge.server'}\n",
            f"{PKG}.engine": "",
            f"{PKG}.engine_notes": "",
        }
    )
    found = _forbidden(tree, f"{PKG}.operators.medgemma.runner", ABOVE_OPERATORS)
    assert [f.rsplit(" ", 1)[1] for f in found] == [f"{PKG}.engine", f"{PKG}.worker.edge.server"], found
    assert not _forbidden(_synthetic({"m": f"import {PKG}.engine_notes\n"}), "m", ABOVE_OPERATORS)


# --- rule 3: only the apps import the apps ----------------------------------------------------


@pytest.mark.parametrize("module", _params(n for n in _tree().modules if not _within(n, (APPS,))))
def test_nothing_outside_apps_imports_apps(module):
    found = _forbidden(_tree(), module, (APPS,))
    assert not found, found


def test_apps_check_flags_an_apps_import():
    tree = _synthetic(
        {f"{PKG}.cli.main": f"from {PKG}.apps.classify import app\n", f"{PKG}.apps.classify.app": ""}
    )
    assert _forbidden(tree, f"{PKG}.cli.main", (APPS,))


# --- rule 4: the worker's engine core sees no edge, backend, engine, listener or CLI ------------


@pytest.mark.parametrize(
    "module", _params(n for n in _ours_scanned() if _within(n, (f"{PKG}.worker.engine",)))
)
def test_worker_engine_does_not_import_upwards(module):
    found = _forbidden(_tree(), module, ABOVE_WORKER_ENGINE)
    assert not found, found


def test_worker_engine_check_flags_an_edge_import():
    tree = _synthetic(
        {f"{PKG}.worker.engine.batcher": f"if TYPE_CHECKING:\n    from {PKG}.worker.edge.metrics import M\n"}
    )
    assert _forbidden(tree, f"{PKG}.worker.engine.batcher", ABOVE_WORKER_ENGINE)
    assert not _forbidden(
        _synthetic({"m": f"from {PKG}.worker.engine import errors\n"}), "m", ABOVE_WORKER_ENGINE
    )


# --- rule 5: the package list in pyproject is the package folders -----------------------------


def _folder_of(package: str, package_dir: Mapping[str, str]) -> Path:
    """The folder that holds ``package`` under ``package_dir`` (longest mapped prefix wins)."""
    base = max((p for p in package_dir if _within(package, (p,))), key=len)
    rest = package.removeprefix(base).lstrip(".")
    return Path(package_dir[base], *rest.split(".")) if rest else Path(package_dir[base])


def _package_of(folder: Path, package_dir: Mapping[str, str]) -> str:
    top = {f: p for p, f in package_dir.items()}[folder.parts[0]]
    return ".".join([top, *folder.parts[1:]])


def folder_problems(
    root: Path, folder: Path, listed: Iterable[str], package_dir: Mapping[str, str]
) -> list[str]:
    """A folder of the namespace holding Python must be a package, and listed in pyproject."""
    problems = []
    if not (root / folder / "__init__.py").is_file():
        problems.append(f"{folder} holds .py files but no __init__.py")
    if _package_of(folder, package_dir) not in set(listed):
        problems.append(f"{folder} ({_package_of(folder, package_dir)}) is not in pyproject's packages")
    return problems


def package_problems(root: Path, package: str, package_dir: Mapping[str, str]) -> list[str]:
    folder = _folder_of(package, package_dir)
    return [] if (root / folder / "__init__.py").is_file() else [f"{package}: no {folder}/__init__.py"]


def _package_folders(root: Path, package_dir: Mapping[str, str]) -> list[Path]:
    folders = {
        path.parent.relative_to(root)
        for top in package_dir.values()
        for path in (root / top).rglob("*.py")
        if "__pycache__" not in path.parts
    }
    return sorted(folders)


@pytest.mark.parametrize("folder", _package_folders(REPO, PACKAGE_DIR), ids=str)
def test_package_folder_is_listed(folder):
    problems = folder_problems(REPO, folder, SETUPTOOLS["packages"], PACKAGE_DIR)
    assert not problems, problems


@pytest.mark.parametrize("package", SETUPTOOLS["packages"], ids=lambda p: str(_folder_of(p, PACKAGE_DIR)))
def test_listed_package_exists(package):
    problems = package_problems(REPO, package, PACKAGE_DIR)
    assert not problems, problems


def test_package_checks_flag_a_missing_package(tmp_path):
    package_dir = {"pkg": "src", "pkg.ops": "ops"}
    for rel in ("src/__init__.py", "src/loose/mod.py", "ops/__init__.py", "ops/extra/__init__.py"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("")
    listed = ["pkg", "pkg.ops", "pkg.gone"]
    problems = {
        str(folder): folder_problems(tmp_path, folder, listed, package_dir)
        for folder in _package_folders(tmp_path, package_dir)
    }
    assert problems["src"] == [] and problems["ops"] == []
    assert len(problems["src/loose"]) == 2  # no __init__.py, not listed
    assert problems["ops/extra"] == ["ops/extra (pkg.ops.extra) is not in pyproject's packages"]
    assert package_problems(tmp_path, "pkg.gone", package_dir) == ["pkg.gone: no src/gone/__init__.py"]
    assert not package_problems(tmp_path, "pkg.ops", package_dir)


# --- rule 6: public names are defined where they are said to live -----------------------------


def _defined_names(tree: ast.Module) -> set[str]:
    """Names a module binds at top level by def, class or assignment (also inside if/try/with)."""
    names: set[str] = set()

    def bind(target: ast.AST) -> None:
        if isinstance(target, ast.Name):
            names.add(target.id)
        elif isinstance(target, (ast.Tuple, ast.List)):
            for element in target.elts:
                bind(element)
        elif isinstance(target, ast.Starred):
            bind(target.value)

    def visit(body: Iterable[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Assign):
                for target in node.targets:
                    bind(target)
            elif isinstance(node, ast.AnnAssign) and node.value is not None:
                bind(node.target)
            elif isinstance(node, (ast.If, ast.Try, ast.With)):
                for block in ("body", "orelse", "finalbody"):
                    visit(getattr(node, block, []))
                for handler in getattr(node, "handlers", []):
                    visit(handler.body)

    visit(tree.body)
    return names


def _all_names(tree: ast.Module) -> list[str] | None:
    """The literal ``__all__`` (``=``, ``: list[str] =``, ``+=``), or None if the module has none."""
    names: list[str] | None = None
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets
        ):
            names = list(ast.literal_eval(node.value))
        elif (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and node.target.id == "__all__"
        ):
            names = list(ast.literal_eval(node.value)) if node.value is not None else []
        elif (
            isinstance(node, ast.AugAssign)
            and isinstance(node.target, ast.Name)
            and node.target.id == "__all__"
        ):
            names = [*(names or []), *ast.literal_eval(node.value)]
    return names


def reexports(tree: ast.Module, rel: str) -> list[str]:
    """Names in ``__all__`` that the module does not define itself."""
    defined = _defined_names(tree)
    return [
        f"{rel}: {name!r} is in __all__ but not defined here"
        for name in _all_names(tree) or []
        if name not in defined
    ]


def home_problems(tree: Tree, package: str) -> list[str]:
    """Each ``_HOMES`` name must be defined (not imported) in the module the table names."""
    problems = []
    for name, home in tree.homes[package].items():
        module = tree.modules.get(f"{package}.{home}")
        if f"{package}.{name}" in tree.known:
            problems.append(f"{package}: {name!r} is also a submodule, which replaces it once imported")
        if module is None:
            problems.append(f"{package}: {name!r} → {home}: no such module")
        elif name not in _defined_names(module.tree):
            problems.append(f"{package}: {name!r} is not defined in {module.rel}")
    return problems


def resolution_problems(package: str, homes: Mapping[str, str], missing: set[str] | None = None) -> list[str]:
    """Each name must resolve by importing the package (its ``__getattr__``) and its home.

    A third-party module that is not installed (an optional extra) goes into ``missing``, not the problems.
    """
    problems = []
    imported = importlib.import_module(package)
    for name, home in homes.items():
        try:
            value = getattr(imported, name)
        except ModuleNotFoundError as error:
            if missing is None or error.name is None or _ours(error.name):
                problems.append(f"{package}.{name}: {type(error).__name__}: {error}")
            else:
                missing.add(error.name)
            continue
        except Exception as error:  # any failure to resolve is the finding
            problems.append(f"{package}.{name}: {type(error).__name__}: {error}")
            continue
        if value is not getattr(importlib.import_module(f"{package}.{home}"), name):
            problems.append(f"{package}.{name} is not {package}.{home}.{name}")
    return problems


@pytest.mark.parametrize(
    "module",
    _params(
        n
        for n in _ours_scanned()
        if not _tree().modules[n].is_package and _all_names(_tree().modules[n].tree) is not None
    ),
)
def test_all_lists_only_own_definitions(module):
    found = reexports(_tree().modules[module].tree, _tree().modules[module].rel)
    assert not found, found


@pytest.mark.filterwarnings("ignore:Current stack size:RuntimeWarning")  # holoscan, on import
@pytest.mark.parametrize("package", _params(_tree().homes))
def test_homes_name_the_defining_module(package):
    missing: set[str] = set()
    problems = home_problems(_tree(), package) + resolution_problems(package, _tree().homes[package], missing)
    assert not problems, "\n".join(problems)
    if missing:
        pytest.skip(f"names not resolved: {sorted(missing)} not installed")


def test_export_checks_flag_a_reexport():
    source = (
        "from a import borrowed\n__all__ = ['borrowed', 'own', 'CONST']\nclass own: ...\nCONST: int = 1\n"
    )
    assert reexports(ast.parse(source), "m") == ["m: 'borrowed' is in __all__ but not defined here"]
    tree = _synthetic(
        {
            "pkg.__init__": "_HOMES = {'Thing': 'home', 'Other': 'home', 'Ghost': 'nowhere'}\n",
            "pkg.home": (
                "from pkg.elsewhere import Thing\ntry:\n    Other = 1\nexcept ImportError:\n    pass\n"
            ),
            "pkg.Other": "",
        }
    )
    assert home_problems(tree, "pkg") == [
        "pkg: 'Thing' is not defined in pkg.home",
        "pkg: 'Other' is also a submodule, which replaces it once imported",
        "pkg: 'Ghost' → nowhere: no such module",
    ]
    assert resolution_problems(f"{PKG}.worker", {"NoSuchName": "config"})
    missing: set[str] = set()
    assert resolution_problems("json", {"no_such_name": "decoder"}, missing) and not missing


# --- rule 7: no *_run.py entry modules --------------------------------------------------------


def run_modules(paths: Iterable[Path]) -> list[str]:
    return [str(path) for path in paths if path.name.endswith("_run.py")]


def test_no_run_modules():
    found = run_modules(path.relative_to(REPO) for path in _namespace_files())
    assert not found, f"{found}: entry points live in apps/ or medgemma_deploy/cli/"


def test_run_check_flags_a_run_module():
    assert run_modules([Path("medgemma_deploy/classify_run.py"), Path("apps/runner.py")]) == [
        "medgemma_deploy/classify_run.py"
    ]


# --- no cycle between the capability packages -------------------------------------------------


def capability(module: str) -> str:
    """The graph node of one of our modules: the most specific capability that holds it.

    The MONAI Deploy operator modules are a node of their own, above the steps they call: the cores
    beside them in ``operators/`` sit below the steps, and a core importing a step is a cycle.
    """
    if module in EXACT:
        return EXACT[module]
    if _within(module, (f"{PKG}.operators",)) and module.rsplit(".", 1)[-1].endswith("operator"):
        return "operators.adapters"
    for node, prefixes in CAPABILITIES:
        if _within(module, prefixes):
            return node
    return module.removeprefix(f"{PKG}.")


def capability_graph(tree: Tree) -> dict[tuple[str, str], list[str]]:
    """Edges between capabilities, each with the imports that make it (every level counts)."""
    edges: dict[tuple[str, str], list[str]] = {}
    for module in tree.modules:
        if not _ours(module):
            continue
        for imp in tree.imports(module):
            if not _ours(imp.name):
                continue
            witness = f"{tree.modules[module].rel}:{imp.line} imports {imp.name}"
            for target in {capability(t) for t in tree.executed(imp.name) or [imp.name]}:
                if target != capability(module):
                    witnesses = edges.setdefault((capability(module), target), [])
                    if witness not in witnesses:
                        witnesses.append(witness)
    return edges


def cycles(edges: Iterable[tuple[str, str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan)."""
    graph: dict[str, list[str]] = {}
    for a, b in edges:
        graph.setdefault(a, []).append(b)
        graph.setdefault(b, [])
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph[node]:
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return found


def _describe(edges: Mapping[tuple[str, str], list[str]], component: Sequence[str]) -> str:
    lines = [f"cycle between {', '.join(component)}:"]
    for (a, b), witnesses in sorted(edges.items()):
        if a in component and b in component:
            lines.append(f"  {a} -> {b}: {'; '.join(witnesses[:3])}{' …' if len(witnesses) > 3 else ''}")
    return "\n".join(lines)


def test_capability_packages_have_no_cycle():
    edges = capability_graph(_tree())
    # the scan sees the graph: the steps call the cores, the apps wire the operator adapters
    assert ("steps", "operators") in edges and ("apps", "operators.adapters") in edges
    assert ("operators.adapters", "steps") in edges and ("operators", "steps") not in edges
    found = cycles(edges)
    assert not found, "\n".join(_describe(edges, component) for component in found)


def test_cycle_check_flags_a_cycle():
    tree = _synthetic(
        {
            f"{PKG}.steps.__init__": "",
            f"{PKG}.steps.classify": f"from {PKG}.backends import make_backend\n",
            f"{PKG}.backends.__init__": "_HOMES = {'make_backend': 'local'}\n",
            f"{PKG}.backends.local": f"def f():\n    from {PKG}.steps import classify\n",
            f"{PKG}.worker.engine.batcher": f"from {PKG}.worker.config import C\n",
            f"{PKG}.worker.config": f"from {PKG}.domain import D\n",
            f"{PKG}.domain": "",
        }
    )
    edges = capability_graph(tree)
    assert edges[("steps", "backends")] == [f"{PKG}.steps.classify:1 imports {PKG}.backends.local"]
    assert cycles(edges) == [["backends", "steps"]]
    assert cycles([("a", "b"), ("b", "c")]) == []
    assert capability(f"{PKG}.worker.engine.batcher") == "worker.engine"
    assert capability(f"{PKG}.operators.medsiglip.operator") == "operators.adapters"
    assert capability(f"{PKG}.operators.writers.seg_operator") == "operators.adapters"
    assert capability(f"{PKG}.operators.writers.seg") == "operators"
    assert capability(f"{PKG}.errors") == "base" and capability(f"{PKG}.worker.config") == "worker.config"
