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
