"""The package's layers, enforced (issue 10): imports point down only.

Computed from the source with ``ast`` (nothing is imported), so a cycle or
a wrong-way import fails here before it can hide behind a lazy import.
Imports under ``if TYPE_CHECKING:`` do not count: they never run (a pure
module may name ``WriteRecord`` in an annotation).
Every module must be listed in ``LAYERS``: a new module without a layer
fails :func:`test_every_module_has_a_layer`, which says where to add it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "pytest_uffd_guard"
NAME = "pytest_uffd_guard"

#: Layers from the bottom up.  A module may import its own layer and those
#: below it, except where the rules below say more.
LAYERS: dict[str, tuple[str, ...]] = {
    # vocabulary: nothing else of the package
    "vocabulary": ("errors", "names"),
    # Python faces of the kernel: no policy, no pytest
    "kernel": (
        "kernel",
        "kernel.backing",
        "kernel.capabilities",
        "kernel.capture",
        "kernel.handler",
        "kernel.asyncfd",
        "kernel.memory",
        "kernel.namer",
        "kernel.pagemap",
        "kernel.process",
        "kernel.records",
        "kernel.recordseq",
        "kernel.syscalls",
        "kernel.uffd",
        "_uffd",
    ),
    # tracking strategies; engines/__init__ is the registry above them
    "engines": (
        "engines.base",
        "engines.choice",
        "engines.pagediff",
        "engines.sync",
        "engines.async_",
        "engines.hybrid",
        "engines.diff",
    ),
    "registry": ("engines",),
    # the Python API
    "guard": (
        "guard",
        "guard_args",
        "guard_pool",
        "guard_mapping",
        "guard_results",
        "borrowed",
        "inplace",
        "armed",
    ),
    # pure: plain data in, plain data out
    "pure": ("frames", "stacks", "verdict", "findings", "harvest", "report"),
    # the command line doctor
    "doctor": ("doctor", "doctor_checks", "doctor_e2e", "__main__"),
    # the pytest plugin: the only modules that import pytest
    "plugin": (
        "plugin",
        "manager",
        "session",
        "marker",
        "settings",
        "hookspecs",
        "fixture",
        "state",
        "jsonfile",
        "watchplugin",
        "watchbook",
        "watched",
        "watchsettings",
    ),
    # the package's lazy front door
    "front": ("__init__",),
}
ORDER = list(LAYERS)
LAYER_OF = {module: layer for layer, modules in LAYERS.items() for module in modules}
PYTEST = ("pytest", "_pytest", "pluggy")
PURE = ("verdict", "findings", "harvest", "report", "frames", "stacks")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node of ``tree`` except those under ``if TYPE_CHECKING:``."""
    out: list[ast.AST] = []
    todo = [tree]
    while todo:
        node = todo.pop()
        out.append(node)
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and ast.unparse(child.test).endswith("TYPE_CHECKING"):
                todo.extend(child.orelse)
                continue
            todo.append(child)
    return out


