"""The report document: built once from headings, paragraphs, tables and figures, rendered twice.

As markdown, a figure is referenced as ``![..](plots/x.png)``; as HTML it is embedded as a base64 data URI
wrapped in a link to its PNG file, with the CSS inline, so ``report.html`` needs nothing beside it. Text
may hold ``code`` and **bold** spans: markdown keeps them, the HTML renders them.
"""

from __future__ import annotations

import base64
import html
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("build_edge")

PLOTS_DIR = "plots"


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]


@dataclass
class Fig:
    rel: str  # "plots/x.png"
    alt: str
    caption: str


class Doc:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.blocks: list[tuple[str, Any]] = []

    def h1(self, text: str) -> None:
        self.blocks.append(("h1", text))

    def h2(self, text: str) -> None:
        self.blocks.append(("h2", text))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def table(self, header: list[str], rows: list[list[Any]]) -> None:
        self.blocks.append(("table", Table(header, [[str(c) for c in r] for r in rows])))

    def fig(self, fig: Fig) -> None:
        self.blocks.append(("fig", fig))

    def figures(self) -> list[Path]:
        return [self.folder / item.rel for kind, item in self.blocks if kind == "fig"]

    def write(self, title: str) -> list[Path]:
        """Write ``report.md`` and ``report.html``; returns them and the figures' PNG files."""
        self.folder.joinpath("report.md").write_text(self.markdown(), encoding="utf-8")
        self.folder.joinpath("report.html").write_text(self.html(title), encoding="utf-8")
        return [self.folder / "report.md", self.folder / "report.html", *self.figures()]

    # markdown
    def markdown(self) -> str:
        out: list[str] = []
        for kind, item in self.blocks:
            if kind == "h1":
                out += [f"# {item}", ""]
            elif kind == "h2":
                out += [f"## {item}", ""]
            elif kind == "p":
                out += [item, ""]
            elif kind == "table":
                cell = lambda s: s.replace("|", "\\|").replace("\n", " ")
                out.append("| " + " | ".join(cell(h) for h in item.header) + " |")
                out.append("|" + "|".join("---" for _ in item.header) + "|")
                out += ["| " + " | ".join(cell(c) for c in row) + " |" for row in item.rows]
                out.append("")
            elif kind == "fig":
                out += [f"![{item.alt}]({item.rel})", "", f"*{item.caption}*", ""]
        return "\n".join(out).rstrip() + "\n"

    # HTML
    @staticmethod
    def _inline(text: str) -> str:
        text = html.escape(text, quote=False)
        text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
        return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", text)

    def _html_block(self, kind: str, item: Any) -> str:
        if kind in ("h1", "h2"):
            return f"<{kind}>{self._inline(item)}</{kind}>"
        if kind == "p":
            return f"<p>{self._inline(item)}</p>"
        if kind == "table":
            head = "".join(f"<th>{self._inline(h)}</th>" for h in item.header)
            rows = "\n".join("<tr>" + "".join(f"<td>{self._inline(c)}</td>" for c in row) + "</tr>"
                             for row in item.rows)
            return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{rows}\n</tbody>\n</table>"
        data = base64.b64encode((self.folder / item.rel).read_bytes()).decode("ascii")
        rel, alt = html.escape(item.rel), html.escape(item.alt)
        return (f'<figure><a href="{rel}"><img src="data:image/png;base64,{data}" alt="{alt}"></a>'
                f"<figcaption>{self._inline(item.caption)} (<a href=\"{rel}\">{rel}</a>)"
                "</figcaption></figure>")

    def html(self, title: str) -> str:
        return "\n".join([
            "<!DOCTYPE html>",
            '<html lang="en">',
            "<head>",
            '<meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>{html.escape(title)}</title>",
            f"<style>{CSS}</style>",
            "</head>",
            "<body>",
            *(self._html_block(kind, item) for kind, item in self.blocks),
            "</body>",
            "</html>",
            "",
        ])


CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.6em;border-bottom:2px solid #ddd;padding-bottom:.3em}
h2{font-size:1.25em;margin-top:2em;border-bottom:1px solid #eee;padding-bottom:.2em}
table{border-collapse:collapse;margin:.8em 0;font-size:.92em}
th,td{border:1px solid #ddd;padding:.3em .6em;text-align:left;vertical-align:top}
th{background:#f4f4f4}
tbody tr:nth-child(even){background:#fafafa}
td:not(:first-child){font-variant-numeric:tabular-nums}
code{background:#f2f2f2;padding:0 .25em;border-radius:3px}
figure{margin:1em 0}
figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{font-size:.9em;color:#555}
""".strip()


def _save(fig: Any, folder: Path, name: str) -> str:
    rel = f"{PLOTS_DIR}/{name}.png"
    (folder / PLOTS_DIR).mkdir(parents=True, exist_ok=True)
    # no "Software" entry: the PNG bytes do not change with the matplotlib version
    fig.savefig(folder / rel, format="png", dpi=fig.dpi, metadata={"Software": None})
    return rel


def draw(doc: Doc, name: str, alt: str, caption: str, make: Callable[[], Any]) -> Fig | None:
    """Run a plot function returning a Figure (or None to skip); save it as plots/<name>.png and add it."""
    try:
        fig = make()
        if fig is None:
            return None
        item = Fig(_save(fig, doc.folder, name), alt, caption)
    except Exception as e:  # a plot never fails the bundle
        log.warning("report: the %s plot could not be drawn: %s", name, e, exc_info=True)
        doc.p(f"(The {alt.lower()} plot could not be drawn: {type(e).__name__}: {e}.)")
        return None
    doc.fig(item)
    return item
