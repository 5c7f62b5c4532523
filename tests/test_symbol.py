"""The symbol-graph walker: consumers and 'only consumer' (fan-out, graph outputs), data
inputs, shapes, and which block owns a node; and that conv+BN pairing agrees with it."""
import logging

import pytest
from mxnet.gluon import HybridBlock, nn

import qat
from qat.symbol import SymbolGraph, trace_symbol


def _index(graph, name):
    [index] = [i for i, node in enumerate(graph.nodes) if node['name'] == name]
    return index


class Residual(HybridBlock):
    """conv -> (bn, and the residual add): the conv has two consumers."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        with self.name_scope():
            self.conv = nn.Conv2D(4, 3, padding=1, in_channels=4)
            self.bn = nn.BatchNorm(in_channels=4)

    def hybrid_forward(self, F, x):
        y = self.conv(x)
        return self.bn(y) + y


class TwoOutputs(HybridBlock):
    """Returns the conv and the BN after it: the conv has one user but is a graph output."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        with self.name_scope():
            self.conv = nn.Conv2D(4, 3, in_channels=3)
            self.bn = nn.BatchNorm(in_channels=4)

    def hybrid_forward(self, F, x):
        y = self.conv(x)
        return y, self.bn(y)


def test_a_residual_conv_is_not_an_only_consumer():
    net = Residual(prefix='res_')
    net.initialize()
    graph = SymbolGraph(trace_symbol(net), net)
    conv, bn = _index(graph, 'res_conv0_fwd'), _index(graph, 'res_batchnorm0_fwd')
    assert sorted(graph.consumers[conv]) == sorted([bn, _index(graph, 'res__plus0')])
    assert graph.only_consumer(conv) is None
    assert graph.nodes[graph.only_consumer(bn)]['op'] == 'elemwise_add'
    assert graph.data_inputs(graph.nodes[conv]) == [_index(graph, 'data')]  # not the weights
    assert graph.unique(conv)
    assert qat.conv_bn_pairs(net) == {}


def test_a_graph_output_is_not_an_only_consumer():
    net = TwoOutputs(prefix='two_')
    net.initialize()
    sym = trace_symbol(net)
    assert len(sym.list_outputs()) == 2  # the tuple became one Group
    graph = SymbolGraph(sym, net)
    conv, bn = _index(graph, 'two_conv0_fwd'), _index(graph, 'two_batchnorm0_fwd')
    assert graph.heads == [conv, bn]
    assert graph.consumers[conv] == [bn]
    assert graph.only_consumer(conv) is None and graph.only_consumer(bn) is None
    assert qat.conv_bn_pairs(net) == {}  # folding the BN would lose the conv's output


def test_shapes_are_inferred_once_for_the_given_inputs():
    net = TwoOutputs(prefix='two_')
    net.initialize()
    graph = SymbolGraph(trace_symbol(net), net, input_shapes={'data': (2, 3, 9, 9)})
    assert graph.shape(_index(graph, 'data')) == (2, 3, 9, 9)
    assert graph.shape(_index(graph, 'two_conv0_fwd')) == (2, 4, 7, 7)
    assert graph.shapes['two_conv0_weight'] == (4, 3, 3, 3)
    assert SymbolGraph(trace_symbol(net)).shapes is None
    assert graph.has_op('two_conv0_fwd') and not graph.has_op('two_conv0_weight')


def test_several_named_inputs():
    class Add(HybridBlock):
        def hybrid_forward(self, F, a, b):
            return a + b

    net = Add(prefix='add_')
    graph = SymbolGraph(trace_symbol(net, ('a', 'b')), net, ('a', 'b'),
                        {'a': (1, 2), 'b': (1, 2)})
    add = graph.heads[0]
    assert graph.data_inputs(graph.nodes[add]) == [_index(graph, 'a'), _index(graph, 'b')]
    assert graph.shape(add) == (1, 2)


def test_the_owner_is_the_innermost_block_by_prefix():
    net = nn.HybridSequential(prefix='net_')
    with net.name_scope():
        body = nn.HybridSequential(prefix='body_')
        with body.name_scope():
            body.add(nn.Conv2D(4, 3, in_channels=3, activation='relu'), nn.BatchNorm())
        net.add(body, nn.Dense(2))
    net.initialize()
    graph = SymbolGraph(trace_symbol(net), net)
    conv = body[0]
    assert graph.owner('net_body_conv0_fwd') is conv
    assert graph.owner('net_body_conv0_relu_fwd') is conv.act  # nested inside the conv
    assert graph.owner('net_body_batchnorm0_fwd') is body[1]
    assert graph.owner('net_dense0_fwd') is net[1]
    assert graph.owner('net_flatten0') is net  # an op of no child block
    assert graph.owner('data') is None
    assert graph.blocks_of('net_body_conv0_fwd') == [conv]
    assert graph.blocks_of('net_body_conv0') == [] and graph.blocks_of('net_fwd') == []


class Twice(HybridBlock):
    """One conv applied twice, then a BN: two nodes share the conv's op name."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        with self.name_scope():
            self.conv = nn.Conv2D(3, 1, in_channels=3)
            self.bn = nn.BatchNorm(in_channels=3)

    def hybrid_forward(self, F, x):
        return self.bn(self.conv(self.conv(x)))


def test_a_block_applied_twice_names_no_unique_node():
    net = Twice(prefix='tw_')
    net.initialize()
    graph = SymbolGraph(trace_symbol(net), net)
    convs = [i for i, node in enumerate(graph.nodes) if node['name'] == 'tw_conv0_fwd']
    assert len(convs) == 2 and not any(graph.unique(i) for i in convs)
    assert graph.nodes[graph.only_consumer(convs[1])]['op'] == 'BatchNorm'
    assert qat.conv_bn_pairs(net) == {}  # the name cannot say which application it is


def test_blocks_sharing_a_prefix_are_all_listed():
    net = nn.HybridSequential(prefix='s_')
    first = nn.Conv2D(3, 1, in_channels=3, prefix='same_')
    net.add(first, nn.Conv2D(3, 1, in_channels=3, prefix='same_', params=first.params))
    graph = SymbolGraph(trace_symbol(net), net)
    assert graph.blocks_of('same_fwd') == [net[0], net[1]]


def test_an_untraceable_net_raises_and_pairing_warns(caplog):
    class Imperative(nn.Block):
        def forward(self, x):
            return x.asnumpy()

    net = Imperative(prefix='imp_')
    with pytest.raises(Exception):
        trace_symbol(net)
    with caplog.at_level(logging.WARNING, logger='qat.convert'):
        assert qat.conv_bn_pairs(net) == {}
    assert 'could not trace imp symbolically' in caplog.text
