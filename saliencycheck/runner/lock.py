"""One run per output folder at a time: an OS file lock, released on any exit.

``run``, ``--resume`` and ``merge`` hold the folder's lock exclusively; the shards of a Slurm
array (``--shard I/N``) hold it shared, so they run side by side into one folder while no
run or merge can start there, and no shard can join a folder a run is using. The lock is a
``flock`` on ``.saliencycheck/lock``: the kernel releases it when the process ends, however
it ends (``kill -9`` included), so a lock never outlives its holder. Each holder also leaves
a small file naming itself (PID, host, start time, command), which the refusal quotes; a
holder file whose process is gone (same host, PID not alive) is stale and removed. On file
systems without ``flock`` (some network mounts) those holder files are the lock, and the
PID check is what detects a stale one.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from saliencycheck.errors import StoreError
from saliencycheck.runner.ownership import STATE_DIR, UNSUPPORTED_LOCKS

HOLDER = "holder-"
# Folders this process holds (resolved → shared): the CLI takes the lock before loading the
# model and the runner takes it again for API callers; the inner acquisition is a no-op.
_HELD: dict[Path, bool] = {}


@dataclass(frozen=True)
class Holder:
    """Who holds (or held) a folder's lock."""

    pid: int
    host: str
    started: float  # time.time()
    command: str
    shared: bool

    def alive(self) -> bool:
        """False only when provably gone: a PID not running on this host."""
        if self.host != socket.gethostname():
            return True  # another node: cannot tell, assume it runs
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # exists, owned by another user
            return True
        return True

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        return f"PID {self.pid} on {self.host}, started {when}: {self.command}"


class FolderLock:
    """Hold ``folder``'s lock while in the ``with`` block (``shared`` for shards);
    re-entering a folder this process already holds is a no-op."""

    def __init__(self, folder: Path, *, shared: bool = False) -> None:
        self.state = folder / STATE_DIR
        self.folder = folder
        self.shared = shared
        self.me = Holder(os.getpid(), socket.gethostname(), time.time(),
                         " ".join(["saliencycheck", *sys.argv[1:]])[:300], shared)
        self._file = None
        self._holder_file = self.state / f"{HOLDER}{self.me.host}-{self.me.pid}.json"

    def __enter__(self) -> FolderLock:
        self._key = key = self.folder.resolve()
        self._reentered = key in _HELD and (not _HELD[key] or self.shared)
        if self._reentered:
            return self
        self.state.mkdir(parents=True, exist_ok=True)
        self._file = (self.state / "lock").open("a")
        mode = fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX
        try:
            fcntl.flock(self._file, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            self._refuse(self._live_holders())
        except OSError as exc:
            if exc.errno not in UNSUPPORTED_LOCKS:
                raise
            self._by_holder_files()  # no flock here: the holder files are the lock
        else:
            self._remove_stale()  # we hold the lock: files of other exclusive holders are stale
        self._holder_file.write_text(json.dumps(self.me.__dict__), encoding="utf-8")
        _HELD[key] = self.shared
        return self

    def __exit__(self, *exc: object) -> None:
        if self._reentered:
            return
        del _HELD[self._key]
        self._holder_file.unlink(missing_ok=True)
        self._release_file()

    def _by_holder_files(self) -> None:
        live = self._live_holders()
        if any(not (h.shared and self.shared) for h in live):
            self._refuse(live)

    def _live_holders(self) -> list[Holder]:
        """The recorded holders still running; the files of the others are removed."""
        live = []
        for path in sorted(self.state.glob(f"{HOLDER}*.json")):
            holder = _read_holder(path)
            if holder is None or not holder.alive():
                path.unlink(missing_ok=True)
            else:
                live.append(holder)
        return live

    def _remove_stale(self) -> None:
        """Holding the lock proves who else cannot: every other holder file when exclusive,
        the exclusive ones when shared (and, always, those of dead processes)."""
        for path in self.state.glob(f"{HOLDER}*.json"):
            holder = _read_holder(path)
            if holder is None or not (self.shared and holder.shared) or not holder.alive():
                path.unlink(missing_ok=True)

    def _refuse(self, live: list[Holder]) -> None:
        self._release_file()
        blocking = [h for h in live if not (h.shared and self.shared)] or live
        who = blocking[0].describe() if blocking else "a process that left no record"
        kind = ("shards of an array job" if blocking and all(h.shared for h in blocking)
                else "another saliencycheck run")
        raise StoreError(f"{self.folder} is in use by {kind} ({who}); wait for it to finish, "
                         "or set output.dir (or -o) to another folder")

    def _release_file(self) -> None:
        if self._file is not None:
            self._file.close()  # closing releases the flock
            self._file = None


def _read_holder(path: Path) -> Holder | None:
    try:
        return Holder(**json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        return None

