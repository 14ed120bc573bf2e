"""Sources, splits, the shard format and the prepare function, on tiny data."""
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import TypeAdapter, ValidationError

from pipeline.data import DataError, to_float
from pipeline.data.corruptions import corrupt
from pipeline.data.prepare import corrupt_shard, prepare_dataset, sample_seed
from pipeline.data.shards import load_split, read_manifest, write_manifest, write_split
from pipeline.data.sources import RawData, load_source, split
from pipeline.config.settings import (Cifar10Source, DigitsSource, FolderSource, Inpaint, Mnist5kSource,
                               NoCorruption, PairedCorruption, PairedSource, Source, SuperResolution)


@pytest.fixture(scope="module")
def mnist():
    torch.set_num_threads(1)
    return load_source(Mnist5kSource())


def save_png(path, color, size=(10, 6)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


# ---- sources -------------------------------------------------------------------

def test_mnist5k_is_embedded_and_balanced(mnist):
    assert mnist.x0.shape == (5000, 1, 28, 28) and mnist.x0.dtype == torch.uint8
    assert mnist.label.dtype == torch.int64 and mnist.y is None and mnist.num_classes == 10
    assert torch.bincount(mnist.label).tolist() == [500] * 10
    assert mnist.x0.max() == 255 and (mnist.x0 == 0).float().mean() > 0.5  # dark background


def test_split_shuffles_and_is_reproducible(mnist):
    train, test = split(mnist, 500, seed=0)
    assert len(train) == 4500 and len(test) == 500
    assert len(torch.unique(test.label)) == 10  # mnist5k is sorted by class: no shuffle, one class
    again_train, again_test = split(mnist, 500, seed=0)
    assert torch.equal(test.x0, again_test.x0) and torch.equal(train.label, again_train.label)
    assert not torch.equal(test.label, split(mnist, 500, seed=1)[1].label)


def test_split_is_a_partition():
    raw = RawData(torch.zeros(20, 1, 2, 2, dtype=torch.uint8), None, torch.arange(20), 20)
    train, test = split(raw, 7, seed=3)
    assert sorted(torch.cat([train.label, test.label]).tolist()) == list(range(20))
    for n_test in (0, 20, 25):
        with pytest.raises(ValueError, match="n_test"):
            split(raw, n_test, seed=0)


def test_digits_loads():
    raw = load_source(DigitsSource())
    assert raw.x0.shape == (1797, 1, 8, 8) and raw.x0.dtype == torch.uint8
    assert raw.x0.max() == 255 and raw.num_classes == 10 and set(raw.label.tolist()) == set(range(10))


def test_folder_classes_from_sorted_subfolders(tmp_path):
    save_png(tmp_path / "zebra" / "a.png", (0, 0, 255))
    save_png(tmp_path / "cat" / "x.png", (255, 0, 0))
    save_png(tmp_path / "cat" / "deeper" / "y.PNG", (255, 0, 0), size=(5, 9))
    raw = load_source(FolderSource(path=tmp_path, image_size=8, channels=3))
    assert raw.x0.shape == (3, 3, 8, 8) and raw.num_classes == 2
    assert raw.label.tolist() == [0, 0, 1]  # cat/deeper/y, cat/x, zebra/a
    assert (raw.x0[0, 0] == 255).all() and (raw.x0[0, 1:] == 0).all()
    assert (raw.x0[2, 2] == 255).all()
    gray = load_source(FolderSource(path=tmp_path, image_size=4, channels=1))
    assert gray.x0.shape == (3, 1, 4, 4)


def test_flat_folder_has_one_class(tmp_path):
    for i in range(3):
        save_png(tmp_path / f"{i}.png", (i, i, i))
    raw = load_source(FolderSource(path=tmp_path, image_size=4, channels=1))
    assert raw.label.tolist() == [0, 0, 0] and raw.num_classes == 1
    assert raw.x0[:, 0, 0, 0].tolist() == [0, 1, 2]


def test_folder_errors_name_the_path(tmp_path):
    with pytest.raises(DataError, match="nowhere"):
        load_source(FolderSource(path=tmp_path / "nowhere", image_size=8))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match="empty"):
        load_source(FolderSource(path=tmp_path / "empty", image_size=8))
    save_png(tmp_path / "mixed" / "loose.png", (0, 0, 0))
    save_png(tmp_path / "mixed" / "cls" / "a.png", (0, 0, 0))
    with pytest.raises(DataError, match="loose.png"):
        load_source(FolderSource(path=tmp_path / "mixed", image_size=8))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "bad.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="bad.png"):
        load_source(FolderSource(path=tmp_path / "broken", image_size=8))


