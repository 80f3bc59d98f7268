"""Atomic writes: a file or folder is built in a hidden sibling, then renamed into place.

Example:
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as root:
    ...     (Path(root) / ".out.tmp").mkdir()
    ...     replace_folder(Path(root) / ".out.tmp", Path(root) / "out", force=False)
    ...     sorted(p.name for p in Path(root).iterdir())
    ['out']
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path

from search.errors import OutputExistsError


def replace_folder(tmp: Path, out: Path, force: bool, what: str = "output folder") -> None:
    """Renames the finished ``tmp`` to ``out``; with ``force`` an existing ``out`` is
    swapped out first (two renames) and removed, otherwise it is an error."""
    if not out.exists():
        os.rename(tmp, out)
        return
    if not force:
        raise OutputExistsError(f"{what} {str(out)!r} appeared while it was written; "
                                "choose another or pass --force to replace it")
    old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
    os.rename(out, old)
    os.rename(tmp, out)
    if old.is_dir():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink()


def write_text(path: str | os.PathLike[str], text: str) -> None:
    """Writes ``text`` to ``path`` through a temporary sibling (usual permissions)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", dir=p.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
