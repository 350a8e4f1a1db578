"""A report as a list of blocks, written as Markdown and as one HTML file with its figures inline.

    blocks = [("h1", "Title"), ("p", "Some text."), ("table", table(rows, ["a", "b"])), ("img", "fig.png")]
    write_report(out, blocks)        # out/report.md and out/report.html

Blocks: ("h1" | "h2", heading), ("p", paragraph), ("table", Markdown table lines from `table`),
("img", a PNG's path relative to `out`). `chimle reproduce` writes its report this way.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["Block", "table", "write_report"]

Block = tuple[str, Any]


def _cell(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def table(rows: Sequence[dict[str, Any]], keys: Sequence[str]) -> list[str]:
    """Markdown table lines of `rows`, one column per key (floats to 4 significant digits, missing: empty)."""
    return ["| " + " | ".join(keys) + " |", "|" + " --- |" * len(keys)] + [
        "| " + " | ".join(_cell(r.get(k, "")) for k in keys) + " |" for r in rows
    ]


def write_report(out: Path, blocks: Sequence[Block]) -> tuple[Path, Path]:
    """out/report.md and out/report.html (figures as data URLs) from the blocks; returns both paths."""
    md, body = [], []
    for kind, v in blocks:
        if kind in ("h1", "h2"):
            md += ["#" * int(kind[1]) + " " + v, ""]
            body.append(f"<{kind}>{html.escape(v)}</{kind}>")
        elif kind == "p":
            md += [v, ""]
            body.append(f"<p>{html.escape(v)}</p>")
        elif kind == "table":
            md += [*v, ""]
            cells = [[c.strip() for c in line.strip("|").split("|")] for line in v if "---" not in line]
            rows = "".join(
                "<tr>" + "".join(f"<{t}>{html.escape(c)}</{t}>" for c in r) + "</tr>"
                for t, r in (("th" if i == 0 else "td", r) for i, r in enumerate(cells))
            )
            body.append(f"<table>{rows}</table>")
        elif kind == "img":
            md += [f"![{v}]({v})", ""]
            data = base64.b64encode((out / v).read_bytes()).decode() if (out / v).exists() else ""
            body.append(f'<p><img alt="{html.escape(v)}" src="data:image/png;base64,{data}"></p>')
    (out / "report.md").write_text("\n".join(md))
    style = "body{font-family:sans-serif;max-width:60em;margin:2em auto}td,th{border:1px solid #ccc;padding:2px 6px}"
    (out / "report.html").write_text(
        f"<!doctype html><meta charset=utf-8><title>chimle report</title><style>{style}</style>{''.join(body)}"
    )
    return out / "report.md", out / "report.html"
