"""What the outbox's latest commits stored, kept in memory so a sink that is caught up need not read it back.

Why: every sink used to read each message back from SQLite right after the commit that stored
it, and the bulk sinks (InfluxDB, history) parsed its JSON again: hundreds of reads per second
under load, all to learn what the commit had in hand a moment before. The outbox stays the single source of truth: memory only
answers a read that continues exactly where the sink is (`take`), and any other read (after a
restart, a reconnect, a backlog beyond `limit`, a commit this process did not make) goes to
the outbox, which holds everything.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from typing import Generic, Protocol, TypeVar


class _Sequenced(Protocol):
    @property
    def seq(self) -> int: ...


S = TypeVar("S", bound=_Sequenced)

#: Committed messages kept per sink at most. Beyond (a sink that is not sending, e.g. its
#: server is down) memory is dropped: that sink reads the outbox until it has caught up.
DEFAULT_LIMIT = 10_000


class RecentCommits(Generic[S]):
    """One sink's view of the latest commits, in seq order."""

    def __init__(self, limit: int = DEFAULT_LIMIT) -> None:
        self.limit = limit
        self._items: deque[S] = deque()
        #: Set when memory overflowed: the sink is not reading (its server is down, or there is
        #: none), so nothing is kept until it reads again, instead of filling up and dropping
        #: `limit` messages over and over.
        self._idle = False

    def __len__(self) -> int:
        return len(self._items)

    def add(self, committed: Iterable[S]) -> None:
        if self._idle:
            return
        self._items.extend(committed)
        if len(self._items) > self.limit:
            self._items.clear()
            self._idle = True

    def take(self, after_seq: int, limit: int) -> list[S] | None:
        """Up to `limit` messages following `after_seq`, or None: read the outbox.

        Only if the first one remembered is `after_seq + 1`, and only if the seqs run on without
        a gap to the end of memory or to `limit`: the outbox numbers each commit's messages
        consecutively, so a gap means a commit that memory did not see, and the outbox read
        that fills it returns what follows it too (answering only up to the gap would leave
        the sink believing it had read everything). What is at or before `after_seq` is
        dropped: the sink has had it.
        """
        self._idle = False
        items = self._items
        while items and items[0].seq <= after_seq:
            items.popleft()
        if not items or items[0].seq != after_seq + 1 or limit < 1:
            return None
        count = 1
        while count < len(items) and count < limit and items[count].seq == items[count - 1].seq + 1:
            count += 1
        if count < limit and count < len(items):
            return None  # a gap after `count` messages
        return [items.popleft() for _ in range(count)]
