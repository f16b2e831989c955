"""The package's shape: no import cycle (lazy imports included), short functions."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "study"
MAX_LINES = 80


def _module(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the study modules it imports anywhere in its body."""
    files = {_module(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in files}
    for mod, path in files.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            for name in names:
                while name and name not in files:
                    name = name.rpartition(".")[0]
                if name and name != mod and name != "study":
                    graph[mod].add(name)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack[stack.index(n) :] + [n]
            if n not in state:
                found = visit(n)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def long_functions(limit: int = MAX_LINES) -> list[tuple[int, str]]:
    out = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > limit:
                    out.append((n, f"{_module(path)}.{node.name}"))
    return sorted(out, reverse=True)


def importers_of(top: str, package: Path = PACKAGE) -> list[str]:
    """The modules of ``package`` that import ``top`` (or a module under it) anywhere."""
    out = []
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom) and not node.level
                else []
            )
            if any(n == top or n.startswith(top + ".") for n in names):
                out.append(_module(path) if package == PACKAGE else path.name)
                break
    return out


def test_only_tracking_talks_to_mlflow():
    """Every MLflow call goes through study.tracking: one place knows the server, the
    run layout and what a failed call means."""
    found = importers_of("mlflow")
    assert found and all(m == "study.tracking" or m.startswith("study.tracking.") for m in found), found


MLFLOW_ATTRIBUTES = {("info", "run_id"), ("info", "experiment_id"), ("data", "params"), ("data", "metrics")}
MLFLOW_NAMES = {"mlflow", "MlflowClient", "ActiveRun", "MlflowException"}


def mlflow_leaks(package: Path = PACKAGE) -> list[str]:
    """Where a module outside study.tracking touches an MLflow object: a run's
    ``.info.run_id`` / ``.data.params``-style attribute or an MLflow name."""
    out = []
    for path in sorted(package.rglob("*.py")):
        if "tracking" in path.relative_to(package).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            hit = (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Attribute)
                and (node.value.attr, node.attr) in MLFLOW_ATTRIBUTES
            ) or (isinstance(node, ast.Name) and node.id in MLFLOW_NAMES)
            if hit:
                out.append(f"{path.relative_to(package)}:{node.lineno}")
    return out


def test_no_mlflow_object_outside_tracking(tmp_path):
    """tracking hands out the study's own small types (``Run``, ``History``), so no other
    module depends on the shape of MLflow's objects."""
    assert mlflow_leaks() == []
    (tmp_path / "a.py").write_text("def f(run):\n    return run.info.run_id\n")
    (tmp_path / "b.py").write_text("def f(run):\n    return run.id, run.info\n")
    (tmp_path / "c.py").write_text("def f(run):\n    return run.data.params or MlflowClient()\n")
    assert mlflow_leaks(tmp_path) == ["a.py:2", "c.py:2", "c.py:2"]


def test_the_mlflow_door_check_finds_a_second_door(tmp_path):
    (tmp_path / "a.py").write_text("def f():\n    from mlflow.entities import Metric\n")
    (tmp_path / "b.py").write_text("import mlflowish\nimport os\n")
    (tmp_path / "c.py").write_text("import os, mlflow\n")
    assert importers_of("mlflow", tmp_path) == ["a.py", "c.py"]


def test_no_import_cycle():
    assert find_cycle(import_graph()) is None, f"import cycle: {' -> '.join(find_cycle(import_graph()))}"


def test_cycle_finder_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_functions_are_short():
    assert long_functions() == [], f"functions over {MAX_LINES} lines: {long_functions()}"


