"""One core per SQLite database.

Replicas share work through PostgreSQL's row locks (SKIP LOCKED). On SQLite the core is the
database's one owner: at start-up it hands back the leases of engine processes that are
gone, and its scheduler and retention assume no other core. A second core started on the
same file (a second terminal, a service manager and a shell) would quietly share it, so it is
refused at start instead. The lock is an flock on a file beside the database: the kernel
drops it when the core exits, however it exits, and engine processes (started with exec)
do not inherit it."""

from __future__ import annotations

import os

from sqlalchemy.engine import make_url

try:
    import fcntl
except ImportError:  # not POSIX: not enforced
    fcntl = None  # type: ignore[assignment]


class CoreLock:
    def __init__(self, database_url: str) -> None:
        parsed = make_url(database_url)
        embedded = parsed.get_backend_name() == "sqlite" and parsed.database and parsed.database != ":memory:"
        self.path = f"{parsed.database}-core.lock" if embedded and fcntl is not None else None
        self._fd: int | None = None

    def acquire(self) -> None:
        """Hold the lock, or exit with one line naming the core that holds it."""
        if self.path is None or self._fd is not None:
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise SystemExit(
                f"another core (pid {holder}) is running on {self.path.removesuffix('-core.lock')}: "
                "SQLite takes one core per database; stop that one, or use PostgreSQL for replicas"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)  # closing the last descriptor drops the flock
