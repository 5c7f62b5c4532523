"""The layering of the package, read from the source with ``ast`` (so an import hidden in a
function counts like any other): no import cycle among ``qat`` modules, no ``qat`` import
inside a function, and every module imports only from its own layer or the ones below."""
import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'qat')

# Bottom to top; a module may import from its own layer and the layers below it.
LAYERS = [
    ('qat.errors', 'qat.config', 'qat.ops', 'qat.native', 'qat.reference', 'qat.fileio',
     'qat.metrics', 'qat.report', 'qat.batches', 'qat.timing'),
    ('qat.nn', 'qat.symbol'),  # symbol reads the graph and needs only nn.walk
    ('qat.modes', 'qat.probes', 'qat.convert'),
    ('qat.calibration', 'qat.deploy', 'qat.importers'),  # importers read deploy's file readers
    ('qat.analysis',),
    ('qat.app',),
    ('qat.cli', 'qat'),  # the command and the public API on top
]


def _modules():
    """{module name: path} of every module of the package."""
    found = {}
    for folder, _, files in os.walk(ROOT):
        for name in files:
            if name.endswith('.py'):
                rel = os.path.relpath(os.path.join(folder, name), os.path.dirname(ROOT))
                module = rel[:-3].replace(os.sep, '.')
                found[module[:-len('.__init__')] if module.endswith('.__init__') else module] = \
                    os.path.join(folder, name)
    return found


MODULES = _modules()


def _resolve(module, node):
    """The ``qat`` modules an import node names (submodules where the name is one)."""
    package = module if MODULES[module].endswith('__init__.py') else module.rsplit('.', 1)[0]
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names if alias.name.split('.')[0] == 'qat']
    base = node.module or ''
    if node.level:
        parts = package.split('.')
        base = '.'.join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
    if base.split('.')[0] != 'qat':
        return []
    targets = []
    for alias in node.names:
        sub = f"{base}.{alias.name}"
        targets.append(sub if sub in MODULES else base)
    return targets


def _imports():
    """{module: [(imported qat module, line, inside a function)]}."""
    edges = {}
    for module, path in MODULES.items():
        with open(path) as handle:
            tree = ast.parse(handle.read(), path)
        found = []
        functions = [n for n in ast.walk(tree)
                     if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        nested = {id(inner) for f in functions for inner in ast.walk(f)
                  if isinstance(inner, (ast.Import, ast.ImportFrom))}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in _resolve(module, node):
                    if target != module:
                        found.append((target, node.lineno, id(node) in nested))
        edges[module] = found
    return edges


EDGES = _imports()


def _layer(module):
    best = None
    for rank, names in enumerate(LAYERS):
        for name in names:
            if module == name or module.startswith(name + '.'):
                if best is None or len(name) > len(best[1]):
                    best = (rank, name)
    return best[0] if best else None


def test_every_module_has_a_layer():
    assert [m for m in MODULES if _layer(m) is None] == []


def test_no_import_cycle():
    """Tarjan's strongly connected components of the import graph: all of size one."""
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w, _, _ in EDGES.get(v, []):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in MODULES:
        if module not in index:
            visit(module)
    assert cycles == []


def test_no_package_import_inside_a_function():
    hidden = [f"{m}:{line} imports {t}" for m, edges in EDGES.items()
              for t, line, nested in edges if nested]
    assert hidden == []


def test_modules_import_only_from_below():
    upward = [f"{m} (layer {_layer(m)}) imports {t} (layer {_layer(t)}) at line {line}"
              for m, edges in EDGES.items() for t, line, _ in edges
              if _layer(t) > _layer(m)]
    assert upward == []


@pytest.mark.parametrize('library', ['qat.nn', 'qat.calibration', 'qat.deploy',
                                     'qat.importers', 'qat.analysis'])
def test_the_library_knows_nothing_of_the_application(library):
    assert [f"{m} -> {t}" for m, edges in EDGES.items() if m.startswith(library)
            for t, _, _ in edges if t.startswith('qat.app') or t == 'qat.cli'] == []


def test_the_checker_sees_hidden_and_relative_imports(tmp_path):
    """The resolver itself: a relative import inside a function is found and resolved."""
    source = "def f():\n    from ..modes import deployed\n    from . import thresholds\n"
    tree = ast.parse(source)
    nodes = [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert _resolve('qat.calibration.methods', nodes[0]) == ['qat.modes']
    assert _resolve('qat.calibration.methods', nodes[1]) == ['qat.calibration.thresholds']