def _imports(name: str, path: Path) -> set[str]:
    """Every module ``name`` imports (anywhere, lazily or not): package
    modules by their name inside the package, others by their top name."""
    is_package = path.name == "__init__.py"
    here = name.split(".") if is_package and name != "__init__" else name.split(".")[:-1]
    if name == "__init__":
        here = []
    found: set[str] = set()
    for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == NAME or alias.name.startswith(NAME + "."):
                    found.add(alias.name[len(NAME) + 1 :] or "__init__")
                else:
                    found.add("ext:" + alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                module = node.module or ""
                if module == NAME or module.startswith(NAME + "."):
                    base = module[len(NAME) + 1 :].split(".") if module != NAME else []
                else:
                    found.add("ext:" + module.split(".")[0])
                    continue
            else:
                base = here[: len(here) - (node.level - 1)] + (
                    node.module.split(".") if node.module else []
                )
            for alias in node.names:
                sub = ".".join([*base, alias.name])
                if sub in _MODULES:
                    found.add(sub)
                else:
                    found.add(".".join(base) or "__init__")
    found.discard(name)
    return found


_MODULES = _modules()
_MODULES["_uffd"] = PACKAGE / "_uffd"  # the C extension: a leaf
GRAPH = {name: _imports(name, path) for name, path in _MODULES.items() if path.is_file()}


def _package(graph_name: str) -> set[str]:
    return {m for m in GRAPH[graph_name] if not m.startswith("ext:")}


def test_every_module_has_a_layer() -> None:
    """issue 10: each module of the package sits in exactly one layer."""
    missing = sorted(set(GRAPH) - set(LAYER_OF))
    assert not missing, (
        f"modules without a layer: {missing}; add each to LAYERS in {__file__} "
        "(and to the picture in docs/how-it-works.md)"
    )


def test_no_cycles() -> None:
    """issue 10: no import cycle, lazy imports included (tracking.py and the
    *_tracker.py modules imported each other)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(name: str) -> None:
        state[name] = 1
        stack.append(name)
        for dep in sorted(_package(name)):
            if dep not in GRAPH:
                continue
            if state.get(dep) == 1:
                cycle = [*stack[stack.index(dep) :], dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[name] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name)


def test_imports_point_down() -> None:
    """issue 10: a module imports only its own layer and the layers below
    (the front door, __init__, may name anything lazily)."""
    wrong = []
    for name in sorted(GRAPH):
        if name not in LAYER_OF or LAYER_OF[name] == "front":
            continue
        level = ORDER.index(LAYER_OF[name])
        for dep in sorted(_package(name)):
            if dep in LAYER_OF and ORDER.index(LAYER_OF[dep]) > level:
                wrong.append(f"{name} ({LAYER_OF[name]}) imports {dep} ({LAYER_OF[dep]})")
    assert not wrong, "\n".join(wrong)


def test_only_the_plugin_layer_imports_pytest() -> None:
    """issue 10: pytest, _pytest and pluggy belong to the plugin layer."""
    wrong = sorted(
        f"{name} imports {dep[4:]}"
        for name, deps in GRAPH.items()
        for dep in deps
        if dep[4:] in PYTEST and LAYER_OF.get(name) != "plugin"
    )
    assert not wrong, "\n".join(wrong)


def test_nothing_imports_the_plugin_layer() -> None:
    """issue 10: only the plugin layer (and the pytest11 entry point) imports it."""
    wrong = sorted(
        f"{name} imports {dep}"
        for name in GRAPH
        for dep in _package(name)
        if LAYER_OF.get(dep) == "plugin" and LAYER_OF.get(name) != "plugin"
    )
    assert not wrong, "\n".join(wrong)
    pyproject = (PACKAGE.parent / "pyproject.toml").read_text()
    assert 'uffd_guard = "pytest_uffd_guard.plugin"' in pyproject


def test_kernel_knows_no_policy() -> None:
    """issue 10: kernel/ never imports the engines, guard, the verdict, the
    report or the plugin."""
    wrong = sorted(
        f"{name} imports {dep}"
        for name in GRAPH
        if LAYER_OF.get(name) == "kernel"
        for dep in _package(name)
        if LAYER_OF.get(dep) not in ("vocabulary", "kernel")
    )
    assert not wrong, "\n".join(wrong)


def test_engines_never_import_the_registry() -> None:
    """issue 10: engines/* never import engines/__init__ (which imports them)."""
    wrong = sorted(
        name for name in GRAPH if LAYER_OF.get(name) == "engines" and "engines" in _package(name)
    )
    assert not wrong, f"these engines import the registry: {wrong}"


def test_pure_modules_make_no_kernel_calls() -> None:
    """issue 10: the verdict, findings, harvest and report import no kernel/
    module and no _uffd (plain data in, plain data out)."""
    wrong = sorted(
        f"{name} imports {dep}"
        for name in PURE
        if name in GRAPH
        for dep in _package(name)
        if LAYER_OF.get(dep) not in ("vocabulary", "pure")
    )
    assert not wrong, "\n".join(wrong)


def test_vocabulary_imports_nothing_of_the_package() -> None:
    """issue 10: errors imports nothing of the package; names only errors."""
    assert _package("errors") == set()
    assert _package("names") <= {"errors"}


def test_fork_is_detected_in_one_place() -> None:
    """issue 10: one os.register_at_fork hook (kernel/process.py) resets the
    singletons; nothing else registers one or compares os.getpid()."""
    wrong = []
    for name, path in _MODULES.items():
        if not path.is_file() or name == "kernel.process":
            continue
        text = path.read_text()
        for needle in ("register_at_fork", "getpid()"):
            if needle in text:
                wrong.append(f"{name} uses {needle}")
    assert not wrong, "\n".join(wrong)
