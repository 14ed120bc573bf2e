"""params.yaml spells out every field of the schema, so every value that can change a result is
a value DVC tracks (docs/architecture.md), and changing any of them reruns exactly the stages
that read it; a value that differs from the schema's default says so on its line."""
import copy
import shutil
from contextlib import chdir

import pytest
import yaml

from pipeline.config.schema import load_params, schema
from tests.conftest import ROOT

# Which stages read each params section: the stage scripts read their params through
# common.load, which allows exactly what their dvc.yaml entry lists (and `tracking`, which
# changes no result); `distill.methods` and `evaluate.models` decide which stages exist.
# evaluate.nfe / samplers / guidance are read by the teachers' evaluations only, but one
# stage group evaluates teachers and students alike, so the students' evaluations rerun too.
TEACHERS, METHODS = ("diffusion", "bridge"), ("ibmd", "mm", "tdd", "pd", "cd", "dmd2", "scm", "cdbm")
TRAINING = {"features", *(f"teacher@{t}" for t in TEACHERS), *(f"distill@{m}" for m in METHODS)}
EVALUATIONS = {f"evaluate@{m}" for m in (*TEACHERS, *METHODS)}


def expected_readers(key):
    section, _, rest = key.partition(".")
    if section in ("tracking",) or key.startswith("distill.methods"):
        return set()
    if section == "seed":  # the report's protocol.json names the students' training seed
        return {"prepare", "report"} | TRAINING
    if section in ("data", "corruption"):
        return {"prepare"}
    if section == "report":
        return {"report"}
    if section == "ray":
        return set(TRAINING)
    if section == "features":
        return {"features"}
    if key == "teacher.bridge.style":  # the report names which law the bridge teacher samples
        return {"teacher@bridge", "report"}
    if section in ("teacher", "distill"):
        return {f"{section}@{rest.split('.')[0]}"}
    if key.startswith("evaluate.models"):
        return {"report"}
    if key in ("evaluate.n_samples", "evaluate.groups"):  # the floor is scored on the same inputs and groups
        return EVALUATIONS | {"floor"}
    if key == "evaluate.grid":  # protocol.json names the grid convention
        return EVALUATIONS | {"report"}
    return set(EVALUATIONS)


