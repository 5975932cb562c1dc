"""The package's layout is its architecture: every import inside first_jax goes to its own
folder or a folder below it (docs/design.md's table), and no module imports itself back."""
import ast
import glob
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "first_jax")
# bottom to top; a module may import its own floor and the floors below
FLOORS = ("runtime", "core", "models", "data", "config", "engine", "stages", "command line")


def floor(module: str) -> int:
  parts = module.split(".")
  if parts[1] in ("runtime", "core", "models", "data", "engine", "stages", "config"):
    return FLOORS.index(parts[1])
  if parts[1] == "embedded":  # the package data the data floor reads
    return FLOORS.index("data")
  return FLOORS.index("command line")  # cli, plan and the `python -m first_jax.<x>` entries


def imports() -> dict[str, set[str]]:
  """module -> the first_jax modules it imports (anywhere in it, functions included)."""
  graph = {}
  for path in glob.glob(os.path.join(PKG, "**", "*.py"), recursive=True):
    rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
    module = rel[:-len(".__init__")] if rel.endswith(".__init__") else rel
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
      if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and (
          node.module.split(".")[0] == "first_jax"):
        for alias in node.names:  # `from first_jax.x import y`: y a module or a name in x
          sub = f"{node.module}.{alias.name}"
          found.add(sub if os.path.exists(os.path.join(ROOT, *sub.split(".")) + ".py") or
                    os.path.isdir(os.path.join(ROOT, *sub.split("."))) else node.module)
      elif isinstance(node, ast.Import):
        found.update(a.name for a in node.names if a.name.split(".")[0] == "first_jax")
    graph[module] = {m for m in found if m != "first_jax"}
  return graph


def test_no_import_goes_up_a_floor():
  up = sorted(f"{m} ({FLOORS[floor(m)]}) imports {d} ({FLOORS[floor(d)]})"
              for m, deps in imports().items() for d in deps if floor(d) > floor(m))
  assert not up, "\n".join(up)


def test_no_import_cycle():
  graph = imports()
  state: dict[str, int] = {}

  def visit(m: str, path: list[str]) -> None:
    state[m] = 1
    for d in sorted(graph.get(m, ())):
      assert state.get(d) != 1, " -> ".join(path + [m, d])
      if d not in state:
        visit(d, path + [m])
    state[m] = 2

  for m in sorted(graph):
    if m not in state:
      visit(m, [])


def test_every_floor_is_a_folder_with_its_idea_written_down():
  for name in FLOORS[:-1]:
    init = os.path.join(PKG, name, "__init__.py")
    assert ast.get_docstring(ast.parse(open(init).read())), init
