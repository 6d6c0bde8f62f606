"""Which files of an output folder saliencycheck wrote, so it deletes only those.

An output folder is *owned* once it holds ``.saliencycheck/manifest.json``: every file a run,
shard or merge writes there is recorded in it (path relative to the folder → SHA-256). Names
are *reserved* (recorded as pending) before their files are written, so an interrupt or a
full disk between a write and its record never leaves a file of saliencycheck's that the next
run takes for the user's. A fresh run removes the previous run's files from that list and
nothing else; a listed file whose content changed since (a user edited or replaced it) is
never overwritten (:meth:`OutputFolder.check_free` refuses the run) and never deleted (kept,
with a warning).
A folder that is not empty and has no manifest was not created by saliencycheck (``-o
paper``, ``-o "$UNSET"`` = the current folder): it is refused unless ``force``, and even
then only files saliencycheck writes from then on are ever deleted.

Shards of one job array record their units into the same folder at once, so every update of
the manifest is a read-modify-write under an exclusive ``flock`` of a lock file beside it.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import uuid
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from saliencycheck.atomic import TMP_SUFFIX, atomic_write_text
from saliencycheck.errors import ConfigError, StoreError

STATE_DIR = ".saliencycheck"  # saliencycheck's own bookkeeping inside an output folder
MANIFEST = "manifest.json"
ERROR_LOG = "error.log"  # an internal error's traceback, written by the CLI
# Files a folder may hold and still count as empty (version-control and desktop markers).
EMPTY_MARKERS = {".gitkeep", ".gitignore", ".DS_Store"}
UNSUPPORTED_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}
PENDING = ""  # the manifest's hash of a reserved name: saliencycheck's whatever it holds


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class OutputFolder:
    """An output folder saliencycheck owns (see :meth:`claim`)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.state = root / STATE_DIR

    @classmethod
    def claim(cls, root: Path, *, force: bool = False, field: str = "output.dir",
              change: str | None = None, forcing: str = "pass --force") -> OutputFolder:
        """Take ``root`` as an output folder: create it (and its manifest) when missing or
        empty, accept it when saliencycheck created it, and otherwise refuse it unless
        ``force``. ``field`` names the setting the user changes (e.g. 'my.yaml: output.dir'),
        ``change`` and ``forcing`` how (default: the CLI's ``-o`` and ``--force``)."""
        change = change or f"set {field} (or -o)"
        folder = cls(root)
        if root.exists() and not root.is_dir():
            raise ConfigError(f"{field}: {root} is a file, not a folder; {change} "
                              "to a folder")
        manifest = folder.state / MANIFEST
        if manifest.is_file():
            folder.owned()  # a corrupt manifest is refused here, before any work
            try:
                cls.probe(root)
            except OSError as exc:
                raise ConfigError(f"{field}: cannot write to {root} ({exc.strerror or exc}); "
                                  f"{change} to a writable folder") from None
            return folder
        foreign = [p.name for p in _entries(root) if p.name not in EMPTY_MARKERS]
        if foreign and not force:
            shown = ", ".join(sorted(foreign)[:3]) + (", ..." if len(foreign) > 3 else "")
            older = (" (an output folder of an older saliencycheck without a manifest)"
                     if (root / "units").is_dir() else "")
            raise ConfigError(
                f"{field}: {root} is not empty ({shown}) and was not created by "
                f"saliencycheck{older}; {change} to a new or empty folder, or {forcing} "
                "to write into it (saliencycheck then deletes only files it writes)")
        try:
            folder.state.mkdir(parents=True, exist_ok=True)
            with folder._locked():
                if not manifest.is_file():
                    folder._write({})
        except OSError as exc:
            raise ConfigError(f"{field}: cannot write to {root} "
                              f"({exc.strerror or type(exc).__name__}); {change} to a "
                              "writable folder") from None
        return folder

    @staticmethod
    def probe(folder: Path) -> None:
        """Write and remove a file in ``folder``: raises OSError where nothing can be written
        (read-only, a refusing file system), before any work is done."""
        probe = folder / f".write-probe-{uuid.uuid4().hex}{TMP_SUFFIX}"
        probe.write_bytes(b"")
        probe.unlink()

    def owned(self) -> dict[str, str]:
        """The files saliencycheck wrote here: relative path → SHA-256 when written."""
        path = self.state / MANIFEST
        try:
            data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
            files = data.get("files", {}) if isinstance(data, dict) else None
            if not isinstance(files, dict):
                raise ValueError("no 'files' mapping")
        except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError too
            raise StoreError(f"{path} is corrupt ({type(exc).__name__}), so saliencycheck "
                             "cannot tell which files it wrote; delete that file and pass "
                             "--force (nothing is then deleted), or use another output "
                             "folder") from None
        return files

    def record(self, paths: Iterable[Path]) -> None:
        """Add the files at ``paths`` (inside the folder) with their current SHA-256."""
        hashes = {self.relative(p): file_sha256(p) for p in paths if p.is_file()}
        if hashes:
            with self._locked():
                self._write({**self.owned(), **hashes})

    def reserve(self, names: Iterable[str]) -> None:
        """Record the relative ``names`` about to be written as saliencycheck's (pending),
        keeping the hash of those already recorded."""
        with self._locked():
            owned = self.owned()
            self._write({**{name: PENDING for name in names}, **owned})

    def settle(self) -> None:
        """Once a report is complete: give the reserved names that were written their hash,
        and forget those that were not."""
        with self._locked():
            owned = self.owned()
            for name in [n for n, recorded in owned.items() if recorded == PENDING]:
                path = self.root / name
                if path.is_file():
                    owned[name] = file_sha256(path)
                else:
                    del owned[name]
            self._write(owned)

    def remove(self, names: Iterable[str] = (), *, under: Iterable[str] = ()) -> list[str]:
        """Delete the owned files named (relative paths) or lying under the given relative
        folders, and the folders left empty. A file changed since it was written is kept,
        with a warning, and returned."""
        prefixes = tuple(f"{folder.rstrip('/')}/" for folder in under)
        wanted = set(names)
        kept: list[str] = []
        with self._locked():
            owned = self.owned()
            for name in sorted(n for n in owned if n in wanted or n.startswith(prefixes)):
                path = self.root / name
                if self._changed(path, owned[name]):
                    kept.append(name)
                    continue
                path.unlink(missing_ok=True)
                del owned[name]
                _prune_empty(path.parent, stop=self.root)
            self._write(owned)
        if kept:
            shown = ", ".join(kept[:3]) + (", ..." if len(kept) > 3 else "")
            warnings.warn(f"{self.root}: kept {len(kept)} file(s) saliencycheck wrote but that "
                          f"changed since ({shown}); delete them yourself if they are stale",
                          stacklevel=2)
        return kept

    def check_free(self, names: Iterable[str]) -> None:
        """Raise StoreError naming the first of ``names`` (relative paths saliencycheck is
        about to write) that holds a file saliencycheck did not write (possible only in a
        folder taken with --force) or one it wrote that changed since (a user edited it):
        writing there would destroy the user's file."""
        owned = self.owned()
        for name in names:
            path = self.root / name
            if name not in owned and path.exists():
                raise StoreError(f"{path} exists and was not written by saliencycheck, which "
                                 "would overwrite it; move it, or set output.dir (or -o) to "
                                 "another folder")
            if name in owned and self._changed(path, owned[name]):
                raise StoreError(f"{path} changed since saliencycheck wrote it (edited?) and "
                                 "this run would overwrite it; move it out of the folder (or "
                                 "delete it) and run again")

    def is_ours(self, name: str) -> bool:
        """Whether the relative ``name`` may be overwritten: recorded, and unchanged since."""
        owned = self.owned()
        return name in owned and not self._changed(self.root / name, owned[name])

    @staticmethod
    def _changed(path: Path, recorded: str) -> bool:
        return recorded != PENDING and path.is_file() and file_sha256(path) != recorded

    def relative(self, path: Path) -> str:
        return path.resolve().relative_to(self.root.resolve()).as_posix()

    def _write(self, files: dict[str, str]) -> None:
        atomic_write_text(self.state / MANIFEST, json.dumps(
            {"created_by": "saliencycheck", "files": dict(sorted(files.items()))}, indent=0))

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """An exclusive lock for one read-modify-write of the manifest (file systems without
        ``flock`` go unlocked: the folder lock already keeps runs apart there)."""
        self.state.mkdir(parents=True, exist_ok=True)
        with (self.state / "manifest.lock").open("a") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX)
            except OSError as exc:
                if exc.errno not in UNSUPPORTED_LOCKS:
                    raise
            yield


