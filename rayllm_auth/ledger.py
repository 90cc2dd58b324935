"""The cluster-wide books of one application's limits: what its single ledger actor holds.

Replicas never ask the ledger per request. They take **leases**: a number of request permits
(``rpm``) or concurrency slots (``concurrency``) for one key id, used locally until spent
(see :mod:`rayllm_auth.quota`). The ledger only hands out what a limit still allows:

Requests (and tokens) per minute
    A permit is counted in the second it is granted, in one-second buckets per key, and a
    bucket is counted until ``WINDOW_S`` after its *last* instant (``COUNTED_S``, 61 s
    after its first): a permit granted at 12.99 still counts at 72.98, so the permits
    granted in any 60 s window never exceed the key's ``rpm`` (a request may wait up to 1 s
    longer than an exact window would make it). A replica uses a permit within ``LEASE_S``
    of its grant or gives it back (:meth:`Ledger.give_back_requests`), so requests
    *admitted* in any 60 s window exceed ``rpm`` by at most the permits granted in the
    ``LEASE_S`` before it and used inside it: at most the replicas' outstanding leases.
    Tokens per minute are the same books in permits of one token, under
    ``quota.tokens_id(key_id)``, plus :meth:`Ledger.correct` once a request's usage is
    known.
Concurrency
    Each replica's slots per key are recorded under its id; a replica reports its holdings
    on every sync (the replica is the truth for them), and a replica silent for
    ``HOLDING_TTL_S`` (dead, or its node lost) loses its slots. Slots granted never exceed
    ``concurrency`` minus what the live replicas hold. A key for which a request was turned
    away, or whose holders add up to more than its limit (slots taken in fallback, a lowered
    limit), is *contended* for CONTENDED_S: every replica that reports meanwhile hears it and
    gives back its idle slots, and each slot its requests free, until granted one again.

Limits travel with each call (the replica read them from its key file), so a lowered limit
takes effect on the next lease. Key ids are non-secret names: the ledger never sees a key.
A restarted ledger starts empty, then each replica :meth:`restores <Ledger.restore>` what
it admitted in the last window, so a killed ledger does not reset the windows; a replica
back from fallback restores what it admitted on its own.
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

__all__ = ["Ledger", "RequestGrant", "WINDOW_S", "COUNTED_S", "LEASE_S", "HOLDING_TTL_S"]

#: The rpm window, in seconds; one bucket per second.
WINDOW_S = 60
#: How long a one-second bucket is counted, from its first instant: to WINDOW_S after its
#: last one (counting it only WINDOW_S would let a burst at S+0.99 and another at S+60.0,
#: 59.01 s apart, both in full).
COUNTED_S = WINDOW_S + 1
#: A request permit not used this long after its grant is given back.
LEASE_S = 2.0
#: A replica that has not synced for this long loses its concurrency slots.
HOLDING_TTL_S = 10.0
#: A key refused a slot (or found above its limit) is reported as contended to every replica
#: that syncs for this long: longer than a heartbeat, so its holders hear it.
CONTENDED_S = 3.0


@dataclass(frozen=True)
class RequestGrant:
    """The answer to a request-permit lease: ``granted`` permits (possibly 0), counted in
    ``second``; ``remaining`` in the window after them; ``reset_s`` until the window frees
    its oldest counted permit (0 when nothing is counted), or, when nothing was granted,
    until it has freed enough for the lease asked for; the ledger's ``incarnation``."""

    granted: int
    second: int
    remaining: int
    reset_s: float
    incarnation: str = ""


def take_off(counts: dict[int, int], second: int, count: int) -> None:
    """``count`` fewer of ``second`` in per-second ``counts`` (what is left of it: it may
    be gone already)."""
    left = counts.get(second, 0) - count
    if left > 0:
        counts[second] = left
    else:
        counts.pop(second, None)


