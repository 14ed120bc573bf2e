"""DVC stage `distill@<method>`: distil a student from its frozen teacher as a Ray Train job."""
import common

from pipeline.distill import METHODS


def main(args):
    params = common.load(args, f"distill@{args.method}")
    # Heavy imports only after the params validated (see common.py).
    from pipeline.training.jobs import distill_job

    # Fails fast, naming the file, on a wrong-kind teacher or a bad shard, before Ray starts.
    job = distill_job(args.method, getattr(params.distill, args.method), args.data, args.teacher)
    from pipeline.training.ray_train import fit  # Ray Train (~4 s of imports) once the inputs are good
    common.connect_ray()
    with common.stage_run(params, args, "distill", **job.tags) as run:
        state = fit(job.run(params.seed, params.ray, log=run.logger()), args.storage,
                    f"distill-{args.method}-{run.run_id}", progress=common.progress_enabled())
        job.write(args.out, state)
    print(f"distill@{args.method}: wrote {args.out}")


if __name__ == "__main__":
    common.run(main, common.parse("distill", __doc__, [
        ("method", {"choices": tuple(METHODS)}),
        ("--teacher", {"required": True, "type": common.path}),
        ("--data", {"required": True, "type": common.path}), ("--out", {"required": True, "type": common.path}),
        ("--storage", {"default": "ray_results", "type": common.path})]))
