"""One self-contained HTML report of a profile's executed notebooks.

    python -m ood_lib.report --profile smoke

``write_report(profile)`` renders every ``results/<profile>/notebooks/*.ipynb`` (sorted by name) with nbconvert's
``basic`` template (cells only: no require.js, MathJax or other CDN script) into ``results/<profile>/report.html``:
a header (profile, generation time, git commit), a table of contents linking to each notebook and its ``##``
sections, then the notebooks with their prose, tables and figures first and the input code collapsed.

The file opens offline: every image is a ``data:`` URI (a local ``<img src>`` is inlined; one that cannot be is
replaced by a visible note), external links are shown as text, and nothing is loaded from a URL.
"""
from __future__ import annotations

import argparse
import base64
import html
import mimetypes
import re
import sys
import time
import unicodedata
import warnings
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import unquote, urlparse

from ood_lib.atomic import atomic_write
from ood_lib.paths import PROJECT_ROOT, results_dir

NOTEBOOK_DIR = PROJECT_ROOT / "notebooks"  # papermill's working directory: where relative paths were written from
EXTERNAL = re.compile(r"^\s*(?:[a-z][a-z0-9+.-]*:)?//", re.I)  # http://, https://, ftp://, protocol-relative //

# The cells of nbconvert's basic (classic) template, with the input code folded into a <details> and long logs too.
TEMPLATE = r"""{%- extends 'classic/base.html.j2' -%}
{% block input_group -%}
<details class="code"><summary>code · {{ cell.source.splitlines() | length }} line(s)</summary>
{{ super() }}
</details>
{%- endblock input_group %}
{% block stream_stdout -%}
{%- if output.text.splitlines() | length > 12 -%}
<details class="log"><summary>output · {{ output.text.splitlines() | length }} lines</summary>{{ super() }}</details>
{%- else -%}{{ super() }}{%- endif -%}
{%- endblock stream_stdout %}
{% block stream_stderr -%}
{%- if output.text.splitlines() | length > 12 -%}
<details class="log"><summary>stderr · {{ output.text.splitlines() | length }} lines</summary>{{ super() }}</details>
{%- else -%}{{ super() }}{%- endif -%}
{%- endblock stream_stderr %}
"""

