"""dvc.yaml against params.yaml: `dvc exp run -S key=value` reruns something for every key."""
import yaml
from dvc.repo import Repo

from tests.conftest import ROOT

# Where runs are recorded changes no output, so no stage depends on it; distill.methods
# decides which distill@<method> stages exist (dvc.yaml's foreach) and moves with
# evaluate.models, which report depends on (the schema keeps the two in step).
UNTRACKED = ("tracking", "distill.methods")


def leaves(d, prefix=""):
    for key, value in d.items():
        if isinstance(value, dict) and value:
            yield from leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"


def test_every_params_key_is_a_dependency_of_some_stage():
    stages = Repo(str(ROOT)).index.stages
    tracked = {key for stage in stages for dep in stage.deps if getattr(dep, "params", None)
               for key in dep.params}
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    untracked = [k for k in leaves(params) if not k.startswith(UNTRACKED)
                 and not any(k == t or k.startswith(t + ".") for t in tracked)]
    assert not untracked, f"no stage reruns when these change: {untracked}"
    assert "distill.ibmd" in tracked and "evaluate.nfe" in tracked  # the resolved foreach stages


# Library code that changes no output, so no stage lists it as a dependency
# (docs/architecture.md, "Dependency policy"): the params schema (DVC tracks the values
# themselves; it includes the methods' params blocks of the registry, distill/__init__.py,
# which every stage loads through it and the stages that build a method list), the runtime
# (Ray connection and fan-out, MLflow, progress bars, atomic writes) and the base error.
PLUMBING = ("pipeline/config/", "pipeline/distill/__init__.py", "pipeline/runtime/", "pipeline/__init__.py",
            "pipeline/errors.py")


def imported_modules(path, skip, top_level_only=False, seen=None):
    """The pipeline modules loaded when `path` runs: its own imports (a stage script imports
    inside main()), then, transitively, the module-level imports of each library module.
    Modules in `skip` are neither counted nor followed. Paths relative to the project."""
    import ast
    seen = set() if seen is None else seen
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    for node in nodes:
        names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                 [node.module] + [f"{node.module}.{a.name}" for a in node.names]
                 if isinstance(node, ast.ImportFrom) and node.module else [])
        for name in names:
            if not name.startswith("pipeline"):
                continue
            parts = name.split(".")
            for candidate in (ROOT.joinpath(*parts).with_suffix(".py"), ROOT.joinpath(*parts, "__init__.py")):
                rel = str(candidate.relative_to(ROOT))
                if candidate.is_file() and rel not in seen and rel not in skip:
                    seen.add(rel)
                    imported_modules(candidate, skip, True, seen)
    return seen


def test_every_library_module_a_stage_imports_is_a_dependency():
    stages = Repo(str(ROOT)).index.stages
    missing = {}
    for stage in stages:
        kind = stage.addressing.split("@")[0]
        deps = [d.def_path for d in stage.deps]
        script = ROOT / "stages" / f"{kind}.py"
        used = {m for m in imported_modules(script, set()) if not m.startswith(PLUMBING)}
        if kind == "distill":  # a student's stage imports only its own method's module
            used = {m for m in used if not m.startswith("pipeline/distill/") or m in (
                f"pipeline/distill/{stage.addressing.split('@')[1]}.py", "pipeline/distill/__init__.py")}
        uncovered = sorted(m for m in used if not any(m == d or m.startswith(d.rstrip("/") + "/") for d in deps))
        if uncovered:
            missing[stage.addressing] = uncovered
    assert not missing, f"stages import library modules their dvc.yaml entry does not list: {missing}"
