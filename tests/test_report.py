"""The offline HTML report: its structure on synthetic notebooks, and the smoke report in a real headless Chromium."""
import base64
import io
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import nbformat
import numpy as np
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output
from PIL import Image

from ood_lib import report, results

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
IMAGE_TYPES = ("image/png", "image/jpeg", "image/svg+xml", "image/gif")


class Page(HTMLParser):
    """What the tests need of an HTML page: ids, <img> sources, every src/href, the contents' links."""

    def __init__(self, text: str):
        super().__init__()
        self.ids, self.imgs, self.refs, self.toc_links, self._nav_depth = [], [], [], [], 0
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.append(a["id"])
        if tag == "img":
            self.imgs.append(a.get("src") or "")
        self.refs += [v or "" for k, v in attrs if k in ("src", "href")]
        if tag == "nav" and a.get("id") == "contents":
            self._nav_depth = 1
        elif self._nav_depth and tag == "nav":
            self._nav_depth += 1
        if self._nav_depth and tag == "a":
            self.toc_links.append(a.get("href") or "")

    def handle_endtag(self, tag):
        if self._nav_depth and tag == "nav":
            self._nav_depth -= 1


def png_b64(color=(200, 40, 40)) -> str:
    im = Image.new("RGB", (24, 16), "white")
    im.paste(color, (4, 4, 20, 12))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def executed_notebook(title: str | None) -> nbformat.NotebookNode:
    md = (f"# {title}\n\n" if title else "") + (
        "Some prose, a [link to the paper](https://example.org/paper) and a local figure "
        '<img src="local_figure.png" alt="local">\n\n'
        "## Section\n\nA table:\n\n| detector | FPR95 |\n|---|---|\n| energy | 0.70 |\n| msp | 0.82 |\n")
    code = new_code_cell("import matplotlib.pyplot as plt\nplt.plot([1, 2])", execution_count=1, outputs=[
        new_output("display_data", data={"image/png": png_b64(), "text/plain": "<Figure size 640x480>"})])
    nb = new_notebook(cells=[new_markdown_cell(md), code, new_markdown_cell("## Verdict\n\nNone yet.")])
    nb.metadata["papermill"] = {"duration": 1.5, "end_time": "2026-01-01T00:00:00", "exception": None,
                                "parameters": {"profile": "synthetic"}}
    return nb


