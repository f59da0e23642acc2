"""Turn a submitted document into the plain text the memory stores and cites.

For: the three accepted formats. ``text`` is kept exactly as given (not even
line endings change), so citations slice the caller's own string. Markdown
and HTML are converted to text in which every heading, list item, table row
and paragraph is its own block, separated by a blank line, so the sentence
splitter never runs a heading into the sentence after it. That converted
text *is* the stored document: citation offsets refer to it, and the API
returns it, so a client can always check a citation by slicing.

Conversion is linear in the size of the source, whatever it holds: it is
fed whatever an application uploads. Every regular expression here is
written so that an attempt that starts at one position cannot scan past the
next position where another attempt would start (a construct's content may
not contain its own opening delimiter, runs are possessive or start only at
their first character), so no input makes the work grow with the square of
its length; ``tests/test_memory_bounds.py`` times each construct that
used to. HTML goes through :func:`_defuse` before the standard library's
parser, which is quadratic (and can raise) on malformed markup.

Not for: keeping a map back into the Markdown or HTML source (a cited
sentence has no markup, so no source slice could equal it), rendering, or
code: fenced and indented code blocks, ``<script>``, ``<style>`` and the like
are dropped, because code is not prose that facts can be cited from.
"""

from __future__ import annotations

import html
import re
from html.parser import HTMLParser
from typing import Final

import attrs

__all__ = ["FORMATS", "Converted", "convert"]

FORMATS: Final = ("text", "markdown", "html")


@attrs.frozen
class Converted:
    """The text to store, and a title found in the source (first heading, ``<title>``)."""

    text: str
    title: str | None = None


def convert(source: str, fmt: str) -> Converted:
    """Convert ``source`` in format ``fmt`` (one of :data:`FORMATS`)."""
    if fmt == "text":
        return Converted(source)
    if fmt == "markdown":
        return _markdown(source)
    if fmt == "html":
        return _html(source)
    raise ValueError(f"unknown format {fmt!r}")


def _blocks(blocks: list[str]) -> str:
    return "\n\n".join(b for b in blocks if b)


_SPACE_RE: Final = re.compile(r"\s+")


def _squash(text: str) -> str:
    return _SPACE_RE.sub(" ", text).strip()


# -- Markdown ---------------------------------------------------------------

_FENCE_RE: Final = re.compile(r"^\s{0,3}(`{3,}|~{3,})")
# The heading's text is everything after the marker; its closing hashes are
# taken off in Python (:func:`_heading_text`): "(.*?)\s*#*\s*$" backtracks
# cubically over a long run of spaces.
_HEADING_RE: Final = re.compile(r"^\s{0,3}(#{1,6})\s+(.*)$")
_SETEXT_RE: Final = re.compile(r"^\s{0,3}(=+|-+)\s*$")
_RULE_RE: Final = re.compile(r"^\s{0,3}([-*_])(?:\s*+\1){2,}+\s*+$")
_ITEM_RE: Final = re.compile(r"^\s*(?:[-*+]|\d{1,9}[.)])\s+(?:\[[ xX]\]\s+)?(.*)$")
# Every leading "> " of a block quote at once (removing them one at a time
# copies the line once per marker).
_QUOTES_RE: Final = re.compile(r"(?:\s{0,3}>\s?)*")
# Matched against the stripped line, possessively: with "\s*" on both sides
# of an optional "|", a long run of spaces backtracks quadratically.
_TABLE_SEP_RE: Final = re.compile(r"\|?+\s*+:?+-{3,}+:?+(?:\s*+\|\s*+:?+-{3,}+:?+)*+\s*+\|?+")
_INDENTED_CODE_RE: Final = re.compile(r"^( {4}|\t)")

