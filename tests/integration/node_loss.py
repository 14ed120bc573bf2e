"""Driver of the lost-node tests, run in its own process (`python -m tests.integration.node_loss
train|evaluate OUT [PROJECT]`): a Ray cluster on this machine (`ray.cluster_utils.Cluster`:
a head without CPUs and worker nodes of one CPU each), a worker node removed mid-job, and a
JSON line of what happened on stdout.

- train: a 2-worker DDP run of a tiny diffusion teacher on three worker nodes (one worker
  per node, the third node idle); a node that holds a worker is removed after the first
  checkpoint, and the restarted run takes the idle node, as it would take a node a cluster
  autoscaler adds (`Cluster.add_node` cannot stand in for that here: it must run in the main
  thread, which `fit` holds). The steps each attempt reached come from a `faults.StepJournal`.
- evaluate: `evaluation.evaluate_model` of the smoke project's CD student on two worker
  nodes, once undisturbed and once with a node removed (and another added) as soon as the
  first shard is done (its shard in flight is rerun by Ray's task retries); both rows, to
  compare.
"""
import functools
import json
import sys
import threading
import time
from pathlib import Path

import ray
from ray.cluster_utils import Cluster

from pipeline.runtime.cluster import RAY_ENV, parallel_map

from pipeline.training.ray_train import fit

ROOT = Path(__file__).resolve().parents[2]
RESULT = "node-loss result: "  # prefixes the one stdout line the test reads (Ray logs go to stdout too)


def start_cluster(nodes):
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    workers = [cluster.add_node(num_cpus=1) for _ in range(nodes)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False,
             runtime_env={"env_vars": {**RAY_ENV, "PYTHONPATH": str(ROOT)}})
    return cluster, workers


def read_journal(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()] if Path(path).exists() else []


def train(out):
    from pipeline.training.faults import Pace, StepJournal
    from pipeline.config.settings import DiffusionTeacherParams, RayParams, TrainParams, UNetParams
    from pipeline.models.teachers import DataShape, DiffusionTeacherTask
    from pipeline.training.loop import TrainRun
    from tests.helpers import square_images

    cluster, workers = start_cluster(nodes=3)
    journal = out / "journal.jsonl"
    task = DiffusionTeacherTask(DiffusionTeacherParams(net=UNetParams(channels=(8, 16), emb_dim=16)),
                                DataShape(channels=1, image_size=8, conditional=True))
    params = TrainParams(steps=160, batch_size=16, lr=3e-3, log_every=10, checkpoint_every=40)
    scaling = RayParams(num_workers=2, threads_per_worker=1, max_failures=3)
    run = TrainRun(task, functools.partial(square_images, 64), params, 0, scaling,
                   hooks=(StepJournal(str(journal)), Pace(0.4)))
    removed = {}

    def remove_a_node():  # once the first attempt passed its first checkpoint
        while not any(e["step"] >= 60 for e in read_journal(journal)):
            time.sleep(0.1)
        on_it = {e["node"] for e in read_journal(journal)}
        victim = next(w for w in workers if w.node_id in on_it and w.node_id)
        removed.update(node=victim.node_id, time=time.time(),
                       step=max(e["step"] for e in read_journal(journal)))
        cluster.remove_node(victim, allow_graceful=False)

    killer = threading.Thread(target=remove_a_node, daemon=True)
    killer.start()
    tick = time.time()
    state = fit(run, out / "ray", "node-loss")
    seconds = time.time() - tick
    killer.join(timeout=5)
    entries = read_journal(journal)
    first = [e for e in entries if e["resumed_from"] is None]
    later = [e for e in entries if e["resumed_from"] is not None]
    print(RESULT + json.dumps({
        "final_step": int(state["step"]), "steps": params.steps, "checkpoint_every": params.checkpoint_every,
        "removed": removed, "reached": max(e["step"] for e in first),
        "resumed_from": min(e["resumed_from"] for e in later) if later else None,
        "recovered_s": min(e["time"] for e in later) - removed["time"] if later else None,
        "ranks_on_nodes": sorted({(e["rank"], e["node"]) for e in first}), "seconds": seconds}))
    ray.shutdown()  # the driver first: a Cluster refuses to remove the node it is connected to
    cluster.shutdown()


def evaluate(out, project):
    from pipeline.config.schema import load_params
    from pipeline.data.shards import load_split
    from pipeline.evaluation.sampling import evaluate_model
    from pipeline.evaluation.results import FeatureSpace
    from pipeline.evaluation.scoring import Scorer

    cluster, workers = start_cluster(nodes=2)
    ev = load_params(project / "params.yaml").evaluate
    data, model = project / "data" / "prepared", project / "models" / "cd.pt"
    scorer = Scorer(FeatureSpace.load(project / "models" / "features"), ev.n_samples, ev.groups,
                    load_split(data, "test").x0.shape[1:])
    removed = {}

    def losing_a_node(fn, jobs, cpus_per_job=1, on_done=None):
        def done(i):
            if not removed:  # the first shard is back: the other node holds one in flight
                removed.update(time=time.time(), jobs=len(jobs))
                cluster.remove_node(workers[1], allow_graceful=False)
                cluster.add_node(num_cpus=1)
            if on_done is not None:
                on_done(i)
        return parallel_map(fn, jobs, cpus_per_job, done)

    tick = time.time()
    undisturbed, _, _ = evaluate_model("cd", model, data, scorer, ev, 2, parallel_map)
    base_s = time.time() - tick
    tick = time.time()
    disturbed, _, _ = evaluate_model("cd", model, data, scorer, ev, 2, losing_a_node)
    print(RESULT + json.dumps({"undisturbed": undisturbed, "disturbed": disturbed, "removed": bool(removed),
                      "jobs": removed.get("jobs"), "undisturbed_s": base_s, "disturbed_s": time.time() - tick},
                     default=float))
    ray.shutdown()  # the driver first: a Cluster refuses to remove the node it is connected to
    cluster.shutdown()


if __name__ == "__main__":
    mode, out = sys.argv[1], Path(sys.argv[2])
    train(out) if mode == "train" else evaluate(out, Path(sys.argv[3]))
