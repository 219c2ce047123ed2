"""The import graph of ``mamba_pkd``: no cycles (strictly so in ``mamba_pkd.ssm``), small modules.

The graph is read from the source with ``ast`` (nothing is imported): an edge
``a -> b`` for every ``import`` / ``from ... import`` statement of module ``a``
naming ``mamba_pkd`` module ``b``, including statements inside functions (a lazy
import is still a dependency). ``from pkg import name`` is an edge to the
submodule ``pkg.name`` when that is a module, else to ``pkg``. Parent packages
that Python initialises on the way (``mamba_pkd/__init__.py`` for every
``mamba_pkd.x``) are not edges: the package ``__init__`` re-exports the public
names, so counting it would put every module on one cycle.
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = "mamba_pkd"
MAX_LINES = 550
LINE_LIMIT_EXEMPT = ("mamba_pkd/ssm/pallas_scan.py",)


def module_files(root: pathlib.Path, package: str) -> dict[str, pathlib.Path]:
  """Dotted module name -> file, for every .py file of ``package`` under ``root``."""
  out = {}
  for path in sorted((root / package).rglob("*.py")):
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
      parts = parts[:-1]
    out[".".join(parts)] = path
  return out


def _is_package(modules: dict[str, pathlib.Path], name: str) -> bool:
  return name in modules and modules[name].name == "__init__.py"


def imports_of(name: str, path: pathlib.Path, modules: dict[str, pathlib.Path]) -> set[str]:
  """The modules of ``modules`` that module ``name`` (source ``path``) imports, anywhere in it."""
  tree = ast.parse(path.read_text(), filename=str(path))
  package = name if _is_package(modules, name) else name.rpartition(".")[0]
  found = set()

  def add(target):
    # The deepest prefix of target that is a known module.
    parts = target.split(".")
    for i in range(len(parts), 0, -1):
      candidate = ".".join(parts[:i])
      if candidate in modules:
        found.add(candidate)
        return

  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        add(alias.name)
    elif isinstance(node, ast.ImportFrom):
      if node.level:
        base = package.split(".")
        base = base[: len(base) - (node.level - 1)]
        source = ".".join(base + ([node.module] if node.module else []))
      else:
        source = node.module or ""
      for alias in node.names:
        submodule = f"{source}.{alias.name}"
        if submodule in modules:
          found.add(submodule)
        else:
          add(source)
  found.discard(name)
  return found


def import_graph(root: pathlib.Path = ROOT, package: str = PACKAGE) -> dict[str, set[str]]:
  modules = module_files(root, package)
  return {name: imports_of(name, path, modules) for name, path in modules.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """Strongly connected components with a cycle (size > 1, or a self-edge), sorted.

  Tarjan's algorithm, iterative; each component is returned as a sorted list.
  """
  index, low, on_stack, stack, result = {}, {}, set(), [], []
  counter = 0
  for start in sorted(graph):
    if start in index:
      continue
    work = [(start, iter(sorted(graph.get(start, ()))))]
    index[start] = low[start] = counter
    counter += 1
    stack.append(start)
    on_stack.add(start)
    while work:
      node, children = work[-1]
      for child in children:
        if child not in index:
          index[child] = low[child] = counter
          counter += 1
          stack.append(child)
          on_stack.add(child)
          work.append((child, iter(sorted(graph.get(child, ())))))
          break
        if child in on_stack:
          low[node] = min(low[node], index[child])
      else:
        work.pop()
        if work:
          parent = work[-1][0]
          low[parent] = min(low[parent], low[node])
        if low[node] == index[node]:
          component = []
          while True:
            member = stack.pop()
            on_stack.discard(member)
            component.append(member)
            if member == node:
              break
          if len(component) > 1 or node in graph.get(node, ()):
            result.append(sorted(component))
  return sorted(result)


def _describe(cycles):
  return "; ".join(" <-> ".join(c) for c in cycles)


# ----------------------------------------------------------------------------
# The detector itself.


@pytest.mark.parametrize(
    "graph,expected",
    [
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c"]]),
        ({"a": {"a"}, "b": set()}, [["a"]]),
        ({"a": {"b", "c"}, "b": {"c"}, "c": set()}, []),  # a diamond is no cycle
        ({"a": {"b"}, "b": {"a"}, "c": {"d"}, "d": {"c", "a"}}, [["a", "b"], ["c", "d"]]),
    ],
)
def test_find_cycles_on_small_graphs(graph, expected):
  assert find_cycles(graph) == expected


def test_detects_a_synthetic_cycle_through_a_function_level_relative_import(tmp_path):
  pkg = tmp_path / "pkg"
  (pkg / "sub").mkdir(parents=True)
  (pkg / "__init__.py").write_text("from pkg.sub import b\n")
  (pkg / "sub" / "__init__.py").write_text("")
  (pkg / "a.py").write_text("import os\nfrom pkg import c\n")
  (pkg / "sub" / "b.py").write_text("def f():\n  from .. import a\n  return a\n")
  (pkg / "c.py").write_text("from .sub import b\nimport pkg.sub.b as bb\n")
  graph = import_graph(tmp_path, "pkg")
  assert graph["pkg.a"] == {"pkg.c"}
  assert graph["pkg.sub.b"] == {"pkg.a"}
  assert graph["pkg.c"] == {"pkg.sub.b"}
  assert find_cycles(graph) == [["pkg.a", "pkg.c", "pkg.sub.b"]]
  (pkg / "sub" / "b.py").write_text("import os\n")
  assert find_cycles(import_graph(tmp_path, "pkg")) == []


# ----------------------------------------------------------------------------
# mamba_pkd.


def test_graph_resolves_the_packages_real_imports():
  graph = import_graph()
  assert "mamba_pkd.ssm.common" in graph["mamba_pkd.ssm.pallas_scan"]
  assert {"mamba_pkd.ssm.fused", "mamba_pkd.ssm.pallas_scan"} <= graph["mamba_pkd.ssm.scan"]
  assert "mamba_pkd.ssm.scan" in graph["mamba_pkd.layers"]


def test_no_import_cycle_through_ssm():
  """Strict: no cycle contains a mamba_pkd.ssm module, and ssm imports nothing outside ssm."""
  graph = import_graph()
  cycles = [c for c in find_cycles(graph) if any(m.startswith("mamba_pkd.ssm") for m in c)]
  assert not cycles, f"import cycles through mamba_pkd.ssm: {_describe(cycles)}"
  for name, targets in graph.items():
    if name.startswith("mamba_pkd.ssm"):
      outside = {t for t in targets if not t.startswith("mamba_pkd.ssm")}
      assert not outside, f"{name} imports {sorted(outside)} (outside mamba_pkd.ssm)"


def test_no_import_cycle_in_mamba_pkd():
  cycles = find_cycles(import_graph())
  assert not cycles, f"import cycles: {_describe(cycles)}"


def test_no_module_exceeds_the_line_limit():
  too_long = {}
  for name, path in module_files(ROOT, PACKAGE).items():
    rel = path.relative_to(ROOT).as_posix()
    lines = len(path.read_text().splitlines())
    if rel not in LINE_LIMIT_EXEMPT and lines > MAX_LINES:
      too_long[rel] = lines
  assert not too_long, f"modules over {MAX_LINES} lines: {too_long}"
