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


@dataclass
class Image:
    name: str  # file name under the figures folder
    data: bytes
    alt: str


Block = Heading | Para | Bullets | Links | Table | Image


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


def to_markdown(doc: Document, figures_dir: str) -> str:
    out = [f"# {doc.title}", ""]
    for b in doc.blocks:
        if isinstance(b, Heading):
            out += ["#" * (b.level + 1) + " " + b.text, ""]
        elif isinstance(b, Para):
            out += [f"_{_md_text(b.text)}_" if b.note else _md_text(b.text), ""]
        elif isinstance(b, Bullets):
            out += [f"- {_md_text(i)}" for i in b.items] + [""]
        elif isinstance(b, Links):
            out += [f"- [{t}]({h})" for t, h in b.items] + [""]
        elif isinstance(b, Table):
            out.append("| " + " | ".join(_md_cell(h) for h in b.header) + " |")
            out.append("|" + "---|" * len(b.header))
            out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in b.rows]
            out.append("")
        elif isinstance(b, Image):
            out += [f"![{b.alt}]({figures_dir}/{b.name})", ""]
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
"""


def _is_num(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def to_html(doc: Document) -> str:
    e = html.escape
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>{e(doc.title)}</title><style>{CSS}</style></head><body>", f"<h1>{e(doc.title)}</h1>"]
    for b in doc.blocks:
        if isinstance(b, Heading):
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
                "<tr>" + "".join(f'<td class="num">{e(c)}</td>' if _is_num(c) else f"<td>{e(c)}</td>"
                                 for c in row) + "</tr>"
                for row in b.rows
            )
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif isinstance(b, Image):
            data = base64.b64encode(b.data).decode()
            out.append(f'<p><img alt="{e(b.alt)}" src="data:image/png;base64,{data}"></p>')
    out.append("</body></html>")
    return "\n".join(out) + "\n"
