"""Drive a page of this example in headless Chromium and read back what it reports (the tests and
bench/bench_runtimes.py use it): a local HTTP server serves ``site`` and takes the page's POST to /report."""

from __future__ import annotations

import http.server
import json
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any


class _Server(http.server.ThreadingHTTPServer):
    report: bytes | None = None


def _serve(site: Path) -> _Server:
    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(site), **kwargs)

        def do_POST(self):  # noqa: N802 - the page reports here
            self.server.report = self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = _Server(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def run_page(chromium: str, site: Path, page: str, timeout: float = 300) -> dict[str, Any]:
    """Open http://127.0.0.1:PORT/PAGE in headless Chromium; the JSON the page POSTs to /report."""
    server = _serve(site)
    url = f"http://127.0.0.1:{server.server_address[1]}/{page}"
    with tempfile.TemporaryDirectory() as profile:
        browser = subprocess.Popen([chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
                                    f"--user-data-dir={profile}", url],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.time() + timeout
            while server.report is None and time.time() < deadline and browser.poll() is None:
                time.sleep(0.1)
        finally:
            browser.kill()
            browser.wait()
            server.shutdown()
    if server.report is None:
        raise RuntimeError(f"the page {page} never reported (timeout {timeout} s)")
    return json.loads(server.report)


def screenshot(chromium: str, site: Path, page: str, out: Path, size: str = "700,900") -> Path:
    """A PNG of the page as Chromium renders it, after up to 60 s of (virtual) time for the sampling to run."""
    server = _serve(site)
    url = f"http://127.0.0.1:{server.server_address[1]}/{page}"
    try:
        with tempfile.TemporaryDirectory() as profile:
            subprocess.run([chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
                            f"--user-data-dir={profile}", f"--window-size={size}", "--virtual-time-budget=60000",
                            f"--screenshot={out}", url], capture_output=True, timeout=300, check=True)
    finally:
        server.shutdown()
    return out


def site_with(folder: Path, files: list[Path], node_modules: Path, graphs: list[Path]) -> Path:
    """A folder to serve: the page's files, node_modules (linked) and each graph with its .json metadata."""
    import shutil

    folder.mkdir(parents=True, exist_ok=True)
    for f in files:
        shutil.copy(f, folder / f.name)
    (folder / "node_modules").symlink_to(node_modules.resolve())
    for g in graphs:
        shutil.copy(g, folder / g.name)
        shutil.copy(f"{g}.json", folder / f"{g.name}.json")
    return folder
