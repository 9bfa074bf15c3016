"""The search journal: ``DIR/journal.jsonl``, append-only, one JSON object a line, fsynced after every line.

Line 1 is a header carrying the search's config fingerprint and the space name; every later line is an event
(``created``, ``band``, ``hurdle``, ``finished``, ``failed``, see ``effjax.search.evolution``). Everything the
search knows (population, history, hurdle statistics, the next id) is derived by replaying these lines, so the
journal is the only state a search keeps (§5.7 of ``shared/methods/search.md``).

A crash in the middle of a write leaves a torn last line (no newline): reading ignores it and the first append
truncates it. Opening a journal written under another fingerprint raises and leaves the file untouched.
"""

import hashlib
import json
import os
import time

FILENAME = "journal.jsonl"
VERSION = 1


def _canonical(config: dict) -> str:
    try:
        return json.dumps(config, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"the search config must hold plain JSON types only ({e}): convert it (e.g. "
                         "config.to_dict()) before passing it as the fingerprint") from None


def fingerprint(config: dict) -> str:
    """A stable hash (16 hex digits) of a plain dict: key order and tuple/list do not matter."""
    return hashlib.sha256(_canonical(config).encode()).hexdigest()[:16]


def read(path: str) -> tuple[dict | None, list[dict], int]:
    """``(header, events, valid_bytes)`` of a journal file; a torn last line is left out of ``valid_bytes``.
    A missing or empty file gives ``(None, [], 0)``. A complete line that is not JSON raises ValueError."""
    if not os.path.exists(path):
        return None, [], 0
    with open(path, "rb") as f:
        data = f.read()
    end = data.rfind(b"\n") + 1  # bytes after the last newline are a torn write
    lines = data[:end].splitlines()
    objs = []
    for i, line in enumerate(lines):
        try:
            obj = json.loads(line)
            if not isinstance(obj, dict):
                raise ValueError("not an object")
        except ValueError:
            raise ValueError(f"{path} line {i + 1} is not a JSON object: the journal was edited or corrupted; "
                             "restore it or start again in a new --workdir") from None
        objs.append(obj)
    if not objs:
        return None, [], 0
    if objs[0].get("event") != "header":
        raise ValueError(f"{path} does not start with a search journal header: point --workdir at a search "
                         "directory or a new one")
    return objs[0], objs[1:], end


class Journal:
    """An open journal in ``workdir``: ``events`` holds what was there, ``append`` adds a line durably.

    ``config`` is the plain dict whose fingerprint ties the journal to one search (the same search resumes,
    another one is refused); ``space`` is the space's name."""

    def __init__(self, workdir: str, config: dict, space: str):
        self.path = os.path.join(workdir, FILENAME)
        self.fingerprint = fingerprint(config)
        header, self.events, self._valid = read(self.path)
        if header is not None and (header.get("fingerprint") != self.fingerprint or header.get("space") != space):
            raise ValueError(
                f"{self.path} belongs to another search (fingerprint {header.get('fingerprint')}, space "
                f"{header.get('space')!r}; this one is {self.fingerprint}, space {space!r}): use a new --workdir "
                "or the original config")
        self._file = None
        self._header = None if header is not None else {
            "event": "header", "version": VERSION, "fingerprint": self.fingerprint, "space": space,
            "config": json.loads(_canonical(config))}

    def _open(self):
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        self._file = open(self.path, "r+b" if os.path.exists(self.path) else "w+b")
        self._file.truncate(self._valid)  # drops a torn last line (or a torn header)
        self._file.seek(self._valid)
        if self._header is not None:  # a new journal (or one whose header itself was torn)
            self._write(self._header)
            self._header = None

    def _write(self, obj: dict) -> None:
        line = json.dumps(obj, separators=(",", ":"), allow_nan=False) + "\n"
        self._file.write(line.encode())  # one write per line: a crash tears at most the last line
        self._file.flush()
        os.fsync(self._file.fileno())

    def append(self, event: dict) -> None:
        """Writes one event line, stamped with the Unix ``time``, flushed and fsynced before returning."""
        if self._file is None:
            self._open()
        self._write({**event, "time": round(time.time(), 3)})

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
