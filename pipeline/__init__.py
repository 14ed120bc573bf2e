"""Diffusion-model distillation pipeline: the library.

The library does the science; `stages/` does the plumbing. Nothing in here
reads params.yaml, argv or environment variables.
"""
