#!/usr/bin/env python3
"""Render a Snakemake HTML report (``snakemake --report report.html``) in headless Chromium to PNG screenshots.

    python workflow/scripts/screenshot_report.py report.html --out shots/
    python workflow/scripts/screenshot_report.py report.html --out shots/ --view frontier_perplexity.png \
        --view results.html --view contents.html

Writes ``<out>/home.png`` (the landing page: menu of categories and the workflow description) and one
``<out>/<view>.png`` per ``--view``: the result whose file name is given, opened as a reader would open it (the
side bar shows its caption, the main pane the figure or table). ``--view all`` takes every result.

The report is a single self-contained page (a React app, results embedded as data URIs); to open a result the
script injects a few lines of JavaScript into a temporary copy that call the app's own ``setView`` once the page
has loaded; the report itself is not changed.

Needs Debian's ``chromium`` (``apt-get install -y chromium``) or ``$CHROMIUM``. Chromium runs with
``--headless --no-sandbox --disable-gpu`` (root in a container), no network services, a throw-away profile.
Exit status 0 when every screenshot was written, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

OPEN_RESULT = """
<script>
window.addEventListener("load", function () {
  setTimeout(function () {
    const want = %s;
    const path = Object.keys(results).find(p => p === want || p.split("/").pop() === want);
    if (path === undefined) { document.title = "LOKI-SHOT: no result " + want; return; }
    let cat, sub;
    for (const c of Object.keys(categories)) {
      for (const s of Object.keys(categories[c])) {
        if (categories[c][s].includes(path)) { cat = c; sub = s; }
      }
    }
    const mime = results[path].mime_type;
    const content = mime.startsWith("image/") ? "img" : (mime === "text/html" ? "html" : "text");
    app.setView({navbarMode: "resultinfo", category: cat, subcategory: sub, resultPath: path,
                 content: content, contentPath: results[path].data_uri});
    document.title = "LOKI-SHOT: " + path;
  }, 300);
});
</script>
"""


def chromium() -> str:
    for c in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if c and shutil.which(c):
            return shutil.which(c)
    sys.exit("chromium not found: apt-get install -y chromium (or set CHROMIUM=/path/to/chrome)")


def shoot(html: Path, png: Path, size: str, budget_ms: int) -> bool:
    with tempfile.TemporaryDirectory(prefix="loki-chromium-") as profile:
        cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               "--disable-background-networking", "--disable-component-update", "--no-first-run", "--disable-sync",
               "--hide-scrollbars", f"--user-data-dir={profile}", f"--window-size={size}",
               f"--virtual-time-budget={budget_ms}", f"--screenshot={png}", html.resolve().as_uri()]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    ok = r.returncode == 0 and png.is_file() and png.stat().st_size > 0
    if not ok:
        print(f"chromium failed on {html} (exit {r.returncode}):\n{r.stderr[-2000:]}", file=sys.stderr)
    return ok


def result_names(report: Path) -> list[str]:
    m = re.search(r'<script id="results">\s*var results = (.*?);\s*</script>', report.read_text(), re.S)
    return sorted(Path(p).name for p in json.loads(m.group(1))) if m else []


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("report", type=Path, help="report.html from snakemake --report")
    ap.add_argument("--out", type=Path, default=Path("report_screenshots"), help="folder for the PNGs")
    ap.add_argument("--view", action="append", default=[], help="file name of a result to open (repeatable; 'all')")
    ap.add_argument("--size", default="1600,1000", help="window size W,H (default 1600,1000)")
    ap.add_argument("--budget-ms", type=int, default=8000, help="virtual time for the page to render (ms)")
    args = ap.parse_args(argv)
    if not args.report.is_file():
        sys.exit(f"{args.report} does not exist: make it with snakemake --report {args.report}")
    args.out.mkdir(parents=True, exist_ok=True)
    views = result_names(args.report) if "all" in args.view else args.view
    ok = shoot(args.report, args.out / "home.png", args.size, args.budget_ms)
    print(f"{'wrote' if ok else 'FAILED'} {args.out / 'home.png'}")
    text = args.report.read_text()
    for v in views:
        with tempfile.TemporaryDirectory(prefix="loki-report-") as tmp:
            page = Path(tmp) / "report.html"
            head, body_end, tail = text.rpartition("</body>")  # the page's own, not one inside embedded JS
            page.write_text(head + OPEN_RESULT % json.dumps(v) + body_end + tail)
            png = args.out / (re.sub(r"[^A-Za-z0-9_-]+", "_", v) + ".png")
            good = shoot(page, png, args.size, args.budget_ms)
        print(f"{'wrote' if good else 'FAILED'} {png}")
        ok &= good
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
