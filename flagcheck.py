"""Range rules of numeric flags, checked at parse time by every entry point: a value out of
range is one usage line naming the flag (argparse's exit status 2), before any work starts."""
import math
from typing import NamedTuple


class Range(NamedTuple):
    """Allowed values: ``low`` <= v (< when ``low_open``), v <= ``high`` (< when ``high_open``);
    NaN never, infinity only where ``allow_inf``."""
    low: float = None
    high: float = None
    low_open: bool = False
    high_open: bool = False
    allow_inf: bool = False

    def holds(self, value):
        value = float(value)
        if math.isnan(value) or (math.isinf(value) and not self.allow_inf):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def describe(self):
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return f"{'<' if self.high_open else '<='} {self.high:g}"


AT_LEAST_0 = Range(0)
AT_LEAST_1 = Range(1)
POSITIVE = Range(0, low_open=True)
UNIT = Range(0, 1)
BETA = Range(0, 1, high_open=True)  # Adam's betas


def flag_name(dest):
    return "--" + dest.replace("_", "-")


def range_error(dest, value, rule):
    """The one line for a value out of range, or None when it is in range (None = not given)."""
    values = value if isinstance(value, (list, tuple)) else [value]
    for v in values:
        if v is not None and not rule.holds(v):
            return f"{flag_name(dest)} must be {rule.describe()}, got {v}"
    return None


def check_ranges(parser, args, rules):
    """``parser.error`` (one line, exit 2) for the first flag of ``rules`` ({dest: Range}) out of range."""
    for dest, rule in rules.items():
        message = range_error(dest, getattr(args, dest, None), rule)
        if message:
            parser.error(message)
