"""Output folders: the package never deletes or overwrites a file that it did not write.

Two tools, for the two ways the package writes into a folder the user names:

- :class:`FolderManifest`, for a job that owns a folder and starts afresh on every rerun (``cnndiff demo``). The job
  records, in a manifest file inside the folder, every file it wrote (with its size and modification time) and,
  while a step runs, which entry the step is writing and the names that step gives its files. A rerun removes
  exactly the files the manifest lists, or that an interrupted step wrote, and refuses -- before removing
  anything -- when the folder is not such a folder, when a listed file was changed since, or when any other file
  sits where the job writes.
- :func:`place_files`, for a job that adds files to a folder the user shares with other work (``cnndiff plot``):
  the files are drawn in a staging folder, then moved into place only if none of their names is taken (or the
  caller said to overwrite), so a refusal leaves the folder as it was.

And two for names that come from the data (a store or result file is a folder anyone can send): :func:`safe_name`
turns a layer, set or image name into a file-name component, and :func:`check_inside` refuses a path that would
resolve outside the output folder. Every figure writer (``plot.save`` with its ``folder``) and :func:`place_files`
check every path they create.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from .extraction.lock import pid_alive

__all__ = ["FolderManifest", "OutputExistsError", "OutputFolderError", "check_inside", "place_files", "safe_name",
           "staging_folder", "taken"]

#: How many offending paths a refusal names before it says "and N more".
MAX_LISTED = 8


class OutputFolderError(ValueError):
    """The output folder cannot be used without deleting or overwriting files the package did not write; the
    message says which files and what to do."""


class OutputExistsError(FileExistsError):
    """Output files exist already and the caller did not ask to overwrite them; the message names them."""


def _listing(paths: Sequence[Path | str]) -> str:
    shown = [str(p) for p in paths[:MAX_LISTED]]
    more = f" and {len(paths) - MAX_LISTED} more" if len(paths) > MAX_LISTED else ""
    return ", ".join(shown) + more


def _signature(path: Path) -> list[int]:
    """Size and modification time: what tells a file the job wrote from the same name changed since."""
    st = path.lstat()
    return [st.st_size, st.st_mtime_ns]


def _files_under(folder: Path, entry: str) -> list[str]:
    """Every file (and symbolic link, never followed) under ``folder / entry``, as POSIX paths relative to
    ``folder``."""
    root = folder / entry
    if root.is_symlink() or root.is_file():
        return [entry]
    if not root.is_dir():
        return [entry] if os.path.lexists(root) else []
    found = []
    for here, dirs, files in os.walk(root):
        rel = Path(here).relative_to(folder)
        found += [(rel / name).as_posix() for name in files]
        # a link to a folder is not the job's: list it as a file so that it is refused, never walked or deleted
        found += [(rel / name).as_posix() for name in dirs if (Path(here) / name).is_symlink()]
    return sorted(found)


def _prune_empty_dirs(folder: Path, entry: str) -> None:
    """Remove the empty folders under (and including) ``folder / entry``, deepest first; never a file."""
    root = folder / entry
    if not root.is_dir() or root.is_symlink():
        return
    for here, _, _ in sorted(os.walk(root), key=lambda walked: -len(Path(walked[0]).parts)):
        with contextlib.suppress(OSError):  # not empty: a file the job did not write stays, with its folder
            Path(here).rmdir()


class FolderManifest:
    """The record of what one job wrote into its output folder, kept in ``folder / name`` (JSON).

    Use :meth:`claim` to make a folder ready for a fresh run, then for each step :meth:`begin` (the entry it
    writes and the pattern of the names it gives its files) and :meth:`record` (the files it wrote), and
    :meth:`finish` at the end. The manifest is saved after each call, so an interrupted run leaves a manifest that a
    rerun can clean up after.

    Parameters
    ----------
    folder
        The output folder.
    name
        The manifest's file name inside ``folder`` (e.g. ``.cnndiff-demo.json``).
    job
        Who writes, for messages (e.g. ``cnndiff demo``).
    entries
        The top-level names (files or folders) the job writes into; a rerun refuses any other file under them.
    """

    def __init__(self, folder: Path, *, name: str, job: str, entries: Sequence[str]) -> None:
        self.folder = folder
        self.path = folder / name
        self.job = job
        self.entries = tuple(entries)
        self.files: dict[str, list[int]] = {}
        self.pending: dict[str, str] = {}  # entry -> regular expression of the relative paths its step writes

    # ---------------------------------------------------------------------------------------------- claiming
    @classmethod
    def claim(cls, folder: str | Path, *, name: str, job: str, entries: Sequence[str],
              remedy: str = "") -> FolderManifest:
        """Make ``folder`` ready for a fresh run of ``job`` and return its new (empty) manifest.

        A missing or empty folder is created/used. A folder with files and no manifest is refused. A folder with a
        manifest has the files it lists (and those an interrupted step wrote) removed, unless some file under
        ``entries`` was not written by the job, or was changed since: then nothing is removed and the run is
        refused. Files outside ``entries`` are never looked at.

        Raises
        ------
        OutputFolderError
            The folder cannot be used; the message names the files in the way and ends with ``remedy``.
        """
        folder = Path(folder)
        manifest = cls(folder, name=name, job=job, entries=entries)
        if os.path.lexists(folder) and not folder.is_dir():
            raise OutputFolderError(f"{folder} is a file, not a folder. {remedy}".strip())
        if not manifest.path.exists():
            others = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
            if others:
                raise OutputFolderError(
                    f"{folder} is not empty ({_listing(others)}) and is not a folder that {job} wrote (it has no "
                    f"{name}). {job} writes only into a new or empty folder, or into one it wrote before, so that it "
                    f"never overwrites or deletes your files. {remedy}".strip())
            folder.mkdir(parents=True, exist_ok=True)
        else:
            manifest._clear_previous_run(remedy)
        manifest._save(running=True)
        return manifest

    def _clear_previous_run(self, remedy: str) -> None:
        """Delete what the previous run recorded, after checking that nothing else is in the way."""
        try:
            previous = json.loads(self.path.read_text())
            files = {str(k): list(v) for k, v in previous["files"].items()}
            pending = {str(k): re.compile(str(v)) for k, v in previous.get("pending", {}).items()}
            running = previous.get("running")
        except (OSError, ValueError, KeyError, TypeError, AttributeError, re.error) as err:
            raise OutputFolderError(
                f"{self.path} is not a manifest that {self.job} can read ({type(err).__name__}: {err}), so it "
                f"cannot tell its files from yours in {self.folder}. {remedy}".strip()) from None
        if isinstance(running, Mapping) and running.get("host") == socket.gethostname() \
                and isinstance(running.get("pid"), int) and running["pid"] != os.getpid() \
                and pid_alive(running["pid"]):
            raise OutputFolderError(
                f"{self.job} (pid {running['pid']}) is writing into {self.folder} now; wait for it to finish, or "
                f"stop it. {remedy}".strip())
        ours: list[str] = []
        changed: list[str] = []
        foreign: list[str] = []
        for entry in self.entries:
            for rel in _files_under(self.folder, entry):
                if rel in files:
                    (ours if _signature(self.folder / rel) == files[rel] else changed).append(rel)
                elif any(pattern.fullmatch(rel) for pattern in pending.values()) \
                        and not (self.folder / rel).is_symlink():
                    ours.append(rel)  # written by a step that was interrupted before it could record its files
                else:
                    foreign.append(rel)
        if changed or foreign:
            why = []
            if foreign:
                why.append(f"files that {self.job} did not write: {_listing([self.folder / f for f in foreign])}")
            if changed:
                why.append(f"files that {self.job} wrote and that were changed since: "
                           f"{_listing([self.folder / f for f in changed])}")
            raise OutputFolderError(
                f"{self.folder} was written by {self.job}, but where a rerun writes ({', '.join(self.entries)}) it "
                f"now holds {'; and '.join(why)}. {self.job} never deletes or overwrites them: move them out of "
                f"those places (other files in {self.folder} are left alone). {remedy}".strip())
        for rel in ours:
            (self.folder / rel).unlink()
        for entry in self.entries:
            _prune_empty_dirs(self.folder, entry)

    # --------------------------------------------------------------------------------------------- recording
    def begin(self, entry: str, pattern: str) -> None:
        """Say that a step starts writing ``entry``; ``pattern`` (a regular expression on POSIX paths relative to
        the folder) matches every file the step may write, so that a rerun after an interruption removes them."""
        if entry not in self.entries:
            raise ValueError(f"entry {entry!r} is not one of {self.entries}")
        self.pending[entry] = pattern
        self._save(running=True)

    def record(self, paths: Sequence[str | Path], *, entry: str | None = None) -> None:
        """Record files the job wrote (absolute, or relative to the folder); ``entry``: the step that wrote them is
        done."""
        for path in paths:
            full = Path(path) if Path(path).is_absolute() else self.folder / path
            rel = full.relative_to(self.folder).as_posix()
            self.files[rel] = _signature(full)
        if entry is not None:
            self.pending.pop(entry, None)
        self._save(running=True)

    def record_tree(self, entry: str) -> None:
        """Record every file under ``entry`` (written by the step that just finished) and close that step."""
        self.record(_files_under(self.folder, entry), entry=entry)

    def finish(self) -> None:
        """The run is complete: nothing is pending and no process writes here any more."""
        self.pending.clear()
        self._save(running=False)

    def total_bytes(self, prefix: str = "") -> int:
        """Bytes of the recorded files whose relative path starts with ``prefix``."""
        return sum(size for rel, (size, _) in self.files.items() if rel.startswith(prefix))

    def _save(self, *, running: bool) -> None:
        record: dict[str, Any] = {
            "written_by": self.job,
            "note": f"{self.job} deletes only the files listed here when it runs again in this folder",
            "running": {"pid": os.getpid(), "host": socket.gethostname()} if running else None,
            "pending": self.pending,
            "files": self.files,
        }
        # write a complete file and rename it over the old one: a crash never leaves half a manifest
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(record, indent=1, sort_keys=True))
        os.replace(tmp, self.path)


# ---------------------------------------------------------------------------------------------- placing files
@contextlib.contextmanager
def staging_folder(target: str | Path) -> Iterator[Path]:
    """A temporary folder inside ``target`` (created if missing) to draw files in, removed on exit. It is on the
    same file system as ``target``, so :func:`place_files` moves by renaming."""
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".cnndiff-staging-", dir=target))
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def taken(target: str | Path, names: Sequence[str | Path]) -> list[Path]:
    """Which of ``names`` (relative to ``target``) exist already, or cannot be created because a file stands where
    one of their folders goes."""
    target = Path(target)
    found = []
    for name in names:
        path = target / name
        blocked = any(os.path.lexists(target / parent) and not (target / parent).is_dir()
                      for parent in Path(name).parents if str(parent) != ".")
        if os.path.lexists(path) or blocked:
            found.append(path)
    return found


def place_files(staged: Sequence[Path], staging: Path, target: str | Path, *, overwrite: bool,
                option: str = "--overwrite") -> list[Path]:
    """Move the ``staged`` files (inside ``staging``) to the same relative paths under ``target``.

    Every name is checked before anything moves: an existing file is refused unless ``overwrite`` (then it is
    replaced); a folder, or a file standing where a folder goes, is always refused. Files in ``target`` with other
    names are never touched. Returns the paths in ``target``.

    Raises
    ------
    OutputExistsError
        Some names are taken; nothing was moved. The message names them and ``option``.
    OutputFolderError
        A name would land outside ``target`` (:func:`check_inside`: a folder of ``target`` that is a link to
        elsewhere); nothing was moved.
    """
    target = Path(target)
    relative = [Path(p).relative_to(staging) for p in staged]
    for rel in relative:  # a folder of the target that is a link to elsewhere would carry the file out of it
        check_inside(target / rel, target, label=rel.as_posix(), renamed_onto=True)
    clashes = taken(target, relative)
    blocking = [p for p in clashes if (p.is_dir() and not p.is_symlink()) or not os.path.lexists(p)]
    if blocking:
        raise OutputExistsError(f"cannot write {_listing(blocking)}: a folder, or a file where a folder goes, is in "
                                "the way; move it, or choose another output folder")
    if clashes and not overwrite:
        raise OutputExistsError(f"{_listing(clashes)} exist(s) already; pass {option} to replace them, or choose "
                                "another output folder")
    placed = []
    for source, rel in zip(staged, relative, strict=True):
        destination = target / rel
        destination.parent.mkdir(parents=True, exist_ok=True)
        os.replace(source, destination)
        placed.append(destination)
    return placed


# ------------------------------------------------------------------------------------------ names from the data
# A store or a result file is a folder anyone can send: its layer, set and image names are data, and a name that
# becomes part of a file name must never steer the file out of the output folder, hide it (a leading dot), clash with
# another label's file, or smuggle control characters into a listing.

#: A label kept as it is in a file name: ASCII letters, digits and ``_ . + -``, not starting with a dot or a dash, at
#: most 80 characters. Keras' layer names (``block1_conv1``, ``Conv1_relu``) and the package's own set names
#: (``white_noise``) are of this kind.
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,79}")

#: Names Windows reserves for devices (with any extension): a figure named ``CON.png`` cannot be written there.
_RESERVED_NAMES = frozenset({"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)),
                             *(f"LPT{i}" for i in range(1, 10))})

#: How much of an escaped label's text its file name keeps (the digest that follows keeps labels apart).
ESCAPED_NAME_CHARS = 48


def safe_name(label: object) -> str:
    """``label`` (a layer, set or image name read from a store or a result) as one file-name component.

    A plain label (:data:`_PLAIN_NAME`, no ``..``, no trailing dot, not a Windows device name) is returned unchanged,
    so that ordinary names give the file names they always gave. Any other label -- holding a path separator, ``..``,
    a control character, a leading dot, non-ASCII text, or too long -- becomes its first
    :data:`ESCAPED_NAME_CHARS` letters, digits, ``_``, ``+`` and ``-`` (other characters as ``_``) followed by ``~``
    and 12 hex digits of the label's blake2b digest. Plain names never contain ``~``, so distinct labels give distinct
    names (up to a 48-bit digest collision between escaped ones).
    """
    text = str(label)
    if _PLAIN_NAME.fullmatch(text) and ".." not in text and not text.endswith(".") \
            and text.split(".", 1)[0].upper() not in _RESERVED_NAMES:
        return text
    readable = "".join(ch if ch.isalnum() or ch in "_+-" else "_" for ch in text[:ESCAPED_NAME_CHARS])
    if readable.startswith("-"):  # a file name that reads as an option to the shell's commands
        readable = "_" + readable[1:]
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=6).hexdigest()
    return f"{readable}~{digest}"


def check_inside(path: str | Path, folder: str | Path, *, label: object = None, renamed_onto: bool = False) -> Path:
    """``path``, refused unless it resolves (symbolic links followed, ``..`` collapsed) to a place strictly inside
    ``folder``: the last check before a writer creates a file whose name was made from data.

    ``renamed_onto``: the file is created by renaming onto ``path`` (:func:`place_files`), which replaces a link
    standing there rather than writing through it, so only its folders are resolved.

    Raises
    ------
    OutputFolderError
        ``path`` would land outside ``folder``; the message names the label it was made from (``label``) and the
        remedy.
    """
    path, folder = Path(path), Path(folder)
    real_folder = folder.resolve()
    real = path.parent.resolve() / path.name if renamed_onto and path.name not in ("", ".", "..") else path.resolve()
    if real != real_folder and real.is_relative_to(real_folder):
        return path
    made_from = f" (its name was made from {label!r}, a name read from the data)" if label is not None else ""
    raise OutputFolderError(
        f"refusing to write {path}{made_from}: it resolves to {real}, outside the output folder {folder}. A name in "
        "the data may not lead outside the output folder, nor may a symbolic link inside the folder; remove the link, "
        "or choose another output folder.")
