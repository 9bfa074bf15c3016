"""Writing a small file so that a kill or a crash leaves the old contents or the new, never half of each."""

import os


def write_atomic(path: str, data: str | bytes) -> None:
    """Writes ``data`` to a temporary file beside ``path``, flushes it to disk, then renames it over ``path``."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
