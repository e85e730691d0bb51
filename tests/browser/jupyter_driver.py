"""A Jupyter server and a Chromium page driving JupyterLab 4 or Notebook 7, for the browser tests.

Why by hand: Galata (JupyterLab's own UI-test tool) is a Node/TypeScript package and
downloads its own browser; these tests use Playwright's Python package with the
system's Chromium and the Jupyter server of the environment under test.

The server runs on a free port with a token, in a temporary root with its own settings
(notebook windowing off so every cell renders, no news or update checks), runtime and
data folders (a fresh trust database), and exposes ``window.jupyterapp``: the tests run
JupyterLab commands (run all, save, change theme) the way the menus do, and click the
widgets themselves.

Example::

    with JupyterServer(root, env={"PYTHONPATH": repo}) as server, chromium() as browser:
        nb = NotebookPage(browser.new_page(), server, "lab")
        nb.open("02_memory_calculator.ipynb")
        nb.run_all()
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

CHROMIUM = os.environ.get("FTMAGIC_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
LIGHT, DARK = "JupyterLab Light", "JupyterLab Dark"
# Settings of the test user: every cell attached to the page (widgets off screen render
# too) and nothing fetched from the internet.
SETTINGS = {
    "@jupyterlab/notebook-extension/tracker": {"windowingMode": "none"},
    "@jupyterlab/apputils-extension/notification": {"fetchNews": "false", "checkForUpdates": False},
    "@jupyterlab/apputils-extension/themes": {"theme": LIGHT},
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class JupyterServer:
    """``jupyter lab`` (which also serves Notebook 7) on a free port; stopped with its kernels on exit."""

    def __init__(self, root: Path, env: Optional[dict] = None, unset=(), startup_timeout: float = 90.0) -> None:
        self.root = Path(root)
        self.extra_env = dict(env or {})
        self.unset = tuple(unset)
        self.startup_timeout = startup_timeout
        self.token = secrets.token_hex(16)
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.home = Path(tempfile.mkdtemp(prefix="ftmagic-jupyter-"))
        self.log_path = self.home / "server.log"
        self.proc: Optional[subprocess.Popen] = None

    def __enter__(self) -> "JupyterServer":
        settings = self.home / "settings"
        for plugin, values in SETTINGS.items():
            path = settings / f"{plugin}.jupyterlab-settings"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(values))
        env = dict(os.environ, JUPYTERLAB_SETTINGS_DIR=str(settings),
                   JUPYTERLAB_WORKSPACES_DIR=str(self.home / "workspaces"),
                   JUPYTER_RUNTIME_DIR=str(self.home / "runtime"), JUPYTER_DATA_DIR=str(self.home / "data"),
                   **self.extra_env)
        for name in self.unset:
            env.pop(name, None)
        command = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1",
                   f"--ServerApp.port={self.port}", "--ServerApp.port_retries=0",
                   f"--IdentityProvider.token={self.token}", f"--ServerApp.root_dir={self.root}",
                   "--ServerApp.allow_root=True", "--ServerApp.terminals_enabled=False",
                   "--LabApp.expose_app_in_browser=True", "--JupyterNotebookApp.expose_app_in_browser=True"]
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(command, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"jupyter server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                self.api("GET", "/api/status")
                return self
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"jupyter server did not answer in {self.startup_timeout}s:\n{self.log()}")
                time.sleep(0.3)

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # the server and the kernels it started
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self._log.close()
        shutil.rmtree(self.home, ignore_errors=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def url(self, path: str) -> str:
        sep = "&" if "?" in path else "?"
        return f"{self.base}{path}{sep}token={self.token}"

    def api(self, method: str, path: str):
        request = urllib.request.Request(f"{self.base}{path}", method=method,
                                         headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            body = response.read()
        return json.loads(body) if body else None

    def shutdown_kernels(self) -> int:
        """Shut every running kernel down (what the Kernel menu's Shut Down does); returns how many."""
        kernels = self.api("GET", "/api/kernels")
        for kernel in kernels:
            self.api("DELETE", f"/api/kernels/{kernel['id']}")
        return len(kernels)


@contextmanager
def chromium(viewport=(1280, 900)) -> Iterator:
    """A Chromium browser context with a fresh profile (Debian's Chromium; Playwright downloads nothing)."""
    from playwright.sync_api import sync_playwright

    profile = tempfile.mkdtemp(prefix="ftmagic-chromium-")
    try:
        with sync_playwright() as playwright:
            context = playwright.chromium.launch_persistent_context(
                profile, executable_path=CHROMIUM, args=CHROMIUM_FLAGS,
                viewport={"width": viewport[0], "height": viewport[1]})
            try:
                yield context
            finally:
                context.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)


# JavaScript run in the page. `nb()` is the notebook panel on screen in either front end.
_JS_NB = "(() => window.jupyterapp && window.jupyterapp.shell.currentWidget)()"
_JS_READY = f"""() => {{
    const nb = {_JS_NB};
    return !!(nb && nb.content && nb.context && nb.context.isReady && nb.sessionContext
              && nb.sessionContext.session && nb.sessionContext.session.kernel
              && nb.sessionContext.session.kernel.status === 'idle');
}}"""
_JS_DONE = f"""() => {{
    const nb = {_JS_NB};
    const kernel = nb.sessionContext.session && nb.sessionContext.session.kernel;
    const cells = nb.content.widgets.filter(c => c.model.type === 'code');
    return kernel && kernel.status === 'idle' && cells.every(c => c.model.executionCount !== null
        && !c.node.querySelector('.jp-InputArea-prompt').textContent.includes('*'));
}}"""


