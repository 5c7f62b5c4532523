"""Shared helpers of the test suite: independent float64 arithmetic and small networks.

Nothing here uses ``qat``'s own formulas: these are the independent side of the comparisons.
"""
import mxnet as mx
import numpy as np
import yaml
from mxnet.gluon import nn

import qat  # only for the builders of test nets below: no formula is taken from it

F32_EPS = float(np.finfo(np.float32).eps)  # 2^-23, the float32 unit roundoff times 2


def naive_conv2d_f64(x, w, bias=None, stride=(1, 1), pad=(0, 0), dilate=(1, 1), groups=1):
    """Direct-definition convolution in float64, NCHW x OIHW, with explicit loops over the
    output positions and the groups (independent of reference.conv2d_int's einsum form)."""
    x = np.asarray(x, np.float64)
    w = np.asarray(w, np.float64)
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    assert c == cg * groups and o % groups == 0
    (sh, sw), (ph, pw), (dh, dw) = stride, pad, dilate
    xp = np.zeros((n, c, h + 2 * ph, wd + 2 * pw))
    xp[:, :, ph:ph + h, pw:pw + wd] = x
    out_h = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    out_w = (wd + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    og = o // groups
    out = np.zeros((n, o, out_h, out_w))
    for oc in range(o):
        g = oc // og
        for r in range(out_h):
            for s in range(out_w):
                window = xp[:, g * cg:(g + 1) * cg,
                            r * sh:r * sh + dh * (kh - 1) + 1:dh,
                            s * sw:s * sw + dw * (kw - 1) + 1:dw]
                out[:, oc, r, s] = (window * w[oc]).sum(axis=(1, 2, 3))
    if bias is not None:
        out += np.asarray(bias, np.float64).reshape(1, -1, 1, 1)
    return out


def params_numpy(net):
    """{structural name: numpy copy} of every parameter of ``net``."""
    return {name: p.data().asnumpy().copy()
            for name, p in net._collect_params_with_prefix().items()}


def params_by_name(net):
    """{parameter name without the net's prefix: numpy copy}: stable across conversion (a
    folded BN's parameters move to the conv's structural path but keep their names)."""
    return {name[len(net.prefix):] if name.startswith(net.prefix) else name:
            p.data().asnumpy().copy() for name, p in net.collect_params().items()}


def small_net(seed=0, prefix='small_', conv_bias=True):
    """conv -> BN -> relu -> GAP -> Dense, initialized from ``seed`` with non-trivial BN
    parameters and statistics (so BN folding is not an identity)."""
    mx.random.seed(seed)
    net = nn.HybridSequential(prefix=prefix)
    with net.name_scope():
        net.add(nn.Conv2D(8, 3, padding=1, in_channels=3, use_bias=conv_bias),
                nn.BatchNorm(in_channels=8),
                nn.Activation('relu'),
                nn.GlobalAvgPool2D(),
                nn.Dense(5, in_units=8))
    net.initialize(mx.init.Xavier())
    randomize_bn(net, np.random.RandomState(seed))
    return net


def randomize_bn(net, rs):
    """Give every BatchNorm of ``net`` random gamma, beta and running statistics."""
    for name, p in sorted(net.collect_params().items()):
        if name.endswith(('running_mean', 'beta')):
            p.set_data(mx.nd.array(rs.uniform(-0.5, 0.5, p.shape)))
        elif name.endswith(('running_var', 'gamma')):
            p.set_data(mx.nd.array(rs.uniform(0.5, 1.5, p.shape)))


def sgd_step(net, trainer, x, labels, loss_fn=None):
    """One training step (forward under autograd, backward, SGD update); returns the output."""
    loss_fn = loss_fn or mx.gluon.loss.SoftmaxCrossEntropyLoss()
    with mx.autograd.record():
        out = net(x)
        loss = loss_fn(out, labels)
    loss.backward()
    trainer.step(x.shape[0])
    return out.asnumpy()


def tiny_net(classes=10, bn=True):
    """conv(-BN)-relu x2 -> GAP -> dense: seconds per epoch on 8x8 digits (the recipes' model
    factory in these tests: ``tests.helpers:tiny_net``)."""
    net = nn.HybridSequential()
    with net.name_scope():
        for channels in (16, 32):
            net.add(nn.Conv2D(channels, 3, padding=1, use_bias=not bn))
            if bn:
                net.add(nn.BatchNorm())
            net.add(nn.Activation('relu'))
        net.add(nn.GlobalAvgPool2D(), nn.Dense(classes))
    return net


def tiny_recipe(tmp_path, name='run', **sections):
    """A recipe file for the tiny net on 8x8 digits: float pre-training, PTQ (also at 4 bits),
    QAT with every schedule switch inside the run; no export."""
    text = {
        'run': {'out': str(tmp_path / 'checkpoints'), 'name': name, 'seed': 3,
                'batch_size': 32, 'checkpoint_steps': 7, 'log_steps': 1,
                'progress': False},
        'model': {'source': 'factory', 'name': 'tests.helpers:tiny_net', 'kwargs': {}},
        'data': {'source': 'digits', 'val_fraction': 0.5},
        'preprocess': {'size': [8, 8]},
        'float': {'epochs': 2, 'lr': 0.3, 'warmup_epochs': 0.5},
        'calibrate': {'batches': 2, 'report_bits': [4]},
        'qat': {'epochs': 3, 'lr': 0.02, 'input_quant_epoch': 1, 'freeze_bn_epoch': 2,
                'freeze_ranges_epoch': 2},
        'export': {'enabled': False},
    }
    return write_recipe(tmp_path, name, text, sections)


def write_recipe(tmp_path, name, text, sections):
    """``text`` (sections of keys) updated by ``sections``, written as ``<name>.yaml``."""
    for section, values in sections.items():
        text.setdefault(section, {}).update(values)
    path = tmp_path / f'{name}.yaml'
    path.write_text(yaml.safe_dump(text))
    return str(path)


def random_batches(seed=0, batches=2, samples=8, size=8):
    """``batches`` NDArray batches (samples, 3, size, size) of N(0, 1) values from ``seed``."""
    rs = np.random.RandomState(seed)
    return [mx.nd.array(rs.normal(0, 1, (samples, 3, size, size))) for _ in range(batches)]


def random_image(h, w, seed):
    """An (h, w, 3) uint8 image of uniform noise from ``seed``."""
    return np.random.RandomState(seed).randint(0, 256, (h, w, 3)).astype(np.uint8)


def train_alike(net, twin, input_shape, steps=3, classes=5, seed=3):
    """SGD ``steps`` on ``net`` and ``twin`` with the same random batches (N = 4 of
    ``input_shape``) and assert bit-identical outputs at every step and parameters (by name)
    at the end: the converted net trains exactly like its float twin."""
    trainers = [mx.gluon.Trainer(n.collect_params(), 'sgd', {'learning_rate': 0.1})
                for n in (net, twin)]
    rs = np.random.RandomState(seed)
    for _ in range(steps):
        x = mx.nd.array(rs.normal(0, 1, (4,) + tuple(input_shape)))
        labels = mx.nd.array(rs.randint(0, classes, 4))
        out, out_twin = (sgd_step(n, t, x, labels) for n, t in zip((net, twin), trainers))
        np.testing.assert_array_equal(out, out_twin)
    got, want = params_by_name(net), params_by_name(twin)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    return want


def converted_and_calibrated(make, input_shape, seed=0):
    """(net, [one batch of 4]): ``make()`` built under ``seed``, Xavier-initialized, run once,
    converted with the defaults and max-calibrated on that batch."""
    mx.random.seed(seed)
    net = make()
    net.initialize(mx.init.Xavier())
    data = [mx.nd.array(np.random.RandomState(seed).normal(0, 1, (4,) + tuple(input_shape)))]
    net(data[0])
    qat.convert_model(net)
    qat.calibrate(net, data, method='max')
    return net, data
