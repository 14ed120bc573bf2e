"""DVC stage `distill@<method>`: distil a student from its frozen teacher as a Ray Train job."""
import functools
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
    from pipeline.checkpoint import CheckpointError, save_checkpoint
    from pipeline.data import DataError
    from pipeline.data.shards import load_tensors
    from pipeline.distill import make_method
    from pipeline.distill.base import student_config
    from pipeline.distributed import fit
    from pipeline.teachers import load_teacher

    method_params = getattr(params.distill, args.method)
    try:  # fail fast, naming the file, before Ray starts
        method = make_method(args.method, method_params,
                             load_teacher(args.teacher, names=(METHOD_TEACHER[args.method],)))
        # Only the fields the method trains on (IBMD: corrupted y alone); checks every shard.
        load_data = functools.partial(load_tensors, args.data, "train", method.data_keys)
        load_data()
    except (CheckpointError, DataError) as err:
        sys.exit(f"distill@{args.method}: {err}")
    common.connect_ray(params)
    with common.stage_run(params, "distill", f"distill.{args.method}", model=args.method,
                          method=args.method, teacher=method.teacher.name) as run:
        state = fit(method, load_data, method_params.train, params.seed, params.ray, args.storage,
                    name=f"distill-{args.method}-{run.run_id}", log=run.logger())
        save_checkpoint(args.out, f"student_{args.method}", student_config(method),
                        {"student": state["ema"]["student"]})
    print(f"distill@{args.method}: wrote {args.out}")


if __name__ == "__main__":
    main()
