"""The package's shape, read from the source: imports run one way (no cycles, never up the layers)."""

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
      submodules = {f"{base}.{alias.name}" for alias in node.names} & modules
      # `from pkg import module` needs the module (Python runs pkg/__init__ first, but that is pkg's
      # own business); `from pkg import name` needs pkg.
      found.update(submodules if submodules else {base})
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


# The layers, lowest first. A module may import its own layer's leaves and its own package, and
# anything in a lower layer; never a higher layer, nor another package of its own layer.
#   leaves: errors, storage, parallel, labels, metrics, settings, cli (each a module at the top);
#   data and models know nothing of how a model is trained or scored; convert turns published
#   weights into a registered backbone's; evaluation scores predictions (it needs no training);
#   training uses evaluation for its periodic scores; inference reads what training wrote;
#   serving and benchmarks sit on top (the serve benchmark starts a server).
LAYERS = (
  ("agejax",),  # the top-level leaf modules
  ("agejax.data", "agejax.models"),
  ("agejax.convert",),
  ("agejax.evaluation",),
  ("agejax.training",),
  ("agejax.inference",),
  ("agejax.serving",),
  ("agejax.benchmarks",),
)


def layer_of(module: str) -> tuple[int, str]:
  """(layer index, package) of an agejax module; a top-level module is its own package in layer 0."""
  parts = module.split(".")
  package = ".".join(parts[:2]) if len(parts) > 1 else module
  for i, packages in enumerate(LAYERS):
    if package in packages:
      return i, package
  return 0, module  # agejax.errors, agejax.settings, ...: leaves


def test_imports_never_go_up_a_layer_or_across_one():
  problems = []
  for module, imported in graph().items():
    layer, package = layer_of(module)
    for target in imported:
      target_layer, target_package = layer_of(target)
      upward = target_layer > layer
      sideways = target_layer == layer and layer > 0 and target_package != package
      if upward or sideways:
        problems.append(f"{module} (layer {layer}) imports {target} (layer {target_layer})")
  assert not problems, "\n".join(sorted(problems))


def test_the_layer_check_sees_a_planted_upward_import():
  assert layer_of("agejax.data.pipeline")[0] < layer_of("agejax.training.train")[0]
  assert layer_of("agejax.evaluation.scoring")[0] < layer_of("agejax.training.learner")[0]
  assert layer_of("agejax.inference.export")[0] < layer_of("agejax.serving.app")[0]
  assert layer_of("agejax.errors") == (0, "agejax.errors")


def test_only_models_depend_on_a_particular_backbone():
  """Outside agejax/models, no code names VGG (strings such as the default backbone's name aside)."""
  offenders = []
  for path in PACKAGE.rglob("*.py"):
    if path.relative_to(PACKAGE).parts[0] == "models":
      continue
    for node in ast.walk(ast.parse(path.read_text())):
      names = []
      if isinstance(node, ast.Name):
        names = [node.id]
      elif isinstance(node, ast.Attribute):
        names = [node.attr]
      elif isinstance(node, ast.ImportFrom | ast.Import):
        names = [alias.name for alias in node.names] + [getattr(node, "module", None) or ""]
      elif isinstance(node, ast.FunctionDef | ast.ClassDef):
        names = [node.name]
      offenders += [f"{path.relative_to(PACKAGE)}:{node.lineno} {n}" for n in names if "vgg" in n.lower()]
  assert not offenders, offenders


def init_code(source: str) -> list[str]:
  """`line: statement` of each statement in a package face's SOURCE beyond its docstring, imports and dunders."""
  tree = ast.parse(source)
  code = []
  for i, node in enumerate(tree.body):
    docstring = i == 0 and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
    dunder = isinstance(node, ast.Assign) and all(
      isinstance(t, ast.Name) and t.id in ("__all__", "__version__") for t in node.targets
    )
    if not (docstring or dunder or isinstance(node, ast.Import | ast.ImportFrom)):
      code.append(f"{node.lineno}: {type(node).__name__}")
  return code


def test_package_faces_only_hand_names_on():
  """A package's __init__.py holds its docstring and the names it hands on; the code lives in named modules."""
  offenders = [
    f"{path.relative_to(PACKAGE)}:{line}"
    for path in PACKAGE.rglob("__init__.py")
    for line in init_code(path.read_text())
  ]
  assert not offenders, offenders


def test_the_face_check_sees_code():
  assert init_code('"""Doc."""\nfrom a import b\n__all__ = ["b"]\n') == []
  assert init_code('"""Doc."""\ndef load():\n  pass\n\nCACHE = {}\n') == ["2: FunctionDef", "5: Assign"]
