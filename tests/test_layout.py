"""The package's shape holds: imports run one way, never in a circle, and layers stay layers.

Read from the source with ``ast`` (imports inside functions count too), so a circle or a layer
broken by a lazy import fails here, before anything runs.
"""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import fd_celery

PACKAGE = pathlib.Path(fd_celery.__file__).parent

#: The outer layer: what builds apps and runs commands. It may import anything.
# (fd_celery.server.cli: the `fd-celery serve` command, which installs its app like the others)
OUTER = (
    "fd_celery",
    "fd_celery.app",
    "fd_celery.cli",
    "fd_celery.bench",
    "fd_celery.local_cluster",
    "fd_celery.server.cli",
)
#: Modules every other part may import, which import none but each other.
LEAVES = (
    "fd_celery.errors",
    "fd_celery.config",
    "fd_celery.settings",
    "fd_celery.keys",
    "fd_celery.protocol",
    "fd_celery.connection",
    "fd_celery.kv.table",
)  # (the store table is data: what FD_KV_STORE may name)


def _modules() -> dict[str, pathlib.Path]:
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        parts = ["fd_celery", *path.relative_to(PACKAGE).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        mods[".".join(parts)] = path
    return mods


def _graph() -> dict[str, set[str]]:
    """module -> the package modules it imports (a package's ``__init__`` is the package)."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        here = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = here.split(".")[: len(here.split(".")) - node.level + 1]
                    base = ".".join([*parts, base] if base else parts)
                names = [f"{base}.{a.name}" for a in node.names]
                # (``from fd_celery import keys`` imports the module keys; the root package, which
                # every import runs first anyway, counts only when a name of its own is taken)
                root_names = base == "fd_celery" and any(n not in mods for n in names)
                targets = [*([base] if base != "fd_celery" or root_names else []), *names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            for target in targets:
                while target and target not in mods:
                    target = target.rpartition(".")[0]
                if target and target != mod:
                    graph[mod].add(target)
    return graph


def _in(module: str, layer: tuple[str, ...]) -> bool:
    return any(module == name or module.startswith(name + ".") for name in layer if name != "fd_celery") or (
        "fd_celery" in layer and module == "fd_celery"
    )


def test_no_import_circles() -> None:
    graph = _graph()
    state: dict[str, int] = {}
    path: list[str] = []
    circles: list[list[str]] = []

    def visit(mod: str) -> None:
        state[mod] = 1
        path.append(mod)
        for dep in sorted(graph[mod]):
            if state.get(dep) == 1:
                circles.append(path[path.index(dep) :] + [dep])
            elif dep not in state:
                visit(dep)
        path.pop()
        state[mod] = 2

    for mod in sorted(graph):
        if mod not in state:
            visit(mod)
    assert circles == [], "import circles: " + "; ".join(" -> ".join(c) for c in circles)


def test_only_the_outer_layer_imports_install_and_commands() -> None:
    """``install()`` is the composition root: nothing inside the package imports it (nor the
    package root that re-exports it, nor the commands and benchmarks)."""
    wrong = sorted(
        f"{mod} imports {dep}"
        for mod, deps in _graph().items()
        if not _in(mod, OUTER)
        for dep in deps
        if _in(dep, OUTER)
    )
    assert wrong == []


def test_leaf_modules_import_only_leaves() -> None:
    wrong = sorted(
        f"{mod} imports {dep}"
        for mod, deps in _graph().items()
        if mod in LEAVES
        for dep in deps
        if dep not in LEAVES
    )
    assert wrong == []


def test_a_client_process_imports_no_torch() -> None:
    """A client app installs fd_celery and makes a Client: torch stays out of the process."""
    code = (
        "import sys\n"
        "from celery import Celery\n"
        "import fd_celery\n"
        "app = Celery('client', set_as_current=False)\n"
        "fd_celery.install(app, scheduler_port=1)\n"
        "fd_celery.Client(app)\n"
        "import fd_celery.kv, fd_celery.streams, fd_celery.scheduler.routing\n"
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip() == "[]"
