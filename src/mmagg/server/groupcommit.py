"""Group commit: the reports of concurrent ingest requests stored in one transaction.

A commit is the costliest step of storing a small report (SQLite writes its WAL pages,
PostgreSQL waits for its WAL flush). Requests that arrive together hand their validated
report to `GroupCommit.store` and wait; one writer stores everything pending in one
transaction (`Database.store_reports`) and answers each request once that commit is done:
a report is acknowledged only after it is durable, exactly as when it had its own
transaction. If the shared transaction fails, every report of the batch is stored on its
own, so one bad report fails only its own request.

Batches form by themselves: the writer takes whatever is pending when it starts, and
whatever arrives while it writes waits for the next batch. Under light load a batch is one
report (no added wait); under heavy load batches grow and the cost per report falls.

On SQLite the writer runs on the event loop (writes are serialised anyway and cost less
than a thread hop); elsewhere writers run in worker threads, up to `THREAD_WRITERS` batches
at a time (one waits for its commit while the next is written).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

import anyio.to_thread

from mmagg.server.db import Database, PendingReport, StoredReport

#: Reports stored per transaction at most; more pending ones go into the next batch.
MAX_BATCH = 64
#: Batches written at once when writing in worker threads (not on SQLite).
THREAD_WRITERS = 2

Outcome = StoredReport | Exception


class GroupCommit:
    """Stores reports handed over by concurrent requests, several per transaction.

    `on_batch` is called with the size of every batch written (the app's metrics).

    Example:
        >>> writer = GroupCommit(Database("sqlite://"))
        >>> writer.inline
        True
    """

    def __init__(
        self,
        db: Database,
        *,
        inline: bool | None = None,
        max_batch: int = MAX_BATCH,
        writers: int = THREAD_WRITERS,
        on_batch: Callable[[int], object] | None = None,
    ) -> None:
        self.db = db
        self.on_batch = on_batch
        self.inline = db.dialect == "sqlite" if inline is None else inline
        self.max_batch = max_batch
        # One writer on the event loop; in threads, a second batch may be written while the
        # first waits for its commit (PostgreSQL takes both).
        self.writers = 1 if self.inline else max(1, writers)
        self._pending: list[tuple[PendingReport, asyncio.Future[Outcome]]] = []
        self._busy = False
        self._running = 0
        #: Batches written and reports in them (for benchmarks and tests).
        self.batches = 0
        self.reports = 0

    async def store(self, item: PendingReport) -> StoredReport:
        """Store `item` with whatever else is pending; its outcome once committed.

        Raises what storing this report raised (`KeyRevokedError`, a database error).
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Outcome] = loop.create_future()
        self._pending.append((item, future))
        # After the callbacks already queued: requests that arrived in the same event-loop
        # turn join this batch.
        if self.inline:
            if not self._busy:
                self._busy = True
                loop.call_soon(self._write_inline, loop)
        elif self._running < self.writers and len(self._pending) == 1:
            self._running += 1
            loop.create_task(self._write_in_thread())
        outcome = await future
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def _take(self) -> list[tuple[PendingReport, asyncio.Future[Outcome]]]:
        batch = self._pending[: self.max_batch]
        del self._pending[: self.max_batch]
        return batch

    def _write_inline(self, loop: asyncio.AbstractEventLoop) -> None:
        batch = self._take()
        try:
            self._settle(batch, self._store([item for item, _ in batch]))
        finally:
            if self._pending:
                loop.call_soon(self._write_inline, loop)
            else:
                self._busy = False

    async def _write_in_thread(self) -> None:
        try:
            while self._pending:
                batch = self._take()
                items = [item for item, _ in batch]
                try:
                    outcomes = await anyio.to_thread.run_sync(self._store, items)
                except BaseException as error:  # cancelled while writing: tell the waiters
                    failure = error if isinstance(error, Exception) else RuntimeError("cancelled")
                    self._settle(batch, [failure] * len(batch))
                    raise
                self._settle(batch, outcomes)
        finally:
            self._running -= 1

    def _store(self, items: list[PendingReport]) -> Sequence[Outcome]:
        try:
            outcomes = self.db.store_reports(items)
        except Exception as error:  # store_reports answers per report; this is a last resort
            return [error] * len(items)
        self.batches += 1
        self.reports += len(items)
        if self.on_batch is not None:
            self.on_batch(len(items))
        return outcomes

    @staticmethod
    def _settle(
        batch: list[tuple[PendingReport, asyncio.Future[Outcome]]], outcomes: Sequence[Outcome]
    ) -> None:
        for (_, future), outcome in zip(batch, outcomes, strict=True):
            if not future.done():  # a request cancelled meanwhile (client gone)
                future.set_result(outcome)
