"""JupyterLab in headless Chromium: run 02-code-review-team.ipynb on the tiny checkpoint and read the live page map
and the timeline figure from the page. Needs Debian's `chromium` (never `playwright install`); skips without it
unless MULTIHEAD_REQUIRE_BROWSER=1."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parent.parent
HEADS = ["coder", "documenter", "reviewer"]
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


def chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        if os.environ.get("MULTIHEAD_REQUIRE_BROWSER") == "1":
            pytest.fail("chromium is missing and MULTIHEAD_REQUIRE_BROWSER=1 (apt-get install -y chromium)")
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def lab(tmp_path, tiny_ckpt):
    """A JupyterLab server over a temp copy of notebook 02 (tiny MODEL injected); yields its base URL."""
    sys.path.insert(0, str(Path(__file__).parent))
    from test_notebooks import inject_parameters, tiny_parameters, write_kernelspec

    work = tmp_path / "work"
    work.mkdir()
    nb = nbformat.read(ROOT / "notebooks" / "02-code-review-team.ipynb", as_version=4)
    nbformat.write(inject_parameters(nb, tiny_parameters(str(tiny_ckpt("llama", max_position_embeddings=2048)), max_tokens=256)),
                   work / "02-code-review-team.ipynb")
    jpath = write_kernelspec(tmp_path / "jupyter", name="python3")
    port = free_port()
    env = {**os.environ, "JUPYTER_PATH": str(jpath), "JUPYTERLAB_WORKSPACES_DIR": str(tmp_path / "workspaces"),
           "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"), "OMP_NUM_THREADS": "2"}
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", f"--port={port}", "--ip=127.0.0.1",
           "--ServerApp.token=", "--ServerApp.password=", "--ServerApp.open_browser=False",
           f"--ServerApp.root_dir={work}", "--ServerApp.disable_check_xsrf=True", "--LabApp.news_url=None",
           "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")
    log = open(tmp_path / "jupyterlab.log", "w")
    proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}/api/status", timeout=2) as r:
                    json.load(r)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("JupyterLab did not start:\n" + (tmp_path / "jupyterlab.log").read_text())
                time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


SEEN_OWNERS = """() => [...document.querySelectorAll('.mh-page-map')].map(e => e.dataset.seenOwners || '').join(';')"""
TIMELINE_BARS = """() => {
  for (const gd of document.querySelectorAll('.js-plotly-plot')) {
    const title = gd.layout && gd.layout.title && (gd.layout.title.text || gd.layout.title);
    if (!String(title || '').startsWith('Timeline')) continue;
    const bars = (gd.data || []).filter(t => t.type === 'bar').map(t => t.name).sort();
    if (bars.length) return bars;
  }
  return null;
}"""


def test_code_review_notebook_in_jupyterlab(lab):
    from playwright.sync_api import sync_playwright

    exe = chromium()
    out = ROOT / "test-artifacts"
    out.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        try:
            page.goto(f"{lab}/lab/tree/02-code-review-team.ipynb", timeout=60_000)
            page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=60_000)
            accept = page.locator(".jp-Dialog .jp-mod-accept")  # "Select Kernel", when JupyterLab asks
            try:
                accept.wait_for(timeout=5_000)
                accept.click()
            except Exception:
                pass
            page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=60_000)
            page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
            page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()
            # the live page map: every head held K/V pages while the team ran
            page.wait_for_function(
                f"() => ({SEEN_OWNERS})().split(';').some(s => {json.dumps(HEADS)}.every(h => s.split(',').includes(h)))",
                timeout=90_000,
            )
            # run.plot(): the timeline has one bar trace per head
            handle = page.wait_for_function(
                f"() => {{ const b = ({TIMELINE_BARS})(); return b && b.length === {len(HEADS)} ? b : null; }}",
                timeout=90_000,
            )
            assert handle.json_value() == HEADS
            no_news = page.locator(".jp-toast-button", has_text="No")
            if no_news.count():
                no_news.first.click()
            page.wait_for_timeout(500)
            page.screenshot(path=str(out / "browser-02.png"), full_page=True)
            errors = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']")
            assert "Traceback" not in " ".join(errors.all_inner_texts())
        finally:
            if not (out / "browser-02.png").exists():
                page.screenshot(path=str(out / "browser-02.png"), full_page=True)
            browser.close()
