"""Quantization schemes: one frozen dataclass, validated on construction."""
from dataclasses import dataclass, fields, replace

GRANULARITIES = ('channel', 'tensor')
RANGE_TRACKERS = ('ema', 'max')


@dataclass(frozen=True)
class QuantConfig:
    """How one layer is quantized.

    weight_bits / input_bits: 2..8 (signed codes in [-(2^(b-1)-1), 2^(b-1)-1]).
    weight_granularity: 'channel' = one scale per output channel for plain convs and Dense,
        one per group for grouped and depthwise convs (what ncnn stores); 'tensor' = one scale.
    input_signed: True is what ncnn runs; False (codes in [0, 2^b-1]) is simulation only.
    fake_bn: fold a following BatchNorm into the conv during training (Jacob et al. 2018).
    range_momentum: EMA momentum of the per-batch max |x| used as the input range.
    range_tracker: 'ema' (bias-corrected EMA, updated in training) or 'max' (running max,
        kept by `calibrate`).
    """
    weight_bits: int = 8
    input_bits: int = 8
    weight_granularity: str = 'channel'
    input_signed: bool = True
    fake_bn: bool = True
    range_momentum: float = 0.9
    range_tracker: str = 'ema'

    def __post_init__(self):
        for name in ('weight_bits', 'input_bits'):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 2 <= value <= 8:
                raise ValueError(f"QuantConfig.{name} must be an integer in 2..8, got {value!r}")
        if self.weight_granularity not in GRANULARITIES:
            raise ValueError(f"QuantConfig.weight_granularity must be one of {GRANULARITIES}, "
                             f"got {self.weight_granularity!r}")
        if self.range_tracker not in RANGE_TRACKERS:
            raise ValueError(f"QuantConfig.range_tracker must be one of {RANGE_TRACKERS}, "
                             f"got {self.range_tracker!r}")
        if not 0.0 <= float(self.range_momentum) < 1.0:
            raise ValueError(f"QuantConfig.range_momentum must be in [0, 1), "
                             f"got {self.range_momentum!r}")
        for name in ('input_signed', 'fake_bn'):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"QuantConfig.{name} must be true or false, "
                                 f"got {getattr(self, name)!r}")

    def updated(self, **changes):
        """A copy with some fields changed (validated)."""
        unknown = set(changes) - {f.name for f in fields(self)}
        if unknown:
            raise ValueError(f"unknown QuantConfig field(s) {sorted(unknown)}; "
                             f"valid: {[f.name for f in fields(self)]}")
        return replace(self, **changes)
