"""Writing files so that a failure, a full disk or a kill never leaves a half-written file.

Every file is written under a short temporary name in its final folder, ``.fg3d-<pid>-<random>.part``
(the same ~25 bytes whatever the final name, so any final name up to the 255-byte limit works), and
renamed when complete.  Temporaries are created with mode 0666 less the umask, like any file the user
writes.  Those left by a process that was killed (SIGKILL, power loss: no code runs) are recognisable by
that pattern and by a pid that no longer runs: no photo listing takes them (``.part``), and
``remove_stale`` deletes them when the next run writes into the folder.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Tuple, Union

from .errors import FG3DError

NAME_MAX = 255  # bytes in one file name on every common file system
_TEMP = re.compile(r"\.fg3d-(\d+)-[0-9a-f]{8}\.part")

PathLike = Union[str, os.PathLike]


def temp_file(folder: PathLike) -> Path:
    """Create an empty temporary file in ``folder`` (mode 0666 less the umask) and return its path."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    while True:
        path = Path(folder) / f".fg3d-{os.getpid()}-{secrets.token_hex(4)}.part"
        try:
            os.close(os.open(path, flags, 0o666))
            return path
        except FileExistsError:  # 1 in 4 billion: draw another name
            continue


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # it runs, under another user
        return True
    return True


def remove_stale(folder: PathLike) -> int:
    """Delete the temporaries that killed processes left in ``folder``; returns how many."""
    removed = 0
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return 0
    for entry in entries:
        m = _TEMP.fullmatch(entry.name)
        if m and not _running(int(m.group(1))):
            try:
                os.unlink(entry.path)
                removed += 1
            except OSError:
                pass
    return removed


def check_name(name: str) -> None:
    """FG3DError when ``name`` is too long to be a file name."""
    if len(os.fsencode(name)) > NAME_MAX:
        raise FG3DError(f"the output name {name[:40]}… is longer than {NAME_MAX} bytes; shorten it")


class AtomicWriter:
    """Collects files as temporaries; ``commit`` renames them all, ``abort`` deletes them.

    ``commit`` first checks that no final name is taken by a folder (or anything but a file), so a
    conflict is found before any file is renamed; if a rename still fails, the files renamed by this
    commit are removed again and the temporaries deleted: all of a photo's outputs appear, or none."""

    def __init__(self, out_dir: PathLike):
        self.out_dir = Path(out_dir)
        self.pending: List[Tuple[Path, Path]] = []

    def path(self, name: str) -> str:
        check_name(name)
        with signals_held():  # a file created is a file recorded, so ``abort`` finds it
            tmp = temp_file(self.out_dir)
            self.pending.append((tmp, self.out_dir / name))
        return str(tmp)

    def commit(self) -> List[Path]:
        for _, final in self.pending:
            if os.path.lexists(final) and not final.is_file():  # a folder, a FIFO, a dangling link…
                self.abort()
                raise FG3DError(f"{final}: exists and is not a file; nothing was written for this photo")
        done: List[Path] = []
        try:
            with signals_held():  # Ctrl-C or SIGTERM now waits until every file is renamed
                for tmp, final in self.pending:
                    os.replace(tmp, final)
                    done.append(final)
        except OSError as exc:
            for path in done:
                try:
                    os.unlink(path)
                except OSError:
                    pass
            failed = self.pending[len(done)][1]
            self.abort()
            raise FG3DError(f"{failed}: could not be written ({exc.strerror or exc})") from None
        self.pending = []
        return done

    def abort(self) -> None:
        with signals_held():  # a second Ctrl-C does not stop the cleaning half-way
            for tmp, _ in self.pending:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
            self.pending = []


_HELD = (signal.SIGINT, signal.SIGTERM)


@contextmanager
def signals_held() -> Iterator[None]:
    """Ctrl-C and SIGTERM wait until the block ends, then act as they would have.

    Python runs signal handlers in the main thread only, between two steps of its code, whichever
    thread the kernel delivered the signal to (so a thread's signal mask cannot hold them).  In the
    main thread the handlers written in Python (the CLI's SIGTERM, Python's own Ctrl-C) are swapped
    for one that notes the signal, and called afterwards; no other thread can be interrupted.  A
    handler set outside Python (an embedding host's) is left alone."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: List[int] = []
    swapped: Dict[int, Callable] = {}
    try:
        for signum in _HELD:
            handler = signal.getsignal(signum)
            if callable(handler):
                swapped[signum] = handler
                signal.signal(signum, lambda s, _frame: caught.append(s))
        yield
    finally:
        _restore(swapped, list(swapped))
    for signum in caught[:1]:  # the first one acts (it raises, as a rule); like a second Ctrl-C, others go
        swapped[signum](signum, None)


def _restore(swapped: Dict[int, Callable], order: List[int]) -> None:
    """Put every swapped handler back, even if a signal's own handler raises in between."""
    if order:
        try:
            signal.signal(order[0], swapped[order[0]])
        finally:
            _restore(swapped, order[1:])


@contextmanager
def atomic_file(final: PathLike) -> Iterator[Path]:
    """``with atomic_file(p) as tmp:`` write ``tmp``; it becomes ``p`` only when the block succeeds."""
    final = Path(final)
    writer = AtomicWriter(final.parent)
    try:
        yield Path(writer.path(final.name))
    except BaseException:
        writer.abort()
        raise
    writer.commit()