def leaves(node, prefix=""):
    """{dotted key: value} of every leaf (a mapping's value that is not a non-empty mapping)."""
    out = {}
    for key, value in node.items():
        if isinstance(value, dict) and value:
            out.update(leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def line_of_each_leaf(text):
    """{dotted key: the source line of its key} from the YAML node tree."""
    def walk(node, prefix):
        found = {}
        for key_node, value_node in node.value:
            key = f"{prefix}{key_node.value}"
            if isinstance(value_node, yaml.MappingNode) and value_node.value:
                found.update(walk(value_node, key + "."))
            else:
                found[key] = key_node.start_mark.line
        return found
    return walk(yaml.compose(text), "")


def test_every_schema_field_is_spelled_out():
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    resolved = load_params(ROOT / "params.yaml").model_dump(mode="json")
    missing = sorted(set(leaves(resolved)) - set(leaves(raw)))
    assert not missing, f"params.yaml lacks these fields of the schema: {missing}"


def test_a_value_other_than_the_schema_default_says_so():
    text = (ROOT / "params.yaml").read_text()
    lines, where = text.splitlines(), line_of_each_leaf(text)
    defaults = leaves(schema()().model_dump(mode="json"))
    given = leaves(load_params(ROOT / "params.yaml").model_dump(mode="json"))
    silent = [k for k, v in given.items() if k in defaults and v != defaults[k] and "#" not in lines[where[k]]]
    assert not silent, f"these differ from the schema's default without a comment on their line: {silent}"


def test_the_checks_see_a_missing_field_and_a_silent_difference(tmp_path):
    """The two checks above can fail: a field dropped, a default changed without a comment."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    del raw["distill"]["mm"]["s_draw"]
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert "distill.mm.s_draw" in set(leaves(load_params(path).model_dump(mode="json"))) - set(leaves(raw))
    text = (ROOT / "params.yaml").read_text().replace("    s_ratio: 0.3\n", "    s_ratio: 0.5\n")
    where = line_of_each_leaf(text)
    assert "#" not in text.splitlines()[where["distill.tdd.s_ratio"]]


@pytest.fixture(scope="module")
def locked_project(tmp_path_factory):
    """A copy of the project's dvc.yaml, params.yaml and code with placeholder data and outputs,
    committed to a dvc.lock: DVC's own view of which stage depends on which value."""
    from dvc.repo import Repo
    root = tmp_path_factory.mktemp("locked")
    for name in ("pipeline", "stages"):
        shutil.copytree(ROOT / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(ROOT / name, root / name)
    with chdir(root):  # DVC resolves a stage's paths against the working directory
        _commit_placeholders(Repo.init(str(root), no_scm=True), root)
    return root


def _commit_placeholders(repo, root):
    for stage in repo.index.stages:
        for out in stage.outs:
            path = root / out.def_path
            (path.parent if path.suffix else path).mkdir(parents=True, exist_ok=True)
            (path if path.suffix else path / "placeholder").write_text("x")
    for stage in repo.index.stages:
        for dep in stage.deps:
            path = root / dep.def_path
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text("x")
    repo.commit(force=True)


def parse_once_per_content(monkeypatch):
    """DVC parses params.yaml again for each stage's params dependency (~60 ms each, with
    ruamel); parse each content of the file once and hand each stage its own copy. DVC's
    status logic is unchanged: it still compares what it read with dvc.lock."""
    from dvc.dependency import param
    parsed, load_path = {}, param.load_path

    def load_once(path, fs, **kwargs):
        key = (path, fs.cat_file(path), tuple(sorted(kwargs.items())))
        if key not in parsed:
            parsed[key] = load_path(path, fs, **kwargs)
        return copy.deepcopy(parsed[key])

    monkeypatch.setattr(param, "load_path", load_once)


@pytest.mark.slow
def test_changing_any_value_reruns_exactly_the_stages_that_read_it(locked_project, monkeypatch):
    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo
    parse_once_per_content(monkeypatch)
    with chdir(locked_project):
        stages = list(Repo(str(locked_project)).index.stages)
    params_file = locked_project / "params.yaml"
    original = params_file.read_text()
    raw = yaml.safe_load(original)
    wrong = {}
    try:
        for key, value in leaves(raw).items():
            if key.startswith(("distill.methods", "evaluate.models")):
                continue  # they decide which stages exist (a changed list adds or drops stages)
            changed = copy.deepcopy(raw)
            *parents, leaf = key.split(".")
            node = changed
            for part in parents:
                node = node[part]
            node[leaf] = ["changed", value]
            params_file.write_text(yaml.safe_dump(changed, sort_keys=False))
            with chdir(locked_project):
                rerun = {s.addressing for s in stages for d in s.deps
                         if isinstance(d, ParamsDependency) and d.workspace_status()}
            if rerun != expected_readers(key):
                wrong[key] = sorted(rerun)
    finally:
        params_file.write_text(original)
    assert not wrong, f"these keys rerun other stages than the ones that read them: {wrong}"


def test_report_reruns_when_the_evaluated_models_change(locked_project):
    from dvc.repo import Repo
    params_file = locked_project / "params.yaml"
    original = params_file.read_text()
    try:
        params_file.write_text(original.replace("models: [diffusion, bridge, ibmd, mm, tdd, pd, cd, dmd2, scm, cdbm]",
                                                "models: [diffusion, bridge, ibmd, mm, tdd, cd, pd, dmd2, scm, cdbm]"))
        with chdir(locked_project):
            status = Repo(str(locked_project)).status()
    finally:
        params_file.write_text(original)
    assert set(status) == {"report"}
