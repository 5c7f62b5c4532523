"""gluon-qat: quantization-aware training for MXNet Gluon, exported to ncnn int8.

The library, bottom to top (a module imports only from the layers below it):
``config``, ``ops``, ``reference``, ``native``, ``fileio``, ``metrics``, ``report``,
``batches`` -> ``nn`` (the blocks) -> ``modes``, ``probes``, ``convert`` -> ``calibration``,
``deploy`` -> ``analysis``. The application (``qat.app``: recipes, data, models, trainer,
the ``qat`` command) sits on top; nothing in the library imports it.
"""
from .config import QuantConfig, QuantScheme
from .convert import (CONVERTERS, conv_bn_pairs, convert_model, first_layer, load_parameters,
                      save_parameters, to_float)
from .modes import (check_ranges, deployed, disable_quantize, enable_quantize, freeze_bn,
                    freeze_ranges, init_learned_thresholds, quantize_input, temporary_mode)
from .calibration import METHODS as CALIBRATION_METHODS, calibrate
from .deploy import export, verify
from .nn import (FoldedBatchNorm, QBatchNorm, QConv2D, QConv2DBatchNorm, QDense, QuantBlock,
                 quant_blocks)
from .nn.learned import with_learned_ranges

__version__ = '0.1.0'
__all__ = ['QuantConfig', 'QuantScheme', 'CONVERTERS', 'check_ranges', 'conv_bn_pairs',
           'convert_model', 'deployed', 'disable_quantize', 'enable_quantize', 'first_layer',
           'freeze_bn', 'freeze_ranges', 'init_learned_thresholds', 'load_parameters', 'quant_blocks', 'quantize_input',
           'save_parameters', 'temporary_mode', 'to_float', 'CALIBRATION_METHODS', 'calibrate',
           'FoldedBatchNorm', 'QBatchNorm', 'QConv2D', 'QConv2DBatchNorm', 'QDense', 'QuantBlock',
           'export', 'verify', 'with_learned_ranges']
