"""The calibration histogram in one pass over a float32 array: ncnn2table's bin of every
non-zero magnitude counted, and the largest magnitude.

A small C function (compiled on first use with ``$CC``, default ``cc``, into the cache folder
of ``qat.native``, keyed by a hash of its source; loaded with ctypes, which releases the GIL so
that layers are counted in parallel threads) does in one read what numpy needs five passes
for. Without a compiler, or with ``QAT_NATIVE=0``, numpy does the same (slower): both follow
``thresholds.bin_index`` (float32 ``(mag / limit) * bins``, floored, clipped to the last bin,
exact zeros not binned), and the tests hold them equal.
"""
import ctypes
import hashlib
import logging
import os
import shutil
import subprocess

import numpy as np

from . import thresholds as th
from ..fileio import atomic_path
from ..native import cpu_flags

log = logging.getLogger(__name__)

SOURCE = r"""
#include <stdint.h>
#include <math.h>
/* Counts of ncnn2table's bins: floor(float32(m / limit) * bins), clipped to bins - 1, for the
   magnitudes m > 0 (|x| signed, max(x, 0) unsigned; NaN is never > 0); returns max m. */
float qat_histogram(const float *x, int64_t n, float limit, int32_t bins, int32_t is_signed,
                    int64_t *counts) {
    float top = 0.0f;
    const int binning = limit > 0.0f;
    const float width = (float)bins;
    for (int64_t i = 0; i < n; ++i) {
        float m = is_signed ? fabsf(x[i]) : x[i];
        if (!(m > 0.0f)) continue;
        if (m > top) top = m;
        if (!binning) continue;
        float scaled = (m / limit) * width;  /* two float32 roundings, as ncnn */
        int64_t k = scaled < width ? (int64_t)scaled : bins - 1;  /* trunc = floor: >= 0 */
        counts[k] += 1;
    }
    return top;
}
"""
_state = {}


def _library_path():
    digest = hashlib.sha256(SOURCE.encode() + cpu_flags().encode()).hexdigest()[:16]
    cache = os.environ.get('QAT_CACHE_DIR') or os.path.join(
        os.path.expanduser('~'), '.cache', 'gluon-qat')
    return os.path.join(cache, f'libqat-histogram-{digest}.so')


def _load():
    compiler = os.environ.get('CC', 'cc')
    path = _library_path()
    if not os.path.exists(path):
        if shutil.which(compiler) is None:
            raise RuntimeError(f"no C compiler ({compiler!r}) on PATH")
        log.info("compiling the calibration histogram into %s", path)
        with atomic_path(path + '.c') as source:
            with open(source, 'w') as handle:
                handle.write(SOURCE)
            with atomic_path(path, suffix='.so') as tmp:
                # no -ffast-math: the division must round exactly as ncnn's float32 one
                subprocess.run([compiler, '-x', 'c', '-shared', '-fPIC', '-O3', '-march=native',
                                '-ffp-contract=off', source, '-o', tmp],
                               check=True, capture_output=True, text=True)
    function = ctypes.CDLL(path).qat_histogram
    function.restype = ctypes.c_float
    function.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int32,
                         ctypes.c_int32, ctypes.c_void_p]
    return function


def native_histogram():
    """The compiled counting function, or None (numpy then; warned once)."""
    if 'function' not in _state:
        _state['function'] = None
        if os.environ.get('QAT_NATIVE', '1') != '0':
            try:
                _state['function'] = _load()
            except (OSError, RuntimeError, subprocess.CalledProcessError) as err:
                log.warning("compiled calibration histogram unavailable (%s); counting with "
                            "numpy (same counts, slower)", str(err).splitlines()[0])
    return _state['function']


def counts(x, limit, bins, signed):
    """(counts (bins,) int64, largest magnitude) of the float32 numpy array ``x`` (any shape)
    binned over [0, limit] by ``thresholds.bin_index`` (values above the limit in the last
    bin)."""
    function = native_histogram()
    x = np.ascontiguousarray(x, np.float32)
    if function is None:
        mag = th.magnitude(x, signed)
        index = th.bin_index(mag, limit, bins)
        return (np.bincount(index[index >= 0], minlength=bins).astype(np.int64),
                float(mag.max(initial=0.0)))
    found = np.zeros(bins, np.int64)
    top = function(x.ctypes.data, x.size, float(limit), bins, int(bool(signed)),
                   found.ctypes.data)
    return found, float(top)
