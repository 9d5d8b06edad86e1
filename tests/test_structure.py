"""The package's import structure, read from the source with `ast` (nothing is imported): no import cycles, no
function-level import that would close one, no arrow up from the trainer's core to the tools or the command-line
dispatcher, and no module reaching into another's `_private` names."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "gist_scale"


@dataclass(frozen=True)
class Import:
    """One import statement's arrow from `source` to the gist_scale module `target`."""

    source: str
    target: str
    line: int
    in_function: bool
    private_names: tuple[str, ...]
    """`_private` names taken from `target` (`from target import _name`)."""


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING"
            or isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _walk(node: ast.AST, in_function: bool = False):
    """Every import node under `node` with whether it sits inside a function (run on call, not on import);
    `if TYPE_CHECKING:` blocks are skipped (never run)."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child):
            yield from _walk(ast.Module(body=child.orelse, type_ignores=[]), in_function)
            continue
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child, in_function
        yield from _walk(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                                   ast.Lambda)))


def _absolute(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
    base = package.split(".")[:len(package.split(".")) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(module: str) -> list[Import]:
    """The arrows from `module` to gist_scale modules, with the `_private` names each one takes."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"), filename=str(MODULES[module]))
    found: list[Import] = []
    aliases: dict[str, str] = {}  # local name -> gist_scale module it is bound to
    for node, in_function in _walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in MODULES and alias.name != module:
                    found.append(Import(module, alias.name, node.lineno, in_function, ()))
                    if alias.asname:
                        aliases[alias.asname] = alias.name
            continue
        base = _absolute(module, node)
        if base not in MODULES:
            continue
        private: list[str] = []
        for alias in node.names:
            submodule = f"{base}.{alias.name}"
            if submodule in MODULES:  # `from package import module`: the arrow goes to the module
                found.append(Import(module, submodule, node.lineno, in_function, ()))
                aliases[alias.asname or alias.name] = submodule
            elif _is_private(alias.name):
                private.append(alias.name)
        names = [alias.name for alias in node.names if f"{base}.{alias.name}" not in MODULES]
        if names and base != module:
            found.append(Import(module, base, node.lineno, in_function, tuple(private)))
    # `alias._name` on a gist_scale module bound by an import reaches into its private names too.
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                and _is_private(node.attr)):
            found.append(Import(module, aliases[node.value.id], node.lineno, False, (node.attr,)))
    return found


IMPORTS = [arrow for module in MODULES for arrow in imports_of(module)]


def cycles(arrows: list[Import]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each a set of modules in a cycle."""
    graph: dict[str, set[str]] = {module: set() for module in MODULES}
    for arrow in arrows:
        graph[arrow.source].add(arrow.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for target in sorted(graph[module]):
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return found


def _describe(component: list[str], arrows: list[Import]) -> str:
    inside = [f"{a.source} -> {a.target} (line {a.line}{', in a function' if a.in_function else ''})"
              for a in arrows if a.source in component and a.target in component]
    return "cycle among " + ", ".join(component) + ":\n    " + "\n    ".join(inside)


def test_the_checker_sees_the_package():
    assert {"gist_scale", "gist_scale.loss", "gist_scale.evaluation.cli", "gist_scale.tools.mine"} <= set(MODULES)
    arrows = {(a.source, a.target) for a in IMPORTS}
    # `from gist_scale import distributed` is an arrow to the module, not to the package.
    assert ("gist_scale.loss", "gist_scale.distributed") in arrows
    assert ("gist_scale.loss", "gist_scale") not in arrows
    assert ("gist_scale.evaluation.cli", "gist_scale.evaluation.mteb") in {
        (a.source, a.target) for a in IMPORTS if a.in_function}


def test_no_import_cycles_among_module_level_imports():
    module_level = [arrow for arrow in IMPORTS if not arrow.in_function]
    found = cycles(module_level)
    assert not found, "\n".join(_describe(component, module_level) for component in found)


def test_no_function_level_import_hides_a_cycle():
    """Function-level imports are for heavy optional dependencies (mteb, faiss, peft ...), not for breaking a cycle:
    counted as arrows too, the graph still has none."""
    found = cycles(IMPORTS)
    assert not found, "\n".join(_describe(component, IMPORTS) for component in found)


def test_no_upward_arrows():
    """The tools are built around the trainer, which never imports them; nothing imports the dispatcher."""
    upward = [f"{a.source} -> {a.target} (line {a.line})" for a in IMPORTS
              if (a.target.startswith("gist_scale.tools") and not a.source.startswith("gist_scale.tools"))
              or (a.target == "gist_scale.cli" and a.source != "gist_scale.__main__")]
    assert not upward, "upward arrows:\n  " + "\n  ".join(upward)


def test_no_module_imports_private_names_of_another():
    private = [f"{a.source} line {a.line}: {', '.join(a.private_names)} from {a.target}"
               for a in IMPORTS if a.private_names]
    assert not private, "private names imported from another module:\n  " + "\n  ".join(private)
