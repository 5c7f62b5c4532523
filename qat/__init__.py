"""gluon-qat: quantization-aware training for MXNet Gluon, exported to ncnn int8."""
from .config import QuantConfig
from .convert import (CONVERTERS, check_ranges, conv_bn_pairs, convert_model, disable_quantize,
                      enable_quantize, first_layer, freeze_bn, freeze_ranges, load_parameters,
                      quant_blocks, quantize_input, save_parameters, temporary_mode, to_float)
from .calibrate import METHODS as CALIBRATION_METHODS, calibrate
from .layers import FoldedBatchNorm, QConv2D, QConv2DBatchNorm, QDense, QuantBlock
from .deploy import export, verify

__version__ = '0.1.0'
__all__ = ['QuantConfig', 'CONVERTERS', 'check_ranges', 'conv_bn_pairs', 'convert_model',
           'disable_quantize', 'enable_quantize', 'first_layer', 'freeze_bn', 'freeze_ranges',
           'load_parameters', 'quant_blocks', 'quantize_input', 'save_parameters',
           'temporary_mode', 'to_float', 'CALIBRATION_METHODS', 'calibrate', 'FoldedBatchNorm',
           'QConv2D', 'QConv2DBatchNorm', 'QDense', 'QuantBlock', 'export', 'verify']
