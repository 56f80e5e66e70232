"""The files' import graph: our modules import each other without a cycle, pntrack.py imports only kernels,
extras/ never the scripts."""
import os

from conftest import ROOT


def import_graph(repo):
    """{module: the modules of ours it imports} for every .py file below `repo`, read from the source with ast
    (imports inside functions too). `from extras import media` counts as importing extras.media."""
    import ast
    files = {}
    for folder, subdirs, names in os.walk(repo):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith(".") and d != "__pycache__")
        for name in names:
            if name.endswith(".py"):
                module = os.path.relpath(os.path.join(folder, name), repo)[:-3].replace(os.sep, ".")
                files[module.removesuffix(".__init__")] = os.path.join(folder, name)
    graph = {}
    for module, path in files.items():
        imported = set()
        for node in ast.walk(ast.parse(open(path).read(), path)):
            if isinstance(node, ast.Import):
                imported |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = [node.module] if node.module else []
                if node.level:                 # relative: from the package, or level - 1 packages up from it
                    package = module.split(".") if path.endswith("__init__.py") else module.split(".")[:-1]
                    base = package[:len(package) - node.level + 1] + base
                base = ".".join(base)
                imported |= {base} | {f"{base}.{a.name}" for a in node.names}
        # importing a.b imports the package a as well
        imported |= {".".join(m.split(".")[:k]) for m in imported for k in range(1, m.count(".") + 1)}
        graph[module] = {m for m in imported if m in files and m != module}
    return graph


def find_cycle(graph):
    """A list of modules [m1, m2, ..., m1] that import each other in a circle, or None."""
    state, path = {}, []                       # state: 1 while on the current path, 2 once fully explored

    def visit(m):
        state[m] = 1
        path.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state and (cycle := visit(n)):
                return cycle
        state[m] = 2
        path.pop()
        return None
    return next((c for m in sorted(graph) if m not in state and (c := visit(m))), None)


def test_our_modules_import_each_other_without_a_cycle_and_pntrack_imports_only_kernels():
    graph = import_graph(ROOT)
    ours = {"pntrack", "kernels", "train", "track", "extras", "extras.synth", "extras.explain", "extras.mae",
            "extras.media", "extras.window", "extras.drawing", "extras.split"}
    assert ours <= set(graph), ours - set(graph)
    assert graph["pntrack"] <= {"kernels"}, graph["pntrack"]              # the method stands alone
    scripts = {m: graph[m] & {"train", "track"} for m in graph if m.startswith("extras") and graph[m] & {"train", "track"}}
    assert not scripts, scripts                                          # extras serve the scripts, never use them
    assert find_cycle(graph) is None, find_cycle(graph)
    # and the check itself finds a cycle where there is one: kernels -> train -> pntrack -> kernels
    cycle = find_cycle({**graph, "kernels": graph["kernels"] | {"train"}})
    assert cycle[0] == cycle[-1] and {"kernels", "train"} <= set(cycle), cycle
    assert all(b in graph[a] or (a, b) == ("kernels", "train") for a, b in zip(cycle, cycle[1:])), cycle
