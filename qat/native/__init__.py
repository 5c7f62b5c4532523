"""Native operators, compiled on first use against the installed MXNet.

``fakequant.cc`` implements, in one pass each way, what ``qat.ops.quantize_activation`` would
otherwise build from six elementwise MXNet ops (MXNet 1.9 has no operator fusion on CPU), and
as a few operators the per-layer chains of small ops of the weight quantizer and the range
tracker (each op costs a dispatch however small its tensor), with the same float32 arithmetic.
``ncnnmath.cc`` computes the fp32 layers ncnn runs between int8 layers (sigmoid, tanh, swish,
ELU, hard sigmoid / swish, global average pooling) with ncnn's own arithmetic, for the
simulation that verification compares against. They are compiled with the C++ compiler found as ``$CXX`` (default ``g++``) into a cache folder
(``$QAT_CACHE_DIR``, default ``~/.cache/gluon-qat``) keyed by a hash of the source and the MXNet
version, then loaded with ``mx.library.load``. Without a compiler everything still works, on
the slower pure-MXNet path, after one warning. ``QAT_NATIVE=0`` forces that path.
"""
import hashlib
import logging
import os
import shutil
import subprocess

import mxnet as mx

from ..fileio import atomic_path

log = logging.getLogger(__name__)
SOURCES = [os.path.join(os.path.dirname(__file__), name)
           for name in ('fakequant.cc', 'ncnnmath.cc')]
_state = {}


def cpu_flags():
    """This CPU's feature flags (the library is built with -march=native for it)."""
    try:
        with open('/proc/cpuinfo') as handle:
            return next((line for line in handle if line.startswith('flags')), '')
    except OSError:
        return ''


def _library_path():
    sources = b''
    for source in SOURCES:
        with open(source, 'rb') as handle:
            sources += handle.read()
    digest = hashlib.sha256(sources + mx.__version__.encode()
                                + cpu_flags().encode()).hexdigest()[:16]
    cache = os.environ.get('QAT_CACHE_DIR') or os.path.join(
        os.path.expanduser('~'), '.cache', 'gluon-qat')
    return os.path.join(cache, f'libqat-{digest}.so')


def _compile(target):
    mxnet_dir = os.path.dirname(mx.__file__)
    compiler = os.environ.get('CXX', 'g++')
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler ({compiler!r}) on PATH")
    try:
        with atomic_path(target, suffix='.so') as tmp:
            subprocess.run([compiler, '-shared', '-fPIC', '-std=c++17', '-O3', '-march=native',
                            # no implicit FMA contraction: x*s must round before the add
                            '-ffp-contract=off', '-fopenmp', *SOURCES,
                            os.path.join(mxnet_dir, 'src', 'lib_api.cc'),
                            '-I', os.path.join(mxnet_dir, 'include'), '-o', tmp],
                           check=True, capture_output=True, text=True)
    except subprocess.CalledProcessError as err:
        raise RuntimeError(f"{compiler} failed on {' '.join(SOURCES)}:\n{err.stderr[-2000:]}") from None


def available():
    """True when the fused operators are loaded (compiling them once if needed)."""
    if 'ok' not in _state:
        _state['ok'] = False
        if os.environ.get('QAT_NATIVE', '1') == '0':
            return False
        try:
            path = _library_path()
            if not os.path.exists(path):
                log.info("compiling the fused quantization operators into %s", path)
                _compile(path)
            mx.library.load(path, False)
            _state['ok'] = True
        except Exception as err:  # any failure leaves the slower, equivalent MXNet path
            log.warning("fused quantization operators unavailable (%s); using plain MXNet "
                        "ops (same results, slower training)", err)
    return _state['ok']
