"""Read AtoM's config/*.yml as AtoM does: PyYAML's parser, symfony 1.4 sfYaml's scalars, PHP's values.

AtoM reads its configuration with the sfYaml copy it vendors (symfony 1.4, default YAML 1.2 mode) under
PHP 7.4/8.x, and concatenates `workers_key` into the job prefix with PHP's string conversion. PyYAML
parses the structure; every *plain* scalar is then evaluated by `evaluate_scalar`, which follows
sfYamlInline::evaluateScalar step by step (quoted and block scalars stay strings, as in sfYaml):

  null, ~, empty            -> None
  digits only               -> octal int with a leading zero (0123 is 83, octdec skips 8 and 9),
                               else int (a string again when it overflows PHP's int)
  true / false, any case    -> bool; yes/no/on/off/y/n stay strings (YAML 1.2 mode)
  PHP's is_numeric          -> float (1.50 is 1.5, -12 is -12.0, 1e3 is 1000.0). 0x1A is not numeric
                               for PHP 7+, so sfYaml's hexdec branch is dead and 0x1A stays a string
  .inf / .NaN, -.inf        -> inf, -inf (sfYaml returns -log(0) for .NaN too)
  digits with commas        -> float without the commas (1,000.5 is 1000.5)
  a date or timestamp       -> strtotime(): Unix time, or False when PHP refuses the date
  anything else             -> the text

Dates without a zone are taken as UTC: PHP's default zone when date.timezone is unset, which is how
Debian's php.ini ships. Mapping keys become PHP array keys, as strings (true -> "1", null -> "").
`!str x` is a string; other tags are refused. Anchors and aliases work, but a document that nests deeper
than MAX_DEPTH or expands to more than MAX_NODES values (aliases counted each time they are used) is
refused before anything is built from it.
"""

from __future__ import annotations

import math
import re

import yaml

from .phpvalues import php_float, php_key, php_string  # noqa: F401 - sfYaml's values as PHP prints them

MAX_DEPTH = 64
MAX_NODES = 100_000
PHP_INT_MAX = 2**63 - 1
SFYAML_TAG = "tag:atom-workerctl,2026:sfyaml-plain"


class SfYamlError(ValueError):
    """A document sfYaml would not read (or that is too deep or too large to be AtoM configuration)."""


# -- PHP's primitives, as evaluateScalar uses them -------------------------------------------------------------
_IS_NUMERIC = re.compile(r"[ \t\n\r\v\f]*[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?[ \t\n\r\v\f]*")
_COMMAS = re.compile(r"[-+]?[0-9,]+(?:\.[0-9]+)?")
_TIMESTAMP = re.compile(
    r"(?P<year>[0-9]{4})-(?P<month>[0-9]{1,2})-(?P<day>[0-9]{1,2})"
    r"(?:(?:[Tt]|[ \t]+)(?P<hour>[0-9]{1,2}):(?P<minute>[0-9]{2}):(?P<second>[0-9]{2})(?:\.[0-9]*)?"
    r"(?:[ \t]*(?P<tz>Z|(?P<sign>[-+])(?P<tzh>[0-9]{1,2})(?::(?P<tzm>[0-9]{2}))?))?)?"
)


def _octdec(digits: str) -> int | float:
    """PHP's octdec(): characters that are not octal digits are skipped; past PHP_INT_MAX a float."""
    value = 0
    for ch in digits:
        if "0" <= ch <= "7":
            value = value * 8 + int(ch)
    return value if value <= PHP_INT_MAX else float(value)


def _days_from_civil(year: int, month: int, day: int) -> int:
    """Days since 1970-01-01 of a proleptic Gregorian date (any year, year 0 included)."""
    year -= month <= 2
    era = year // 400
    yoe = year - era * 400
    doy = (153 * (month + (-3 if month > 2 else 9)) + 2) // 5 + day - 1
    return era * 146097 + yoe * 365 + yoe // 4 - yoe // 100 + doy - 719468


