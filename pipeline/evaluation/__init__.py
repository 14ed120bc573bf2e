"""Turning a model into numbers: sampling plans and sharded sampling (`sampling`), per-sample
noise (`noise`), the `Scorer` that makes samples metrics (`scoring`), PSNR/SSIM (`metrics`),
intervals and paired comparisons (`uncertainty`), and the evaluation's files (`results`).
"""
