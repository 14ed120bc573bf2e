"""DVC stage `teacher@<name>`: train a teacher as a Ray Train job, write its checkpoint."""
import common

from pipeline.settings import TEACHER_NAMES


def main():
    args = common.parse("teacher", __doc__, [
        ("name", {"choices": TEACHER_NAMES}),
        ("--data", {"required": True, "type": common.path}), ("--out", {"required": True, "type": common.path}),
        ("--storage", {"default": "ray_results", "type": common.path})])
    params = common.load(args, section=f"teacher.{args.name}")
    # Heavy imports only after the params validated (see common.py).
    from pipeline.distributed import fit
    from pipeline.jobs import teacher_job

    job = teacher_job(args.name, params, args.data)  # checks every shard: fails fast, naming it
    common.connect_ray(params)
    with common.stage_run(params, "teacher", f"teacher.{args.name}", **job.tags) as run:
        state = fit(job.task, job.load_data, job.train, params.seed, params.ray, args.storage,
                    name=f"teacher-{args.name}-{run.run_id}", log=run.logger(),
                    progress=common.progress_enabled())
        job.write(args.out, state)
    print(f"teacher@{args.name}: wrote {args.out}")


if __name__ == "__main__":
    main()