# Each rule's content excludes the characters that could start another
# attempt (a "[" for links, the delimiter itself for emphasis, "<" for tags),
# so an attempt that fails stops where the next one starts: the rules are
# linear, where "(.+?)" or "[^\]]+" scan to the end of the paragraph from
# every opening delimiter that has no partner ("**a " * 50,000: minutes).
_INLINE_RULES: Final[tuple[tuple[re.Pattern[str], str], ...]] = (
    (re.compile(r"!\[([^\[\]]*)\]\([^)\[\]]*\)"), r"\1"),  # image: keep the alt text
    (re.compile(r"\[([^\[\]]+)\]\([^)\[\]]*\)"), r"\1"),  # link: keep the label
    (re.compile(r"\[([^\[\]]+)\]\[[^\[\]]*\]"), r"\1"),  # reference link
    (re.compile(r"<((?:https?|mailto):[^<>\s]+)>"), r"\1"),  # autolink
    # A code span starts only at the first backtick of a run, which it takes whole.
    (re.compile(r"(?<!`)`++([^`]+?)`+"), r"\1"),
    (re.compile(r"(\*\*|__)(?=\S)((?:(?!\1).)+?)(?<=\S)\1"), r"\2"),
    (re.compile(r"(?<![\w*])\*(?=\S)([^*\n]+?)(?<=\S)\*(?![\w*])"), r"\1"),
    (re.compile(r"(?<![\w_])_(?=\S)([^_\n]+?)(?<=\S)_(?![\w_])"), r"\1"),
    (re.compile(r"~~(?=\S)((?:(?!~~).)+?)(?<=\S)~~"), r"\1"),
    (re.compile(r"</?[A-Za-z][^<>]*>"), ""),  # inline HTML tags
    (re.compile(r"\\([\\`*_{}\[\]()#+\-.!|>~])"), r"\1"),  # backslash escapes
)
_LINK_DEFINITION_RE: Final = re.compile(r"^\s{0,3}\[[^\]]+\]:\s+\S+")


def _inline(text: str) -> str:
    for pattern, replacement in _INLINE_RULES:
        text = pattern.sub(replacement, text)
    return _squash(html.unescape(text))


def _heading_text(rest: str) -> str:
    """An ATX heading's text: without its closing hashes and the spaces around them."""
    return rest.rstrip().rstrip("#").rstrip()


def _markdown(source: str) -> Converted:
    blocks: list[str] = []
    paragraph: list[str] = []
    title: str | None = None
    fence: str | None = None

    def flush() -> None:
        if paragraph:
            blocks.append(_inline(" ".join(paragraph)))
            paragraph.clear()

    for raw in source.splitlines():
        if fence is not None:
            if raw.strip().startswith(fence):
                fence = None
            continue
        if match := _FENCE_RE.match(raw):
            flush()
            fence = match.group(1)[:3]
            continue
        if not raw.strip():
            flush()
            continue
        if not paragraph and _INDENTED_CODE_RE.match(raw) and not _ITEM_RE.match(raw):
            continue
        quotes = _QUOTES_RE.match(raw)
        line = raw[quotes.end() :] if quotes else raw
        if not line.strip():
            flush()
            continue
        if paragraph and _SETEXT_RE.match(line) and len(paragraph) == 1:
            heading = _inline(paragraph.pop())
            blocks.append(heading)
            title = title or heading
            continue
        if (
            _RULE_RE.match(line)
            or _LINK_DEFINITION_RE.match(line)
            or _TABLE_SEP_RE.fullmatch(line.strip())
        ):
            flush()
            continue
        if match := _HEADING_RE.match(line):
            flush()
            heading = _inline(_heading_text(match.group(2)))
            blocks.append(heading)
            title = title or heading
            continue
        if match := _ITEM_RE.match(line):
            flush()
            paragraph.append(match.group(1))
            continue
        if line.lstrip().startswith("|"):
            flush()
            cells = [c for c in (_inline(c) for c in line.strip().strip("|").split("|")) if c]
            blocks.append("; ".join(cells))
            continue
        paragraph.append(line.strip())
    flush()
    return Converted(_blocks(blocks), title or None)


# -- HTML -------------------------------------------------------------------

# Elements whose content is not prose.
_SKIP: Final = frozenset(
    {"script", "style", "head", "noscript", "template", "svg", "math", "pre", "code", "iframe"}
)
# Elements that end a block of text: their start and end both break it.
_BLOCK: Final = frozenset(
    {
        "address", "article", "aside", "blockquote", "body", "br", "caption", "dd", "details",
        "div", "dl", "dt", "fieldset", "figcaption", "figure", "footer", "form", "h1", "h2",
        "h3", "h4", "h5", "h6", "header", "hr", "html", "li", "main", "nav", "ol", "p",
        "section", "summary", "table", "tbody", "td", "th", "thead", "tfoot", "tr", "ul",
    }
)  # fmt: skip
_HEADINGS: Final = frozenset({"h1", "h2", "h3", "h4", "h5", "h6"})
_CELLS: Final = frozenset({"td", "th"})
# Void elements never get an end tag, so they must not open a skip region.
_VOID: Final = frozenset({"br", "hr", "img", "input", "meta", "link", "area", "base", "col", "wbr"})