# -- the backbone registry -----------------------------------------------------------------
def test_a_family_missing_a_piece_is_refused_naming_it():
    import pytest

    from study.backbones import RegistryError, ResNet, register

    pieces = {
        k: getattr(ResNet, k)
        for k in (
            "variants",
            "stages",
            "build",
            "stem",
            "stage",
            "pool",
            "fold",
            "map_weights",
            "fast_copy",
            "signature",
        )
    }
    for missing in ("stages", "pool", "fold"):
        cls = type(
            "Broken",
            (),
            {"name": "broken", **{k: v for k, v in pieces.items() if k != missing}, "variants": ("broken1",)},
        )
        with pytest.raises(RegistryError, match=f"backbone family 'broken': missing {missing}"):
            register(cls)
    three = type("Three", (), {**pieces, "name": "three", "variants": ("three1",), "stages": ("a", "b", "c")})
    with pytest.raises(RegistryError, match="'three': stages must name four distinct stages"):
        register(three)
    twice = type("Twice", (), {**pieces, "name": "twice"})
    with pytest.raises(RegistryError, match="'resnet18' is already built by 'resnet'"):
        register(twice)


def test_only_the_registry_knows_resnet_attribute_names():
    """models, analyses, the attack engine, the inference copy and plan reach a backbone's
    parts through its registry entry only."""
    import re

    names = ["models.py", "fastcopy.py", "plan.py", "evaluate.py"]
    names += [str(p.relative_to(PACKAGE)) for room in ("attacks", "analyses") for p in (PACKAGE / room).glob("*.py")]
    for name in names:
        text = (PACKAGE / name).read_text()
        code = "\n".join(line.split("#")[0] for line in text.splitlines())
        found = re.findall(r"\.(conv1|bn1|layer[1-4]|downsample|avgpool|maxpool|fc)\b", code)
        assert not found, f"{name} reaches into a ResNet: {found}"


def test_no_global_statement():
    """What a run owns (its Ray, its server, its locks) is an object passed down, not a
    module's state that functions rebind."""
    found = [
        f"{p.relative_to(PACKAGE.parent)}:{node.lineno}"
        for p in PACKAGE.rglob("*.py")
        for node in ast.walk(ast.parse(p.read_text()))
        if isinstance(node, ast.Global)
    ]
    assert not found, found


CONTAINERS = {"dict", "list", "set", "OrderedDict", "defaultdict", "deque", "Counter"}
MUTATORS = {"append", "extend", "insert", "update", "setdefault", "pop", "popitem", "clear", "add", "discard", "remove"}


def mutable_cells(package: Path = PACKAGE) -> list[str]:
    """Module-level containers that code changes (an item set or deleted, a mutating
    method called): a process's hidden state. A registry's ``register`` (timm's pattern:
    each entry registers itself as its module is read) is the one writer allowed."""
    out = []
    for path in sorted(package.rglob("*.py")):
        tree = ast.parse(path.read_text())
        cells = set()
        for node in tree.body:
            targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
            value = getattr(node, "value", None)
            made = isinstance(value, (ast.Dict, ast.List, ast.Set)) or (
                isinstance(value, ast.Call) and getattr(value.func, "id", None) in CONTAINERS
            )
            cells |= {t.id for t in targets if made and isinstance(t, ast.Name)}
        registers = [
            (f.lineno, f.end_lineno) for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) and f.name == "register"
        ]
        for node in ast.walk(tree):
            hit = None
            if isinstance(node, (ast.Assign, ast.AugAssign, ast.Delete)):
                for t in getattr(node, "targets", None) or [node.target]:
                    if isinstance(t, ast.Subscript) and isinstance(t.value, ast.Name) and t.value.id in cells:
                        hit = t.value.id
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in MUTATORS:
                if isinstance(node.func.value, ast.Name) and node.func.value.id in cells:
                    hit = node.func.value.id
            if hit and not any(a <= node.lineno <= b for a, b in registers):
                out.append(f"{path.relative_to(package)}:{node.lineno} {hit}")
    return out


def test_no_module_level_cell_that_code_changes(tmp_path):
    """What a run keeps between calls (loaders, digests) lives in its Runtime, passed down."""
    assert mutable_cells() == []
    (tmp_path / "a.py").write_text("_KEPT = {}\nNAMES = ['a']\ndef f(k):\n    _KEPT[k] = 1\n    return NAMES[0]\n")
    (tmp_path / "b.py").write_text("import collections\nC = OrderedDict()\ndef f():\n    C.popitem()\n")
    (tmp_path / "c.py").write_text("R = {}\ndef register(k):\n    R[k] = k\n    return k\n")
    assert mutable_cells(tmp_path) == ["a.py:4 _KEPT", "b.py:4 C"]