def check_apart(output: Path, images: Path, paths: Iterable[Path], *, field: str) -> None:
    """Refuse an output folder that the images' search reaches, or that holds the images'
    folder: the next run would read its own figures as images, and a fresh run's clean-up
    would reach into the images. ``images`` is images.path resolved: a folder (searched
    recursively), a glob (its fixed leading folders, taken as searched recursively), or a list
    or single file (then only the listed ``paths`` count)."""
    out = output.resolve()
    root = _search_root(images)
    if root is not None:
        searched = root.resolve()
        if out == searched or searched in out.parents:
            raise ConfigError(f"{field}: the output folder {output} is inside the images' "
                              f"folder {root} (images.path), so a run would read its own "
                              "figures as images; set it (or -o) to a folder outside it")
        if out in searched.parents:
            raise ConfigError(f"{field}: the output folder {output} holds the images' folder "
                              f"{root} (images.path); set it (or -o) to a folder beside it")
        return
    inside = next((p for p in paths if out in p.resolve().parents), None)
    if inside is not None:
        raise ConfigError(f"{field}: image {inside} lies inside the output folder {output}; "
                          "set it (or -o) to a folder that holds no input image")


def _search_root(images: Path) -> Path | None:
    """The folder images.path searches: itself, or the fixed leading part of a glob; None
    for a list or a single file."""
    if images.is_dir():
        return images
    parts = images.parts
    magic = next((i for i, part in enumerate(parts) if any(ch in part for ch in "*?[")), None)
    if magic is None:
        return None
    return Path(*parts[:magic]) if magic else Path(".")


def _entries(root: Path) -> list[Path]:
    try:
        return list(root.iterdir())
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise ConfigError(f"cannot read {root} ({exc.strerror}); choose a readable folder") \
            from None


def _prune_empty(folder: Path, *, stop: Path) -> None:
    """Remove ``folder`` and its parents up to ``stop`` while they are empty."""
    while folder != stop and stop in folder.parents:
        try:
            folder.rmdir()
        except OSError:  # not empty (or gone): stop here
            return
        folder = folder.parent
