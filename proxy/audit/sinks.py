"""Where sealed record lines go: a file (with size rotation) or a stream (stdout).

Every sink's write(lines) -> bool is all-or-nothing from the chain's point of view: True
when every line was handed over, False (never an exception) when not. A sink retries by
itself on the next write, so the proxy recovers when the disk or directory is back.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
import threading
import time

from proxy.audit import files
from proxy.audit.chain import AuditError

log = logging.getLogger("phiproxy.audit")

_os_write = os.write  # module-level so tests can simulate short writes
ERROR_EVERY_S = 10.0  # while writes keep failing, an error line this often at most


class FileSink:
    """O_APPEND file, one os.write per batch; rotation by size; regular files or devices.

    A torn batch (short write, e.g. ENOSPC half-way) is cut off again with ftruncate before
    anything else is written, so the file never holds a broken line between good ones.
    Once a second the path is compared with the open file (device, inode): if the file was
    removed, renamed or replaced, the sink reopens the path (a gap then shows in verify).

    With `fsync` (`[audit] fsync` other than "no") a file is fdatasync'ed before it is
    closed or rotated away, and the directory after a rotation's renames, so what was
    written before a rotation or a shutdown is on disk. sync() is the writer's call (once
    per loop iteration for "always", from a background thread for "everysec"); dup_fd()
    lends that thread the current file under `fd_lock`, the lock every fd change holds.
    """

    kind = "file"

    def __init__(self, path: str, *, max_bytes: int = 0, keep: int = 10,
                 check_interval_s: float = 1.0, fsync: bool = False):
        self.path = path
        self.fsync = fsync
        self.max_bytes = max_bytes
        self.keep = keep
        self.check_interval_s = check_interval_s
        self.regular = True  # False for /dev/stdout, a FIFO, /dev/full...: no rotation, no head
        self.size = 0
        self.rotations = 0
        self.first_seq = 0  # seq of the first record of the oldest file kept; 0 unknown
        self.pending_bytes = 0  # a file sink never buffers
        self.batch_start = 0  # where the last batch written starts (cut back to it)
        self.fd_lock = threading.Lock()  # held while the fd changes (see dup_fd)
        self._fd: int | None = None
        self._id: tuple[int, int] | None = None
        self._dirty = False  # a torn batch is still at the end of the file
        self._next_check = 0.0
        # While writes keep failing (a full disk), one error line per ERROR_EVERY_S, not
        # one per batch (a busy proxy fails hundreds of batches a second).
        self._error_logged_at: float | None = None
        self._errors_unlogged = 0

    # --- opening --------------------------------------------------------------------
    def open(self) -> None:
        """Open (creating the directory and file, 0600); AuditError naming the path."""
        try:
            self._open()
        except OSError as e:
            raise AuditError(f"{self.path}: cannot open the audit trail ({e.strerror}); "
                             "check that the directory exists or can be created and is "
                             "writable by this user") from None

    def _open(self) -> None:
        directory = os.path.dirname(self.path)
        if directory and not os.path.isdir(directory):
            os.makedirs(directory, mode=0o700, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        st = os.fstat(fd)
        if self._fd is not None:
            self._close_fd()
        with self.fd_lock:
            self._fd = fd
        self._id = (st.st_dev, st.st_ino)
        self.regular = stat.S_ISREG(st.st_mode)
        self.size = st.st_size if self.regular else 0
        self._dirty = False
        self._next_check = time.monotonic() + self.check_interval_s

    def _close_fd(self, sync: bool = False) -> None:
        """Close the file; with `sync` (and fsync on) fdatasync it first, so closing never
        leaves records that only the page cache holds behind a file we stop writing."""
        if self._fd is None:
            return
        if sync and self.fsync and self.regular:
            self.sync()
        with self.fd_lock:
            fd, self._fd = self._fd, None
        try:
            os.close(fd)
        except OSError:
            pass

    def close(self) -> None:
        self._close_fd(sync=True)

    # --- durability -----------------------------------------------------------------
    def sync(self) -> bool:
        """fdatasync the current file (data and size: enough for an append-only file);
        False when it failed (logged). Devices and pipes have nothing to sync: True."""
        if self._fd is None or not self.regular:
            return True
        try:
            os.fdatasync(self._fd)
        except OSError as e:
            log.error("audit: cannot fsync %s: %s", self.path, e.strerror or e)
            return False
        return True

    def dup_fd(self) -> int | None:
        """A duplicate of the current file's fd (for the everysec thread, which closes it),
        None when there is no regular file open. A rotation meanwhile leaves the duplicate
        on the old file, which the rotation synced itself."""
        with self.fd_lock:
            if self._fd is None or not self.regular:
                return None
            return os.dup(self._fd)

    def cut_back(self) -> None:
        """Take the last batch back off the end (its fsync failed: see AuditWriter)."""
        self.size = self.batch_start
        if not self.regular or self._fd is None:
            return
        try:
            os.ftruncate(self._fd, self.size)
        except OSError:
            self._dirty = True  # try again before the next write

    # --- writing --------------------------------------------------------------------
    def write(self, lines: list[bytes]) -> bool:
        data = b"".join(lines)
        try:
            if self.regular and self._fd is not None and time.monotonic() >= self._next_check \
                    and self._replaced():
                self._close_fd(sync=True)  # nothing more goes to a file no longer at the path
            if self._fd is None:
                self._open()
            if self._dirty:
                os.ftruncate(self._fd, self.size)  # type: ignore[arg-type]
                self._dirty = False
            if self.max_bytes and self.regular and self.size and \
                    self.size + len(data) > self.max_bytes:
                self._rotate()
            self.batch_start = self.size
            written = _os_write(self._fd, data)  # type: ignore[arg-type]
        except OSError as e:
            self._failed(e)
            return False
        if written != len(data):  # torn: take it back before the chain moves on
            self._failed(OSError(errno.ENOSPC, f"short write ({written} of {len(data)} bytes): "
                                               "the filesystem is full or a file size limit "
                                               "was reached"), torn=True)
            return False
        self.size += written
        if self._error_logged_at is not None:  # failing no more: the next failure logs
            self._error_logged_at, self._errors_unlogged = None, 0
        return True

    def _failed(self, e: OSError, torn: bool = False) -> None:
        now = time.monotonic()
        if self._error_logged_at is None or now - self._error_logged_at >= ERROR_EVERY_S:
            more = (f" ({self._errors_unlogged} more failed writes in the last "
                    f"{now - self._error_logged_at:.0f} s)"
                    if self._error_logged_at is not None and self._errors_unlogged else "")
            log.error("audit: cannot write %s: %s%s", self.path, e.strerror or e, more)
            self._error_logged_at, self._errors_unlogged = now, 0
        else:
            self._errors_unlogged += 1
        if torn and self.regular:
            try:
                os.ftruncate(self._fd, self.size)  # type: ignore[arg-type]
            except OSError:
                self._dirty = True  # try again before the next write
        if e.errno in (errno.EBADF, errno.EIO, errno.ESTALE, errno.ENOENT):
            self._close_fd()  # reopen on the next write

    def _replaced(self) -> bool:
        """True if the path no longer names our file (removed, renamed, replaced)."""
        self._next_check = time.monotonic() + self.check_interval_s
        try:
            st = os.stat(self.path)
        except OSError:
            return True
        return (st.st_dev, st.st_ino) != self._id

    # --- rotation ---------------------------------------------------------------------
    def _rotate(self) -> None:
        """audit.jsonl -> .1 -> ... -> .keep (dropped beyond); then a new audit.jsonl.

        With fsync on, the current file is synced before it is renamed (an OSError then
        fails this write: the batch is refused rather than written after records that may
        not be on disk) and the directory after, so the renames survive a crash too."""
        if self.fsync and self._fd is not None:
            os.fdatasync(self._fd)
        for stale in range(self.keep + 1, self.keep + 1000):  # left by a larger `keep`
            try:
                os.unlink(files.rotated(self.path, stale))
            except FileNotFoundError:
                break
        for n in range(self.keep, 0, -1):
            src = files.rotated(self.path, n - 1)
            try:
                os.replace(src, files.rotated(self.path, n))
            except FileNotFoundError:
                continue
            except OSError as e:  # keep writing to the current file rather than fail
                log.error("audit: cannot rotate %s: %s", src, e.strerror)
                return
        self._close_fd()  # our fd is now the .1 file (synced above): never rotate it twice
        self.size = 0
        self._open()
        if self.fsync:
            sync_directory(os.path.dirname(self.path) or ".")
        self.rotations += 1
        self.first_seq = oldest_first_seq(self.path, self.keep)


def sync_directory(path: str) -> None:
    """fsync a directory (its entries: renames, new files); failures are logged only, the
    records themselves are synced."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        log.error("audit: cannot fsync the directory %s: %s", path, e.strerror or e)


