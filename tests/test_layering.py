"""The layering, checked from the import graph (every `import`, at module level or inside a function):

    mathematics   mirl.losses, mirl.advantages, mirl.logps: torch and each other only
    models        mirl.models: nothing from data, rollout, rewards, eval, checkpoint, recipes or above; within it
                  files <- backends <- facade <- policy (the loaders): the backends know nothing of the Policy
                  facade, and the facade nothing of how policies are loaded
    data          mirl.data: models at most (nothing from rollout, rewards, eval, checkpoint, recipes or above)
    envs          mirl.envs (environments, tools, the sandbox): nothing from recipes, experiments, demo or cli;
                  and mirl.rollout nothing from envs (an episode gets its environment host and renderer passed in)
    recipes       no recipe imports another (recipes.common, run, held_out and rl hold what they share)
and no import cycle between modules.
"""

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "mirl"
MATH = ("mirl.losses", "mirl.advantages", "mirl.logps")
ABOVE_MODELS = (
    "mirl.data",
    "mirl.rollout",
    "mirl.rewards",
    "mirl.eval",
    "mirl.checkpoint",
    "mirl.recipes",
    "mirl.experiments",
    "mirl.demo",
    "mirl.cli",
    "mirl.report",
)
ABOVE_DATA = ABOVE_MODELS[1:]


def _module(path: Path) -> str:
    parts = ("mirl",) + path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the mirl modules it imports (names resolved to modules where they are modules)."""
    modules = {_module(p): p for p in ROOT.rglob("*.py")}
    graph = {}
    for mod, path in modules.items():
        pkg = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
        out = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                out |= {a.name for a in node.names if a.name.startswith("mirl")}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if not target.startswith("mirl"):
                    continue
                for a in node.names:  # `from . import x` imports the module mirl.pkg.x
                    sub = f"{target}.{a.name}"
                    out.add(sub if sub in modules else target)
        graph[mod] = out - {mod}
    return graph


GRAPH = import_graph()


def _under(mod: str, prefixes) -> bool:
    return any(mod == p or mod.startswith(p + ".") for p in prefixes)


def test_mathematics_imports_only_torch_and_itself():
    for mod, deps in GRAPH.items():
        if _under(mod, MATH):
            assert all(_under(d, MATH) for d in deps), (mod, sorted(deps))
            path = ROOT.parent / (mod.replace(".", "/") + ("/__init__.py" if mod == "mirl.losses" else ".py"))
            third = {
                n.names[0].name.split(".")[0]
                for n in ast.walk(ast.parse(path.read_text()))
                if isinstance(n, ast.Import)
            }
            third |= {
                n.module.split(".")[0]
                for n in ast.walk(ast.parse(path.read_text()))
                if isinstance(n, ast.ImportFrom) and n.module and not n.level
            }
            assert third <= {"torch", "math", "__future__", "collections", "dataclasses", "typing"} | set(
                sys.stdlib_module_names
            ), (mod, third)


def test_models_and_data_import_nothing_above_them():
    for mod, deps in GRAPH.items():
        if _under(mod, ("mirl.models",)):
            assert not [d for d in deps if _under(d, ABOVE_MODELS)], (mod, sorted(deps))
        if _under(mod, ("mirl.data",)):
            assert not [d for d in deps if _under(d, ABOVE_DATA)], (mod, sorted(deps))


def test_the_policy_modules_point_down():
    order = ("mirl.models.files", "mirl.models.backends", "mirl.models.facade", "mirl.models.policy")
    assert set(order) <= set(GRAPH), sorted(set(order) - set(GRAPH))
    for i, mod in enumerate(order):
        assert not set(order[i + 1 :]) & GRAPH[mod], (mod, sorted(GRAPH[mod]))


def test_environments_sit_between_rollout_and_recipes():
    above = ("mirl.recipes", "mirl.experiments", "mirl.demo", "mirl.cli")
    for mod, deps in GRAPH.items():
        if _under(mod, ("mirl.envs",)):
            assert not [d for d in deps if _under(d, above)], (mod, sorted(deps))
        if _under(mod, ("mirl.rollout",)):
            assert not [d for d in deps if _under(d, ("mirl.envs",))], (mod, sorted(deps))


def test_no_recipe_imports_another():
    for mod, deps in GRAPH.items():
        shared = ("mirl.recipes", "mirl.recipes.common", "mirl.recipes.run", "mirl.recipes.held_out", "mirl.recipes.rl")
        if _under(mod, ("mirl.recipes",)) and mod not in shared:
            others = [d for d in deps if _under(d, ("mirl.recipes",)) and d not in shared]
            assert not others, (mod, others)


def test_no_import_cycles():
    state, path = {}, []

    def visit(m):
        state[m] = "open"
        path.append(m)
        for d in sorted(GRAPH.get(m, ())):
            if state.get(d) == "open":
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(d) :] + [d]))
            if d not in state:
                visit(d)
        path.pop()
        state[m] = "done"

    for m in sorted(GRAPH):
        if m not in state:
            visit(m)
