"""A tiny document model rendered twice: Markdown (figures linked) and self-contained HTML (figures inlined).

Building the report once as blocks keeps the two outputs in step; the HTML page has inline CSS
and base64 PNGs, so it opens from disk, by mail or as an MLflow artifact with nothing beside it.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field


@dataclass
class Heading:
    level: int
    text: str


@dataclass
class Para:
    text: str
    note: bool = False  # rendered muted: "not run", provenance lines


@dataclass
class Bullets:
    items: list[str]


@dataclass
class Links:
    items: list[tuple[str, str]]  # (text, relative href)


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]
    # Per-row definitions: in HTML one click away (the first cell opens a <details>), in Markdown a last column.
    defs: list[str] | None = None


@dataclass
class Fold:
    """A folded part: its blocks behind a one-line summary (HTML <details>); Markdown shows them all."""

    summary: str
    blocks: list[Block] = field(default_factory=list)


@dataclass
class Image:
    name: str  # file name under the figures folder
    data: bytes
    alt: str


Block = Heading | Para | Bullets | Links | Table | Image | Fold


@dataclass
class Document:
    title: str
    blocks: list[Block] = field(default_factory=list)

    def add(self, *blocks: Block) -> None:
        self.blocks.extend(blocks)


def _md_text(text: str) -> str:
    # Feature explanations come from a language model: never let them inject raw HTML into the page.
    return str(text).replace("<", "&lt;").replace(">", "&gt;")


def _md_cell(text: str) -> str:
    return _md_text(text).replace("|", "\\|").replace("\n", " ")


def _md_blocks(blocks: list[Block], figures_dir: str) -> list[str]:
    out: list[str] = []
    for b in blocks:
        if isinstance(b, Fold):
            out += [f"**{_md_text(b.summary)}**", ""] + _md_blocks(b.blocks, figures_dir)
        elif isinstance(b, Heading):
            out += ["#" * (b.level + 1) + " " + b.text, ""]
        elif isinstance(b, Para):
            out += [f"_{_md_text(b.text)}_" if b.note else _md_text(b.text), ""]
        elif isinstance(b, Bullets):
            out += [f"- {_md_text(i)}" for i in b.items] + [""]
        elif isinstance(b, Links):
            out += [f"- [{t}]({h})" for t, h in b.items] + [""]
        elif isinstance(b, Table):
            header = b.header + (["definition"] if b.defs is not None else [])
            rows = [r + [b.defs[i]] for i, r in enumerate(b.rows)] if b.defs is not None else b.rows
            out.append("| " + " | ".join(_md_cell(h) for h in header) + " |")
            out.append("|" + "---|" * len(header))
            out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
            out.append("")
        elif isinstance(b, Image):
            out += [f"![{b.alt}]({figures_dir}/{b.name})", ""]
    return out


def to_markdown(doc: Document, figures_dir: str) -> str:
    out = [f"# {doc.title}", "", *_md_blocks(doc.blocks, figures_dir)]
    return "\n".join(out).rstrip() + "\n"


CSS = """
body{font-family:-apple-system,system-ui,"Segoe UI",Roboto,sans-serif;max-width:1000px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}
h1{border-bottom:2px solid #4c72b0;padding-bottom:.2em}h2{margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#f0f3f8}tr:nth-child(even) td{background:#fafafa}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.note{color:#777;font-style:italic}img{max-width:100%;border:1px solid #eee}
code{background:#f4f4f4;padding:0 .2em}
summary{cursor:pointer}.def{color:#555;font-size:.9em;max-width:40em;padding:.2em 0}
details.fold{margin:.6em 0}details.fold>summary{font-weight:600;color:#4c72b0}
"""


def _is_num(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _cell(text: str, definition: str = "") -> str:
    e = html.escape
    if definition:  # the definition one click away, under the name
        return f'<td><details><summary>{e(text)}</summary><div class="def">{e(definition)}</div></details></td>'
    return f'<td class="num">{e(text)}</td>' if _is_num(text) else f"<td>{e(text)}</td>"


def _html_blocks(blocks: list[Block]) -> list[str]:
    e = html.escape
    out: list[str] = []
    for b in blocks:
        if isinstance(b, Fold):
            out += [f'<details class="fold"><summary>{e(b.summary)}</summary>', *_html_blocks(b.blocks), "</details>"]
        elif isinstance(b, Heading):
            out.append(f"<h{b.level + 1}>{e(b.text)}</h{b.level + 1}>")
        elif isinstance(b, Para):
            out.append(f'<p class="note">{e(b.text)}</p>' if b.note else f"<p>{e(b.text)}</p>")
        elif isinstance(b, Bullets):
            out.append("<ul>" + "".join(f"<li>{e(i)}</li>" for i in b.items) + "</ul>")
        elif isinstance(b, Links):
            out.append("<ul>" + "".join(f'<li><a href="{e(h)}">{e(t)}</a></li>' for t, h in b.items) + "</ul>")
        elif isinstance(b, Table):
            head = "".join(f"<th>{e(h)}</th>" for h in b.header)
            rows = "".join(
                "<tr>" + _cell(row[0], b.defs[i] if b.defs is not None else "") + "".join(_cell(c) for c in row[1:])
                + "</tr>"
                for i, row in enumerate(b.rows) if row
            )
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif isinstance(b, Image):
            data = base64.b64encode(b.data).decode()
            out.append(f'<p><img alt="{e(b.alt)}" src="data:image/png;base64,{data}"></p>')
    return out


def to_html(doc: Document) -> str:
    e = html.escape
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>{e(doc.title)}</title><style>{CSS}</style></head><body>", f"<h1>{e(doc.title)}</h1>",
           *_html_blocks(doc.blocks), "</body></html>"]
    return "\n".join(out) + "\n"