CSS = """
body { max-width: 60rem; margin: 0 auto; padding: 1.5rem 1.25rem 4rem; background: #fff; color: #1b1b1b;
       font: 16px/1.55 -apple-system, "Segoe UI", "Helvetica Neue", Helvetica, Arial, "DejaVu Sans", sans-serif; }
header.report { border-bottom: 2px solid #1b1b1b; padding-bottom: .6rem; margin-bottom: 1.2rem; }
header.report .title { font-size: 1.7rem; font-weight: 600; margin: 0 0 .3rem; }
header.report dl { display: grid; grid-template-columns: max-content 1fr; gap: .1rem 1rem; margin: 0; font-size: .9rem; }
header.report dt { color: #666; } header.report dd { margin: 0; word-break: break-all; }
nav#contents { background: #f7f7f5; border: 1px solid #e2e2de; padding: .6rem 1.2rem .8rem; font-size: .93rem; }
nav#contents .toc-title { font-weight: 600; margin: .2rem 0 .4rem; }
nav#contents ol { margin: 0; padding-left: 1.4rem; } nav#contents ol ol { margin-bottom: .4rem; }
nav#contents .meta, .nb-meta { color: #777; font-size: .85em; }
section.notebook { border-top: 1px solid #ccc; margin-top: 2.5rem; }
h1, h2, h3, h4 { line-height: 1.25; font-weight: 600; }
h1 { font-size: 1.55rem; margin: 1.4rem 0 .3rem; } h2 { font-size: 1.25rem; margin: 2rem 0 .5rem; }
h3 { font-size: 1.07rem; margin: 1.4rem 0 .4rem; }
a { color: #1a4f8a; } a.anchor-link { visibility: hidden; text-decoration: none; color: #aaa; margin-left: .35em; }
h1:hover a.anchor-link, h2:hover a.anchor-link, h3:hover a.anchor-link { visibility: visible; }
a.top { display: block; text-align: right; font-size: .8rem; color: #888; text-decoration: none; margin-top: .3rem; }
p, ul, ol { margin: .5rem 0; }
img { max-width: 100%; height: auto; display: block; margin: .6rem auto; }
.output_html, .rendered_html, .output_markdown { overflow-x: auto; }
table { border-collapse: collapse; margin: .8rem 0; font-size: .86rem; font-variant-numeric: tabular-nums;
        border-top: 1.5px solid #1b1b1b; border-bottom: 1.5px solid #1b1b1b; }
thead th, thead td { border-bottom: 1px solid #1b1b1b; }
th, td { padding: .22rem .65rem; border: 0; text-align: right; vertical-align: top; }
.output_area td { white-space: nowrap; }  /* numbers with their spread stay on one line; the table scrolls */
th { font-weight: 600; } tbody tr:nth-child(even) { background: #fafafa; }
table.dataframe { border-left: 0; border-right: 0; }
code, pre, kbd { font-family: ui-monospace, "DejaVu Sans Mono", Menlo, Consolas, monospace; }
code { font-size: .86em; background: #f2f2f0; padding: 0 .2em; border-radius: 2px; }
pre { font-size: .78rem; line-height: 1.4; margin: .3rem 0; padding: .45rem .7rem; overflow-x: auto; background: #f7f7f5; }
pre code { background: none; padding: 0; }
details.code, details.log { margin: .2rem 0; }
details.code > summary, details.log > summary { color: #999; font-size: .75rem; cursor: pointer; user-select: none; }
details.code .highlight pre { background: #f4f5f7; }
.output_stream pre { background: none; color: #666; font-size: .74rem; padding: 0 .7rem; max-height: 18rem; overflow: auto; }
.output_stderr pre { color: #8a6d3b; }
.output_error pre { background: #fdeeee; color: #611; }
.output_text pre { white-space: pre-wrap; }
.missing-image { display: block; padding: .6rem; border: 1px dashed #c55; color: #a33; font-size: .85rem; }
.ext-url { color: #777; font-size: .85em; word-break: break-all; }
.ansi-bold { font-weight: bold; } .ansi-red-fg { color: #b22; } .ansi-green-fg { color: #282; }
.ansi-yellow-fg { color: #a60; } .ansi-blue-fg { color: #236; } .ansi-cyan-fg { color: #077; }
.ansi-magenta-fg { color: #838; } .ansi-red-bg { background: #fdd; } .ansi-green-bg { background: #dfd; }
@media print { nav#contents { break-after: page; } details.code { display: none; } a { color: inherit; } }
"""


def _exporter():
    import jinja2
    from nbconvert import HTMLExporter
    from traitlets.config import Config

    config = Config()
    # the default-valued "parameters" cell goes: papermill's injected cell after it says what actually ran
    config.TagRemovePreprocessor.enabled = True
    config.TagRemovePreprocessor.remove_cell_tags = {"parameters"}
    return HTMLExporter(config=config, template_name="basic", template_file="ood_report.html.j2",
                        extra_loaders=[jinja2.DictLoader({"ood_report.html.j2": TEMPLATE})],
                        exclude_input_prompt=True, exclude_output_prompt=True)


def slugify(text: str) -> str:
    """'Ablation: which of LINe's parts?' -> 'ablation-which-of-line-s-parts' (ASCII, safe in a URL fragment)."""
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "section"


def _heading_text(tag) -> str:
    return " ".join(s for s in tag.find_all(string=True)
                    if not (s.parent.name == "a" and "anchor-link" in (s.parent.get("class") or []))).strip()


def _data_uri(path: Path) -> str:
    mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


def _local_file(src: str, nb_path: Path) -> Path | None:
    """The file an <img src> names, looked for beside the executed notebook, in notebooks/ and the project."""
    parsed = urlparse(src)
    if parsed.scheme not in ("", "file"):
        return None
    rel = Path(unquote(parsed.path))
    candidates = [rel] if rel.is_absolute() else [nb_path.parent / rel, NOTEBOOK_DIR / rel, PROJECT_ROOT / rel]
    return next((p for p in candidates if p.is_file()), None)


