"""Classifier FID/KID through torch-fidelity: zero on identical sets, growing with noise, cached references."""
import pytest
import torch
from sklearn.datasets import load_digits
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from pipeline.features import fid
from pipeline.features.classifier import Classifier, save_classifier, train_classifier
from pipeline.config.settings import ClassifierParams, TrainParams
from pipeline.features.extractors import ClassifierFeatureExtractor, register_classifier_extractor, register_extractors
from pipeline.features.fid import cache_reference_statistics, extract_features, fid_label, fidelity_metrics
from pipeline.features.layers import FID_LAYERS
from tests.conftest import one_torch_thread

KID_SUBSETS = 20  # fewer than the default 100: same behaviour, a fraction of the time


# One torch thread in every test of this module (tests/conftest.py).
one_thread = pytest.fixture(autouse=True)(one_torch_thread)


@pytest.fixture(scope="module")
def digits():
    """Two disjoint halves of scikit-learn's digits in [-1, 1]: (600, 1, 8, 8) each, plus labels."""
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32)[:, None] / 8.0 - 1.0
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    return x[perm], torch.tensor(data.target)[perm]


@pytest.fixture(scope="module")
def weights(digits, tmp_path_factory):
    """A classifier checkpoint trained briefly on the digits (about 1 s)."""
    torch.set_num_threads(1)
    x, label = digits
    params = ClassifierParams()
    train = TrainParams(steps=150, batch_size=64, lr=3e-3, warmup_steps=0, ema_decay=0.0)
    model, _ = train_classifier(x, label, params, train, seed=1, num_classes=10)
    path = tmp_path_factory.mktemp("classifier") / "classifier.pt"
    save_classifier(path, model, params, 1, 10)
    return path, model


def noisy(x, std, seed=2):
    g = torch.Generator().manual_seed(seed)
    return (x + std * torch.randn(x.shape, generator=g)).clamp(-1, 1)


@pytest.fixture
def count_extracted(monkeypatch):
    """Images seen by the classifier extractor, one entry per batch."""
    seen = []
    forward = ClassifierFeatureExtractor.forward

    def counting(self, x):
        seen.append(len(x))
        return forward(self, x)

    monkeypatch.setattr(ClassifierFeatureExtractor, "forward", counting)
    return seen


def test_fid_of_a_set_against_itself_is_zero(digits, weights):
    path, model = weights
    ref = digits[0][:600]
    out = fidelity_metrics(ref, ref, weights_path=path, kid_subsets=KID_SUBSETS)
    # FID's natural scale is the trace of the feature covariance (two unrelated
    # sets score about twice that); identical sets leave only round-off.
    with torch.no_grad():
        scale = torch.cov(model.features(ref).double().T).trace().item()
    assert abs(out["fid"]) < 1e-6 * scale
    assert set(out) == {"fid", "kid", "kid_std"}


def test_fid_and_kid_grow_with_noise(digits, weights):
    x = digits[0]
    ref, other = x[:600], x[600:1200]  # independent samples of one distribution
    results = [
        fidelity_metrics(noisy(other, std) if std else other, ref, weights_path=weights[0], kid_subsets=KID_SUBSETS)
        for std in (0.0, 0.15, 0.3, 0.6)
    ]
    fids = [r["fid"] for r in results]
    kids = [r["kid"] for r in results]
    assert fids == sorted(fids) and len(set(fids)) == 4, fids
    assert kids == sorted(kids) and len(set(kids)) == 4, kids
    # Same distribution: KID's unbiased estimate is close to zero.
    assert abs(kids[0]) < 0.1 * kids[-1]
    assert fids[0] < 0.5 * fids[-1]


