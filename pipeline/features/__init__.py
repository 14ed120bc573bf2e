"""The feature spaces FID is computed in: the digit classifier the `features` stage trains
(`classifier`), FID/KID extraction through torch-fidelity (`fid`) and the standard TF-Inception
extractor (`inception`). torch-fidelity (and torchvision with it) is imported only here.
"""