class _TextParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.blocks: list[str] = []
        self.current: list[str] = []
        self.skip_depth = 0
        self.in_title = False
        self.title_parts: list[str] = []
        self.heading: str | None = None
        self.in_heading = False
        self.row: list[str] | None = None
        self.cell: list[str] | None = None

    def _flush(self) -> None:
        text = _squash("".join(self.current))
        self.current.clear()
        if not text:
            return
        if self.in_heading and self.heading is None:
            self.heading = text
        self.blocks.append(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "title":
            self.in_title = True
            return
        if tag in _SKIP and tag not in _VOID:
            self.skip_depth += 1
            return
        if self.skip_depth:
            return
        if tag == "tr":
            self._flush()
            self.row = []
            return
        if tag in _CELLS and self.row is not None:
            self.cell = []
            return
        if tag in _BLOCK:
            self._flush()
            self.in_heading = tag in _HEADINGS

    def handle_endtag(self, tag: str) -> None:
        if tag == "title":
            self.in_title = False
            return
        if tag in _SKIP and tag not in _VOID:
            self.skip_depth = max(0, self.skip_depth - 1)
            return
        if self.skip_depth:
            return
        if tag in _CELLS and self.row is not None and self.cell is not None:
            text = _squash("".join(self.cell))
            if text:
                self.row.append(text)
            self.cell = None
            return
        if tag == "tr" and self.row is not None:
            if self.row:
                self.blocks.append("; ".join(self.row))
            self.row = None
            return
        if tag in _BLOCK:
            self._flush()
            if tag in _HEADINGS:
                self.in_heading = False

    def handle_data(self, data: str) -> None:
        if self.in_title:
            self.title_parts.append(data)
        elif self.skip_depth:
            return
        elif self.cell is not None:
            self.cell.append(data)
        else:
            self.current.append(data)


class _Next:
    """Where ``needle`` next occurs in ``text`` at or after a position, for
    positions that only grow: each search starts where the last one stopped
    being useful, so all of them together scan ``text`` about once."""

    def __init__(self, text: str, needle: str) -> None:
        self.text = text
        self.needle = needle
        self.searched_from = -1
        self.found = -1

    def __call__(self, position: int) -> int:
        """The index of the next occurrence at or after ``position``, or -1."""
        if 0 <= self.searched_from <= position and (self.found < 0 or self.found >= position):
            return self.found
        self.searched_from = position
        self.found = self.text.find(self.needle, position)
        return self.found


def _defuse(source: str) -> str:
    """``source`` with every ``<`` that cannot start well-formed markup
    escaped (``&lt;``, which the parser turns back into ``<``), and comments,
    declarations and processing instructions removed (none of them is text).

    The standard library's parser looks for the end of a construct from
    every ``<`` that starts one; when it has none (``"<a " * 50,000``, an
    unclosed ``<!--``) each search runs to the end of the document, which
    makes it quadratic, and ``<![x[`` raises AssertionError. After this, a
    ``<`` that reaches it has its ``>`` before the next ``<``, so no search
    passes the next construct. Linear: every search position only grows."""
    out: list[str] = []
    next_lt = _Next(source, "<")
    next_gt = _Next(source, ">")
    comment_end = _Next(source, "-->")
    position = 0
    while (lt := next_lt(position)) >= 0:
        out.append(source[position:lt])
        if source.startswith("<!--", lt):
            end = comment_end(lt + 4)
            if end >= 0:
                position = end + 3
                continue
        else:
            gt = next_gt(lt + 1)
            following = next_lt(lt + 1)
            if gt >= 0 and (following < 0 or gt < following):
                opener = source[lt + 1 : lt + 2]
                if opener in ("!", "?"):
                    position = gt + 1  # <!DOCTYPE …>, <![CDATA[…]]>, <?xml …?>
                    continue
                if opener == "/" or (opener.isascii() and opener.isalpha()):
                    out.append(source[lt : gt + 1])
                    position = gt + 1
                    continue
        out.append("&lt;")
        position = lt + 1
    out.append(source[position:])
    return "".join(out)


def _html(source: str) -> Converted:
    parser = _TextParser()
    parser.feed(_defuse(source))
    parser.close()
    parser._flush()
    title = _squash("".join(parser.title_parts)) or parser.heading
    return Converted(_blocks(parser.blocks), title or None)
