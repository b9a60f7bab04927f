"""Named leases in the database: at most one backend process does a job at a time.

A lease is a row (`name`, `holder`, `expires_at`) in the lease table. `acquire(now)` takes a
free or expired lease, or renews one this holder has; while another holder's lease is
unexpired it returns False. The take-over is a compare-and-set on the row (an UPDATE that
names the holder and expiry it read), so of several processes racing for an expired lease
exactly one wins; racing for a missing row, the primary key lets one INSERT through.

The alert evaluator (`mmagg.server.alerts`) and the retention job (`mmagg.server.app`) each
hold one. A holder that dies keeps its lease until it expires, then the next process to
ask takes over.

Example:
    >>> from mmagg.server.db import Database
    >>> db = Database("sqlite://")
    >>> first, second = Lease(db, "job", ttl=60.0), Lease(db, "job", ttl=60.0)
    >>> first.acquire(1000.0), second.acquire(1000.0), second.acquire(1061.0)
    (True, False, True)
"""

from __future__ import annotations

import logging
import uuid

import sqlalchemy as sa

from mmagg.server.db import Database
from mmagg.server.tables import alert_lease

logger = logging.getLogger("mmagg.server")


class Lease:
    """The lease `name`, held as `holder` (default: a random id per instance) for `ttl` s."""

    def __init__(self, db: Database, name: str, ttl: float, holder: str | None = None) -> None:
        if ttl <= 0:
            raise ValueError(f"ttl: expected a positive number of seconds, got {ttl}")
        self.db = db
        self.name = name
        self.ttl = ttl
        self.holder = holder or uuid.uuid4().hex[:16]

    def acquire(self, now: float) -> bool:
        """Take or renew the lease until `now + ttl`; False while another holder has it."""
        table = alert_lease
        try:
            with self.db.write() as conn:
                row = conn.execute(
                    sa.select(table.c.holder, table.c.expires_at).where(table.c.name == self.name)
                ).first()
                if row is None:
                    conn.execute(
                        sa.insert(table).values(
                            name=self.name, holder=self.holder, expires_at=now + self.ttl
                        )
                    )
                    return True
                if row.holder != self.holder and row.expires_at >= now:
                    return False
                updated = conn.execute(
                    sa.update(table)
                    .where(
                        table.c.name == self.name,
                        table.c.holder == row.holder,
                        table.c.expires_at == row.expires_at,
                    )
                    .values(holder=self.holder, expires_at=now + self.ttl)
                )
                return bool(updated.rowcount == 1)
        except sa.exc.IntegrityError:
            return False  # another process inserted the row first

    def release(self) -> None:
        """Give the lease up (if this holder has it), so that another process takes over at
        once; on failure it just expires."""
        try:
            with self.db.write() as conn:
                conn.execute(
                    sa.delete(alert_lease).where(
                        alert_lease.c.name == self.name, alert_lease.c.holder == self.holder
                    )
                )
        except sa.exc.SQLAlchemyError:  # shutting down: the lease expires by itself
            logger.warning("mmagg: could not release the %s lease", self.name)