def oldest_first_seq(path: str, keep: int) -> int:
    """The seq of the first record of the oldest file of the series kept; 0 if unknown."""
    for n in range(keep, -1, -1):
        line = files.read_first_line(files.rotated(path, n))
        if line is None:
            continue
        try:
            seq = json.loads(line).get("seq")
        except (ValueError, AttributeError):
            return 0
        return seq if isinstance(seq, int) else 0
    return 0


class StreamSink:
    """Standard output (or any stream fd): no rotation, no recovery, no head of its own.

    A write to a pipe can be short; the rest is written in a loop. If a stream fails
    half-way through a line, the next successful write starts with a newline, so the
    reader sees one torn line rather than two records glued together.
    """

    kind = "stream"
    regular = False

    def __init__(self, fd: int = 1, name: str = "-"):
        self.fd = fd
        self.path = name
        self.size = 0
        self.rotations = 0
        self.first_seq = 0
        self.pending_bytes = 0
        self._torn = False

    def open(self) -> None:
        try:
            os.fstat(self.fd)
        except OSError as e:
            raise AuditError(f"audit path = \"{self.path}\": standard output is not usable "
                             f"({e.strerror})") from None

    def close(self) -> None:
        pass  # not ours to close

    def write(self, lines: list[bytes]) -> bool:
        data = b"".join(lines)
        if self._torn:
            data = b"\n" + data
        view = memoryview(data)
        done = 0
        try:
            while done < len(data):
                done += _os_write(self.fd, view[done:])
        except OSError as e:
            log.error("audit: cannot write to standard output: %s", e.strerror)
            self._torn = done > 0 and data[done - 1:done] != b"\n"
            return False
        self._torn = False
        return True
