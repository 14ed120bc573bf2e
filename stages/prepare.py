"""DVC stage `prepare`: load the source, split, corrupt (as Ray tasks), write shards."""
import common


def main(args):
    params = common.load(args, "prepare")
    # Heavy imports only after the params validated (see common.py).
    from pipeline.data.prepare import prepare_dataset
    from pipeline.data.sources import check_source
    from pipeline.runtime.cluster import parallel_map

    check_source(params.data.source)  # missing or empty folders fail here, before Ray starts

    def ray_map(fn, jobs):
        return parallel_map(fn, [(job,) for job in jobs])

    common.connect_ray()
    with common.stage_run(params, args, "prepare") as run:
        data = params.data
        manifest = prepare_dataset(data.source, params.corruption, data.n_test, data.shard_size, params.seed,
                                   args.out, map_fn=ray_map, n_reference=data.n_reference)
        counts = {f"{name}_count": entry["count"] for name, entry in manifest["splits"].items()}
        run.log_metrics(counts)
        run.set_tags({"corruption": params.corruption.kind, "source": params.data.source.kind})
    print(f"prepare: wrote {args.out} ({counts})")


if __name__ == "__main__":
    common.run(main, common.parse("prepare", __doc__, [("--out", {"required": True, "type": common.path})]))
