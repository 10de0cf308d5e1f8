"""PHP's string conversion of the values sfYaml returns, without PyYAML.

AtoM concatenates configuration values into strings (the job prefix's `workers_key`, server names) with PHP's
(string) cast. These live apart from sfyaml.py so that code holding an already parsed configuration (the
configuration cache) can use them without importing PyYAML.
"""

from __future__ import annotations

import math


def php_float(value: float, precision: int = 14) -> str:
    """(string) of a PHP float: `precision` (14) significant digits, as zend_gcvt prints them."""
    if math.isnan(value):
        return "NAN"
    if math.isinf(value):
        return "INF" if value > 0 else "-INF"
    if value == 0:
        return "-0" if math.copysign(1, value) < 0 else "0"
    sign = "-" if value < 0 else ""
    mantissa, exponent = f"{abs(value):.{precision - 1}e}".split("e")
    digits = mantissa.replace(".", "").rstrip("0") or "0"
    point = int(exponent) + 1  # where the decimal point goes, counted from the first digit
    if (point < -3) if point < 0 else (point > precision):
        return f"{sign}{digits[0]}.{digits[1:] or '0'}E{'-' if point - 1 < 0 else '+'}{abs(point - 1)}"
    if point <= 0:
        return f"{sign}0.{'0' * -point}{digits}"
    whole, frac = digits[:point].ljust(point, "0"), digits[point:]
    return f"{sign}{whole}.{frac}" if frac else f"{sign}{whole}"


def php_string(value) -> str:
    """(string) $value for what sfYaml returns: true "1", false and null "", floats as PHP 8 prints them."""
    if value is None or value is False:
        return ""
    if value is True:
        return "1"
    if isinstance(value, float):
        return php_float(value)
    if isinstance(value, (dict, list)):
        return "Array"
    return str(value)


def php_key(value) -> str:
    """An array key as PHP makes it from a YAML key (true 1, false 0, null "", floats truncated)."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float):
        return str(int(value)) if math.isfinite(value) else "0"
    return php_string(value)