@dataclass
class _Window:
    """Permits granted per second, for the last COUNTED_S seconds; and, for tokens, a debt:
    tokens used beyond the limit, counted after the window they were used in, one *part* of
    at most the limit per window (COUNTED_S) until paid, so that none is forgiven. A part's
    size is fixed when its window starts: a debt made meanwhile waits for the next part."""

    counts: dict[int, int] = field(default_factory=dict)  # second -> permits granted
    debt: int = 0  # tokens still to be counted, the current part included
    debt_from: int = 0  # the second from which the current (or next) part is counted
    part: int = 0  # the current part's size, once its window has started (else 0)

    def used(self, now_s: int, limit: int) -> int:
        """What the window counts at ``now_s``: its seconds, and the part of a debt due."""
        self._forget(now_s, limit)
        if self.debt and now_s >= self.debt_from and not self.part:
            self.part = min(self.debt, max(limit, 1))
        return sum(self.counts.values()) + (self.part if now_s >= self.debt_from else 0)

    def owe(self, tokens: int, now_s: int, limit: int) -> None:
        """``tokens`` over the limit at ``now_s``: counted after this window, in parts."""
        self._forget(now_s, limit)
        if not self.debt:
            self.debt_from, self.part = now_s + COUNTED_S, 0
        self.debt += tokens

    def reset_s(self, now: float, least: int, limit: int) -> float:
        """Seconds until the window leaves ``least`` permits free, as far as it is known now
        (permits granted meanwhile can take them): when enough of its seconds have left it
        and the part of a debt then due is small enough. 0 when that is now."""
        limit = max(limit, 1)
        first = self.part or min(self.debt, limit)  # the current or next part
        parts = 1 + -(-(self.debt - first) // limit) if self.debt else 0
        changes = {s + COUNTED_S for s in self.counts}
        if parts:  # parts after the first are full, but for the last
            changes |= {self.debt_from + k * COUNTED_S for k in (0, 1, parts - 1, parts)}
        for at in [now, *sorted(t for t in changes if t > now)]:
            counted = sum(n for s, n in self.counts.items() if s > at - COUNTED_S)
            if parts and at >= self.debt_from:
                k = int((at - self.debt_from) // COUNTED_S)
                left = self.debt - first - (k - 1) * limit
                counted += first if k == 0 else max(0, min(left, limit))
            if counted + least <= limit:
                return max(0.0, at - now)
        return 0.0  # least > limit: never (the caller's lease is refused anyway)

    def _forget(self, now_s: int, limit: int) -> None:
        for second in [s for s in self.counts if s <= now_s - COUNTED_S]:
            del self.counts[second]
        if self.debt and now_s >= self.debt_from + COUNTED_S:  # parts paid since
            windows = (now_s - self.debt_from) // COUNTED_S
            paid = (self.part or min(self.debt, max(limit, 1))) + (windows - 1) * max(limit, 1)
            self.debt = max(0, self.debt - paid)
            self.debt_from += windows * COUNTED_S
            self.part = 0


class Ledger:
    """The books; a plain object, so it is tested without Ray (:class:`LedgerActor` serves
    one per application). ``clock`` gives seconds (the actor's own monotonic clock)."""

    def __init__(self, clock: Callable[[], float]):
        self._clock = clock
        #: Changes when a ledger starts afresh: replicas seeing a new one restore their part.
        self.incarnation = uuid.uuid4().hex
        self._windows: dict[str, _Window] = {}
        self._holdings: dict[str, dict[str, int]] = {}  # key id -> replica -> slots
        self._last_sync: dict[str, float] = {}  # replica -> clock at its last call
        self._contended: dict[str, float] = {}  # key id -> clock when last contended
        self._concurrency: dict[str, int] = {}  # key id -> its limit, as last leased with
        self._restored: dict[str, float] = {}  # restore part token -> clock when applied

    # -- requests per minute -----------------------------------------------------------------

    def lease_requests(self, key_id: str, rpm: int, want: int, replica: str,
                       least: int = 1) -> RequestGrant:
        """Up to ``want`` permits of a window of ``rpm`` per minute; none unless at least
        ``least`` are free (a request's tokens: all or nothing)."""
        now = self._clock()
        self._last_sync[replica] = now
        second = math.floor(now)
        window = self._windows.setdefault(key_id, _Window())
        used = window.used(second, rpm)
        free = max(0, rpm - used)
        granted = min(want, free) if free >= least else 0
        if granted:
            window.counts[second] = window.counts.get(second, 0) + granted
            reset_s = max(0.0, min(window.counts) + COUNTED_S - now)  # its oldest second
        else:
            reset_s = window.reset_s(now, least, rpm)
        return RequestGrant(granted, second, free - granted, reset_s, self.incarnation)

    def give_back_requests(self, key_id: str, count: int, second: int,
                           incarnation: str) -> None:
        """Permits granted in ``second`` and never used (a lease that ran out). Permits
        another incarnation granted are not in these books: nothing is taken off."""
        window = self._windows.get(key_id)
        if incarnation == self.incarnation and window is not None:
            take_off(window.counts, second, count)

    def correct(self, key_id: str, tpm: int, given_back: Mapping[int, int], charged: int,
                incarnation: str) -> str:
        """A replica's corrections of its token reservations (``tokens_id`` windows), once
        the engine reported their usage: permits granted in a second and not used
        (``given_back``: second -> count), and tokens used beyond what was reserved
        (``charged``), counted now, even above ``tpm``. What the charge puts above ``tpm``
        is a debt, also counted in the windows that follow, ``tpm`` per window, until paid:
        over any longer stretch the key gets ``tpm``, not ``tpm`` plus an overdraw every
        minute. Only the ``incarnation`` that granted the
        reservations applies them (another got them in the window a replica restored into
        it). Returns the incarnation."""
        if incarnation != self.incarnation:
            return self.incarnation
        window = self._windows.setdefault(key_id, _Window())
        for second, count in given_back.items():
            take_off(window.counts, second, count)
        if charged > 0:
            second = math.floor(self._clock())
            window.counts[second] = window.counts.get(second, 0) + charged
            overdraw = min(charged, window.used(second, tpm) - tpm)
            if overdraw > 0:
                window.owe(overdraw, second, tpm)
        return self.incarnation

    # -- concurrency ---------------------------------------------------------------------------

    def lease_slots(self, key_id: str, concurrency: int, want: int,
                    replica: str) -> tuple[int, str]:
        """Slots granted (possibly 0), never more than ``concurrency`` minus what live
        replicas hold; and the ledger's incarnation."""
        now = self._clock()
        self._last_sync[replica] = now
        self._drop_silent_replicas(now)
        self._concurrency[key_id] = concurrency
        holders = self._holdings.setdefault(key_id, {})
        free = max(0, concurrency - sum(holders.values()))
        granted = min(want, free)
        if granted:
            holders[replica] = holders.get(replica, 0) + granted
        if granted < want:
            self._contended[key_id] = now
        return granted, self.incarnation

    def give_back_slots(self, key_id: str, count: int, replica: str) -> None:
        """Slots ``replica`` no longer holds (its last request of the key ended)."""
        self._last_sync[replica] = self._clock()
        holders = self._holdings.get(key_id, {})
        left = holders.get(replica, 0) - count
        if left > 0:
            holders[replica] = left
        else:
            holders.pop(replica, None)

    def sync(self, replica: str, holdings: Mapping[str, int]) -> dict:
        """A replica's heartbeat: the slots it holds now, per key id (its own truth, also
        after giving idle slots back). Returns the incarnation and the contended keys, so
        the replica can give back the idle slots of those."""
        now = self._clock()
        self._last_sync[replica] = now
        for key_id, holders in self._holdings.items():
            if key_id not in holdings:
                holders.pop(replica, None)
        for key_id, slots in holdings.items():
            holders = self._holdings.setdefault(key_id, {})
            if slots > 0:
                holders[replica] = slots
            else:
                holders.pop(replica, None)
        self._drop_silent_replicas(now)
        for key_id in holdings:  # above its limit (slots taken in fallback, now reported):
            limit = self._concurrency.get(key_id)  # its holders give back their idle slots
            if limit is not None and sum(self._holdings[key_id].values()) > limit:
                self._contended[key_id] = now
        # Every replica that reports within CONTENDED_S hears it (the holder among them: a
        # replica holding slots reports every 2 s), not only the next one.
        for key_id in [k for k, at in self._contended.items() if now - at > CONTENDED_S]:
            del self._contended[key_id]
        contended = sorted(self._contended)
        return {"incarnation": self.incarnation, "contended": contended,
                "replicas": len(self._last_sync)}

    def restore(self, replica: str, incarnation: str,
                parts: Iterable[tuple[str, Mapping[str, Iterable[tuple[float, int]]]]],
                holdings: Mapping[str, int]) -> str:
        """What one replica admitted that these books lack, and the slots it holds: each
        part is a token and ``(age in seconds, requests)`` per key id (what it admitted
        before this ledger started, or on its own while it could not reach it). The parts
        are applied only by the ``incarnation`` they were made for (a replica that has not
        yet seen this ledger restart sends less than it must: it learns from the answer and
        sends the whole window); a part is applied once: sent again with its token (its
        answer was lost), it is skipped. The holdings are taken in any case. Returns the
        incarnation."""
        now = self._clock()
        for token, seen in list(self._restored.items()):
            if now - seen > 2 * COUNTED_S:  # a part sent again this late has nothing counted
                del self._restored[token]
        for token, granted in parts if incarnation == self.incarnation else ():
            if token in self._restored:
                continue
            self._restored[token] = now
            for key_id, grants in granted.items():
                window = self._windows.setdefault(key_id, _Window())
                for age, count in grants:
                    if 0 <= age < COUNTED_S and count > 0:
                        second = math.floor(now - age)
                        window.counts[second] = window.counts.get(second, 0) + count
        self.sync(replica, holdings)
        return self.incarnation

    def replicas(self) -> int:
        """Replicas heard from within HOLDING_TTL_S (at least 1)."""
        self._drop_silent_replicas(self._clock())
        return max(1, len(self._last_sync))

    def _drop_silent_replicas(self, now: float) -> None:
        silent = [r for r, seen in self._last_sync.items() if now - seen > HOLDING_TTL_S]
        for replica in silent:
            del self._last_sync[replica]
            for holders in self._holdings.values():
                holders.pop(replica, None)
