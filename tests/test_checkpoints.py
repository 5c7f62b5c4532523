"""Checkpoints carry each quantized block's QuantConfig (``qconfig``, with the checkpoint
format) besides its modes: a mixed-precision result survives a save / load round trip, and
files of the earlier formats are migrated."""
import hashlib
import logging

import mxnet as mx
import numpy as np
import pytest
from mxnet.gluon import nn

import qat
from qat.analysis import mixed_precision as mp
from qat.config import CHECKPOINT_FORMAT, QuantConfig

from tests.helpers import randomize_bn

W4 = QuantConfig(weight_bits=4, input_bits=4)


def _net(seed=0):
    mx.random.seed(seed)
    net = nn.HybridSequential(prefix='ck_')
    with net.name_scope():
        net.add(nn.Conv2D(8, 3, padding=1, in_channels=3), nn.BatchNorm(in_channels=8),
                nn.Activation('relu'), nn.Conv2D(8, 3, padding=1, in_channels=8),
                nn.Activation('relu'), nn.Conv2D(8, 1, in_channels=8), nn.GlobalAvgPool2D(),
                nn.Dense(10, in_units=8))
    net.initialize(mx.init.Xavier())
    randomize_bn(net, np.random.RandomState(seed))
    return net


def _data():
    return [mx.nd.array(np.random.RandomState(1).normal(0, 1, (8, 3, 8, 8)))]


def _mixed():
    """W4A4, calibrated; the second conv promoted to 8 bits and the 1x1 conv kept float, by
    mixed precision's own actions."""
    net = qat.convert_model(_net(), config=W4)
    qat.calibrate(net, _data(), method='max')
    qat.freeze_bn(net)
    blocks = {block.name: block for _, block in qat.quant_blocks(net)}
    mp.ACTIONS['bits'](blocks['ck_conv1'])
    mp.ACTIONS['float'](blocks['ck_conv2'])
    return net


def _export_digests(net, folder):
    paths = qat.export(net, str(folder), (3, 8, 8))
    return {kind: hashlib.sha256(open(paths[kind], 'rb').read()).hexdigest()
            for kind in ('table', 'int8_param', 'int8_bin', 'param', 'bin')}


def test_mixed_precision_net_saved_and_loaded_exports_the_same_int8_model(tmp_path):
    net = _mixed()
    original = _export_digests(net, tmp_path / 'original')
    qat.save_parameters(net, str(tmp_path / 'mixed.params'))

    loaded = qat.convert_model(_net(seed=5), config=W4)   # converted as at the start: all W4A4
    qat.load_parameters(loaded, str(tmp_path / 'mixed.params'))
    configs = {block.name: block.config for _, block in qat.quant_blocks(loaded)}
    assert configs['ck_conv1'] == W4.updated(weight_bits=8, input_bits=8)
    assert configs['ck_conv0'] == configs['ck_dense0'] == W4
    assert _export_digests(loaded, tmp_path / 'loaded') == original

    # Gluon's own load restores parameters but not the configs: the export then differs,
    # which is what the saved configs prevent.
    plain = qat.convert_model(_net(seed=5), config=W4)
    plain.load_parameters(str(tmp_path / 'mixed.params'))
    for _, block in qat.quant_blocks(plain):
        block.load_mode()
    assert _export_digests(plain, tmp_path / 'plain')['int8_bin'] != original['int8_bin']


def test_config_vector_round_trips_every_field():
    for config in (QuantConfig(), W4, QuantConfig(weight_granularity='tensor', input_signed=False,
                                                  fake_bn=False, range_momentum=0.99,
                                                  range_tracker='max', weight_bits=2)):
        vector = config.to_vector()
        assert vector.dtype == np.float32 and vector[0] == CHECKPOINT_FORMAT
        assert QuantConfig.from_vector(vector) == config
    with pytest.raises(ValueError, match='format 9'):
        QuantConfig.from_vector(np.float32([9] + list(W4.to_vector()[1:])))


def _strip(path, suffixes, out):
    arrays = mx.nd.load(path)
    mx.nd.save(out, {k: v for k, v in arrays.items() if not k.endswith(suffixes)})
    return out


@pytest.mark.parametrize('missing,fmt', [(('qconfig',), 1),
                                         (('qconfig', 'weight_threshold_factor'), 0)])
def test_earlier_checkpoint_formats_are_migrated(tmp_path, caplog, missing, fmt):
    net = _mixed()
    factor = next(b for _, b in qat.quant_blocks(net) if b.name == 'ck_conv0')
    factor.weight_threshold_factor.set_data(mx.nd.ones((8,)) * 0.5)
    qat.save_parameters(net, str(tmp_path / 'now.params'))
    old = _strip(str(tmp_path / 'now.params'), missing, str(tmp_path / f'format{fmt}.params'))
    loaded = qat.convert_model(_net(seed=5), config=W4)
    with caplog.at_level(logging.INFO, logger='qat.convert'):
        qat.load_parameters(loaded, old)
    blocks = {block.name: block for _, block in qat.quant_blocks(loaded)}
    # format 1 saved no configs: each block keeps the config it was converted with
    assert all(block.config == W4 for block in blocks.values())
    assert blocks['ck_conv2'].mode['quantize'] is False   # the modes were saved all along
    want = np.ones(8) if fmt == 0 else np.full(8, 0.5)
    np.testing.assert_array_equal(blocks['ck_conv0'].weight_threshold_factor.data().asnumpy(),
                                  want)
    for suffix in missing:
        assert f"without {suffix}" in caplog.text
    # saved again, the file is of the current format
    qat.save_parameters(loaded, str(tmp_path / 'again.params'))
    assert all(v.asnumpy()[0] == CHECKPOINT_FORMAT for k, v in
               mx.nd.load(str(tmp_path / 'again.params')).items() if k.endswith('qconfig'))


def test_a_damaged_parameter_file_is_an_error_naming_it(tmp_path):
    net = _mixed()
    path = tmp_path / 'net.params'
    qat.save_parameters(net, str(path))
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match=f"{path}: not a readable parameter file"):
        qat.load_parameters(qat.convert_model(_net(), config=W4), str(path))
