"""The package's shape: imports run one way (no cycles), read from the source."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "agejax"


def module_name(path: Path) -> str:
  parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, modules: set[str]) -> set[str]:
  """The agejax modules `path` imports anywhere in it (top level or inside functions)."""
  found = set()
  package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      found.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:  # relative
        base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
      found.add(base)
      found.update(f"{base}.{alias.name}" for alias in node.names)
  return {name for name in found if name in modules}


def graph() -> dict[str, set[str]]:
  files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
  return {name: imports(path, set(files)) - {name, "agejax", "agejax.data"} for name, path in files.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
  """A cycle of the directed graph as a list of nodes, or None."""
  state: dict[str, int] = {}  # 1: on the current path, 2: done
  path: list[str] = []

  def visit(node: str) -> list[str] | None:
    state[node] = 1
    path.append(node)
    for nxt in sorted(edges.get(node, ())):
      if state.get(nxt) == 1:
        return path[path.index(nxt) :] + [nxt]
      if nxt not in state and (cycle := visit(nxt)):
        return cycle
    state[node] = 2
    path.pop()
    return None

  for node in sorted(edges):
    if node not in state and (cycle := visit(node)):
      return cycle
  return None


def test_the_cycle_finder_finds_a_planted_cycle():
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_the_agejax_import_graph_has_no_cycle():
  edges = graph()
  assert {"agejax.training.train", "agejax.evaluation.scoring", "agejax.data.pipeline"} <= set(edges)
  assert "agejax.evaluation.scoring" in edges["agejax.training.train"]  # lazy imports count too
  assert find_cycle(edges) is None, " -> ".join(find_cycle(edges))
