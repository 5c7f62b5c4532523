"""Quantization schemes: ``QuantConfig`` says how one layer is quantized (one frozen,
validated dataclass); ``QuantScheme`` says which config each layer of a net gets (a default,
overrides by block type and by name, the first-layer rule), in the spirit of PyTorch's
QConfigMapping. The recipe's ``quantize`` section, ``qat calibrate``'s flags and the Python
API all build a ``QuantScheme`` (``QuantScheme.from_dict``), so they cannot drift apart.
"""
import fnmatch
from dataclasses import dataclass, field, fields, replace

import numpy as np

from .errors import UserError

BITS = (2, 8)                      # the widths a layer can be simulated at (int8 storage)
GRANULARITIES = ('channel', 'tensor')
RANGE_TRACKERS = ('ema', 'max', 'lsq', 'auto')
# 'auto' learns the ranges (LSQ) of layers this narrow or narrower, and tracks them (EMA) above:
# at 8 bits a max-based range is already right and a learned one only adds noise (measured:
# benchmarks.narrow), while below it EMA ranges feed back on themselves and diverge.
AUTO_LSQ_BITS = 4
# A QuantConfig as a float32 vector (saved with the parameters, see ``to_vector``): the
# checkpoint format version first, then the fields in this order.
CHECKPOINT_FORMAT = 2
VECTOR_FIELDS = ('weight_bits', 'input_bits', 'weight_granularity', 'input_signed', 'fake_bn',
                 'range_momentum', 'range_tracker')
_CHOICES = {'weight_granularity': GRANULARITIES, 'range_tracker': RANGE_TRACKERS}


@dataclass(frozen=True)
class QuantConfig:
    """How one layer is quantized.

    weight_bits / input_bits: 2..8 (signed codes in [-(2^(b-1)-1), 2^(b-1)-1]).
    weight_granularity: 'channel' = one scale per output channel for plain convs and Dense,
        one per group for grouped and depthwise convs (what ncnn stores); 'tensor' = one scale.
    input_signed: True: codes in [-(2^(b-1)-1), 2^(b-1)-1]; False: codes in [0, 2^b-1], twice
        the levels for non-negative inputs (after a ReLU); exported up to 7 bits (they fit int8).
    fake_bn: fold a following BatchNorm into the conv during training (Jacob et al. 2018).
    range_momentum: EMA momentum of the per-batch max |x| used as the input range.
    range_tracker: 'ema' (bias-corrected EMA, updated in training), 'max' (running max,
        kept by `calibrate`) or 'lsq' (learned step size, Esser et al. 2020: the input range
        and the weight ranges are trained parameters, started from the calibrated range and
        from max|w|; see ``qat.nn.layers.QuantBlock``), or 'auto': 'lsq' when the weight or
        input bits are AUTO_LSQ_BITS or fewer, else 'ema' (``resolved``; a block always holds
        the resolved config).
    """
    weight_bits: int = 8
    input_bits: int = 8
    weight_granularity: str = 'channel'
    input_signed: bool = True
    fake_bn: bool = True
    range_momentum: float = 0.9
    range_tracker: str = 'ema'

    def __post_init__(self):
        low, high = BITS
        for name in ('weight_bits', 'input_bits'):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) \
                    or not low <= value <= high:
                raise UserError(f"QuantConfig.{name} must be an integer in {low}..{high}, "
                                 f"got {value!r}")
        for name, choices in _CHOICES.items():
            if getattr(self, name) not in choices:
                raise UserError(f"QuantConfig.{name} must be one of {choices}, "
                                 f"got {getattr(self, name)!r}")
        if isinstance(self.range_momentum, bool) \
                or not isinstance(self.range_momentum, (int, float)) \
                or not 0.0 <= float(self.range_momentum) < 1.0:
            raise UserError(f"QuantConfig.range_momentum must be in [0, 1), "
                             f"got {self.range_momentum!r}")
        for name in ('input_signed', 'fake_bn'):
            if not isinstance(getattr(self, name), bool):
                raise UserError(f"QuantConfig.{name} must be true or false, "
                                 f"got {getattr(self, name)!r}")

    def resolved(self):
        """This config with range_tracker 'auto' replaced by what it means at these widths."""
        if self.range_tracker != 'auto':
            return self
        narrow = min(self.weight_bits, self.input_bits) <= AUTO_LSQ_BITS
        return replace(self, range_tracker='lsq' if narrow else 'ema')

    def updated(self, **changes):
        """A copy with some fields changed (validated)."""
        unknown = set(changes) - {f.name for f in fields(self)}
        if unknown:
            raise UserError(f"unknown QuantConfig field(s) {sorted(unknown)}; "
                             f"valid: {[f.name for f in fields(self)]}")
        return replace(self, **changes)

    def to_vector(self):
        """[CHECKPOINT_FORMAT, fields in VECTOR_FIELDS order] as float32; choices as their
        index."""
        values = [_CHOICES[name].index(getattr(self, name)) if name in _CHOICES
                  else float(getattr(self, name)) for name in VECTOR_FIELDS]
        return np.array([CHECKPOINT_FORMAT] + values, np.float32)

    @classmethod
    def from_vector(cls, vector):
        """The config saved by ``to_vector`` (a float32 array)."""
        vector = np.asarray(vector, np.float32)
        if int(vector[0]) != CHECKPOINT_FORMAT or len(vector) != len(VECTOR_FIELDS) + 1:
            raise UserError(f"a saved QuantConfig of format {vector[0]:g} with "
                             f"{len(vector) - 1} fields; this version reads format "
                             f"{CHECKPOINT_FORMAT} ({len(VECTOR_FIELDS)} fields)")
        values = {}
        for name, value in zip(VECTOR_FIELDS, vector[1:]):
            if name in _CHOICES:
                values[name] = _CHOICES[name][int(value)]
            elif name == 'range_momentum':  # the shortest decimal that is this float32
                values[name] = float(np.format_float_positional(value, unique=True))
            elif name in ('input_signed', 'fake_bn'):
                values[name] = bool(value > 0.5)
            else:
                values[name] = int(value)
        return cls(**values)