def _make_offline(soup, nb_path: Path, problems: list[str]) -> None:
    """Inline local images, de-link external URLs, drop anything that would load from the network."""
    for img in soup.find_all("img"):
        src = (img.get("src") or "").strip()
        img.attrs.pop("srcset", None)
        if src.startswith("data:"):
            continue
        path = None if EXTERNAL.match(src) or src.startswith("attachment:") else _local_file(src, nb_path)
        if path is not None:
            img["src"] = _data_uri(path)
            continue
        problems.append(f"{nb_path.name}: image {src!r} is not available offline")
        note = soup.new_tag("span", attrs={"class": "missing-image"})
        note.string = f"[image not available offline: {src}]"
        img.replace_with(note)
    for a in soup.find_all("a", href=True):
        href = a["href"].strip()
        if EXTERNAL.match(href):
            text = a.get_text(strip=True)
            a.name, a.attrs = "span", {"class": "ext-link", "title": href}
            if text != href:
                url = soup.new_tag("span", attrs={"class": "ext-url"})
                url.string = f" ⟨{href}⟩"
                a.insert_after(url)
    for tag in soup.find_all(["script", "link", "iframe", "embed", "object", "source", "video", "audio"]):
        ref = tag.get("src") or tag.get("href") or tag.get("data") or ""
        if EXTERNAL.match(ref):
            problems.append(f"{nb_path.name}: removed <{tag.name}> loading {ref!r}")
            tag.decompose()
    for style in soup.find_all("style"):
        css = style.string or ""
        if "//" in css:
            css = re.sub(r"@import[^;]*;", "", css)
            style.string = re.sub(r"url\(\s*['\"]?(?:[a-z]+:)?//[^)]*\)", "none", css, flags=re.I)


def _title_from_name(stem: str) -> str:
    number, _, rest = stem.partition("_")
    return f"{number} · {rest.replace('_', ' ')}" if rest else stem


def _render_notebook(exporter, nb_path: Path, problems: list[str]) -> tuple[str, dict]:
    """The notebook as an HTML <section> with ids unique in the report, and its entry of the contents."""
    import nbformat
    from bs4 import BeautifulSoup

    nb = nbformat.read(nb_path, as_version=4)
    body, _ = exporter.from_notebook_node(nb, resources={"metadata": {"path": str(nb_path.parent)}})
    soup = BeautifulSoup(body, "html.parser")
    _make_offline(soup, nb_path, problems)

    nb_id = "nb-" + slugify(nb_path.stem)
    used: set[str] = set()
    renamed: dict[str, str] = {}

    def unique(base: str) -> str:
        new, k = base, 2
        while new in used:
            new, k = f"{base}-{k}", k + 1
        used.add(new)
        return new

    sections = []
    for h in soup.find_all(["h1", "h2", "h3", "h4", "h5", "h6"]):
        new = unique(f"{nb_id}--{slugify(_heading_text(h))}")
        if h.get("id"):
            renamed[h["id"]] = new
        h["id"] = new
        if h.name == "h2":
            sections.append((new, _heading_text(h)))
    for a in soup.find_all("a", href=True):  # in-notebook links, the headings' ¶ links among them
        if a["href"].startswith("#") and a["href"][1:] in renamed:
            a["href"] = "#" + renamed[a["href"][1:]]

    pm = nb.metadata.get("papermill", {})
    meta_bits = [nb_path.name]
    if pm.get("end_time"):
        meta_bits.append(f"executed {str(pm['end_time'])[:19].replace('T', ' ')} UTC")
    if pm.get("duration") is not None:
        meta_bits.append(f"{float(pm['duration']):.1f} s")
    if pm.get("parameters"):
        meta_bits.append("parameters " + ", ".join(f"{k}={v!r}" for k, v in pm["parameters"].items()))
    failed = bool(pm.get("exception"))
    if failed:
        meta_bits.append("FAILED: see the error output below")
    meta = soup.new_tag("p", attrs={"class": "nb-meta"})
    meta.string = " · ".join(meta_bits)

    h1 = soup.find("h1")
    if h1 is None:
        h1 = soup.new_tag("h1", attrs={"id": unique(f"{nb_id}--title")})
        h1.string = _title_from_name(nb_path.stem)
        soup.insert(0, h1)
    title = _heading_text(h1)
    h1.insert_after(meta)

    entry = {"id": nb_id, "title": title, "sections": sections, "failed": failed,
             "duration": pm.get("duration"), "images": len(soup.find_all("img"))}
    section = (f'<section class="notebook" id="{nb_id}">\n<a class="top" href="#contents">↑ contents</a>\n'
               f"{soup.decode(formatter='minimal')}\n</section>")
    return section, entry