def test_paired_source_matches_names(tmp_path):
    for name, shade in (("1", 10), ("2", 200)):
        save_png(tmp_path / "a" / f"{name}.png", (shade, shade, shade))
        save_png(tmp_path / "b" / f"{name}.png", (255 - shade, 0, 0))
    raw = load_source(PairedSource(a=tmp_path / "a", b=tmp_path / "b", image_size=4, channels=3))
    assert raw.x0.shape == raw.y.shape == (2, 3, 4, 4) and raw.y.dtype == torch.uint8
    assert raw.x0[:, 0, 0, 0].tolist() == [10, 200] and raw.y[:, 0, 0, 0].tolist() == [245, 55]
    save_png(tmp_path / "b" / "3.png", (0, 0, 0))
    with pytest.raises(DataError, match="3.png"):
        load_source(PairedSource(a=tmp_path / "a", b=tmp_path / "b", image_size=4))


def test_cifar10_without_download_names_root(tmp_path):
    with pytest.raises(DataError, match=str(tmp_path)):
        load_source(Cifar10Source(root=tmp_path))


def test_source_params_parse_as_a_discriminated_union():
    adapter = TypeAdapter(Source)
    parsed = adapter.validate_python({"kind": "folder", "path": "imgs", "image_size": 16, "channels": 1})
    assert isinstance(parsed, FolderSource) and parsed.image_shape == (1, 16, 16)
    for bad in ({"kind": "folder", "path": "imgs", "channels": 2}, {"kind": "mnist5k", "path": "x"},
                {"kind": "folder", "path": "imgs", "image_size": 2}, {"kind": "imagenet"}):
        with pytest.raises(ValidationError):
            adapter.validate_python(bad)


# ---- shards --------------------------------------------------------------------

def write_tiny(out_dir, n=7, shard_size=3):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, 256, (n, 1, 4, 4), generator=g, dtype=torch.uint8)
    y = torch.randn(n, 1, 4, 4, generator=g)
    label = torch.arange(n)
    entry = write_split(out_dir, "train", x0, y, label, shard_size)
    write_manifest(out_dir, {"splits": {"train": entry}, "x0_shape": [1, 4, 4], "y_shape": [1, 4, 4],
                             "conditional": True, "num_classes": 7})
    return x0, y, label, entry


def test_shards_round_trip(tmp_path):
    x0, y, label, entry = write_tiny(tmp_path)
    assert [s["count"] for s in entry["shards"]] == [3, 3, 1] and entry["count"] == 7
    assert [s["file"] for s in entry["shards"]] == ["train-00000.pt", "train-00001.pt", "train-00002.pt"]
    data = load_split(tmp_path, "train")
    assert torch.equal(data.x0, to_float(x0)) and torch.equal(data.y, y) and torch.equal(data.label, label)
    assert data.x0.dtype == torch.float32 and data.x0.min() >= -1 and data.x0.max() <= 1
    assert data.conditional and data.num_classes == 7 and len(data) == 7
    first = data.head(2)
    assert len(first) == 2 and torch.equal(first.y, y[:2]) and first.num_classes == 7
    assert read_manifest(tmp_path)["splits"]["train"] == entry
    small = (tmp_path / "train-00002.pt").stat().st_size
    assert small < (tmp_path / "train-00000.pt").stat().st_size  # slices saved without their base


def test_truncated_shard_is_named(tmp_path):
    write_tiny(tmp_path)
    shard = tmp_path / "train-00001.pt"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(DataError, match="train-00001.pt"):
        load_split(tmp_path, "train")


def test_missing_shard_is_named(tmp_path):
    write_tiny(tmp_path)
    (tmp_path / "train-00002.pt").unlink()
    with pytest.raises(DataError, match="train-00002.pt"):
        load_split(tmp_path, "train")


def test_missing_manifest_and_split_are_named(tmp_path):
    with pytest.raises(DataError, match="manifest.json"):
        load_split(tmp_path, "train")
    write_tiny(tmp_path)
    with pytest.raises(DataError, match="'test'"):
        load_split(tmp_path, "test")


def test_manifest_shape_mismatch_is_named(tmp_path):
    write_tiny(tmp_path)
    manifest = read_manifest(tmp_path)
    manifest["x0_shape"] = [3, 4, 4]
    write_manifest(tmp_path, manifest)
    with pytest.raises(DataError, match="train-00000.pt"):
        load_split(tmp_path, "train")


# ---- prepare -------------------------------------------------------------------

def recording_map(calls):
    def map_fn(fn, jobs):
        pickle.dumps((fn, jobs))  # what a Ray-based map needs
        calls.append(len(jobs))
        return [fn(job) for job in jobs]
    return map_fn


