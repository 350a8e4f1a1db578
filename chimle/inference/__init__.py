"""Inference: loading weights, sampling many outputs per input, tiling for large images, grids and files."""
