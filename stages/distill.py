"""DVC stage `distill@<method>`: distil a student from its frozen teacher as a Ray Train job."""
import sys

import common

from pipeline.settings import METHOD_TEACHER


def main():
    args = common.parse("distill", __doc__, [
        ("method", {"choices": tuple(METHOD_TEACHER)}),
        ("--teacher", {"required": True, "type": common.path}),
        ("--data", {"required": True, "type": common.path}), ("--out", {"required": True, "type": common.path}),
        ("--storage", {"default": "ray_results", "type": common.path})])
    params = common.load(args, section=f"distill.{args.method}")
    # Heavy imports only after the params validated (see common.py).
    from pipeline.checkpoint import CheckpointError
    from pipeline.data import DataError
    from pipeline.distributed import fit
    from pipeline.jobs import distill_job

    try:  # fail fast, naming the file, before Ray starts
        job = distill_job(args.method, params, args.data, args.teacher)
    except (CheckpointError, DataError) as err:
        sys.exit(f"distill@{args.method}: {err}")
    common.connect_ray(params)
    with common.stage_run(params, "distill", f"distill.{args.method}", **job.tags) as run:
        state = fit(job.task, job.load_data, job.train, params.seed, params.ray, args.storage,
                    name=f"distill-{args.method}-{run.run_id}", log=run.logger(),
                    progress=common.progress_enabled())
        job.write(args.out, state)
    print(f"distill@{args.method}: wrote {args.out}")


if __name__ == "__main__":
    main()