def strtotime(match: re.Match) -> int | bool:
    """strtotime() of a text that matched sfYaml's timestamp pattern, in UTC.

    PHP accepts month 0..12 and day 0..31 and rolls over (2024-02-30 is March 1st), hour 0..24,
    minute 0..59, second 0..60, zone offsets of any two-digit hour and minutes 0..59; the fraction is dropped.
    """
    g = match.groupdict()
    year, month, day = int(g["year"]), int(g["month"]), int(g["day"])
    hour, minute, second = (int(g[k] or 0) for k in ("hour", "minute", "second"))
    if month > 12 or day > 31 or hour > 24 or minute > 59 or second > 60 or int(g["tzm"] or 0) > 59:
        return False
    months = year * 12 + month - 1  # month 0 is December of the year before
    days = _days_from_civil(months // 12, months % 12 + 1, 1) + day - 1
    offset = 0
    if g["sign"]:
        offset = (int(g["tzh"]) * 3600 + int(g["tzm"] or 0) * 60) * (1 if g["sign"] == "+" else -1)
    return days * 86400 + hour * 3600 + minute * 60 + second - offset


def evaluate_scalar(text: str):
    """The PHP value sfYaml (YAML 1.2 mode) gives a plain scalar."""
    s = text.strip(" \t\n\r\0\x0b")
    low = s.lower()
    if low == "null" or s in ("", "~"):
        return None
    if s.isascii() and s.isdigit():
        if s[0] == "0":
            return _octdec(s)
        return int(s) if int(s) <= PHP_INT_MAX else s  # intval saturates, then sfYaml keeps the text
    if low == "true":
        return True
    if low == "false":
        return False
    if _IS_NUMERIC.fullmatch(s):
        return float(s)
    if low in (".inf", ".nan"):
        return math.inf
    if low == "-.inf":
        return -math.inf
    if _COMMAS.fullmatch(s):
        digits = s.replace(",", "")
        return float(digits) if _IS_NUMERIC.fullmatch(digits) else 0.0  # floatval("") and floatval("-") are 0
    if match := _TIMESTAMP.fullmatch(s):
        return strtotime(match)
    return s


# -- the loader --------------------------------------------------------------------------------------------------
class _Loader(yaml.SafeLoader):
    """PyYAML's pure-Python safe loader with sfYaml's scalars, a depth limit and an expansion limit."""

    _depth = 0

    def resolve(self, kind, value, implicit):
        if kind is yaml.ScalarNode and implicit[0]:
            return SFYAML_TAG  # every plain scalar, never SafeLoader's YAML 1.1 rules
        return super().resolve(kind, value, implicit)

    def compose_node(self, parent, index):
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                line = self.peek_event().start_mark.line + 1
                raise SfYamlError(f"line {line}: nested deeper than {MAX_DEPTH} levels")
            alias = self.check_event(yaml.AliasEvent) and self.peek_event().anchor
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        if alias:
            size = getattr(node, "sf_size", 1)
        elif isinstance(node, yaml.MappingNode):
            size = 1 + sum(getattr(k, "sf_size", 1) + getattr(v, "sf_size", 1) for k, v in node.value)
        elif isinstance(node, yaml.SequenceNode):
            size = 1 + sum(getattr(v, "sf_size", 1) for v in node.value)
        else:
            size = 1
        if size > MAX_NODES:
            raise SfYamlError(f"line {node.start_mark.line + 1}: expands to more than {MAX_NODES} values")
        if not alias:
            node.sf_size = size
        return node

    def construct_plain(self, node):
        return evaluate_scalar(node.value)

    def construct_double_quoted(self, node):
        """sfYaml unescapes only \\" \\n \\r in double quotes: take the text as written when it is one line."""
        mark, end = node.start_mark, node.end_mark
        if node.style == '"' and mark.buffer is not None and mark.line == end.line:
            raw = mark.buffer[mark.pointer + 1:end.pointer - 1]
            return raw.replace('\\"', '"').replace("\\n", "\n").replace("\\r", "\r")
        return self.construct_scalar(node)

    def construct_str_tag(self, node):
        return self.construct_scalar(node)

    def construct_mapping(self, node, deep=False):
        self.flatten_mapping(node)  # `<<: *anchor` merges, as sfYaml's parser does
        out = {}
        for key_node, value_node in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, (dict, list)):
                raise SfYamlError(f"line {key_node.start_mark.line + 1}: a mapping or list as a key")
            out[php_key(key)] = self.construct_object(value_node, deep=deep)
        return out


_Loader.add_constructor(SFYAML_TAG, _Loader.construct_plain)
_Loader.add_constructor("tag:yaml.org,2002:str", _Loader.construct_double_quoted)
_Loader.add_constructor("!str", _Loader.construct_str_tag)
_Loader.add_constructor("tag:yaml.org,2002:map", _Loader.construct_mapping)


def loads(text: str):
    """The PHP value of a YAML document as AtoM reads it. Raises SfYamlError with the line number."""
    try:
        return yaml.load(text, Loader=_Loader)  # _Loader is a SafeLoader: no Python objects
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}: " if mark else ""
        what = ": ".join(part for part in (exc.context, exc.problem) if part)
        raise SfYamlError(f"{where}{what}") from None
    except yaml.YAMLError as exc:
        raise SfYamlError(str(exc).splitlines()[0]) from None