def winograd_candidate(block):
    """True for a Gluon Conv2D that ncnn may run with int8 Winograd: 3x3 kernel, stride 1,
    dilation 1, one group (ncnn2table's test)."""
    kwargs = getattr(block, '_kwargs', None)
    if type(block).__name__ != 'Conv2D' or not kwargs:
        return False
    return tuple(kwargs.get('kernel', ())) == (3, 3) and tuple(kwargs.get('stride', ())) == (1, 1) \
        and tuple(kwargs.get('dilate', ())) == (1, 1) and kwargs.get('num_group', 1) == 1


def _glob(block, path, pattern):
    return fnmatch.fnmatchcase(block.name, pattern) or fnmatch.fnmatchcase(path, pattern)


@dataclass(frozen=True, eq=False)
class QuantScheme:
    """The config of every layer of a net.

    default: the QuantConfig of every layer not matched below.
    by_name: {glob pattern on block name ('resnetv10_conv0') or path ('features.0'):
        QuantConfig, or None = the layer stays float}; the first matching pattern wins.
    first_layer_bits: weight and input bits of the first Conv2D / Dense in network order (it
        sees the raw image; 8 is the usual choice), None = like the others.
    by_type: {block type (nn.Conv2D, nn.Dense): QuantConfig or None}.
    exclude: glob patterns of blocks left float with everything inside them.
    winograd_weight_bits: weight bits of every 3x3, stride-1, undilated, ungrouped Conv2D —
        the convs ncnn may run with int8 Winograd F(4,3); ncnn2table's rule is 6 (its weight
        scale 31/absmax, so that Winograd's transformed weights stay within int8). None: no
        rule. It applies on top of the first-layer rule, by_type and default, not to by_name.
    unsigned_after_relu: unsigned input codes (0..2^b-1: twice the levels) for the layers of
        7 input bits or fewer whose input is >= 0 by construction (after a ReLU, a sigmoid,
        and through pooling, flatten, concat, sums and products of such: read from the
        traced graph by ``convert_model``); exported exactly (the codes fit int8). On top of
        the same rules as winograd_weight_bits, not by_name.
    Precedence: by_name, then the first-layer rule, then by_type, then default.
    """
    default: QuantConfig = QuantConfig()
    by_name: dict = field(default_factory=dict)
    first_layer_bits: int = None
    by_type: dict = field(default_factory=dict)
    exclude: tuple = ()
    winograd_weight_bits: int = None
    unsigned_after_relu: bool = False

    def __post_init__(self):
        for where, value in [('default', self.default)] + [
                (f"by_name[{k!r}]", v) for k, v in self.by_name.items()] + [
                (f"by_type[{getattr(k, '__name__', k)}]", v) for k, v in self.by_type.items()]:
            if value is not None and not isinstance(value, QuantConfig):
                raise TypeError(f"QuantScheme.{where} must be a QuantConfig or None, got "
                                f"{type(value).__name__}")
        if self.first_layer_bits is not None:
            self.default.updated(weight_bits=self.first_layer_bits,
                                 input_bits=self.first_layer_bits)  # validates
        if self.winograd_weight_bits is not None:
            self.default.updated(weight_bits=self.winograd_weight_bits)  # validates

    def config_for(self, block, path, first=False, non_negative=False):
        """The QuantConfig of ``block`` at ``path`` (``first``: it is the net's first layer;
        ``non_negative``: its input is >= 0 by construction), or None when it stays float."""
        for pattern, config in self.by_name.items():
            if _glob(block, path, pattern):
                return config
        config = self._rules_config(block, first)
        if config is None:
            return None
        if self.winograd_weight_bits is not None and winograd_candidate(block):
            config = config.updated(weight_bits=self.winograd_weight_bits)
        if self.unsigned_after_relu and non_negative and config.input_bits <= 7:
            config = config.updated(input_signed=False)
        return config

    def _rules_config(self, block, first):
        if first and self.first_layer_bits is not None:
            return self.default.updated(weight_bits=self.first_layer_bits,
                                        input_bits=self.first_layer_bits)
        for block_type, config in self.by_type.items():
            if isinstance(block, block_type):
                return config
        return self.default

    def with_bits(self, bits):
        """The same scheme with weight and input bits ``bits`` by default (overrides and the
        first-layer rule unchanged)."""
        return replace(self, default=self.default.updated(weight_bits=bits, input_bits=bits))

    @classmethod
    def from_dict(cls, values, origin='quantize'):
        """A scheme from flat settings: QuantConfig field names, ``first_layer_bits``,
        ``exclude`` (patterns) and ``layers`` ({pattern: {field: value} or None}). Errors
        are ValueError naming ``<origin>.<key>``."""
        names = {f.name for f in fields(QuantConfig)}
        extra = {'first_layer_bits', 'exclude', 'layers', 'winograd_weight_bits',
                 'unsigned_after_relu'}
        unknown = sorted(set(values) - names - extra)
        if unknown:
            raise UserError(f"{origin}.{unknown[0]}: unknown key; valid: "
                             f"{', '.join(sorted(names | extra))}")
        try:
            default = QuantConfig(**{k: v for k, v in values.items() if k in names})
        except ValueError as err:
            raise UserError(f"{origin}: {err}") from None
        by_name = {}
        for pattern, override in (values.get('layers') or {}).items():
            if override is None:
                by_name[pattern] = None
                continue
            if not isinstance(override, dict):
                raise UserError(f"{origin}.layers.{pattern}: a mapping of QuantConfig "
                                 f"fields or null (float), got {override!r}")
            try:
                by_name[pattern] = default.updated(**override)
            except ValueError as err:
                raise UserError(f"{origin}.layers.{pattern}: {err}") from None
        for key in ('first_layer_bits', 'winograd_weight_bits'):
            if values.get(key) is not None:
                try:
                    default.updated(weight_bits=values[key])
                except ValueError as err:
                    raise UserError(f"{origin}.{key}: {err}") from None
        return cls(default, by_name, values.get('first_layer_bits'),
                   exclude=tuple(values.get('exclude') or ()),
                   winograd_weight_bits=values.get('winograd_weight_bits'),
                   unsigned_after_relu=bool(values.get('unsigned_after_relu', False)))
