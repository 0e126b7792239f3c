"""How much disk a running process holds, deleted-but-open files included (for `--stream`)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path


class DiskSampler:
    """Samples, every few milliseconds, the bytes a process holds on disk under `folders`: the
    blocks of every file there, plus those of files it deleted but still holds open (seen in
    /proc/<pid>/fd as "(deleted)"), which still take space until closed."""

    def __init__(self, folders: list[Path], pid: int) -> None:
        self.folders = folders
        self.pid = pid
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _held(self) -> int:
        total = 0
        for root, _, files in (walked for folder in self.folders for walked in os.walk(folder)):
            for name in files:
                try:
                    total += os.lstat(os.path.join(root, name)).st_blocks * 512
                except FileNotFoundError:
                    continue
        fds = Path(f"/proc/{self.pid}/fd")
        try:
            entries = list(fds.iterdir())
        except (FileNotFoundError, ProcessLookupError):
            return total
        for entry in entries:
            try:
                if os.readlink(entry).endswith("(deleted)"):
                    total += os.stat(entry).st_blocks * 512
            except (FileNotFoundError, ProcessLookupError):
                continue
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._held())
            self.samples += 1
            time.sleep(0.002)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak
