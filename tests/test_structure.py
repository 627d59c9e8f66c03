"""The package's shape, kept by a test: no import circle (function-level imports included), short modules, and no
code outside an extension point asking which objective or which source it is dealing with."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "hf_bomerge"


def modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The hf_bomerge modules `name` imports anywhere (module level or in a function; not under TYPE_CHECKING)."""
    tree = ast.parse(path.read_text())
    skipped = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
               for n in ast.walk(node)}
    here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped or not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            base = ".".join(here[: len(here) - node.level + 1] + ([node.module] if node.module else [])) \
                if node.level else node.module or ""
            targets = [f"{base}.{a.name}" for a in node.names]
        for target in targets:
            while target not in known and "." in target:
                target = target.rsplit(".", 1)[0]
            if target in known and target != name:
                found.add(target)
    return found


def test_no_import_circle_even_through_function_level_imports():
    mods = modules()
    graph = {name: imports(name, path, set(mods)) for name, path in mods.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                raise AssertionError("import circle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for name in graph:
        if name not in state:
            visit(name)


def test_no_module_is_longer_than_400_lines():
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > 400}
    assert not long, f"split these modules: {long}"


def test_only_the_objectives_know_the_objectives_names_and_only_the_sources_their_kinds():
    name_checks = re.compile(r"""objective\s*[!=]=\s*["']loss["']|["']loss["']\s*[!=]=\s*\w*objective""")
    kind_checks = re.compile(r"""\.kind\s*[!=]=|source_kind\s*[!=]=|isinstance\([^)]*(Hub|Folder|Git)Source""")
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).as_posix()
        text = path.read_text()
        if not rel.startswith("objectives/") and name_checks.search(text):
            offenders.append(f"{rel}: compares an objective's name")
        if not rel.startswith("sources/") and kind_checks.search(text):
            offenders.append(f"{rel}: asks which kind of source")
    assert not offenders, offenders


def test_every_function_level_import_of_the_package_says_why():
    """An hf_bomerge import inside a function (not under TYPE_CHECKING) is there only to keep something light
    (--help, a fixed merge without Optuna, a light module without torch); its line says which."""
    bare = []
    for path in modules().values():
        text = path.read_text()
        lines = text.splitlines()
        tree = ast.parse(text)
        skipped = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                   and "TYPE_CHECKING" in ast.unparse(node.test) for n in ast.walk(node)}
        in_function = {id(n) for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                       for n in ast.walk(node) if n is not node}
        for node in ast.walk(tree):
            if id(node) in skipped or id(node) not in in_function or not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            own = node.level > 0 or (node.module or "").split(".")[0] == "hf_bomerge" if isinstance(node, ast.ImportFrom) \
                else any(a.name.split(".")[0] == "hf_bomerge" for a in node.names)
            if own and "#" not in lines[node.lineno - 1]:
                bare.append(f"{path.relative_to(PACKAGE).as_posix()}:{node.lineno}: {lines[node.lineno - 1].strip()}")
    assert not bare, "function-level imports without a comment saying why (hoist them or comment them):\n" + "\n".join(bare)
