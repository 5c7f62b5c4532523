"""Latency-aware int8 (``qat.deploy.latency``): the groups, the choice rule and what it leaves
in the net and the export. The timings themselves are measured by ``benchmarks.latency``."""
import math
import os

import pytest
from mxnet.gluon import nn

import qat
from qat.deploy import ncnn as ncnn_files
from qat.deploy.latency import format_latency, latency_aware
from qat.deploy.table import read_table
from qat.nn import quant_blocks
from tests.helpers import converted_and_calibrated
from tests.test_ptq_cli import base_args, run_cli

SHAPE = (3, 16, 16)


def _mobile():
    net = nn.HybridSequential()
    net.add(nn.Conv2D(16, 3, strides=2, padding=1, in_channels=3), nn.Activation('relu'),
            nn.Conv2D(16, 3, padding=1, groups=16, in_channels=16), nn.Activation('relu'),
            nn.Conv2D(24, 1, in_channels=16), nn.GlobalAvgPool2D(), nn.Dense(5, in_units=24))
    return net


# min_gain -inf keeps every group fp32, +inf none, whatever the (noisy) timings
@pytest.mark.parametrize('min_gain, expected', [(-math.inf, 'all'), (math.inf, 'none')])
def test_the_choice_rule_and_what_it_leaves(min_gain, expected, tmp_path):
    net, data = converted_and_calibrated(_mobile, SHAPE)
    report = latency_aware(net, SHAPE, rounds=2, min_gain=min_gain)
    groups = {group['group']: group for group in report['groups']}
    assert sorted(groups) == ['conv 1x1 s1', 'conv 3x3 s2', 'depthwise 3x3 s1', 'innerproduct']
    assert all(len(group['layers']) == 1 for group in groups.values())
    assert all(group['ms'] > 0 and group['fp32'] == (expected == 'all')
               for group in groups.values())
    assert report['fp32_ms'] > 0 and report['all_int8_ms'] > 0 and report['chosen_ms'] > 0
    kept = set(report['kept_fp32'])
    quantized = {block.name for _, block in quant_blocks(net) if block.mode['quantize']}
    assert kept.isdisjoint(quantized) and len(kept) == (4 if expected == 'all' else 0)
    paths = qat.export(net, str(tmp_path), SHAPE)
    _, inputs = read_table(paths['table'])
    assert set(inputs) == quantized  # the kept layers get no table line: fp32 in ncnn
    int8 = {name for _, name, _, _, p in ncnn_files.read_param(paths['int8_param'])
            if p.get(8)}
    assert int8 == quantized
    assert qat.verify(net, str(tmp_path), data, packing=False)['passed']
    assert 'kept fp32' in format_latency(report)


def test_calibrate_latency_aware_writes_its_choice(tmp_path, images, capsys):
    out = tmp_path / 'lat'
    status, stdout, stderr = run_cli(base_args(images, out, '--latency-aware'), capsys)
    assert status == 0, stderr
    assert 'latency-aware int8:' in stdout
    text = (out / 'model-latency.md').read_text()
    assert '| int8 layers (ncnn code path) |' in text and 'kept fp32' in text
    assert os.path.isfile(out / 'model-int8.param')