# Errors the front ends log on their own, with no ftmagic output on the page (seen opening an
# empty notebook): Notebook 7.6's keyboard-shortcut settings on start-up.
FRONT_END_ERRORS = (
    "Cannot read properties of undefined (reading 'schema')",
    # Notebook 7's notebook page has no file browser; its own start-up sometimes asks for one.
    "Command 'filebrowser:open-path' not registered",
)


class NotebookPage:
    """One notebook open in JupyterLab (``ui="lab"``) or Notebook 7 (``ui="notebook"``).

    Console errors and page errors are collected in ``errors`` as they happen, except the
    front end's own start-up errors (:data:`FRONT_END_ERRORS`).
    """

    def __init__(self, page, server: JupyterServer, ui: str = "lab") -> None:
        self.page, self.server, self.ui = page, server, ui
        self.errors: list[str] = []
        page.on("console", lambda message: message.type == "error" and self._error(message.text))
        page.on("pageerror", lambda error: self._error(f"page error: {error}\n{error.stack}"))

    def _error(self, text: str) -> None:
        if not any(known in text for known in FRONT_END_ERRORS):
            self.errors.append(text)

    def open(self, name: str, timeout: float = 120) -> None:
        """Open ``name`` (relative to the server root) with a reset workspace and wait for an idle kernel."""
        path = f"/lab/tree/{name}?reset" if self.ui == "lab" else f"/notebooks/{name}"
        self.page.goto(self.server.url(path))
        self.page.wait_for_function(_JS_READY, timeout=timeout * 1000)
        self.page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=timeout * 1000)

    def command(self, name: str, args: Optional[dict] = None):
        return self.page.evaluate("([name, args]) => window.jupyterapp.commands.execute(name, args)",
                                  [name, args or {}])

    def run_all(self, timeout: float = 900) -> None:
        """Clear every output, run all cells and wait until each has run and the kernel is idle."""
        self.command("notebook:clear-all-cell-outputs")
        self.command("notebook:run-all-cells")
        self.page.wait_for_timeout(500)
        self.page.wait_for_function(_JS_DONE, timeout=timeout * 1000, polling=500)
        self.page.wait_for_timeout(1000)  # the last display messages reach the page

    def start_running_all(self) -> None:
        self.command("notebook:clear-all-cell-outputs")
        self.command("notebook:run-all-cells")

    def wait_until_done(self, timeout: float = 900) -> None:
        self.page.wait_for_function(_JS_DONE, timeout=timeout * 1000, polling=500)
        self.page.wait_for_timeout(1000)

    def save(self) -> None:
        self.command("docmanager:save")
        self.page.wait_for_function(f"() => !{_JS_NB}.context.model.dirty", timeout=30000)

    def set_theme(self, theme: str) -> None:
        self.command("apputils:change-theme", {"theme": theme})
        light = "true" if theme == LIGHT else "false"
        self.page.wait_for_function(f"() => document.body.dataset.jpThemeLight === '{light}'", timeout=30000)
        self.page.wait_for_timeout(500)

    def cells(self):
        return self.page.locator(".jp-Notebook .jp-Cell.jp-CodeCell")

    def cell(self, source_start: str):
        """The code cell whose source starts with ``source_start``."""
        index = self.page.evaluate(f"""(start) => {{
            const cells = {_JS_NB}.content.widgets.filter(c => c.model.type === 'code');
            return cells.findIndex(c => c.model.sharedModel.getSource().startsWith(start));
        }}""", source_start)
        assert index >= 0, f"no code cell starts with {source_start!r}"
        return self.cells().nth(index)

    def visible_text(self, locator=None) -> str:
        return (locator or self.page.locator(".jp-Notebook")).inner_text()

    def outputs_by_cell(self) -> list:
        """For each code cell: the visible text of its outputs (hidden outputs left out)."""
        return self.page.evaluate("""() => [...document.querySelectorAll('.jp-Notebook .jp-CodeCell')].map(cell =>
            [...cell.querySelectorAll('.jp-OutputArea-child')].filter(o => o.offsetParent !== null)
                .map(o => o.innerText.trim()).filter(t => t))""")

    def static_copies(self) -> list:
        """(visible, text) of every widget's static copy on the page."""
        return self.page.evaluate("""() => [...document.querySelectorAll('[data-ftmagic-static]')].map(e =>
            [e.offsetParent !== null, e.innerText])""")

    def widget_errors(self) -> list:
        """Visible widget outputs that failed: "Error displaying widget", "Loading widget..." left over."""
        return self.page.evaluate("""() => [...document.querySelectorAll('.jp-OutputArea-output')]
            .filter(o => o.offsetParent !== null && /Error displaying widget|Loading widget/.test(o.innerText))
            .map(o => o.innerText)""")

    def rendered_widgets(self) -> int:
        """Widget outputs showing a live view."""
        return self.page.evaluate("""() => [...document.querySelectorAll('.jp-OutputArea-output')]
            .filter(o => o.offsetParent !== null && o.querySelector(':scope > .jupyter-widgets, :scope > .widget-box'))
            .length""")
