"""SQLite's WAL checkpoints, off the commit path.

SQLite's own auto-checkpoint runs inside the COMMIT that takes the log past 1,000 pages:
that commit copies the log into the database file and syncs both, and every caller in
its group commit (usage pings, crash reports waiting for their answer) waits for it:
measured under the usage bench, a commit's p99 went from ~1.7 ms to ~10 ms with it.
Here the writer's connection has auto-checkpoints off, and after commits that changed
`CHECK_ROWS` rows since it last looked, it looks at the log's size (one `stat`; not
after every commit: a system call lets the event loop's thread take the GIL, which the
writer then waits to get back):

- past `soft_pages`, it wakes this thread, which checkpoints on a connection of its own
  (PASSIVE: it copies what no reader needs, beside the writer's next transactions, which
  WAL mode lets go on; a later transaction starts the log again from its beginning once
  all of it is copied);
- past `hard_pages` (the thread cannot keep up, or is stopped), the writer checkpoints
  itself, as SQLite would have: the log stays bounded either way.

`journal_size_limit` (half the soft mark) lets SQLite cut the file back when the log
starts again, so the file's size is the log's: what the `stat` reads.

The TRUNCATE checkpoints after a deletion (privacy.sqlite) stay on the writer: they are
what makes an erased row leave the log, and they wait for a checkpoint under way here.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
from pathlib import Path

log = logging.getLogger("softrelay.privacy")

SOFT_PAGES = 1000  # SQLite's own wal_autocheckpoint
HARD_PAGES = 8 * SOFT_PAGES
CHECK_ROWS = 64  # a row dirties a few pages: the log is looked at every ~200 pages


class Checkpointer:
    def __init__(
        self,
        path: Path,
        page_size: int,
        *,
        soft_pages: int = SOFT_PAGES,
        hard_pages: int = HARD_PAGES,
        check_rows: int = CHECK_ROWS,
    ) -> None:
        self._path = path
        self._wal = f"{path}-wal"
        self.soft = soft_pages * page_size
        self.hard = hard_pages * page_size
        self.size_limit = self.soft // 2  # journal_size_limit, for the writer's connection
        self._check_rows = check_rows
        self._checked_at = 0  # the writer's total_changes when it last looked
        self.runs = 0  # checkpoints this thread made
        self.inline = 0  # checkpoints the writer made itself, past the hard mark
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._serve, name="softrelay-wal", daemon=True)
        self._thread.start()

    def committed(self, db: sqlite3.Connection) -> None:
        """On the writer's thread, after a commit on its connection `db`."""
        changes = db.total_changes
        if changes - self._checked_at < self._check_rows:
            return
        self._checked_at = changes
        try:
            size = os.stat(self._wal).st_size
        except FileNotFoundError:
            return
        if size >= self.hard:
            self.inline += 1
            db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        elif size >= self.soft:
            self._wake.set()

    def stop(self) -> None:
        """Let a checkpoint under way finish, then end the thread (blocks)."""
        self._stopping = True
        self._wake.set()
        self._thread.join()

    def _serve(self) -> None:
        db = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA busy_timeout=5000")
            while True:
                self._wake.wait()
                if self._stopping:
                    return
                self._wake.clear()
                try:
                    self._checkpoint(db)
                except sqlite3.Error as exc:
                    # The writer's hard mark still bounds the log; say why this one failed.
                    log.warning(
                        "wal.checkpoint_failed",
                        extra={"fields": {"error": str(exc)}},  # service_log's field
                    )
                    continue
                self.runs += 1
        finally:
            db.close()

    def _checkpoint(self, db: sqlite3.Connection) -> None:
        db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
