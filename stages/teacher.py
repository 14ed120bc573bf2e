"""DVC stage `teacher@<name>`: train a teacher as a Ray Train job, write its checkpoint."""
import functools

import common

from pipeline.settings import TEACHER_NAMES


def main():
    args = common.parse("teacher", __doc__, [
        ("name", {"choices": TEACHER_NAMES}),
        ("--data", {"required": True, "type": common.path}), ("--out", {"required": True, "type": common.path}),
        ("--storage", {"default": "ray_results", "type": common.path})])
    params = common.load(args, section=f"teacher.{args.name}")
    # Heavy imports only after the params validated (see common.py).
    from pipeline.checkpoint import save_checkpoint
    from pipeline.data.shards import load_split, load_tensors
    from pipeline.distributed import fit
    from pipeline.teachers import TEACHERS, DataShape, teacher_config

    teacher = getattr(params.teacher, args.name)
    train = load_split(args.data, "train")  # checks every shard's checksum: fails fast, naming it
    shape = DataShape(channels=train.x0.shape[1], image_size=train.x0.shape[-1],
                      conditional=train.conditional)
    task = TEACHERS[args.name][1](teacher, shape)
    common.connect_ray(params)
    with common.stage_run(params, "teacher", f"teacher.{args.name}", model=args.name,
                          method="teacher", teacher=args.name) as run:
        state = fit(task, functools.partial(load_tensors, args.data, "train", ("x0", "y")), teacher.train, params.seed,
                    params.ray, args.storage, name=f"teacher-{args.name}-{run.run_id}",
                    log=run.logger())
        save_checkpoint(args.out, f"teacher_{args.name}", teacher_config(args.name, teacher, shape),
                        {"denoiser": state["ema"]["denoiser"]})
    print(f"teacher@{args.name}: wrote {args.out}")


if __name__ == "__main__":
    main()
