"""Analysis on top of the library: per-layer sensitivity, automatic mixed precision, the
choice of a calibration method, and the layer-by-layer comparison of float, simulated and
ncnn int8; ``tasks`` says what each of them compares and scores (classifiers, detectors)."""
from . import comparison, mixed_precision, selection, sensitivity, tasks

__all__ = ['comparison', 'mixed_precision', 'selection', 'sensitivity', 'tasks']
