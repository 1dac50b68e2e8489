"""scripts/mutation.py: every module has tests to run its mutants against, and a sample is reproducible."""

import collections
import importlib.util
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _load():
  spec = importlib.util.spec_from_file_location("agejax_mutation", ROOT / "scripts" / "mutation.py")
  assert spec is not None and spec.loader is not None
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module
  spec.loader.exec_module(module)
  return module


mutation = _load()


def test_every_module_maps_to_test_files_that_exist():
  """A new module without tests to run its mutants against fails here, naming it."""
  modules = mutation.all_modules()
  assert len(modules) > 50
  for module in modules:
    tests = mutation.tests_for(module)
    assert tests, module
    for test in tests:
      assert (ROOT / test).is_file(), f"{module} maps to {test}, which does not exist"
  assert {mutation.package_of(m) for m in modules} == set(mutation.PACKAGES)


def test_annotations_and_bit_operators_are_left_out(tmp_path, monkeypatch):
  """`float | None` in a signature is not a mutant; `a | b` on values and `a + b` are."""
  package = tmp_path / "agejax" / "toy"
  package.mkdir(parents=True)
  (package / "m.py").write_text(
    "def f(a: float | None, b: int = 1) -> int | None:\n  x: list[int] | None = None\n  return a + b\n"
  )
  monkeypatch.setattr(mutation, "ROOT", tmp_path)
  mutants = mutation.enumerate_mutants(["agejax/toy/m.py"])
  lines = collections.Counter(m["line"] for m in mutants)
  assert set(lines) == {1, 3}, lines  # line 1: the default 1 (NumberReplacer); line 2 is all annotation
  assert all("BitOr" not in m["operator"] for m in mutants)
  assert any(m["operator"] == "core/ReplaceBinaryOperator_Add_Sub" for m in mutants)
  assert {m["package"] for m in mutants} == {"toy"}


def test_a_sample_is_a_function_of_its_seed_and_draws_from_every_package():
  """The same seed draws the same mutants, interleaved by package; a smaller sample is a prefix of a larger."""
  mutants = [
    {"key": f"agejax/{p}/m.py:op:{i}", "package": p, "module": f"agejax/{p}/m.py"} for p in "abc" for i in range(40)
  ]
  mutants.append({"key": "agejax/d/m.py:op:0", "package": "d", "module": "agejax/d/m.py"})
  first = mutation.sample(mutants, 5, seed=0)
  again = mutation.sample(list(reversed(mutants)), 5, seed=0)
  assert [m["key"] for m in first] == [m["key"] for m in again]
  assert [m["key"] for m in first] != [m["key"] for m in mutation.sample(mutants, 5, seed=1)]
  assert collections.Counter(m["package"] for m in first) == {"a": 5, "b": 5, "c": 5, "d": 1}
  smaller = mutation.sample(mutants, 3, seed=0)  # a prefix of each package's draws: a cut session is a sample
  for package in "abcd":
    keys = [m["key"] for m in first if m["package"] == package]
    assert [m["key"] for m in smaller if m["package"] == package] == keys[:3]
  assert [m["package"] for m in first[:4]] == ["a", "b", "c", "d"]  # interleaved


def test_the_report_counts_timeouts_as_killed_and_argued_survivors_apart(monkeypatch):
  """Kill rate = killed (timeouts included) over killed + survivors not argued equivalent."""
  monkeypatch.setattr(mutation, "equivalents", lambda: {"k3": "the same array either way"})
  rows = {
    "k1": {"outcome": "killed"},
    "k2": {"outcome": "timeout"},
    "k3": {"outcome": "survived"},
    "k4": {"outcome": "survived"},
    "k5": {"outcome": "baseline-failed"},
  }
  results = {k: {**r, "key": k, "package": "p", "module": "agejax/p/m.py", "line": 1} for k, r in rows.items()}
  table = mutation.report(results)
  assert "| p | 5 | 2 (1) | 1 | 1 | 67% |" in table
  assert "not run: {'baseline-failed': 1}" in table
  assert "the same array either way" in table


def test_every_argued_equivalent_has_a_one_line_argument():
  """tests/mutation-equivalent.toml: each key names a module that exists, with a reason."""
  path = ROOT / "tests" / "mutation-equivalent.toml"
  for key, why in tomllib.loads(path.read_text())["equivalent"].items():
    module, operator, occurrence = key.rsplit(":", 2)
    assert (ROOT / module).is_file(), key
    assert operator.startswith("core/") and occurrence.isdigit(), key
    assert why.strip() and "\n" not in why, key


def test_a_rerun_finds_its_mutant_by_its_change_after_an_edit_renumbers_the_module(tmp_path):
  """A session records each mutant's change: after an edit adds an earlier `+`, the rerun applies the same change (not
  the occurrence of the same number), and a mutant whose code is gone is not applied anywhere else."""
  import cosmic_ray.plugins

  module = tmp_path / "m.py"
  module.write_text("a = 1 + 2\nb = 3 + 4\n")
  operator = cosmic_ray.plugins.get_operator("core/ReplaceBinaryOperator_Add_Sub")()
  diff = ["b = 3 + 4  ->  b = 3 - 4"]
  assert mutation.Worker.find(module, operator, diff, 1) == 1
  module.write_text("c = 5 + 6\na = 1 + 2\nb = 3 + 4\n")
  assert mutation.Worker.find(module, operator, diff, 1) == 2
  module.write_text("c = 5 + 6\na = 1 + 2\nb = 3 + 4  # a comment written since\n")
  assert mutation.Worker.find(module, operator, diff, 1) == 2
  module.write_text("c = 5 + 6\na = 1 + 2\n")
  assert mutation.Worker.find(module, operator, diff, 1) is None
  assert module.read_text() == "c = 5 + 6\na = 1 + 2\n"  # every try put the module back
