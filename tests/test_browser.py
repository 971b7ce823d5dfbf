"""The explorer in a real browser: JupyterLab from the project's venv, headless Chromium driven by
Playwright (the system browser, ``/usr/bin/chromium``; nothing is downloaded).

The test copies ``notebooks/13_explorer.ipynb`` into a fresh folder with the ``smoke`` preset,
opens it in JupyterLab, runs every cell, types a caption into the widget and checks that five
ranked pictures and SCAN's alignment appear and that the typed unknown word is named. The
screenshot is kept in the test's folder and copied to ``runs/browser/explorer.png``.
Skips with a reason where Chromium or Playwright is missing (``.ci/run`` installs both).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from itmkit.paths import REPO_ROOT

pytestmark = pytest.mark.browser

CHROMIUM = os.environ.get("ITMKIT_CHROMIUM", "/usr/bin/chromium")
# As the machine's own probe starts it: no sandbox as root, no background traffic to a closed network.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]
TYPED = "a zzqx green triangle above a circle"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _smoke_copy(folder: Path) -> Path:
    """The explorer notebook with its parameters set to the smoke preset and a local out_dir."""
    import nbformat

    nb = nbformat.read(str(REPO_ROOT / "notebooks" / "13_explorer.ipynb"), as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    cell.source = cell.source.replace('preset = "course"', 'preset = "smoke"')
    assert 'preset = "smoke"' in cell.source
    path = folder / "explorer.ipynb"
    nbformat.write(nb, str(path))
    return path


def _start_lab(folder: Path, port: int, token: str) -> subprocess.Popen:
    env = dict(os.environ, JUPYTER_CONFIG_DIR=str(folder / ".jupyter"), JUPYTER_RUNTIME_DIR=str(folder / ".runtime"),
               JUPYTERLAB_SETTINGS_DIR=str(folder / ".settings"), JUPYTERLAB_WORKSPACES_DIR=str(folder / ".workspaces"))
    # no news / update prompt over the page (the network is closed anyway)
    settings = folder / ".settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    (settings / "notification.jupyterlab-settings").write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    # every cell stays rendered (JupyterLab 4 defers cells scrolled out of view)
    tracker = folder / ".settings" / "@jupyterlab" / "notebook-extension"
    tracker.mkdir(parents=True)
    (tracker / "tracker.jupyterlab-settings").write_text(json.dumps({"windowingMode": "none"}))
    command = [sys.executable, "-m", "jupyter", "lab", "--no-browser", f"--port={port}", "--ip=127.0.0.1",
               f"--ServerApp.token={token}", f"--ServerApp.root_dir={folder}"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        command.append("--allow-root")  # containers and CI run as root; JupyterLab refuses otherwise
    log = open(folder / "lab.log", "w")
    return subprocess.Popen(command, cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT)


def _wait_for(url: str, process: subprocess.Popen, log: Path, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"JupyterLab exited with {process.returncode}:\n{log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(1)
    pytest.fail(f"JupyterLab did not answer {url} in {seconds} s:\n{log.read_text()[-2000:]}")


def _run_all_cells(page, sync_api) -> None:
    """Run > Run All Cells, and make sure the run started: on a loaded machine a click on a menu
    that was still opening was lost once, and the test then waited 9 minutes on an idle notebook.
    Started means a cell shows ``[*]`` or an execution count; one more try otherwise."""
    started = page.locator(".jp-InputArea-prompt", has_text=re.compile(r"\[(\*|\d+)\]")).first
    for attempt in range(2):
        page.locator(".lm-MenuBar-item", has_text="Run").first.click()
        item = page.locator(".lm-Menu-item", has_text="Run All Cells").first
        item.wait_for(state="visible", timeout=30_000)
        item.click()
        try:
            started.wait_for(state="attached", timeout=60_000)
            return
        except sync_api.TimeoutError:
            if attempt == 1:
                raise


def test_explorer_in_jupyterlab_with_headless_chromium(tmp_path):
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"no Chromium at {CHROMIUM} (Debian: apt-get install chromium; .ci/run does it as root)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (the dev extra has it)")
    pytest.importorskip("jupyterlab", reason="the course extra (jupyterlab) is not installed")

    folder = tmp_path / "lab"
    folder.mkdir()
    notebook = _smoke_copy(folder)
    port, token = _free_port(), "itmkit-browser-test"
    lab = _start_lab(folder, port, token)
    try:
        _wait_for(f"http://127.0.0.1:{port}/api/status?token={token}", lab, folder / "lab.log")
        with sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"http://127.0.0.1:{port}/lab/tree/{notebook.name}?token={token}")
            page.wait_for_selector(".jp-Notebook", timeout=90_000)
            page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=90_000)
            _run_all_cells(page, sync_api)
            # the notebook trains (or reuses) two smoke runs, then builds the widget
            widget = page.locator(".itmkit-caption")
            try:  # generous: on a loaded machine the kernel trains its two smoke runs slowly
                widget.wait_for(state="attached", timeout=540_000)
            except sync_api.TimeoutError:
                page.screenshot(path=str(tmp_path / "failure.png"), full_page=False)
                outputs = " | ".join(page.locator(".jp-OutputArea-output").all_inner_texts())[-1500:]
                pytest.fail(f"the explorer widget did not appear; screenshot {tmp_path / 'failure.png'}; notebook outputs: "
                            f"{outputs}; lab.log: {(folder / 'lab.log').read_text()[-1500:]}")
            widget.scroll_into_view_if_needed()
            caption = page.locator(".itmkit-caption input")
            caption.wait_for(timeout=60_000)
            page.locator(".itmkit-ranked img").nth(4).wait_for(timeout=120_000)
            caption.scroll_into_view_if_needed()
            caption.fill(TYPED)
            caption.press("Enter")
            page.locator(".itmkit-status", has_text="zzqx").wait_for(timeout=60_000)
            thumbs = page.locator(".itmkit-ranked img")
            assert thumbs.count() == 5
            assert all(thumbs.nth(i).evaluate("img => img.naturalWidth > 0") for i in range(5))
            labels = page.locator(".itmkit-ranked .widget-label").all_inner_texts()
            assert [label.split()[0] for label in labels] == ["#1", "#2", "#3", "#4", "#5"]
            page.locator(".itmkit-alignment img").first.wait_for(timeout=60_000)  # SCAN's words on the best image
            page.locator(".itmkit-ranked").scroll_into_view_if_needed()
            shot = tmp_path / "explorer.png"
            page.screenshot(path=str(shot), full_page=False)
            browser.close()
        assert shot.stat().st_size > 10_000
        keep = REPO_ROOT / "runs" / "browser"
        keep.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, keep / "explorer.png")
    finally:
        lab.terminate()
        try:
            lab.wait(timeout=20)
        except subprocess.TimeoutExpired:
            lab.kill()