def _contents(entries: list[dict]) -> str:
    items = []
    for e in entries:
        subs = "".join(f'<li><a href="#{sid}">{html.escape(text)}</a></li>' for sid, text in e["sections"])
        meta = []
        if e["duration"] is not None:
            meta.append(f"{float(e['duration']):.0f} s")
        meta.append(f"{e['images']} figure(s)")
        if e["failed"]:
            meta.append("FAILED")
        items.append(f'<li><a href="#{e["id"]}">{html.escape(e["title"])}</a> '
                     f'<span class="meta">({", ".join(meta)})</span>' + (f"<ol>{subs}</ol>" if subs else "") + "</li>")
    return ('<nav id="contents"><div class="toc-title">Contents</div>\n<ol>\n' + "\n".join(items) + "\n</ol></nav>")


def build_html(profile_name: str, notebooks: list[Path], commit: str, generated: datetime,
               problems: list[str] | None = None) -> str:
    """The report of ``notebooks`` as one HTML document (``problems`` collects what could not be made offline)."""
    from pygments.formatters import HtmlFormatter

    problems = [] if problems is None else problems
    exporter = _exporter()
    rendered = [_render_notebook(exporter, p, problems) for p in notebooks]
    entries = [entry for _, entry in rendered]
    out_dir = results_dir(profile_name)
    files = [f'<a href="{name}">{name}</a>' for name in ("metrics.csv", "timings.csv", "provenance.json")
             if (out_dir / name).exists()]
    rows = [("Profile", f"<code>{html.escape(profile_name)}</code>"),
            ("Generated", html.escape(generated.isoformat(timespec="seconds"))),
            ("Commit", f"<code>{html.escape(commit)}</code>"),
            ("Notebooks", f"{len(notebooks)}, {sum(e['images'] for e in entries)} figure(s)"
                          + (f"; failed: {', '.join(e['title'] for e in entries if e['failed'])}"
                             if any(e["failed"] for e in entries) else ""))]
    if files:
        rows.append(("Files", " · ".join(files)))
    dl = "\n".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in rows)
    css = CSS + HtmlFormatter(style="default").get_style_defs(".highlight")
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="ood_lib.report">
<title>OOD study report · {html.escape(profile_name)}</title>
<style>{css}</style>
</head>
<body>
<header class="report">
<div class="title">Intrinsic OOD detection · report of profile <code>{html.escape(profile_name)}</code></div>
<dl>
{dl}
</dl>
</header>
{_contents(entries)}
{chr(10).join(section for section, _ in rendered)}
</body>
</html>
"""


def write_report(profile_name: str) -> Path:
    """Combine ``results/<profile>/notebooks/*.ipynb`` into ``results/<profile>/report.html``; return its path."""
    from ood_lib.results import git_commit

    out_dir = results_dir(profile_name)
    notebooks = sorted((out_dir / "notebooks").glob("*.ipynb"))
    if not notebooks:
        raise FileNotFoundError(f"no executed notebooks in {out_dir / 'notebooks'}; run "
                                f"`python -m ood_lib.reproduce --profile {profile_name}` first")
    problems: list[str] = []
    document = build_html(profile_name, notebooks, git_commit(), datetime.now(timezone.utc).astimezone(), problems)
    for p in problems:
        warnings.warn(f"report of {profile_name}: {p}", stacklevel=2)
    path = out_dir / "report.html"
    # bytes, so that the file is UTF-8 whatever the locale's default encoding is
    with atomic_write(path, "wb") as f:
        f.write(document.encode("utf-8"))
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ood_lib.report", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", required=True, help="profile whose results/<profile>/notebooks/ to combine")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    try:
        path = write_report(args.profile)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"report: {path} ({path.stat().st_size / 1e6:.2f} MB) in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
