"""Analysis on top of the library: per-layer sensitivity, automatic mixed precision, and the
layer-by-layer comparison of float, simulated and ncnn int8."""
from . import comparison, mixed_precision, sensitivity

__all__ = ['comparison', 'mixed_precision', 'sensitivity']
