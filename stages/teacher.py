"""DVC stage `teacher@<name>`: train a teacher as a Ray Train job, write its checkpoint."""
import common

from pipeline.config.settings import TEACHER_NAMES


def main(args):
    params = common.load(args, f"teacher@{args.name}")
    section = getattr(params.teacher, args.name)
    if getattr(section, "pretrained", None) is not None:  # nothing to train: embed the model
        from pipeline.models.pretrained import write_pretrained_teacher
        with common.stage_run(params, args, "teacher", model=args.name, method="pretrained", teacher=args.name):
            write_pretrained_teacher(args.out, section.pretrained, section, args.data)
        print(f"teacher@{args.name}: wrote {args.out} from {section.pretrained.path}")
        return
    # Heavy imports only after the params validated (see common.py).
    from pipeline.training.jobs import teacher_job

    job = teacher_job(args.name, getattr(params.teacher, args.name), args.data)  # checks every shard
    from pipeline.training.ray_train import fit  # Ray Train (~4 s of imports) once the inputs are good
    common.connect_ray()
    with common.stage_run(params, args, "teacher", **job.tags) as run:
        state = fit(job.run(params.seed, params.ray, log=run.logger()), args.storage,
                    f"teacher-{args.name}-{run.run_id}", progress=common.progress_enabled())
        job.write(args.out, state)
    print(f"teacher@{args.name}: wrote {args.out}")


if __name__ == "__main__":
    common.run(main, common.parse("teacher", __doc__, [
        ("name", {"choices": TEACHER_NAMES}),
        ("--data", {"required": True, "type": common.path}), ("--out", {"required": True, "type": common.path}),
        ("--storage", {"default": "ray_results", "type": common.path})]))
