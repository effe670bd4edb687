"""Progress bars for the long loops (training epochs, feature extraction, ODIN), where the loop runs and on the
runner's console.

A notebook opened in JupyterLab, or the library used from a terminal, shows a ``tqdm.auto`` bar (a widget in
JupyterLab). Under ``python -m ood_lib.reproduce`` the notebook's kernel has no console of its own, so the runner
sets ``OOD_PROGRESS`` to a file: each bar then appends one JSON line per update to it instead of drawing itself,
and the runner draws the bars on its console from that file (``Follower``). The executed notebooks stay free of
bar output. A bar with fewer than ``MIN_STEPS`` steps is not shown.

The same loops count the work they computed or reused (``note_work``), which the notebooks' timings read.
"""
from __future__ import annotations

import itertools
import json
import os
import sys
import threading
from pathlib import Path

ENV = "OOD_PROGRESS"
MIN_STEPS = 2
_ids = itertools.count()
WORK = {"computed": 0, "reused": 0}   # counts since the process started (see note_work)


def note_work(kind: str) -> None:
    """Count a unit of work: ``"computed"`` (an epoch trained, a cache entry computed) or ``"reused"`` (a
    finished run, a checkpoint or a cache entry reloaded). ``results.Timer.stage`` reads these counts to mark a
    stage that only reloaded work as cached."""
    WORK[kind] += 1


class Bar:
    """``with Bar(total, desc, unit) as bar: ... bar.update()``: a tqdm bar, or events for the runner."""

    def __init__(self, total: int, desc: str, unit: str = "it", initial: int = 0, leave: bool = True):
        self.total, self.desc, self.unit, self.n, self.leave = int(total), desc, unit, int(initial), leave
        self.id = f"{os.getpid()}-{next(_ids)}"
        self._file, self._tqdm = os.environ.get(ENV), None
        self.shown = self.total >= MIN_STEPS and self.n < self.total
        if not self.shown:
            return
        if self._file:
            self._emit()
        else:
            from tqdm.auto import tqdm

            self._tqdm = tqdm(total=self.total, initial=self.n, desc=desc, unit=unit, leave=leave,
                              dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 15.0)

    def _emit(self, closed: bool = False) -> None:
        line = json.dumps({"id": self.id, "desc": self.desc, "unit": self.unit, "total": self.total, "n": self.n,
                           "leave": self.leave, "closed": closed})
        try:
            with open(self._file, "a") as f:  # one short line per write: appends of whole lines do not interleave
                f.write(line + "\n")
        except OSError:
            self._file = None  # progress is never worth failing a run for

    def update(self, n: int = 1) -> None:
        self.n += n
        if not self.shown:
            return
        if self._tqdm is not None:
            self._tqdm.update(n)
        elif self._file:
            self._emit()

    def close(self) -> None:
        if not self.shown:
            return
        self.shown = False
        if self._tqdm is not None:
            self._tqdm.close()
        elif self._file:
            self._emit(closed=True)

    def __enter__(self) -> "Bar":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Follower:
    """Draw on this console the bars that a notebook's kernel writes to ``path`` (a thread; ``stop`` ends it).

    On a terminal the bars redraw in place, and a transient bar (``leave=False``: one extraction) appears only
    once it has run for 2 s. In a log file (CI) only the lasting bars (a training run) are written, at most every
    30 s and when they close."""

    def __init__(self, path: Path, stream=None, poll: float = 0.5):
        self.path, self.stream, self.poll = Path(path), stream or sys.stderr, poll
        self.bars: dict = {}
        self._offset = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> "Follower":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self._read()
        for bar in self.bars.values():
            bar.close()
        self.bars.clear()

    def _run(self) -> None:
        while not self._stop.wait(self.poll):
            self._read()

    def _read(self) -> None:
        try:
            with open(self.path) as f:
                f.seek(self._offset)
                chunk = f.read()
        except FileNotFoundError:
            return
        complete = chunk[:chunk.rfind("\n") + 1]  # a line still being written is read next time
        self._offset += len(complete.encode())
        for line in complete.splitlines():
            try:
                self._show(json.loads(line))
            except (ValueError, KeyError, TypeError):
                continue

    def _show(self, e: dict) -> None:
        from tqdm import tqdm

        bar = self.bars.get(e["id"])
        if bar is None:
            tty = getattr(self.stream, "isatty", lambda: False)()
            if not tty and not e["leave"]:
                return
            bar = self.bars[e["id"]] = tqdm(total=e["total"], desc=e["desc"], unit=e["unit"], leave=e["leave"],
                                           file=self.stream, dynamic_ncols=True, position=len(self.bars),
                                           delay=0 if e["leave"] else 2.0, mininterval=0.5 if tty else 30.0,
                                           maxinterval=10.0 if tty else 1e9)
        bar.update(e["n"] - bar.n)
        if e["closed"]:
            bar.close()
            del self.bars[e["id"]]


def started(path: Path) -> Follower:
    """Truncate ``path`` and follow it."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("")
    return Follower(path).start()
