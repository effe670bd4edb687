"""JupyterLab as a way in: a real, headless JupyterLab server runs a notebook of the study on the `smoke` profile
through its REST and kernel (websocket) API, and the notebook's page renders in headless Chromium.

What `make lab` starts, minus the browser window: the venv's `jupyter lab`, the notebook's own kernelspec
(`python3`, which must resolve to this venv's Python), Curve-encrypted kernel channels.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import nbformat
import pandas as pd
import pytest

from ood_lib.config import load_profile
from ood_lib.paths import PROJECT_ROOT

NOTEBOOK = "01_intermediate_stage.ipynb"  # the cheapest notebook that trains and prints its own numbers
PARAMETERS = {"profile": "smoke", "overrides": {"seeds": [0]}, "compute": True}  # smoke, one seed: 0.5-1.5 minutes
SERVER_START_S = 120
CELL_TIMEOUT_S = 600
PAGE_TIMEOUT_S = 120
# Curve-encrypted kernel channels, as `make lab` asks (where pyzmq's libzmq has CurveZMQ, as its wheels do)
ENCRYPTION = "auto" if __import__("zmq").has("curve") else "disabled"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Lab:
    """A JupyterLab server in a child process, its REST API with the token, and its log."""

    def __init__(self, root: Path, home: Path, env_extra: dict[str, str]):
        self.port, self.token, self.root = free_port(), secrets.token_hex(24), root
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = home / "jupyterlab.log"
        env = {**os.environ, **env_extra,
               "JUPYTER_CONFIG_DIR": str(home / "config"), "JUPYTER_DATA_DIR": str(home / "data"),
               "JUPYTER_RUNTIME_DIR": str(home / "runtime"), "IPYTHONDIR": str(home / "ipython"),
               "JUPYTER_PLATFORM_DIRS": "1"}
        env.pop("JUPYTER_PATH", None)  # the kernelspecs are the venv's own (sys.prefix/share/jupyter)
        env.pop("JUPYTERLAB_SETTINGS_DIR", None)
        # every cell in the page (no windowing), so that the test can count them
        settings = home / "config/lab/user-settings/@jupyterlab/notebook-extension/tracker.jupyterlab-settings"
        settings.parent.mkdir(parents=True)
        settings.write_text(json.dumps({"windowingMode": "none"}))
        cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={self.port}",
               "--ServerApp.port_retries=0", f"--IdentityProvider.token={self.token}",
               f"--ServerApp.root_dir={root}", f"--MappingKernelManager.transport_encryption={ENCRYPTION}",
               "--LabApp.news_url=", "--LabApp.extension_manager=readonly"]  # nothing fetched from the network
        if os.geteuid() == 0:  # CI machines run as root; the server refuses that without the flag
            cmd.append("--allow-root")
        self._log = self.log_path.open("w")
        self.proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def url(self, path: str) -> str:
        return f"{self.base}{path}"

    def api(self, method: str, path: str, body=None, timeout: float = 30):
        import requests

        r = requests.request(method, self.url(path), json=body, timeout=timeout,
                             headers={"Authorization": f"token {self.token}"})
        if r.status_code >= 400:
            raise AssertionError(f"{method} {path} -> HTTP {r.status_code}: {r.text[:500]}\n"
                                 f"server log (tail):\n{self.log()[-3000:]}")
        return r.json() if r.content else None

    def wait_ready(self) -> dict:
        import requests

        deadline = time.monotonic() + SERVER_START_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"jupyter lab exited with code {self.proc.returncode} before it answered:\n{self.log()}")
            try:
                r = requests.get(self.url("/api/status"), headers={"Authorization": f"token {self.token}"},
                                 timeout=5)
                if r.status_code == 200:
                    return r.json()
            except requests.ConnectionError:
                pass
            time.sleep(0.5)
        pytest.fail(f"jupyter lab did not answer on port {self.port} within {SERVER_START_S} s:\n{self.log()}")

    def stop(self) -> None:
        """Ask the server to shut down (it shuts its kernels down); terminate it if it does not."""
        if self.proc.poll() is None:
            try:
                self.api("POST", "/api/shutdown", timeout=10)
            except Exception:  # noqa: BLE001 - the process is terminated below in any case
                pass
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        for sig in (signal.SIGTERM, signal.SIGKILL):  # still alive: its process group (started for it) goes
            if self.proc.poll() is not None:
                break
            os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        self._log.close()


def stop_kernel_process(pid: int | None) -> None:
    """The kernel runs in a session of its own: should the server have died without shutting it down, end it."""
    if not pid:
        return
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return  # gone
        if b"ipykernel" not in cmdline:
            return  # the pid was reused: not ours
        time.sleep(0.5)
    os.kill(pid, signal.SIGKILL)


class KernelChannel:
    """Execute code in a kernel of the server through its websocket (`/api/kernels/<id>/channels`), collecting the
    outputs as nbformat outputs."""

    def __init__(self, lab: Lab, kernel_id: str, session_id: str):
        import websocket

        self.session_id = session_id
        self.ws = websocket.create_connection(
            f"ws://127.0.0.1:{lab.port}/api/kernels/{kernel_id}/channels?session_id={session_id}",
            header=[f"Authorization: token {lab.token}"], timeout=30)

    def execute(self, code: str, timeout: float = CELL_TIMEOUT_S) -> tuple[dict, list]:
        """Run ``code``; return the execute_reply content and the outputs, once the kernel is idle again."""
        import websocket

        msg_id = uuid.uuid4().hex
        self.ws.send(json.dumps({
            "header": {"msg_id": msg_id, "msg_type": "execute_request", "username": "test",
                       "session": self.session_id, "date": datetime.now(timezone.utc).isoformat(),
                       "version": "5.3"},
            "parent_header": {}, "metadata": {}, "channel": "shell", "buffers": [],
            "content": {"code": code, "silent": False, "store_history": True, "user_expressions": {},
                        "allow_stdin": False, "stop_on_error": True}}))
        outputs, reply, idle = [], None, False
        deadline = time.monotonic() + timeout
        while reply is None or not idle:
            if time.monotonic() > deadline:
                raise AssertionError(f"no answer within {timeout} s to the cell:\n{code[:500]}")
            try:
                msg = json.loads(self.ws.recv())
            except websocket.WebSocketTimeoutException:
                continue
            if msg.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            kind = msg["header"]["msg_type"]
            if msg["channel"] == "shell" and kind == "execute_reply":
                reply = msg["content"]
            elif msg["channel"] == "iopub":
                if kind == "status":
                    idle = msg["content"]["execution_state"] == "idle"
                elif kind in ("stream", "display_data", "execute_result", "error"):
                    outputs.append(nbformat.v4.output_from_msg(msg))
        return reply, outputs

    def close(self) -> None:
        self.ws.close()


def output_text(outputs: list) -> str:
    """What a reader sees of a cell's outputs, as text (streams, text/plain, text/markdown, text/html)."""
    parts = []
    for o in outputs:
        if o.output_type == "stream":
            parts.append(o.text)
        elif o.output_type in ("display_data", "execute_result"):
            parts += [o.data[k] for k in ("text/plain", "text/markdown", "text/html") if k in o.data]
        elif o.output_type == "error":
            parts.append("\n".join(o.traceback))
    return "\n".join(parts)