def test_reference_statistics_are_computed_once_and_reused(digits, weights, tmp_path, count_extracted):
    x = digits[0]
    ref, gen = x[:600], noisy(x[600:900], 0.2)
    files = cache_reference_statistics(ref, cache_root=tmp_path, reference_cache_name="digits-test", weights_path=weights[0])
    assert all(f.startswith(str(tmp_path)) for f in files)
    assert sum(count_extracted) == len(ref)  # the reference went through the extractor once

    count_extracted.clear()
    cached = fidelity_metrics(
        gen, ref, weights_path=weights[0], cache_root=tmp_path, reference_cache_name="digits-test",
        kid_subsets=KID_SUBSETS,
    )
    assert sum(count_extracted) == len(gen)  # only the generated images: the reference came from the cache

    count_extracted.clear()
    without_images = fidelity_metrics(
        gen, None, weights_path=weights[0], cache_root=tmp_path, reference_cache_name="digits-test",
        kid_subsets=KID_SUBSETS,
    )
    assert sum(count_extracted) == len(gen)

    uncached = fidelity_metrics(gen, ref, weights_path=weights[0], kid_subsets=KID_SUBSETS)
    for out in (cached, without_images):
        assert out["fid"] == pytest.approx(uncached["fid"], rel=1e-6)
        assert out["kid"] == pytest.approx(uncached["kid"], rel=1e-6)


def test_cache_miss_on_first_use_writes_the_cache(digits, weights, tmp_path, count_extracted):
    x = digits[0]
    ref, gen = x[:200], x[200:300]
    kwargs = dict(weights_path=weights[0], cache_root=tmp_path, reference_cache_name="lazy", kid_subsets=KID_SUBSETS)
    first = fidelity_metrics(gen, ref, **kwargs)
    assert sum(count_extracted) == len(gen) + len(ref)
    count_extracted.clear()
    assert fidelity_metrics(gen, None, **kwargs) == pytest.approx(first, rel=1e-6)
    assert sum(count_extracted) == len(gen)


def test_cache_is_keyed_by_classifier_weights_and_image_shape(digits, weights, tmp_path):
    x = digits[0]
    cache_reference_statistics(x[:100], cache_root=tmp_path, reference_cache_name="ref", weights_path=weights[0])
    params = ClassifierParams()
    retrained = tmp_path / "retrained.pt"
    save_classifier(retrained, Classifier(params, 1, 10), params, 1, 10)
    with pytest.raises(FileNotFoundError, match="cache_reference_statistics"):
        fidelity_metrics(x[100:200], None, weights_path=retrained, cache_root=tmp_path, reference_cache_name="ref")
    bigger = torch.nn.functional.interpolate(x[100:110], size=(16, 16))
    with pytest.raises(FileNotFoundError, match="cache_reference_statistics"):
        fidelity_metrics(bigger, None, weights_path=weights[0], cache_root=tmp_path, reference_cache_name="ref")


def test_recaching_replaces_stale_statistics(digits, weights, tmp_path):
    x = digits[0]
    kwargs = dict(cache_root=tmp_path, reference_cache_name="ref", weights_path=weights[0])
    cache_reference_statistics(x[:300], **kwargs)
    cache_reference_statistics(noisy(x[:300], 0.5), **kwargs)  # the reference data changed
    fresh = fidelity_metrics(x[:300], None, kid_subsets=KID_SUBSETS, **kwargs)
    assert fresh["fid"] > 1e-3  # against the new (noisy) reference, not the stale clean one


def test_kid_subset_size_is_clipped_to_the_sample_count(digits, weights):
    x = digits[0]
    out = fidelity_metrics(x[:20], x[100:700], weights_path=weights[0], kid_subset_size=1000, kid_subsets=5)
    assert all(map(lambda v: v == v, out.values()))  # no NaN


def test_mismatched_shapes_raise_clearly(digits, weights):
    x = digits[0]
    rgb = x[:50].expand(-1, 3, -1, -1)
    with pytest.raises(ValueError, match=r"differ in \(C, H, W\)"):
        fidelity_metrics(x[:50], rgb, weights_path=weights[0])


