"""The project's import graph, from the source (nothing is imported or run).

    python scripts/import_graph.py            # edges, cycles, function-local imports, summary
    python scripts/import_graph.py --json     # the same as JSON

A module is a .py file of this repository outside tests/; an edge A -> B means A imports B at
module level ("top") or inside a function ("local"). tests/test_structure.py asserts that there
is no cycle and names every local import of a project module that it allows.
"""
import argparse
import ast
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SKIP_DIRS = {"tests", ".venv", ".git", "__pycache__", ".whl", "exps", "samples", "demo_out", "wandb"}


def project_modules(root=ROOT):
    """{dotted module name: path} of the repository's Python files outside tests/."""
    out = {}
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith("."))
        for name in sorted(files):
            if name.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, name), root)[:-3].replace(os.sep, ".")
                out[rel.removesuffix(".__init__")] = os.path.join(folder, name)
    return out


def resolve(name, modules):
    """The project module a dotted import name refers to (the longest known prefix), or None."""
    parts = name.split(".")
    for k in range(len(parts), 0, -1):
        if ".".join(parts[:k]) in modules:
            return ".".join(parts[:k])
    return None


def imports_of(path, modules, this):
    """[(imported project module, 'top' or 'local', line)] of one file."""
    tree = ast.parse(open(path, encoding="utf-8").read(), filename=path)
    package = this if path.endswith("__init__.py") else this.rpartition(".")[0]
    found = []

    def visit(node, local):
        for child in ast.iter_child_nodes(node):
            inner = local or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            names = []
            if isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    base = ".".join(filter(None, [package.rsplit(".", child.level - 1)[0] if child.level > 1
                                                  else package, base]))
                names = [f"{base}.{a.name}" for a in child.names] + [base]
            targets = {resolve(n, modules) for n in names} - {None, this}
            if isinstance(child, ast.ImportFrom) and len(targets) > 1:  # "from pkg import sub": the submodule
                targets -= {resolve(child.module or "", modules)} if child.module else set()
            found.extend((t, "local" if local else "top", child.lineno) for t in sorted(targets))
            visit(child, inner)

    visit(tree, False)
    return found


def graph(root=ROOT):
    modules = project_modules(root)
    return modules, {m: imports_of(p, modules, m) for m, p in modules.items()}


def cycles(edges, kinds=("top", "local")):
    """Strongly connected components of more than one module (Tarjan), over the given edge kinds."""
    adj = {m: sorted({t for t, kind, _ in e if kind in kinds}) for m, e in edges.items()}
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def strong(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in adj.get(v, ()):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(adj):
        if v not in index:
            strong(v)
    return out


def summary(root=ROOT):
    modules, edges = graph(root)
    local = sorted((m, t, line) for m, e in edges.items() for t, kind, line in e if kind == "local")
    return {"modules": len(modules),
            "edges": sum(len({t for t, _, _ in e}) for e in edges.values()),
            "cycles": cycles(edges),
            "local_imports": [f"{m}:{line} -> {t}" for m, t, line in local],
            "imports_of": {m: sorted({t for t, _, _ in e}) for m, e in edges.items()}}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    s = summary()
    if args.json:
        print(json.dumps(s, indent=1))
        return
    for m, targets in s["imports_of"].items():
        print(f"{m} -> {', '.join(targets) or '-'}")
    print(f"\n{s['modules']} modules, {s['edges']} import edges, {len(s['cycles'])} cycles"
          + "".join(f"\n  cycle: {' <-> '.join(c)}" for c in s["cycles"]))
    print(f"{len(s['local_imports'])} function-local imports of project modules"
          + "".join(f"\n  {x}" for x in s["local_imports"]))


if __name__ == "__main__":
    main()
