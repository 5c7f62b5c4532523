"""The short demo (``qat demo``): a GluonCV net on the bundled digits, float vs simulated
int8 / int4, post-training and after a short QAT fine-tune, without a recipe."""
import os

from . import models
from ..calibration import calibrate
from ..config import QuantConfig, QuantScheme
from ..convert import convert_model, save_parameters
from ..modes import freeze_bn, freeze_ranges
from ..report import format_table
from .data import batches, digits
from .trainer import evaluate, fit


def build_float_net(model, seed, input_shape):
    net = models.build(model, {'classes': 10}, seed=seed, input_shape=input_shape)
    net.hybridize()
    return net


def run(model='cifar_resnet20_v1', size=16, epochs=6, calib_batches=8, seed=0,
        bits=(8, 4), qat_epochs=2, folder='checkpoints', out=print):
    """Train float; then per bit width: post-training quantization (calibrate only) and
    quantization-aware fine-tuning for ``qat_epochs``. The float weights are kept in
    ``folder`` (created). Returns the table rows."""
    (x_train, y_train), (x_test, y_test) = digits(size=size)
    out(f"digits: {len(y_train)} train / {len(y_test)} test images, {size}x{size}")
    shape = x_train.shape[1:]
    net = build_float_net(model, seed, shape)
    fit(net, x_train, y_train, epochs, seed=seed, progress=out)
    float_file = os.path.join(folder, 'demo-float.params')
    save_parameters(net, float_file)
    rows = [('float32', f"{evaluate(net, x_test, y_test):.2f}")]
    for b in bits:
        qnet = build_float_net(model, seed, shape)
        qnet.load_parameters(float_file)
        # The first conv sees the raw image; it stays at 8 bits, as usual.
        convert_model(qnet, config=QuantScheme(QuantConfig(weight_bits=b, input_bits=b),
                                               first_layer_bits=8))
        calibrate(qnet, batches(x_train, y_train, 64, shuffle=True, seed=seed),
                  method='ema', num_batches=calib_batches)
        freeze_bn(qnet)
        freeze_ranges(qnet)
        rows.append((f"W{b}A{b} per-channel, PTQ (simulated)",
                     f"{evaluate(qnet, x_test, y_test):.2f}"))
        if qat_epochs:
            freeze_bn(qnet, False)
            freeze_ranges(qnet, False)
            out(f"QAT fine-tuning at W{b}A{b}:")
            fit(qnet, x_train, y_train, qat_epochs, seed=seed, progress=out,
                optimizer_params={'learning_rate': 0.005, 'momentum': 0.9, 'wd': 1e-4})
            freeze_bn(qnet)
            freeze_ranges(qnet)
            rows.append((f"W{b}A{b} per-channel, QAT {qat_epochs} epochs (simulated)",
                         f"{evaluate(qnet, x_test, y_test):.2f}"))
    table = format_table(rows, [f"{model} on digits", 'top-1 (%)'])
    out(table)
    return rows
