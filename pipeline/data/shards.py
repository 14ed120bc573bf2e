"""The on-disk format of a prepared dataset: shards plus a checked manifest.

A prepared directory holds `manifest.json` and, per split, files
`{split}-00000.pt`, `{split}-00001.pt`, ... each a `torch.save`d dict of
tensors: x0 uint8 (n, C, H, W), y float32 (n, C, H, W), label int64 (n,).
The manifest records counts, shapes and a sha256 per shard, so a truncated,
edited or missing file is caught (and named) before training starts instead
of surfacing as a confusing shape error or silently wrong numbers.
"""
import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from pipeline.data import DataError, to_float

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
REQUIRED_KEYS = {"splits", "x0_shape", "y_shape", "conditional", "num_classes"}


@dataclass
class Split:
    """One split in memory, ready for training or evaluation."""

    x0: torch.Tensor  # (N, C, H, W) float32 in [-1, 1]
    y: torch.Tensor  # (N, C, H, W) float32, zeros when not conditional
    label: torch.Tensor  # (N,) int64
    conditional: bool  # y is an informative image condition (a corruption)
    num_classes: int
    class_conditional: bool = False  # the models take `label` as their condition

    @property
    def condition(self):
        """What a model is conditioned on for these samples: the label, y, or None."""
        if self.class_conditional:
            return self.label
        return self.y if self.conditional else None

    def __len__(self):
        return self.x0.shape[0]

    def head(self, n):
        """The first n samples (the split is already shuffled, so a fair subset)."""
        return replace(self, x0=self.x0[:n], y=self.y[:n], label=self.label[:n])


def sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_split(out_dir, name, x0_uint8, y_float, label, shard_size):
    """Write one split as shards of at most shard_size samples; returns its manifest entry.

    Entry: {"count": N, "shards": [{"file", "count", "sha256"}, ...]}.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size={shard_size} must be at least 1")
    n = x0_uint8.shape[0]
    if y_float.shape != x0_uint8.shape or label.shape != (n,):
        raise ValueError(f"split {name}: shapes x0 {tuple(x0_uint8.shape)}, y {tuple(y_float.shape)}, "
                         f"label {tuple(label.shape)} do not agree")
    shards = []
    for i, start in enumerate(range(0, n, shard_size)):
        part = slice(start, start + shard_size)
        shards.append(write_shard(Path(out_dir) / f"{name}-{i:05d}.pt", {
            "x0": x0_uint8[part].to(torch.uint8),
            "y": y_float[part].to(torch.float32),
            "label": label[part].to(torch.int64),
        }))
    return {"count": n, "shards": shards}


def write_shard(path, tensors):
    # clone: torch.save of a slice would store the whole underlying tensor
    torch.save({k: v.contiguous().clone() for k, v in tensors.items()}, path)
    return {"file": path.name, "count": int(tensors["label"].shape[0]), "sha256": sha256(path)}


def write_manifest(out_dir, manifest):
    """Write manifest.json as given; the dict must be JSON-serialisable (params as plain dicts)."""
    text = json.dumps(manifest, indent=2, sort_keys=True)
    (Path(out_dir) / MANIFEST).write_text(text + "\n")


def read_manifest(data_dir):
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        raise DataError(f"{path} is missing: the prepare stage writes it (dvc repro prepare)")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"manifest {path} is not valid JSON: {e}") from e


def load_shard(path, entry, image_shapes):
    """Load one shard after checking it exists, its checksum, its count and shapes."""
    if not path.is_file():
        raise DataError(f"shard {path} listed in the manifest is missing; rerun the prepare stage "
                        "(dvc repro -f prepare)")
    if sha256(path) != entry["sha256"]:
        raise DataError(f"shard {path} does not match its checksum (truncated or edited); rerun the "
                        "prepare stage (dvc repro -f prepare)")
    try:
        tensors = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any unpickling failure means a bad file
        raise DataError(f"cannot load shard {path}: {e}") from e
    check_shard(path, tensors, entry["count"], image_shapes)
    return tensors


def check_shard(path, tensors, count, image_shapes):
    """image_shapes: {"x0": (C, H, W), "y": (C, H, W)} from the manifest."""
    expected = {"x0": (count, *image_shapes["x0"]), "y": (count, *image_shapes["y"]), "label": (count,)}
    if not isinstance(tensors, dict) or set(tensors) != set(expected):
        raise DataError(f"shard {path} must hold exactly the tensors {sorted(expected)}")
    for key, shape in expected.items():
        if tuple(tensors[key].shape) != shape:
            raise DataError(f"shard {path}: {key} has shape {tuple(tensors[key].shape)}, "
                            f"the manifest says {shape}")


def load_split(data_dir, name):
    """Read and verify one split ("train" or "test") of a prepared directory."""
    manifest = read_manifest(data_dir)
    where = Path(data_dir) / MANIFEST
    missing = REQUIRED_KEYS - set(manifest)
    if missing:
        raise DataError(f"manifest {where} lacks {sorted(missing)}")
    entry = manifest["splits"].get(name)
    if entry is None:
        raise DataError(f"manifest {where} has no split {name!r} (has {sorted(manifest['splits'])})")
    if sum(s["count"] for s in entry["shards"]) != entry["count"] or not entry["shards"]:
        raise DataError(f"manifest {where}: split {name!r} shard counts do not add up to {entry['count']}")
    image_shapes = {"x0": tuple(manifest["x0_shape"]), "y": tuple(manifest["y_shape"])}
    shards = [load_shard(Path(data_dir) / s["file"], s, image_shapes) for s in entry["shards"]]
    return Split(
        x0=to_float(torch.cat([s["x0"] for s in shards])),
        y=torch.cat([s["y"] for s in shards]).to(torch.float32),
        label=torch.cat([s["label"] for s in shards]).to(torch.int64),
        conditional=bool(manifest["conditional"]),
        num_classes=int(manifest["num_classes"]),
        class_conditional=bool(manifest.get("class_conditional", False)),
    )


def load_tensors(data_dir, name, keys):
    """{key: tensor} for the fields `keys` of a split; picklable with functools.partial,
    so training workers read the data themselves instead of receiving it."""
    split = load_split(data_dir, name)
    return {key: getattr(split, key) for key in keys}