def test_write_report_on_synthetic_notebooks(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OOD_RESULTS_DIR", str(tmp_path / "results"))
    nb_dir = tmp_path / "results/synthetic/notebooks"
    nb_dir.mkdir(parents=True)
    Image.new("RGB", (8, 8), "blue").save(nb_dir / "local_figure.png")
    nbformat.write(executed_notebook("Title"), nb_dir / "01_first.ipynb")
    nbformat.write(executed_notebook(None), nb_dir / "02_second.ipynb")  # same section names, no title
    before = results.git_commit()

    path = report.write_report("synthetic")

    assert path == tmp_path / "results/synthetic/report.html"
    text = path.read_bytes().decode("utf-8")
    page = Page(text)
    assert len(page.ids) == len(set(page.ids)), "ids must be unique across notebooks"
    # the contents: each notebook and each of its ## sections, every link to an anchor that exists
    assert len(page.toc_links) == 2 * 3
    assert all(h.startswith("#") and h[1:] in page.ids for h in page.toc_links), page.toc_links
    assert ">Title</a>" in text and ">02 · second</a>" in text and text.count(">Section</a>") == 2
    # every image a data: URI: the two outputs and the two local files
    assert len(page.imgs) == 4 and all(src.startswith("data:image/png;base64,") for src in page.imgs)
    assert sum(png_b64() in src for src in page.imgs) == 2
    # offline: no URL in any src or href, no script, no stylesheet link; the external link is kept as text
    assert not [r for r in page.refs if "http://" in r or "https://" in r or r.startswith("//")]
    assert "<script" not in text and "<link" not in text
    assert "link to the paper" in text
    assert "<table" in text and "energy" in text and "<details" in text  # the markdown table; code folded
    assert "<code>synthetic</code>" in text
    assert before in text or results.git_commit() in text  # HEAD may move while another commit lands

    assert report.main(["--profile", "synthetic"]) == 0
    out = capsys.readouterr().out
    assert str(path) in out and "MB" in out and " s" in out
    assert report.main(["--profile", "empty"]) == 2
    assert "no executed notebooks" in capsys.readouterr().err


def image_outputs(notebooks: list[Path]) -> int:
    count = 0
    for path in notebooks:
        for cell in nbformat.read(path, as_version=4).cells:
            count += sum(any(t in o.get("data", {}) for t in IMAGE_TYPES) for o in cell.get("outputs", []))
    return count


def chromium_driver(tmp_path: Path):
    """A headless Debian Chromium driven by selenium through Debian's chromedriver; nothing is downloaded."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        pytest.fail(f"{', '.join(missing)} missing: run `bash scripts/install_browser.sh` (`make test` does)")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError as e:
        pytest.fail(f"selenium is not installed ({e}): `pip install -r requirements.txt` (`make test` does)")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                "--no-first-run", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--window-size=1280,1000", f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(str(CHROMEDRIVER), log_output=str(tmp_path / "chromedriver.log"))
    return webdriver.Chrome(service=service, options=options)


def check_report_in_browser(html_path: Path, notebooks: list[Path], tmp_path: Path) -> dict:
    """Load the report from file:// in headless Chromium and check what a reader would see."""
    driver = chromium_driver(tmp_path)
    try:
        driver.set_page_load_timeout(120)
        driver.get(html_path.resolve().as_uri())
        assert driver.execute_script("return document.readyState") == "complete"
        severe = [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
        assert not severe, f"console errors: {severe}"
        # nothing but the file itself (and data: URIs, which are not fetched) was loaded
        fetched = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
        assert all(u.startswith("file:") for u in fetched), fetched
        images = driver.execute_script(
            "return Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.src.slice(0, 30)])")
        assert images and all(complete and width > 0 for complete, width, _ in images), images
        assert len(images) == image_outputs(notebooks)
        # the contents: a link to each notebook and its sections, each to an element that exists
        links = driver.execute_script(
            "return Array.from(document.querySelectorAll('nav#contents a')).map(a => a.getAttribute('href'))")
        assert len(links) > len(notebooks), links
        dangling = driver.execute_script(
            "return Array.from(document.querySelectorAll('nav#contents a'))"
            ".filter(a => !document.getElementById(decodeURIComponent(a.hash.slice(1)))).map(a => a.hash)")
        assert not dangling, dangling
        driver.execute_script("document.querySelectorAll('nav#contents a')[arguments[0]].click()", len(links) - 1)
        assert driver.execute_script("return window.scrollY") > 1000  # the last section is far down the page
        # a full-page screenshot through the DevTools protocol, checked to be no blank page
        size = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
        width, height = int(size["width"]), int(size["height"])
        shot = driver.execute_cdp_cmd("Page.captureScreenshot", {
            "format": "png", "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": width, "height": height, "scale": 1}})
    finally:
        driver.quit()
    png = tmp_path / "report.png"
    png.write_bytes(base64.b64decode(shot["data"]))
    im = np.asarray(Image.open(png).convert("RGB"))
    assert im.shape[0] >= min(height, 16000) - 2 and im.shape[0] > 1000, (im.shape, height)
    colours = len(np.unique(im.reshape(-1, 3).astype(np.uint32) @ np.array([65536, 256, 1], np.uint32)))
    non_white = float((im < 245).any(axis=2).mean())
    assert colours > 64 and non_white > 0.03, (colours, non_white)
    return {"images": len(images), "links": len(links), "height": height, "colours": colours,
            "non_white": non_white, "screenshot": png}


def test_smoke_report_in_headless_chromium(smoke_run, tmp_path):
    out, done = smoke_run
    html_path = out / "results/smoke/report.html"
    assert html_path.exists(), "reproduce.run writes the report after the notebooks"
    notebooks = sorted((out / "results/smoke/notebooks").glob("*.ipynb"))
    assert [p.name for p in notebooks] == [name for name, _ in done]
    # the file itself, parsed: one embedded image per image output of the executed notebooks, no reference to
    # anything outside it, a contents entry per notebook and section, each to an id on the page
    page = Page(html_path.read_text(encoding="utf-8"))
    assert len(page.imgs) == image_outputs(notebooks) > 0
    assert all(src.startswith("data:image/") for src in page.imgs)
    assert not [r for r in page.refs if "://" in r or r.startswith("//")]
    assert len(page.toc_links) > len(notebooks) and all(unquote(h[1:]) in page.ids for h in page.toc_links)
    check_report_in_browser(html_path, notebooks, tmp_path)
