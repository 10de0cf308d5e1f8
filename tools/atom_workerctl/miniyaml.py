"""A small YAML reader for AtoM's Symfony configuration files (config/gearman.yml, config/app.yml).

Hosts run the CLI with pystemd as its only dependency, so this reads the YAML subset that Symfony 1.x
configuration files use: block mappings and sequences, flow `[...]` and `{...}`, plain, single- and
double-quoted scalars, `|`/`>` block scalars, comments and `---`. Scalars resolve as sfYaml (YAML 1.1)
does: `~`/`null`/empty are None, `true/false/yes/no/on/off` booleans, decimal integers ints; anything
else stays a string. Anchors, aliases and tags are refused with the line number, as is anything this
reader does not understand: a wrong answer about the job prefix is worse than a clear error.
"""

from __future__ import annotations

_TRUE = {"true", "yes", "on", "+"}
_FALSE = {"false", "no", "off", "-"}
_NULL = {"", "~", "null"}


class YamlError(ValueError):
    def __init__(self, source: str, lineno: int, message: str):
        super().__init__(f"{source}:{lineno}: {message}")
        self.source = source
        self.lineno = lineno
        self.message = message


def resolve_plain(text: str):
    low = text.lower()
    if low in _NULL:
        return None
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    body = text[1:] if text[:1] in "+-" else text
    if body.isdigit() and body.isascii():
        return int(text)
    return text


def _strip_comment(text: str) -> str:
    """Cut a `#` comment that is outside quotes (a quote only opens at the start of a scalar)."""
    quote = ""
    prev = " "  # what precedes the current position, ignoring spaces
    i = 0
    n = len(text)
    while i < n:
        c = text[i]
        if quote == '"':
            if c == "\\":
                i += 2
                continue
            if c == '"':
                quote = ""
        elif quote == "'":
            if c == "'":
                if i + 1 < n and text[i + 1] == "'":
                    i += 2
                    continue
                quote = ""
        elif c == "#" and (i == 0 or text[i - 1] in " \t"):
            return text[:i].rstrip()
        elif c in "'\"" and prev in " :-[{,?":
            quote = c
        if c not in " \t":
            prev = c
        i += 1
    return text.rstrip()


_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "0": "\0", '"': '"', "\\": "\\", "/": "/", " ": " ",
            "a": "\a", "b": "\b", "e": "\x1b", "f": "\f", "v": "\v"}


class _Flow:
    """Parser for one line's inline value: flow collections and quoted or plain scalars."""

    def __init__(self, text: str, source: str, lineno: int):
        self.s = text
        self.i = 0
        self.source = source
        self.lineno = lineno

    def fail(self, message: str):
        raise YamlError(self.source, self.lineno, message)

    def ws(self):
        while self.i < len(self.s) and self.s[self.i] in " \t":
            self.i += 1

    def value(self, stops: str):
        self.ws()
        if self.i >= len(self.s):
            return None
        c = self.s[self.i]
        if c == "[":
            return self.seq()
        if c == "{":
            return self.map()
        if c in "'\"":
            return self.quoted()
        if c in "&*!":
            self.fail("anchors, aliases and tags are not supported")
        if c in "|>" and not stops:
            self.fail("block scalar indicator in an unexpected place")
        start = self.i
        while self.i < len(self.s):
            ch = self.s[self.i]
            if ch in stops:
                break
            if ch == ":" and stops and (self.i + 1 >= len(self.s) or self.s[self.i + 1] in " ,]}"):
                break
            self.i += 1
        return resolve_plain(self.s[start:self.i].strip())

    def quoted(self) -> str:
        q = self.s[self.i]
        self.i += 1
        out = []
        while True:
            if self.i >= len(self.s):
                self.fail(f"unterminated {q}quoted{q} string")
            c = self.s[self.i]
            if q == "'" and c == "'":
                if self.s[self.i + 1:self.i + 2] == "'":
                    out.append("'")
                    self.i += 2
                    continue
                self.i += 1
                return "".join(out)
            if q == '"' and c == '"':
                self.i += 1
                return "".join(out)
            if q == '"' and c == "\\":
                esc = self.s[self.i + 1:self.i + 2]
                if esc in _ESCAPES:
                    out.append(_ESCAPES[esc])
                    self.i += 2
                    continue
                if esc in ("x", "u", "U"):
                    width = {"x": 2, "u": 4, "U": 8}[esc]
                    digits = self.s[self.i + 2:self.i + 2 + width]
                    try:
                        out.append(chr(int(digits, 16)))
                    except ValueError:
                        self.fail(f"bad escape \\{esc}{digits}")
                    self.i += 2 + width
                    continue
                self.fail(f"bad escape \\{esc}")
            out.append(c)
            self.i += 1

    def seq(self) -> list:
        self.i += 1
        items = []
        while True:
            self.ws()
            if self.i >= len(self.s):
                self.fail("unterminated [ ... ]")
            if self.s[self.i] == "]":
                self.i += 1
                return items
            items.append(self.value(",]"))
            self.ws()
            if self.i < len(self.s) and self.s[self.i] == ",":
                self.i += 1
            elif self.i < len(self.s) and self.s[self.i] != "]":
                self.fail(f"expected , or ] in flow sequence, found {self.s[self.i]!r}")

    def map(self) -> dict:
        self.i += 1
        items = {}
        while True:
            self.ws()
            if self.i >= len(self.s):
                self.fail("unterminated { ... }")
            if self.s[self.i] == "}":
                self.i += 1
                return items
            key = self.value(",}:")
            self.ws()
            val = None
            if self.i < len(self.s) and self.s[self.i] == ":":
                self.i += 1
                val = self.value(",}")
            items[_key(key)] = val
            self.ws()
            if self.i < len(self.s) and self.s[self.i] == ",":
                self.i += 1
            elif self.i < len(self.s) and self.s[self.i] != "}":
                self.fail(f"expected , or }} in flow mapping, found {self.s[self.i]!r}")

    def done(self):
        self.ws()
        if self.i < len(self.s):
            self.fail(f"unexpected text after the value: {self.s[self.i:]!r}")


