"""A report as a list of blocks, rendered twice: Markdown (figures linked next to it) and
one self-contained HTML file (figures inlined as base64 PNG data URIs)."""

from __future__ import annotations

import base64
import html
import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd


@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Paragraph:
    text: str


@dataclass
class Code:
    text: str


@dataclass
class Bullets:
    items: list[str]


@dataclass
class Table:
    frame: pd.DataFrame


@dataclass
class Image:
    path: str  # relative to the report's folder
    caption: str


Block = Heading | Paragraph | Code | Bullets | Table | Image


def format_value(value: object) -> str:
    """Floats to 4 significant digits, missing values as an em dash."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def text_frame(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.astype(object).map(format_value)


def to_markdown(blocks: list[Block]) -> str:
    parts = []
    for block in blocks:
        if isinstance(block, Heading):
            parts.append(f"{'#' * block.level} {block.text}")
        elif isinstance(block, Paragraph):
            parts.append(block.text)
        elif isinstance(block, Code):
            parts.append(f"```\n{block.text}\n```")
        elif isinstance(block, Bullets):
            parts.append("\n".join(f"- {item}" for item in block.items))
        elif isinstance(block, Table):
            parts.append(_markdown_table(text_frame(block.frame)))
        else:
            parts.append(f"![{block.caption}]({block.path})\n\n*{block.caption}*")
    return "\n\n".join(parts) + "\n"


def _markdown_table(frame: pd.DataFrame) -> str:
    def row(cells: list[str]) -> str:
        return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"

    lines = [row([str(c) for c in frame.columns]), row(["---"] * len(frame.columns))]
    lines += [row(list(values)) for values in frame.itertuples(index=False)]
    return "\n".join(lines)


STYLE = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;
line-height:1.45;color:#222}table{border-collapse:collapse;font-size:0.85em;margin:1em 0}
th,td{border:1px solid #ccc;padding:3px 7px;text-align:right}th{background:#f2f2f2}
pre{background:#f6f6f6;padding:0.8em;overflow-x:auto}figure{margin:1.5em 0}
img{max-width:100%}figcaption{font-style:italic;color:#555}"""


def to_html(blocks: list[Block], title: str, base_dir: Path) -> str:
    """One HTML file; `base_dir` is where the images' relative paths start."""
    parts = []
    for block in blocks:
        if isinstance(block, Heading):
            parts.append(f"<h{block.level}>{html.escape(block.text)}</h{block.level}>")
        elif isinstance(block, Paragraph):
            parts.append(f"<p>{html.escape(block.text)}</p>")
        elif isinstance(block, Code):
            parts.append(f"<pre><code>{html.escape(block.text)}</code></pre>")
        elif isinstance(block, Bullets):
            items = "".join(f"<li>{html.escape(item)}</li>" for item in block.items)
            parts.append(f"<ul>{items}</ul>")
        elif isinstance(block, Table):
            parts.append(text_frame(block.frame).to_html(index=False, border=0))
        else:
            data = base64.b64encode((base_dir / block.path).read_bytes()).decode("ascii")
            caption, source = html.escape(block.caption), html.escape(block.path)
            parts.append(f'<figure><img src="data:image/png;base64,{data}" '
                         f'alt="{caption}" data-source="{source}">'
                         f"<figcaption>{caption}</figcaption></figure>")
    body = "\n".join(parts)
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{STYLE}</style></head>\n"
            f"<body>\n{body}\n</body></html>\n")