def run_in_lab(tmp_path: Path) -> dict:
    """Start JupyterLab on a copy of the notebook, run it on `smoke` through a kernel session, save it through the
    contents API, load its page in Chromium. Returns what the checks need."""
    from papermill.iorw import load_notebook_node
    from papermill.parameterize import parameterize_notebook

    root, home = tmp_path / "lab", tmp_path / "home"
    root.mkdir()
    home.mkdir()
    nb = load_notebook_node(str(PROJECT_ROOT / "notebooks" / NOTEBOOK))  # nbformat.read, and papermill's defaults
    kernel_name = nb.metadata.kernelspec.name
    nb = parameterize_notebook(nb, PARAMETERS)  # the injected parameters cell that papermill adds, nothing else
    nbformat.write(nb, root / NOTEBOOK)
    results_dir, figures_dir = tmp_path / "results", tmp_path / "figures"
    lab = Lab(root, home, {"OOD_RESULTS_DIR": str(results_dir), "OOD_FIGURES_DIR": str(figures_dir)})
    found = {"results_dir": results_dir}
    try:
        found["status"] = lab.wait_ready()
        specs = lab.api("GET", "/api/kernelspecs")
        assert kernel_name in specs["kernelspecs"], (kernel_name, sorted(specs["kernelspecs"]))
        found["kernel_display_name"] = specs["kernelspecs"][kernel_name]["spec"]["display_name"]
        session = lab.api("POST", "/api/sessions", {"path": NOTEBOOK, "type": "notebook", "name": NOTEBOOK,
                                                     "kernel": {"name": kernel_name}})
        kernel_id = session["kernel"]["id"]
        channel = KernelChannel(lab, kernel_id, uuid.uuid4().hex)
        try:
            reply, outputs = channel.execute(
                "import os, sys; print(sys.executable, os.getcwd(), os.getpid(), sep='\\n')")
            assert reply["status"] == "ok", reply
            found["kernel_python"], found["kernel_cwd"], pid = output_text(outputs).splitlines()[:3]
            found["kernel_pid"] = int(pid)
            t0 = time.perf_counter()
            for i, cell in enumerate(nb.cells):
                if cell.cell_type != "code":
                    continue
                reply, outputs = channel.execute(cell.source)
                cell.outputs, cell.execution_count = outputs, reply.get("execution_count")
                if reply["status"] != "ok":
                    pytest.fail(f"cell {i} of {NOTEBOOK} failed in the JupyterLab kernel:\n{output_text(outputs)}")
            found["seconds"] = time.perf_counter() - t0
        finally:
            channel.close()
        found["nb"] = nb
        # the executed notebook back through the contents API: the page below shows these outputs
        lab.api("PUT", f"/api/contents/{NOTEBOOK}", {"type": "notebook", "format": "json", "content": nb})
        found["page"] = load_page(lab, tmp_path)
        found["sessions"] = lab.api("GET", "/api/sessions")
        found["kernel_id"] = kernel_id
    finally:
        lab.stop()
        stop_kernel_process(found.get("kernel_pid"))
        found["log"] = lab.log_path.read_text(errors="replace")
    return found