IMPORT_PROBE = r"""
import ast, importlib, importlib.util, json, logging, os, sys
from pathlib import Path
found = importlib.util.find_spec("study").submodule_search_locations  # study itself not imported yet
package = Path(found[0])
# from the files: pkgutil.walk_packages would import every package to walk it
names = sorted(
    ".".join(("study",) + p.relative_to(package).with_suffix("").parts).removesuffix(".__init__")
    for p in package.rglob("*.py")
)
# the libraries study's modules import at their top, first: their own import-time effects
# (OpenCV's environment variables) are theirs
for path in package.rglob("*.py"):
    for node in ast.parse(path.read_text()).body:
        mods = [a.name for a in node.names] if isinstance(node, ast.Import) else (
            [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else [])
        for m in mods:
            if not m.startswith("study") and not m.startswith("__"):
                importlib.import_module(m)
def state(n):
    lg = logging.getLogger(n)
    return lg.level, list(lg.handlers), list(lg.filters)
named = [n for n, lg in logging.Logger.manager.loggerDict.items() if isinstance(lg, logging.Logger)]
env, hook, excepthook = dict(os.environ), sys.unraisablehook, sys.excepthook
levels = {n: state(n) for n in named}
for n in names:
    importlib.import_module(n)
changed = [f"env {k}" for k in set(env) ^ set(os.environ)]
changed += [f"env {k}" for k in env if os.environ.get(k, env[k]) != env[k]]
changed += ["sys.unraisablehook"] * (sys.unraisablehook is not hook)
changed += ["sys.excepthook"] * (sys.excepthook is not excepthook)
changed += [f"logger {n}" for n, s in levels.items() if state(n) != s]
print(json.dumps({"modules": len(names), "changed": changed}))
"""


def test_importing_any_module_changes_no_hook_environment_or_logger():
    import json
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", IMPORT_PROBE], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["modules"] >= 40 and out["changed"] == [], out


# The layers, bottom to top: a module imports from its own layer and the ones below only.
# Every top-level module or package of study/ is in one (a new one must choose).
LAYERS = [
    ("ground", {"files", "items", "methods", "stats", "formats", "backbones"}),
    ("runtime", {"runtime", "tracking"}),
    ("data", {"data"}),
    ("models", {"models", "fastcopy"}),
    ("evaluation items", {"attacks", "corruptions"}),
    ("training", {"objectives", "engine"}),
    ("evaluation", {"evaluate", "weights", "contract"}),
    ("science", {"claims", "evidence", "simulate"}),
    ("job", {"config", "costs", "distributed", "stages", "report", "results", "threat"}),
    ("stages", {"analyses", "pretrain", "sweep"}),
    ("commands", {"pipeline", "plan", "cli"}),
]


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    level = {name: i for i, (_, names) in enumerate(LAYERS) for name in names}

    def of(module: str) -> str:
        return module.split(".")[1] if "." in module else ""

    unplaced = sorted({of(m) for m in graph if of(m) and of(m) not in level})
    upward = [
        f"{m} ({LAYERS[level[of(m)]][0]}) imports {d} ({LAYERS[level[of(d)]][0]})"
        for m, deps in graph.items()
        for d in deps
        if of(m) in level and of(d) in level and level[of(d)] > level[of(m)]
    ]
    return [f"not in a layer: {u}" for u in unplaced] + sorted(upward)


def test_imports_flow_down_the_layers():
    assert layer_violations(import_graph()) == []
    assert layer_violations({"study.stats": {"study.claims"}, "study.newroom": set()}) == [
        "not in a layer: newroom",
        "study.stats (ground) imports study.claims (science)",
    ]


def test_the_claims_import_nothing_from_the_report():
    """The paper's constants sit in study.methods, below both: the judge does not reach up
    into what renders it."""
    assert not [m for m in import_graph()["study.claims"] if m.startswith("study.report")]


MAX_MODULE_LINES = 600


def test_no_module_is_too_big_to_hold_in_ones_head():
    big = {
        str(p.relative_to(PACKAGE.parent)): n
        for p in PACKAGE.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert not big, big
