"""Probes: what one block sees and computes while a converted net runs imperatively (inside
``qat.modes.deployed``), through forward hooks."""
import logging

from .errors import UserError
from .modes import deployed
from .nn import quant_blocks

log = logging.getLogger(__name__)


class _Captured(Exception):
    """Stops a forward pass once the wanted tensor has been seen."""


def capture(net, x, block, output=False):
    """The input (or, with ``output``, the output) of ``block`` on the first call of the
    block while ``net`` runs on ``x``; the rest of the forward pass is skipped. ``net`` must
    run imperatively (``deployed``)."""
    seen = []

    def pre_hook(_, inputs):
        seen.append(inputs[0])
        raise _Captured

    def post_hook(_, inputs, out):
        seen.append(out)
        raise _Captured

    handle = (block.register_forward_hook(post_hook) if output
              else block.register_forward_pre_hook(pre_hook))
    try:
        net(x)
    except _Captured:
        pass
    finally:
        handle.detach()
    if not seen:
        raise UserError(f"{block.name} did not run in {net.name}'s forward pass (is the net "
                         f"hybridized outside `deployed`?)")
    return seen[0]


def inputs_of(net, x, blocks):
    """{block: its first input} for the ``blocks`` that run while ``net`` (imperative) runs on
    ``x``, and the net's output."""
    seen = {}
    handles = [block.register_forward_pre_hook(
        lambda block, inputs: seen.setdefault(block, inputs[0])) for block in blocks]
    try:
        out = net(x)
    finally:
        for handle in handles:
            handle.detach()
    return seen, out


def run_with_layer(net, x, block, forward=None):
    """(net output, input of ``block``, output of ``block``) for one imperative forward;
    ``forward(net, x)`` (default ``net(x)``) makes the pass and gives its "output"."""
    seen = {}
    handle = block.register_forward_hook(
        lambda _, inputs, out: seen.setdefault('io', (inputs[0], out)))
    try:
        out = net(x) if forward is None else forward(net, x)
    finally:
        handle.detach()
    if 'io' not in seen:
        raise UserError(f"{block.name} did not run in {net.name}'s forward pass")
    return (out,) + seen['io']


def execution_order(net, x):
    """The quantized blocks of ``net`` in the order they first run on ``x`` (blocks that never
    run are left out, with a warning)."""
    order = []
    handles = [block.register_forward_pre_hook(
        lambda b, _: order.append(b) if b not in order else None)
        for _, block in quant_blocks(net)]
    try:
        with deployed(net):
            net(x[:1])
    finally:
        for handle in handles:
            handle.detach()
    unused = [block.name for _, block in quant_blocks(net) if block not in order]
    if unused:
        log.warning("quantized blocks that never ran: %s", unused)
    return order