def _key(key) -> str:
    if key is None:
        return ""
    if isinstance(key, bool):
        return "1" if key else ""  # as PHP's array keys
    return str(key)


def _split_key(text: str, source: str, lineno: int):
    """`key: rest` -> (key, rest), or None when the line is not a mapping entry."""
    if text[:1] in "'\"":
        flow = _Flow(text, source, lineno)
        key = flow.quoted()
        flow.ws()
        if flow.s[flow.i:flow.i + 1] != ":":
            return None
        return key, flow.s[flow.i + 1:].strip()
    if text[:1] in "[{":
        return None
    pos = 0
    while True:
        pos = text.find(":", pos)
        if pos < 0:
            return None
        if pos + 1 == len(text) or text[pos + 1] in " \t":
            return _key(resolve_plain(text[:pos].strip())) if text[:pos].strip() else "", text[pos + 1:].strip()
        pos += 1


class _Doc:
    def __init__(self, text: str, source: str):
        self.source = source
        self.raw = text.split("\n")
        self.lines = []  # [lineno, indent, content] of significant lines
        for n, line in enumerate(self.raw, 1):
            if "\t" in line[: len(line) - len(line.lstrip(" \t"))]:
                raise YamlError(source, n, "tab in indentation")
            stripped = _strip_comment(line)
            content = stripped.lstrip(" ")
            if not content:
                continue
            if content in ("---", "...") or content.startswith("--- ") or content.startswith("%"):
                if content.startswith("--- ") and content[4:].strip():
                    raise YamlError(source, n, "content on the document marker line is not supported")
                continue
            self.lines.append([n, len(stripped) - len(content), content])
        self.pos = 0

    def fail(self, lineno: int, message: str):
        raise YamlError(self.source, lineno, message)

    def peek(self):
        return self.lines[self.pos] if self.pos < len(self.lines) else None

    def parse(self):
        if not self.lines:
            return None
        first = self.lines[0]
        value = self.block(first[1])
        if self.pos < len(self.lines):
            line = self.lines[self.pos]
            self.fail(line[0], "bad indentation")
        return value

    def block(self, indent: int):
        line = self.peek()
        if line[2] == "-" or line[2].startswith("- "):
            return self.sequence(indent)
        if _split_key(line[2], self.source, line[0]) is not None:
            return self.mapping(indent)
        # A lone scalar or flow collection as the whole block.
        self.pos += 1
        return self.inline(line, line[2], indent)

    def inline(self, line, text: str, parent_indent: int):
        lineno = line[0]
        if text[:1] in "|>":
            return self.block_scalar(text, lineno, parent_indent)
        flow = _Flow(text, self.source, lineno)
        value = flow.value("")
        flow.done()
        if text[:1] not in "'\"[{":
            # Plain multi-line scalar: more-indented lines continue it.
            parts = [] if value is None else [text]
            while (nxt := self.peek()) is not None and nxt[1] > parent_indent:
                if _split_key(nxt[2], self.source, nxt[0]) is not None or nxt[2].startswith("- "):
                    self.fail(nxt[0], "bad indentation (a mapping or sequence under a scalar)")
                parts.append(nxt[2])
                self.pos += 1
            if len(parts) > 1:
                return " ".join(parts)
        return value

    def block_scalar(self, header: str, lineno: int, parent_indent: int) -> str:
        style, chomp = header[0], ""
        for c in header[1:].strip():
            if c in "+-":
                chomp = c
            elif not c.isdigit():
                self.fail(lineno, f"bad block scalar header {header!r}")
        # Raw lines after the header that are blank or indented deeper than the parent belong to it.
        body = []
        n = lineno  # raw index of the next line (lineno is 1-based)
        while n < len(self.raw):
            raw = self.raw[n]
            if raw.strip() and len(raw) - len(raw.lstrip(" ")) <= parent_indent:
                break
            body.append(raw)
            n += 1
        while self.pos < len(self.lines) and self.lines[self.pos][0] <= n:
            self.pos += 1
        while body and not body[-1].strip():
            body.pop()
        if not body:
            return ""
        width = min(len(b) - len(b.lstrip(" ")) for b in body if b.strip())
        body = [b[width:] for b in body]
        if style == "|":
            text = "\n".join(body)
        else:
            text = ""
            prev = ""
            for b in body:
                if not b:
                    text += "\n"
                elif text and not text.endswith("\n"):
                    # More-indented lines keep their line breaks (YAML's folding rule).
                    text += ("\n" if b[0] == " " or prev[:1] == " " else " ") + b
                else:
                    text += b
                prev = b
        return text if chomp == "-" else text + "\n"

    def mapping(self, indent: int) -> dict:
        out = {}
        while (line := self.peek()) is not None:
            lineno, ind, text = line
            if ind < indent:
                break
            if ind > indent:
                self.fail(lineno, "bad indentation")
            split = _split_key(text, self.source, lineno)
            if split is None:
                self.fail(lineno, f"expected `key: value`, found {text!r}")
            key, rest = split
            if rest and rest[0] in "&*!":
                self.fail(lineno, "anchors, aliases and tags are not supported")
            self.pos += 1
            if rest:
                out[key] = self.inline(line, rest, indent)
                continue
            nxt = self.peek()
            if nxt is not None and nxt[1] > indent:
                out[key] = self.block(nxt[1])
            elif nxt is not None and nxt[1] == indent and (nxt[2] == "-" or nxt[2].startswith("- ")):
                out[key] = self.sequence(indent)
            else:
                out[key] = None
        return out

    def sequence(self, indent: int) -> list:
        out = []
        while (line := self.peek()) is not None:
            lineno, ind, text = line
            if ind < indent or not (text == "-" or text.startswith("- ")):
                if ind > indent:
                    self.fail(lineno, "bad indentation")
                break
            if ind > indent:
                self.fail(lineno, "bad indentation")
            rest = text[1:].lstrip(" ")
            if not rest:
                self.pos += 1
                nxt = self.peek()
                out.append(self.block(nxt[1]) if nxt is not None and nxt[1] > indent else None)
                continue
            # The item's content starts a block at its own column ("- key: v", "- - x").
            line[1] = ind + (len(text) - len(rest))
            line[2] = rest
            if rest == "-" or rest.startswith("- ") or (
                rest[:1] not in "[{" and _split_key(rest, self.source, lineno) is not None
            ):
                out.append(self.block(line[1]))
            else:
                self.pos += 1
                out.append(self.inline(line, rest, indent))
        return out


def loads(text: str, source: str = "<yaml>"):
    """Parse YAML text; raises YamlError naming source and line."""
    if text.startswith("\ufeff"):
        text = text[1:]
    return _Doc(text.replace("\r\n", "\n"), source).parse()
