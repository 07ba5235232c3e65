"""The import graph: s2v_core needs no framework, and the arrows point s2v_core <- pipelines <- tune."""

import ast
import subprocess
import sys
from pathlib import Path

FORBIDDEN = {"ray", "deepspeed", "mlflow"}
CORE = Path(__file__).resolve().parents[1] / "s2v_core"


def test_s2v_core_source_never_imports_frameworks():
    offenders = []
    for path in CORE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in FORBIDDEN]
    assert offenders == []


def test_importing_every_core_module_loads_no_framework():
    modules = sorted(
        "s2v_core." + ".".join(p.relative_to(CORE).with_suffix("").parts)
        for p in CORE.rglob("*.py")
        if p.name != "__init__.py"
    )
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        f"print(sorted(k for k in sys.modules if k.split('.')[0] in {sorted(FORBIDDEN)!r}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# -- the arrows between the packages -------------------------------------------------------------
#
# s2v_core <- pipelines <- tune: a module imports from its own package or one below it; and an
# entry point (a module behind an `s2v` sub-command) does not import another entry point for its
# helpers: shared code lives in a library module. What is listed here is known and reasoned; a new
# arrow fails the test until it is removed or argued for here.

REPO = CORE.parent
LAYER = {"s2v_core": 0, "pipelines": 1, "tune": 2}
#: (importing module, imported module) -> why the arrow is allowed.
ALLOWED_UPWARD = {
    ("pipelines.demo", "tune.sweep"): "the demo runs every command in order, the sweep included",
}
ALLOWED_ENTRY_POINT_IMPORTS = {
    ("pipelines.demo", "*"): "the demo runs every command in order",
    ("pipelines.submit", "pipelines.cli"): "submit parses the job's command line with the CLI's own parser",
    ("pipelines.evaluate", "pipelines.embed"): "robustness re-embeds the store once per sensor subset "
    "with embed's actor pool (the embeddings format itself lives in s2v_core.embeddings)",
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth (function-level imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def _project_modules() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for package in LAYER for p in (REPO / package).rglob("*.py")}


def _owner(module: str, known: set[str]) -> str | None:
    """The project module ``module`` names (``pipelines.embed.embed`` -> ``pipelines.embed``)."""
    while module and module not in known:
        module = module.rpartition(".")[0]
    return module or None


def layering_violations(modules: dict[str, set[str]]) -> list[str]:
    from pipelines.cli import COMMANDS

    # A command whose options live in ``<module>_cli`` has both modules as its entry point.
    entry_points = {module for module, _ in COMMANDS.values()}
    entry_points |= {module.removesuffix("_cli") for module in entry_points}
    known = set(modules)
    problems = []
    for importer, imported in modules.items():
        for target in sorted({_owner(name, known) for name in imported} - {None, importer}):
            if LAYER[target.split(".")[0]] > LAYER[importer.split(".")[0]] and (importer, target) not in ALLOWED_UPWARD:
                problems.append(f"{importer} imports {target}: an arrow up the layers")
            if (
                importer in entry_points
                and target in entry_points
                and importer.removesuffix("_cli") != target.removesuffix("_cli")
                and not (
                    (importer, target) in ALLOWED_ENTRY_POINT_IMPORTS or (importer, "*") in ALLOWED_ENTRY_POINT_IMPORTS
                )
            ):
                problems.append(f"{importer} imports {target}: one entry point importing another")
    return problems


def test_imports_point_down_the_layers_and_not_between_entry_points():
    assert layering_violations(_project_modules()) == []


def test_the_layering_check_catches_a_reverse_import():
    modules = _project_modules()
    modules["s2v_core.model"] = modules["s2v_core.model"] | {"pipelines.runtime"}
    modules["pipelines.embed"] = modules["pipelines.embed"] | {"pipelines.pretrain.setup", "pipelines.finetune.setup"}
    assert sorted(layering_violations(modules)) == [
        "pipelines.embed imports pipelines.finetune: one entry point importing another",
        "pipelines.embed imports pipelines.pretrain: one entry point importing another",
        "s2v_core.model imports pipelines.runtime: an arrow up the layers",
    ]


def test_every_allowed_arrow_still_exists():
    modules = _project_modules()
    known = set(modules)
    for importer, target in [*ALLOWED_UPWARD, *ALLOWED_ENTRY_POINT_IMPORTS]:
        if target != "*":
            assert target in {_owner(name, known) for name in modules[importer]}, (importer, target)


def _core_cycles() -> list[list[str]]:
    """Import cycles among s2v_core modules (function-level imports included); a package's
    ``__init__`` re-exporting its own submodules is not counted."""
    modules = {m: found for m, found in _project_modules().items() if m.startswith("s2v_core")}
    known = set(modules)
    graph = {}
    for module, found in modules.items():
        targets = {_owner(name, known) for name in found} - {None, module}
        graph[module] = {t for t in targets if not module.startswith(t + ".")}
    cycles, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                cycles.append(path[path.index(target) :] + [target])
            elif target not in state:
                visit(target, [*path, target])
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    return cycles


def test_s2v_core_has_no_import_cycle():
    # store <- splits once ran both ways (a subset's splits.json), and store -> io.discovery for a
    # path helper; both arrows now go through small modules (store_subset, locations).
    assert _core_cycles() == []
