"""Files the measuring tools write: checked before any compute, written so that a kill or a full
disk never leaves a half-written result that looks whole."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

# What matplotlib's Agg canvas writes; an output name with another suffix is refused up front
# instead of failing (or gaining a ".png") after all the compute.
FIGURE_FORMATS = ("png", "pdf", "svg", "svgz", "eps", "ps", "jpg", "jpeg", "tif", "tiff", "webp", "pgf", "raw", "rgba")


_UMASK = os.umask(0)
os.umask(_UMASK)


class OutputError(ValueError):
    pass


def writable_dir(path, what: str = "--out") -> Path:
    """Create `path` (and its parents) if needed and prove a file can be written there."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{what} {str(path)!r} is a file, but a folder is written there; pass a folder path")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".vidtok-write-test-"):
            pass
    except OSError as error:
        raise OutputError(f"cannot write to {what} {str(path)!r} ({error.strerror or error}); choose a writable folder") from error
    return path


def figure_target(path, what: str = "--out") -> tuple[Path, str]:
    """(path, format) for a figure: the suffix names the format; no suffix writes exactly `path`
    as PNG (matplotlib would otherwise append ".png"). The folder is checked for writability."""
    path = Path(path)
    suffix = path.suffix[1:].lower()
    if suffix and suffix not in FIGURE_FORMATS:
        raise OutputError(
            f"{what} {str(path)!r}: cannot write a figure as {suffix!r}; use one of .{', .'.join(FIGURE_FORMATS[:4])} "
            "(or no suffix for a PNG at exactly that path)"
        )
    if path.is_dir():
        raise OutputError(f"{what} {str(path)!r} is a folder; give a file name such as {str(path / 'figure.png')!r}")
    writable_dir(path.parent if str(path.parent) else Path("."), what=f"the folder of {what}")
    if path.exists() and not os.access(path, os.W_OK):
        raise OutputError(f"{what} {str(path)!r} exists and is read-only; choose another path or make it writable")
    return path, suffix or "png"


def atomic_write_text(path, text: str) -> None:
    """Write-then-rename: readers see the old file or the new one, never a truncated one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; results are ordinary files
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path, data) -> None:
    atomic_write_text(path, json.dumps(data, indent=1) + "\n")


class JsonlLog:
    """Append-only JSONL, one line per record, each flushed to the OS as it is written: a killed
    process loses at most the line being written. `append(..., durable=False)` leaves the fsync
    to a later `sync()` (once per batch of lines): a crash of the machine itself may then lose
    the lines since the last sync, which are recomputed on resume like any missing line.

    Reading back: a last line without its newline (or that is not JSON) is a torn write; it is
    reported, cut off, and its record is missing (to be recomputed). A damaged line elsewhere is
    reported and dropped the same way.
    """

    def __init__(self, path):
        self.path = Path(path)
        self._file = None
        self._unsynced = False

    def read(self, check=None) -> tuple[list[dict], list[str]]:
        """(records, problems found) ; repairs the file so that appending continues cleanly.

        `check(record)`: why a JSON object is still not a usable record, or None; such a line
        counts as damaged like one that is not JSON."""
        if not self.path.is_file():
            return [], []
        data = self.path.read_bytes()
        lines = data.split(b"\n")
        complete, tail = lines[:-1], lines[-1]  # after the last newline: b"" when the file ends cleanly
        records, problems, good = [], [], []
        for n, line in enumerate(complete, start=1):
            try:
                record = json.loads(line)
                why = "not a JSON object" if not isinstance(record, dict) else check(record) if check else None
            except ValueError:
                why = "not a JSON object"
            if why:
                if line.strip():
                    problems.append(f"{self.path} line {n} is damaged ({why}); dropped, its sample is recomputed")
                continue
            records.append(record)
            good.append(line)
        if tail:
            problems.append(
                f"{self.path} line {len(complete) + 1} is truncated (a write was interrupted); dropped, its sample is recomputed"
            )
        if problems:  # keep only whole, readable lines, atomically
            atomic_write_text(self.path, "".join(line.decode() + "\n" for line in good))
        return records, problems

    def append(self, record: dict, durable: bool = True) -> None:
        if self._file is None:
            self._file = open(self.path, "a")
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()  # in the OS's hands: a kill of this process no longer loses it
        self._unsynced = True
        if durable:
            self.sync()

    def sync(self) -> None:
        """fsync what was appended since the last sync (nothing to do if nothing was)."""
        if self._file is not None and self._unsynced:
            os.fsync(self._file.fileno())
        self._unsynced = False

    def close(self) -> None:
        if self._file is not None:
            self.sync()
            self._file.close()
            self._file = None
