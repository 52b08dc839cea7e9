"""The package's layers: imports only go down, no method imports another, no import hides in a function.

Layers, lowest first (docs/architecture.md, "Layers"):
    errors, config, io, runtime -> data -> models -> evaluation -> methods -> engine -> cli
A module may import its own layer and any layer below it. The checks read the source with `ast`,
so they see every import, including those under `if TYPE_CHECKING:`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "retain"
TESTS = Path(__file__).resolve().parent
LAYERS = [
    ("errors", "config", "config_compat", "io", "runtime", "__init__"),
    ("data",),
    ("models",),
    ("evaluation",),
    ("methods",),
    ("engine",),
    ("cli",),
]
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}
# methods/ modules that are not a method: the interface, the registry, the combinator, shared machinery.
METHOD_INFRASTRUCTURE = {"__init__", "base", "registry", "combine", "common"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> str:
    """'retain.methods.common.routing' -> 'methods'; 'retain' -> '__init__'."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def method_file_of(module: str) -> str | None:
    """The method a module belongs to ('retain.methods.ewc' -> 'ewc'), or None for non-method modules."""
    parts = module.split(".")
    if len(parts) > 2 and parts[1] == "methods" and parts[2] not in METHOD_INFRASTRUCTURE:
        return parts[2]
    return None


def is_module(dotted: str) -> bool:
    path = PACKAGE.parent / dotted.replace(".", "/")
    return path.with_suffix(".py").exists() or path.is_dir()


def retain_imports(tree: ast.AST, source: str) -> list[tuple[int, str, bool]]:
    """(line, imported module, inside a function) for every import of a retain module."""
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.ImportFrom):
                if child.level:
                    raise AssertionError(f"{source}:{child.lineno}: relative import; write retain.<...>")
                if child.module and (child.module == "retain" or child.module.startswith("retain.")):
                    for alias in child.names:
                        # `from retain.methods.common import pseudo` imports retain.methods.common.pseudo
                        candidate = f"{child.module}.{alias.name}"
                        target = candidate if is_module(candidate) else child.module
                        found.append((child.lineno, target, in_function))
            elif isinstance(child, ast.Import):
                for alias in child.names:
                    if alias.name == "retain" or alias.name.startswith("retain."):
                        found.append((child.lineno, alias.name, in_function))
            visit(child, nested)

    visit(tree, False)
    return found


def package_sources() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def import_problems(path: Path, text: str | None = None) -> list[str]:
    """What is wrong with the imports of one package module (empty when it follows the layers)."""
    text = path.read_text(encoding="utf-8") if text is None else text
    source = str(path.relative_to(PACKAGE.parent))
    module = module_name(path)
    layer = layer_of(module)
    problems = []
    for line, target, in_function in retain_imports(ast.parse(text), source):
        where = f"{source}:{line} imports {target}"
        target_layer = layer_of(target)
        if target_layer not in RANK:
            problems.append(f"{where}: unknown layer '{target_layer}' (add it to LAYERS and the docs)")
        elif RANK[target_layer] > RANK[layer]:
            problems.append(f"{where}: '{layer}' is below '{target_layer}'; imports only go down")
        importer, imported = method_file_of(module), method_file_of(target)
        if imported is not None and imported != importer and layer == "methods":
            problems.append(
                f"{where}: a method never imports another method; move the shared part to common/"
            )
        if in_function and layer != "cli":
            problems.append(f"{where} inside a function; import at the top (only cli.py imports late)")
    return problems


@pytest.mark.parametrize("path", package_sources(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_follow_the_layers(path):
    assert import_problems(path) == []


def test_the_check_catches_an_upward_import_a_method_import_and_a_late_import():
    loop = PACKAGE / "engine" / "loop.py"
    assert import_problems(PACKAGE / "data" / "streams.py", "from retain.engine.loop import make_plan\n")
    assert import_problems(
        PACKAGE / "evaluation" / "rank.py", "from retain.methods.base import MethodContext\n"
    )
    assert import_problems(PACKAGE / "methods" / "ilora.py", "from retain.methods.replay import Replay\n")
    assert import_problems(PACKAGE / "methods" / "common" / "routing.py", "from retain.methods import lcia\n")
    assert import_problems(loop, "def f():\n    from retain.data import streams\n")
    assert import_problems(loop, "from retain.methods.registry import create_method\n") == []


def test_every_package_has_a_layer():
    tops = {p.relative_to(PACKAGE).parts[0].removesuffix(".py") for p in package_sources()}
    assert tops <= set(RANK), f"modules outside the known layers: {sorted(tops - set(RANK))}"


def test_no_test_file_imports_another_test_file():
    offenders = []
    for path in TESTS.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            if any(n.split(".")[-1].startswith("test_") for n in names):
                offenders.append(f"{path.relative_to(TESTS)}:{node.lineno}")
    assert offenders == [], "shared test code belongs in tests/helpers.py"