def test_bad_inputs_raise_clearly(digits, weights, tmp_path):
    x = digits[0]
    with pytest.raises(ValueError, match="float"):
        fidelity_metrics((x[:50] > 0).to(torch.uint8), x[:50], weights_path=weights[0])
    with pytest.raises(ValueError, match="at least 2"):
        fidelity_metrics(x[:1], x[:50], weights_path=weights[0])
    with pytest.raises(ValueError, match="weights_path"):
        fidelity_metrics(x[:50], x[:50])
    with pytest.raises(ValueError, match="cache_root"):
        fidelity_metrics(x[:50], x[:50], weights_path=weights[0], reference_cache_name="ref")
    with pytest.raises(ValueError, match="unknown extractor"):
        fidelity_metrics(x[:50], x[:50], extractor="vgg16", weights_path=weights[0])


def test_inception_without_weights_fails_before_any_download(digits, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))  # an empty hub cache
    x = digits[0]
    with pytest.raises(FileNotFoundError, match="weights_path"):
        fidelity_metrics(x[:50], x[:50], extractor="inception-v3-compat")
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        fidelity_metrics(x[:50], x[:50], extractor="inception-v3-compat", weights_path=tmp_path / "missing.pth")


def test_extractor_reads_uint8_as_our_images(digits, weights):
    path, model = weights
    extractor = ClassifierFeatureExtractor("classifier", ["logits", "penultimate"], feature_extractor_weights_path=path)
    x = digits[0][:8]
    as_uint8 = ((x + 1) * 127.5).round().to(torch.uint8)
    logits, features = extractor(as_uint8)
    with torch.no_grad():
        assert torch.allclose(features, model.features(as_uint8.float() / 127.5 - 1), atol=1e-6)
        assert torch.allclose(logits, model.head(features), atol=1e-6)
        # 8-bit quantisation of the digits (17 grey levels) keeps the predictions.
        assert torch.equal(logits.argmax(1), model(x).argmax(1))


def test_registration_is_idempotent():
    register_classifier_extractor()
    register_classifier_extractor()
    assert FEATURE_EXTRACTORS_REGISTRY[fid.CLASSIFIER] is ClassifierFeatureExtractor


def test_direct_classifier_features_equal_torch_fidelitys_to_the_bit(digits, weights):
    """extract_features computes the classifier's features without torch-fidelity (scoring never
    imports it); they equal what torch-fidelity's own extraction of the same extractor gives, in
    the same batches, exactly. An odd batch size leaves a short last batch."""
    from torch_fidelity.utils import create_feature_extractor, get_featuresdict_from_dataset
    path, _ = weights
    x = digits[0][:203]
    ours = extract_features(x, weights_path=path, batch_size=64)
    register_extractors()
    net = create_feature_extractor("classifier", ["penultimate"], cuda=False,
                                   feature_extractor_weights_path=str(path), verbose=False)
    theirs = get_featuresdict_from_dataset(fid._UInt8Images(x), net, 64, False, save_cpu_ram=True,
                                           verbose=False)["penultimate"].double().numpy()
    assert ours.shape == (203, theirs.shape[1]) and (ours == theirs).all()


def test_scoring_imports_no_torch_fidelity():
    """Evaluation stages pay no torch-fidelity import (torchvision and torch._dynamo with it, ~2 s)."""
    import subprocess
    import sys
    code = ("import sys, pipeline.evaluation.scoring, pipeline.evaluation.sampling; "
            "print(sorted(m for m in ('torch_fidelity', 'torchvision', 'torch._dynamo') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_layer_table_is_the_one_torch_fidelity_registers():
    register_extractors()
    for name, layer in FID_LAYERS.items():
        assert FEATURE_EXTRACTORS_REGISTRY[name].get_default_feature_layer_for_metric("fid") == layer


def test_reported_as_classifier_fid():
    assert fid_label("classifier") == "classifier FID"
    assert fid_label("inception-v3-compat") == "Inception FID"
