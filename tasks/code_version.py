"""Code versions: a hash of the code a task runs that moves when what it does changes, and only then.

A task's version hashes the normalised syntax tree (``ast.dump`` with docstrings and other bare string statements
dropped; comments and layout never reach the tree) of (a) its own function in the wrapper module, decorators
left out, with the module-level helpers it names there, and (b) every ``slimflow.tasks`` / ``slimflow.storage``
module those import, transitively (imports inside functions included, and the packages' ``__init__`` they run).
A comment, a docstring, a reformat, or an edit of a module the task never imports leaves the version as it is; a
change to any code the task runs moves it, with nothing to bump by hand (issue 13).

Modules are named by their dotted names, never their paths, so a checkout in another folder hashes the same. The
tree's shape is Python's own (``ast.dump``), so another Python minor version can give other versions: a rerun
under it recomputes.
"""

from __future__ import annotations

import ast
import copy
import functools
import hashlib
import inspect
import threading
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import slimflow.storage

# The packages whose modules are part of a task's code: dotted prefix -> its folder.
PACKAGES: Mapping[str, Path] = {"slimflow.tasks": Path(__file__).resolve().parent,
                                "slimflow.storage": Path(slimflow.storage.__file__).resolve().parent}


def _is_string_statement(node: ast.stmt) -> bool:
    return isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)


class _DropStrings(ast.NodeTransformer):
    """Docstrings, and any other bare string statement (a no-op), removed from every body (a body left empty is
    not valid Python, but the tree is only dumped, never compiled)."""

    def generic_visit(self, node: ast.AST) -> ast.AST:
        super().generic_visit(node)
        body = getattr(node, "body", None)
        if isinstance(body, list):
            node.body = [s for s in body if not (isinstance(s, ast.stmt) and _is_string_statement(s))]
        return node


def normalised(tree: ast.AST) -> str:
    """``tree`` without its docstrings, dumped without positions: equal for sources that differ only in comments,
    docstrings or layout."""
    return ast.dump(_DropStrings().visit(tree))


@functools.cache
def _parse(path: Path, stamp: tuple[int, int]) -> ast.Module:  # stamp: (mtime_ns, size), so an edit re-reads
    return ast.parse(path.read_bytes(), filename=str(path))


@functools.cache
def _dump(path: Path, stamp: tuple[int, int]) -> str:
    return normalised(ast.parse(path.read_bytes(), filename=str(path)))


def _stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_mtime_ns, st.st_size


def _tree(path: Path) -> ast.Module:
    """The parsed module (shared: never modify it)."""
    return _parse(path, _stamp(path))


def module_file(name: str, packages: Mapping[str, Path] = PACKAGES) -> Path | None:
    """``slimflow.tasks.a.b`` -> tasks/a/b.py (or tasks/a/b/__init__.py); None outside ``packages`` or for a name
    that is not a module (a function imported from one)."""
    for prefix, folder in packages.items():
        if name == prefix or name.startswith(prefix + "."):
            base = folder.joinpath(*name[len(prefix):].split(".")[1:])
            for path in (base.with_suffix(".py") if base != folder else None, base / "__init__.py"):
                if path is not None and path.is_file():
                    return path
    return None


def _parents(name: str, packages: Mapping[str, Path]) -> list[str]:
    """The packages importing ``name`` runs first (their ``__init__``), within ``packages``."""
    parts = name.split(".")
    return [p for i in range(1, len(parts)) if module_file(p := ".".join(parts[:i]), packages) is not None]


def _imports(nodes: Iterable[ast.AST], module: str, packages: Mapping[str, Path]) -> set[str]:
    """The modules within ``packages`` that the import statements anywhere in ``nodes`` load."""
    found: set[str] = set()
    for top in nodes:
        for node in ast.walk(top):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the importing module's package
                    pkg = module.split(".")[: -node.level]
                    base = ".".join(pkg + ([base] if base else []))
                # `from slimflow.tasks import fastseg` loads a module; `from slimflow.tasks.x import f` loads .x
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for n in names:
                if module_file(n, packages) is not None:
                    found |= {n, *_parents(n, packages)}
    return found


def modules_run(names: Iterable[str], packages: Mapping[str, Path] = PACKAGES) -> list[str]:
    """``names`` and every module within ``packages`` they import, transitively, sorted."""
    todo, seen = list(names), set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo += _imports([_tree(module_file(name, packages))], name, packages) - seen
    return sorted(seen)


def _module_name(path: Path, packages: Mapping[str, Path]) -> str:
    for prefix, folder in packages.items():
        if path.is_relative_to(folder):
            parts = path.relative_to(folder).with_suffix("").parts
            return ".".join((prefix, *(parts[:-1] if parts[-1] == "__init__" else parts)))
    raise ValueError(f"{path} is outside the packages {', '.join(packages)}")


def _glue(tree: ast.Module, function: str) -> list[ast.AST]:
    """The task's function (decorators dropped: name, retries and cache settings are not what it computes) and
    the module-level statements of its module that it names, transitively."""
    defined: dict[str, ast.stmt] = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            defined[node.name] = node
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            defined |= {t.id: node for t in targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.Import | ast.ImportFrom):
            defined |= {(a.asname or a.name).split(".")[0]: node for a in node.names}
    entry = defined.get(function)
    if not isinstance(entry, ast.FunctionDef | ast.AsyncFunctionDef):
        raise ValueError(f"no function {function} at the top level of its module")
    entry = type(entry)(**{**{f: getattr(entry, f) for f in entry._fields}, "decorator_list": []})
    todo: list[ast.AST] = [entry]
    kept: list[ast.AST] = []
    while todo:
        node = todo.pop()
        kept.append(node)
        used = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
        todo += [d for name in sorted(used) if (d := defined.get(name)) is not None
                 and d is not node and d not in kept and d not in todo]
    return kept


def version_of(wrapper: Path, function: str, packages: Mapping[str, Path] = PACKAGES) -> str:
    """The code version of the task ``function`` defined in ``wrapper``: its glue and the modules it runs."""
    module = _module_name(wrapper, packages)
    glue = _glue(_tree(wrapper), function)
    h = hashlib.sha256()
    for node in glue:
        h.update(normalised(copy.deepcopy(node)).encode())  # a copy: the parsed tree is shared
    for name in modules_run(_imports(glue, module, packages), packages):
        path = module_file(name, packages)
        h.update(name.encode() + b"\0" + _dump(path, _stamp(path)).encode() + b"\0")
    return h.hexdigest()[:16]


def task_code_version(fn: Callable) -> str:
    """The code version of a task function (a Prefect task's ``.fn``, or the task itself): computed once per
    process, from the code this process loaded."""
    fn = inspect.unwrap(getattr(fn, "fn", fn))
    with _LOCK:
        return _version_once(Path(inspect.getsourcefile(fn)).resolve(), fn.__name__)


_version_once = functools.cache(version_of)
# Cache keys are computed in the task runner's threads, and CPython 3.11's ast.parse is not thread-safe ("AST
# constructor recursion depth mismatch" seen here with two export tasks keyed at once): one parse at a time. The
# flows compute each version before submitting (flows/stages.py), so no task thread parses at all.
_LOCK = threading.Lock()


def code_version(*tasks: Callable) -> str:
    """The code version of a stage: of the tasks it runs, together."""
    h = hashlib.sha256()
    for v in sorted(task_code_version(t) for t in tasks):
        h.update(v.encode())
    return h.hexdigest()[:16]