def test_prepare_digits_end_to_end(tmp_path):
    calls = []
    out = tmp_path / "prepared"
    params = SuperResolution(factor=2)
    manifest = prepare_dataset(DigitsSource(), params, n_test=300, shard_size=500, seed=0,
                               out_dir=out, map_fn=recording_map(calls), n_reference=400)
    assert calls == [3 + 1 + 1]  # 1097 train in 3 shards, 300 test in 1, 400 reference in 1
    assert manifest == read_manifest(out)
    assert manifest["splits"]["train"]["count"] == 1097 and manifest["x0_shape"] == [1, 8, 8]
    assert manifest["splits"]["reference"]["count"] == 400 and manifest["n_reference"] == 400
    reference = load_split(out, "reference")
    assert not set(map(bytes, reference.x0.numpy())) & set(map(bytes, load_split(out, "test").x0.numpy()))
    assert manifest["corruption"] == {"kind": "super_resolution", "factor": 2, "mode": "pool"}
    assert manifest["source"] == {"kind": "digits"} and manifest["conditional"] is True
    test = load_split(out, "test")
    assert len(test) == 300 and len(torch.unique(test.label)) == 10
    assert torch.allclose(test.y, corrupt(test.x0, params, [0] * 300))
    assert [p.name for p in tmp_path.iterdir()] == ["prepared"]  # no temporary leftovers


def test_prepare_is_independent_of_shard_size(tmp_path):
    params = Inpaint(mask="random", size=3)
    for shard_size in (100, 2000):
        prepare_dataset(DigitsSource(), params, 200, shard_size, 5, tmp_path / str(shard_size))
    a, b = load_split(tmp_path / "100", "train"), load_split(tmp_path / "2000", "train")
    assert torch.equal(a.y, b.y) and torch.equal(a.x0, b.x0)
    seeds = [sample_seed(5, "train", i) for i in range(len(a))]
    assert torch.equal(a.y, corrupt(a.x0, params, seeds))
    assert sample_seed(5, "train", 0) != sample_seed(5, "test", 0)


def test_prepare_unconditional_stores_zeros(tmp_path):
    manifest = prepare_dataset(DigitsSource(), NoCorruption(), 100, 1000, 0, tmp_path / "out")
    assert manifest["conditional"] is False
    data = load_split(tmp_path / "out", "train")
    assert not data.conditional and (data.y == 0).all()


def test_failed_prepare_keeps_previous_output(tmp_path):
    out = tmp_path / "prepared"
    out.mkdir()
    (out / "keep.txt").write_text("previous run")

    def failing_map(fn, jobs):
        yield fn(jobs[0])
        raise RuntimeError("worker died")

    with pytest.raises(RuntimeError, match="worker died"):
        prepare_dataset(DigitsSource(), SuperResolution(factor=2), 100, 500, 0, out, map_fn=failing_map)
    assert [p.name for p in tmp_path.iterdir()] == ["prepared"]
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    prepare_dataset(DigitsSource(), SuperResolution(factor=2), 100, 500, 0, out)
    assert not (out / "keep.txt").exists() and (out / "manifest.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["prepared"]


def test_failure_while_writing_leaves_nothing(tmp_path, monkeypatch):
    import pipeline.data.prepare as prepare

    def broken_manifest(out_dir, manifest):
        raise OSError("disk full")

    monkeypatch.setattr(prepare, "write_manifest", broken_manifest)
    with pytest.raises(OSError, match="disk full"):
        prepare_dataset(DigitsSource(), NoCorruption(), 100, 500, 0, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_prepare_rejects_bad_combinations_before_work(tmp_path):
    calls = []
    bad = [
        (DigitsSource(), PairedCorruption(), "paired"),
        (PairedSource(a=tmp_path / "a", b=tmp_path / "b"), NoCorruption(), "paired"),
        (DigitsSource(), SuperResolution(factor=3), "factor"),
        (Mnist5kSource(), Inpaint(size=30), "size"),
    ]
    for source, corruption, field in bad:
        with pytest.raises(ValueError, match=field):
            prepare_dataset(source, corruption, 100, 500, 0, tmp_path / "out", map_fn=recording_map(calls))
    with pytest.raises(ValueError, match="n_test"):
        prepare_dataset(DigitsSource(), NoCorruption(), 1797, 500, 0, tmp_path / "out",
                        map_fn=recording_map(calls))
    assert calls == [] and not (tmp_path / "out").exists()


def test_paired_prepare_takes_y_from_b(tmp_path):
    for i in range(6):
        save_png(tmp_path / "a" / f"{i}.png", (40 * i, 40 * i, 40 * i))
        save_png(tmp_path / "b" / f"{i}.jpg", (0, 0, 0))
    source = PairedSource(a=tmp_path / "a", b=tmp_path / "b", image_size=4, channels=1)
    prepare_dataset(source, PairedCorruption(), 1, 2, 0, tmp_path / "out")
    data = load_split(tmp_path / "out", "train")
    assert len(data) == 3 and data.conditional and (data.y == -1).all()
    shades = {round(v * 127.5 + 127.5) for v in data.x0[:, 0, 0, 0].tolist()}
    assert len(shades) == 3 and shades <= {0, 40, 80, 120, 160, 200}  # x0 comes from a


def test_corrupt_shard_is_picklable():
    assert pickle.loads(pickle.dumps(corrupt_shard)) is corrupt_shard
    x0 = torch.from_numpy(np.full((2, 1, 4, 4), 255, dtype=np.uint8))
    y = corrupt_shard((x0, None, NoCorruption(), [0, 1]))
    assert y.shape == (2, 1, 4, 4) and (y == 0).all()
