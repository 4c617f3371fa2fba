"""List import cycles among trtlm's modules (core and the bundled plugins).

Reads the sources with :mod:`ast` (nothing is imported), so it sees every import a
module can make: module-level ones and the lazy ones inside functions (a lazy
import still ties two modules together: neither can be understood or moved alone),
plus ``importlib.import_module("trtlm.x")`` with a literal name.  The package root
``trtlm/__init__.py`` is left out: it is a facade whose ``__getattr__`` re-exports
``LLM``/``Family``/``hookimpl`` on first use, and every plugin imports it for
``hookimpl``, so counting it would put every module in one cycle.

Prints each strongly connected component of more than one module, with one
shortest cycle through it, and exits 1 when there is any (``--top-level`` counts
only module-level imports).

    python scripts/import_cycles.py [--top-level]
"""
from __future__ import annotations

import argparse
import ast
import sys
from collections import deque
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = [ROOT / "core" / "src", *sorted((ROOT / "plugins").glob("*/src"))]
FACADE = "trtlm"


def module_files() -> dict[str, Path]:
    mods = {}
    for src in SOURCES:
        for path in sorted(src.rglob("*.py")):
            parts = list(path.relative_to(src).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            if parts and (parts[0] == "trtlm" or parts[0].startswith("trtlm_")):
                mods[".".join(parts)] = path
    return mods


def _resolve(name: str, mods: dict[str, Path]) -> str | None:
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _walk(nodes: list[ast.AST], top_level: bool):
    """Import statements and calls that run: ``if TYPE_CHECKING:`` blocks are skipped, and with
    ``top_level`` so are function and class bodies' lazy imports inside functions."""
    for node in nodes:
        if _is_type_checking(node):
            continue
        if top_level and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        yield node
        yield from _walk(list(ast.iter_child_nodes(node)), top_level)


def imports(module: str, path: Path, mods: dict[str, Path], top_level: bool) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in _walk(tree.body, top_level):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{a.name}" for a in node.names] + [base]
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "import_module" and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)):
            names = [node.args[0].value]
        else:
            continue
        for name in names:
            target = _resolve(name, mods)
            if target and target != module:
                found.add(target)
    return found


def graph(top_level: bool) -> dict[str, set[str]]:
    mods = module_files()
    g = {m: imports(m, p, mods, top_level) - {FACADE} for m, p in mods.items() if m != FACADE}
    return {m: {t for t in ts if t in g} for m, ts in g.items()}


def components(g: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components (iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out = []
    counter = 0
    for root in sorted(g):
        if root in index:
            continue
        work = [(root, iter(sorted(g[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on.add(root)
        while work:
            node, it = work[-1]
            nxt = next(it, None)
            if nxt is not None:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on.add(nxt)
                    work.append((nxt, iter(sorted(g[nxt]))))
                elif nxt in on:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    m = stack.pop()
                    on.discard(m)
                    comp.append(m)
                    if m == node:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def shortest_cycle(g: dict[str, set[str]], comp: list[str]) -> list[str]:
    members = set(comp)
    best: list[str] = []
    for start in comp:
        prev = {start: None}
        queue = deque([start])
        while queue:
            node = queue.popleft()
            for nxt in sorted(g[node] & members):
                if nxt == start:
                    path = [node]
                    while prev[path[-1]] is not None:
                        path.append(prev[path[-1]])
                    cycle = list(reversed(path)) + [start]
                    if not best or len(cycle) < len(best):
                        best = cycle
                    queue.clear()
                    break
                if nxt not in prev:
                    prev[nxt] = node
                    queue.append(nxt)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--top-level", action="store_true", help="only module-level imports")
    args = parser.parse_args(argv)
    g = graph(args.top_level)
    comps = components(g)
    kind = "module-level" if args.top_level else "all (module-level and lazy)"
    print(f"{len(g)} modules, {sum(len(v) for v in g.values())} import edges ({kind}); "
          f"{len(comps)} cycle(s)")
    for comp in comps:
        print(f"- {len(comp)} modules: {' '.join(comp)}")
        print(f"  e.g. {' -> '.join(shortest_cycle(g, comp))}")
    return 1 if comps else 0


if __name__ == "__main__":
    sys.exit(main())
