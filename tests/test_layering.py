"""The package's layers: every module imports only modules of its own layer or below, at the
top of the file, with no circles (docs: DESIGN.md, "Layout")."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "pimc_dist"

# Bottom (0) to top (4). A name ending in ".*" covers a package and everything in it.
LAYERS: dict[int, tuple[str, ...]] = {
    0: (
        "pimc_dist.config",
        "pimc_dist.files",
        "pimc_dist.progress",
        "pimc_dist.run_lock",
        "pimc_dist.indices",
        "pimc_dist.label_subset",
        "pimc_dist.recurrence",
        "pimc_dist.recurrence.*",
        "pimc_dist.pixel_selection",
        "pimc_dist.sources",
        "pimc_dist.sources.*",
    ),
    1: (
        "pimc_dist.samples",
        "pimc_dist.shardset",
        "pimc_dist.shardset.*",
        "pimc_dist.distributed",
        "pimc_dist.tracking",
        "pimc_dist.losses",
        "pimc_dist.augment",
        "pimc_dist.models",
        "pimc_dist.models.*",
    ),
    2: (
        "pimc_dist.checks",
        "pimc_dist.engine",
        "pimc_dist.encoders",
        "pimc_dist.shard_plan",
        "pimc_dist.shard",
    ),
    3: (
        "pimc_dist",  # the package's front door re-exports the library (load_encoder, ...)
        "pimc_dist.pretrain",
        "pimc_dist.planning",  # the cost model of a pretraining job, beside pretrain
        "pimc_dist.eval",
        "pimc_dist.eval.*",  # tasks, reading (splits from shard sets), finetune_config, ...
        "pimc_dist.viz",
    ),
    # Runners: `python -m pimc_dist.<job>` and the submission around them; nothing below
    # imports them.
    4: (
        "pimc_dist.jobs",
        "pimc_dist.launch",
        "pimc_dist.sweep",
        "pimc_dist.quickstart",
        "pimc_dist.diagnose",
        "pimc_dist.finetune",
        "pimc_dist.plan",
    ),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> int | None:
    best = None
    for layer, names in LAYERS.items():
        for name in names:
            exact = name == module
            inside = name.endswith(".*") and module.startswith(name[:-1])
            if exact or (inside and best is None):
                best = layer
            if exact:
                return layer
    return best


def imports_of(module: str, path: Path) -> list[tuple[str, int, bool]]:
    """(imported pimc_dist module, line, at the top of the file) for every import in `path`."""
    tree = ast.parse(path.read_text(), str(path))
    top = {id(node) for node in tree.body}
    is_package = path.name == "__init__.py"
    known = package_modules()
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                here = module.split(".") if is_package else module.split(".")[:-1]
                here = here[: len(here) - (node.level - 1)]
                base = ".".join([*here, *([node.module] if node.module else [])])
            # `from pimc_dist import shardset` imports the module pimc_dist.shardset
            names = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names
            ]
        else:
            continue
        for name in names:
            if name == "pimc_dist" or name.startswith("pimc_dist."):
                # a name inside a module (pimc_dist.config.load) counts as its module
                while name not in known and "." in name:
                    name = name.rsplit(".", 1)[0]
                found.append((name, node.lineno, id(node) in top))
    return found


def import_graph() -> dict[str, set[str]]:
    return {
        module: {name for name, _, _ in imports_of(module, path) if name != module}
        for module, path in package_modules().items()
    }


def test_every_module_has_a_layer():
    missing = [m for m in package_modules() if layer_of(m) is None]
    assert not missing, (
        f"modules with no layer: {missing}; add each to LAYERS in tests/test_layering.py "
        "(bottom 0: no project imports but config ... top 4: runners)"
    )


def test_no_module_imports_a_layer_above_its_own():
    upward = []
    for module, targets in import_graph().items():
        here = layer_of(module)
        for target in sorted(targets):
            there = layer_of(target)
            if here is not None and there is not None and there > here:
                upward.append(f"{module} (layer {here}) imports {target} (layer {there})")
    assert not upward, "upward imports:\n" + "\n".join(upward)


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            # A package's __init__ runs before its submodules: an import of a submodule
            # from the package's own __init__ is not a circle through the package.
            if nxt.startswith(node + "."):
                continue
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycles():
    cycle = _cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_imports_of_the_package_sit_at_the_top_of_each_file():
    local = [
        f"{module}:{line} imports {name} inside a function"
        for module, path in package_modules().items()
        for name, line, at_top in imports_of(module, path)
        if not at_top
    ]
    assert not local, (
        "function-local imports of pimc_dist modules (move them to the top of the file):\n"
        + "\n".join(local)
    )


@pytest.mark.parametrize(
    ("graph", "cycle"),
    [
        ({"a": {"b"}, "b": {"a"}}, ["a", "b", "a"]),
        ({"a": {"b"}, "b": {"c"}, "c": set()}, None),
        ({"p": {"p.x"}, "p.x": {"p"}}, None),
    ],
)
def test_the_cycle_finder_finds_cycles(graph, cycle):
    assert _cycle(graph) == cycle


def test_the_layer_map_names_a_new_module_as_unassigned():
    assert layer_of("pimc_dist.brand_new_runner") is None
    assert layer_of("pimc_dist.shardset.writer") == 1
    assert layer_of("pimc_dist.launch") == 4
