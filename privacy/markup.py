"""A small document model for the privacy notice, and its Markdown and HTML writers.

The notice is built once as blocks (headings, paragraphs, bullet lists) whose text is
plain strings, field names (`Code`) and e-mail links (`Mail`); each writer escapes for
its own format, so a controller's name such as "Müller & <Söhne>" reads the same in
both and can never become markup.

The HTML is one self-contained page, fit to be shown as an app's EULA at first launch:
inline style only, no script, no image, no link to anything but `mailto:`, and a
Content-Security-Policy that forbids loading anything should a viewer try.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass
from urllib.parse import quote

_MD_SPECIAL = re.compile(r"([\\`*_\[\]<>])")
_CSS = (
    "body{font-family:system-ui,sans-serif;line-height:1.5;max-width:46rem;"
    "margin:0 auto;padding:1rem;color:#1b1b1b;background:#fff}"
    "h1,h2,h3{line-height:1.25}h2{margin-top:2rem}"
    "code{font-family:ui-monospace,monospace;font-size:.95em}"
    "ul{padding-left:1.25rem}li{margin:.2rem 0}"
)
# Nothing may be fetched; only the inline style above applies.
_CSP = "default-src 'none'; style-src 'unsafe-inline'"


@dataclass(frozen=True, slots=True)
class Code:
    """A name as the policy spells it (a field name), shown in code font."""

    text: str


@dataclass(frozen=True, slots=True)
class Mail:
    """An e-mail address, a `mailto:` link in HTML."""

    address: str


Inline = str | Code | Mail
Text = tuple[Inline, ...]


@dataclass(frozen=True, slots=True)
class Heading:
    level: int  # 1 for the title, 2 for a section, 3 for a subsection
    text: str


@dataclass(frozen=True, slots=True)
class Paragraph:
    text: Text


@dataclass(frozen=True, slots=True)
class Item:
    label: str  # shown in bold before the text; "" for none
    text: Text
    children: tuple[Text, ...] = ()


@dataclass(frozen=True, slots=True)
class Bullets:
    items: tuple[Item, ...]


Block = Heading | Paragraph | Bullets


def fill(template: str, **values: Inline | Text) -> Text:
    """`template` with each `{name}` replaced by an inline or a run of inlines.

    str.format would flatten a `Code` or `Mail` into text that one writer or the other
    then escapes wrongly; this keeps them as they are.
    """
    out: list[Inline] = []
    for i, part in enumerate(re.split(r"\{(\w+)\}", template)):
        if i % 2 == 0:
            if part:
                out.append(part)
            continue
        value = values[part]
        if isinstance(value, tuple):
            out.extend(value)
        else:
            out.append(value)
    return tuple(out)


def joined(items: list[Text], separator: str = ", ") -> Text:
    out: list[Inline] = []
    for i, item in enumerate(items):
        if i:
            out.append(separator)
        out.extend(item)
    return tuple(out)


def to_markdown(blocks: list[Block]) -> str:
    parts: list[str] = []
    for block in blocks:
        if isinstance(block, Heading):
            parts.append(f"{'#' * block.level} {block.text}")
        elif isinstance(block, Paragraph):
            parts.append(_md_text(block.text))
        else:
            lines: list[str] = []
            for item in block.items:
                label = f"**{_md_escape(item.label)}:**" if item.label else ""
                text = _md_text(item.text)
                lines.append("- " + " ".join(p for p in (label, text) if p))
                lines += [f"  - {_md_text(child)}" for child in item.children]
            parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def to_html(blocks: list[Block], lang: str) -> str:
    """One self-contained HTML page; the first level-1 heading is also its title."""
    title = next((b.text for b in blocks if isinstance(b, Heading) and b.level == 1), "")
    body: list[str] = []
    for block in blocks:
        if isinstance(block, Heading):
            body.append(f"<h{block.level}>{_esc(block.text)}</h{block.level}>")
        elif isinstance(block, Paragraph):
            body.append(f"<p>{_html_text(block.text)}</p>")
        else:
            body.append("<ul>")
            for item in block.items:
                label = f"<strong>{_esc(item.label)}:</strong> " if item.label else ""
                children = ""
                if item.children:
                    inner = "".join(f"<li>{_html_text(c)}</li>" for c in item.children)
                    children = f"<ul>{inner}</ul>"
                body.append(f"<li>{label}{_html_text(item.text)}{children}</li>")
            body.append("</ul>")
    head = [
        "<!DOCTYPE html>",
        f'<html lang="{_esc(lang)}">',
        "<head>",
        '<meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_esc(title)}</title>",
        f"<style>{_CSS}</style>",
        "</head>",
        "<body>",
        "<main>",
    ]
    return "\n".join([*head, *body, "</main>", "</body>", "</html>"]) + "\n"


def _md_escape(text: str) -> str:
    return _MD_SPECIAL.sub(r"\\\1", text)


def _md_text(text: Text) -> str:
    out: list[str] = []
    for inline in text:
        if isinstance(inline, Code):
            # A name holds no backtick (policy names are [a-z0-9_]), so one pair encloses it.
            out.append(f"`{inline.text}`")
        elif isinstance(inline, Mail):
            out.append(_md_escape(inline.address))
        else:
            out.append(_md_escape(inline))
    return "".join(out)


def _esc(text: str) -> str:
    return html.escape(text, quote=True)


def _html_text(text: Text) -> str:
    out: list[str] = []
    for inline in text:
        if isinstance(inline, Code):
            out.append(f"<code>{_esc(inline.text)}</code>")
        elif isinstance(inline, Mail):
            href = "mailto:" + quote(inline.address, safe="@.+-_")
            out.append(f'<a href="{_esc(href)}">{_esc(inline.address)}</a>')
        else:
            out.append(_esc(inline))
    return "".join(out)