def load_page(lab: Lab, tmp_path: Path) -> dict:
    """The notebook's page in headless Chromium: its cells and outputs rendered, the browser console clean."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    from test_report import chromium_driver

    driver = chromium_driver(tmp_path)
    try:
        driver.set_page_load_timeout(PAGE_TIMEOUT_S)
        driver.get(lab.url(f"/lab/tree/{NOTEBOOK}?token={lab.token}"))
        wait = WebDriverWait(driver, PAGE_TIMEOUT_S)
        try:
            wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".jp-NotebookPanel .jp-Cell"))
            wait.until(lambda d: "final train loss" in d.execute_script(
                "return Array.from(document.querySelectorAll('.jp-NotebookPanel .jp-OutputArea-output'))"
                ".map(e => e.textContent).join('\\n')"))
            # the page attached to a kernel: its toolbar names the kernel's display name, not "No Kernel"
            wait.until(lambda d: "Python" in d.execute_script(
                "const k = document.querySelector('.jp-NotebookPanel-toolbar .jp-KernelName');"
                "return k ? k.textContent : ''"))
        except TimeoutException:
            body = driver.execute_script("return document.body ? document.body.innerText.slice(0, 2000) : ''")
            pytest.fail(f"the notebook page did not render within {PAGE_TIMEOUT_S} s; page text:\n{body}\n"
                        f"browser log: {driver.get_log('browser')}\nserver log (tail):\n{lab.log()[-3000:]}")
        time.sleep(2)  # late console errors (a failing request after the first render) land in the log too
        page = {
            "title": driver.title,
            "kernel_name": driver.execute_script(
                "return document.querySelector('.jp-NotebookPanel-toolbar .jp-KernelName').textContent"),
            "cells": len(driver.find_elements(By.CSS_SELECTOR, ".jp-NotebookPanel .jp-Cell")),
            "code_cells": len(driver.find_elements(By.CSS_SELECTOR, ".jp-NotebookPanel .jp-CodeCell")),
            "outputs": driver.execute_script(
                "return Array.from(document.querySelectorAll('.jp-NotebookPanel .jp-OutputArea-output'))"
                ".map(e => e.textContent)"),
            "console": driver.get_log("browser"),
        }
    finally:
        driver.quit()
    return page


def test_notebook_runs_in_jupyterlab_and_renders(tmp_path):
    for what in ("jupyterlab", "websocket", "requests", "selenium"):
        try:
            __import__(what)
        except ImportError as e:
            pytest.fail(f"{what} is not installed ({e}): `pip install -r requirements.lock` (`make test` does)")
    t0 = time.perf_counter()
    found = run_in_lab(tmp_path)
    print(f"JupyterLab {found['status'].get('started', '')}: {NOTEBOOK} ran on smoke in {found['seconds']:.1f} s; "
          f"everything in {time.perf_counter() - t0:.1f} s")

    # the notebook's kernelspec resolved to this venv's Python, started in the notebook's folder
    assert Path(found["kernel_python"]).resolve() == Path(sys.executable).resolve(), found["kernel_python"]
    assert Path(found["kernel_cwd"]).resolve() == (tmp_path / "lab").resolve(), found["kernel_cwd"]

    # a real output of the notebook: the final training loss it prints is the one in the history it wrote
    nb = found["nb"]
    text = "\n".join(output_text(c.outputs) for c in nb.cells if c.cell_type == "code")
    m = re.search(r"final train loss (\d+\.\d+) \(per seed: ([\d., ]+)\)", text)
    assert m, f"no 'final train loss' line in the outputs:\n{text[:3000]}"
    history = pd.read_csv(found["results_dir"] / "smoke/01_training_history.csv")
    assert set(history.seed) == {0} and history.epoch.max() == load_profile("smoke").train.epochs
    final = history[history.epoch == history.epoch.max()].train_loss
    assert float(m.group(1)) == pytest.approx(final.mean(), abs=1e-4) and 0 < float(m.group(1)) < 10
    assert "profile smoke:" in text
    assert "seed-mean curve is lowest at epoch" in text  # the computed verdict
    sizes = next(c.outputs for c in nb.cells if c.cell_type == "code" and "prepare_data" in c.source)
    assert re.search(r"ID train\s+fashion_mnist\s+1000", output_text(sizes)), output_text(sizes)
    metrics = pd.read_csv(found["results_dir"] / "smoke/metrics.csv", dtype={"notebook": str},
                          keep_default_na=False)
    assert set(metrics.notebook) == {"01"} and set(metrics.seed) == {0}

    # the page: every cell rendered, the printed number among the rendered outputs, a clean console
    page = found["page"]
    assert page["cells"] == len(nb.cells) and page["code_cells"] == sum(c.cell_type == "code" for c in nb.cells), \
        page
    assert any(f"final train loss {m.group(1)}" in o for o in page["outputs"]), page["outputs"][:10]
    assert page["kernel_name"].strip() == found["kernel_display_name"], page["kernel_name"]
    severe = [e for e in page["console"] if e.get("level") == "SEVERE"]
    assert not severe, f"console errors on the JupyterLab page: {severe}"
    # the page's notebook used the session the test created: one session, one kernel
    assert [s["kernel"]["id"] for s in found["sessions"]] == [found["kernel_id"]], found["sessions"]

    # the kernel channels were Curve-encrypted: ipykernel's plain-TCP warning is not in the server's log
    if ENCRYPTION == "auto":
        assert "without encryption" not in found["log"], found["log"][-3000:]
    assert "Traceback" not in found["log"], found["log"][-5000:]
