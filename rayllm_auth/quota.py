"""One replica's side of the per-key limits: admit or refuse a limited key's request, mostly
without leaving the process.

A replica holds **leases** from its application's :class:`~rayllm_auth.ledger.Ledger`:
request permits (``rpm``), token permits (``tpm``) and concurrency slots (``concurrency``)
per key id. A request spends a local permit and takes a local slot; only when a key's lease
is spent does the replica ask the ledger again. Lease sizes adapt: a lease spent before it runs out doubles
the next one (up to ``MAX_LEASE_SHARE`` of the limit), a lease that runs out unused halves
it, so a busy key asks about once per ``LEASE_S`` and a quiet one takes one permit at a
time. A key the ledger refused is refused locally until the window frees a permit
(``reset``), so overload costs no remote calls. Every ``SYNC_S``, off the request path, a
replica holding leases gives back expired permits, tells the ledger the slots it holds (a
heartbeat: a replica silent for ``HOLDING_TTL_S`` loses them) and gives back idle slots of
keys other replicas wait for.

When the ledger cannot be reached (its actor killed, its node lost, the head restarting),
the replica keeps serving with **fallback limits**: each limit divided by the number of
replicas last heard of (never fewer than :meth:`ReplicaQuota.assume_replicas`), counted
here alone. It says so once in the log and in
``ray_rayllm_auth_limits_fallbacks_total``, tries the ledger again every ``RETRY_S``, and
returns to cluster-wide limits as soon as it answers, restoring into a restarted ledger what
this replica admitted in the last window. Limits are never dropped and traffic is never
refused because the ledger is gone.

**Tokens per minute** are requests per minute counted in tokens, in a window of their own
(``tokens_id``): a request *reserves* the key's recent usage on this replica (the median of
its last USAGE_SAMPLES requests; one token before any has ended here) from token permits,
as a request spends a request permit, and is refused when the window has not that much left
(a token lease is all or nothing). When its response ends, :meth:`ReplicaQuota.settle`
corrects the reservation with the usage the engine reported: tokens reserved and not used go
back into the lease they came from while it runs (spent by the next requests), and are taken
off the second they were counted in by the heartbeat once it has run out (within ``SYNC_S``,
one call per key: never a remote call per request); tokens used beyond the reservation are
taken from this replica's leases, and what they lack is *charged* to the ledger by the
heartbeat, counted even above the limit, and what puts the window above it in the following
minutes too (:meth:`~rayllm_auth.ledger.Ledger.correct`). A permit is thus always spent within
``LEASE_S`` of its grant, as for requests per minute. A request whose usage never came whole
(a client gone, an app failed) is settled with an estimate of what it used at least
(:meth:`ReplicaQuota.settle_unfinished`); one refused by a 4xx answer gives it all back.
"""

from __future__ import annotations

import asyncio
import logging
import math
import uuid
import weakref
from dataclasses import dataclass, field
from typing import Awaitable, Callable, NamedTuple, Optional, Protocol

from rayllm_auth.ledger import COUNTED_S, LEASE_S, Ledger, RequestGrant, take_off

__all__ = ["ReplicaQuota", "Verdict", "Reservation", "LedgerUnavailable", "InProcessLedger",
           "SYNC_S", "RETRY_S", "tokens_id"]

logger = logging.getLogger("rayllm_auth")

#: How often a replica holding slots reports to the ledger.
SYNC_S = 2.0
#: How long a replica in fallback waits before asking the ledger again.
RETRY_S = 5.0
#: A key the ledger refused is refused here without asking for at most this long: permits
#: that other replicas give back (leases that ran out unused) are seen after it.
RPM_RECHECK_S = 1.0
#: Largest lease, as a share of the limit: bounds what leases can hold idle.
MAX_LEASE_SHARE = 0.02
#: After the ledger refused a key a slot, this replica refuses it locally for this long (a
#: flood of refused requests costs no remote calls; a slot freed elsewhere is seen after it).
SLOT_REFUSAL_S = 0.05
#: A request reserves the median usage of its key's last this many requests on the replica:
#: a median, so one outlier does not make the replica reserve it for every request (and be
#: refused for ever: it learns nothing while it refuses).
USAGE_SAMPLES = 5
#: Largest reservation, as a share of the key's tpm.
RESERVATION_SHARE = 0.25


def tokens_id(key_id: str) -> str:
    """The name under which a key's tokens per minute are counted, apart from its requests
    (a key id never holds ':')."""
    return "tokens:" + key_id


class LedgerUnavailable(Exception):
    """The ledger did not answer (dead, unreachable or too slow). ``late_answer``: the call,
    still in flight, when it only missed its deadline; the ledger may yet apply it."""

    def __init__(self, reason: str, late_answer: Optional[Awaitable] = None):
        super().__init__(reason)
        self.late_answer = late_answer


class LedgerCalls(Protocol):
    """The ledger's methods as awaitables (:class:`~rayllm_auth.ledger.Ledger`'s signatures);
    each raises LedgerUnavailable when the ledger cannot answer."""

    async def lease_requests(self, key_id: str, rpm: int, want: int, replica: str,
                             least: int = 1) -> RequestGrant: ...
    async def give_back_requests(self, key_id: str, count: int, second: int,
                                 incarnation: str) -> None: ...
    async def lease_slots(self, key_id: str, concurrency: int, want: int,
                          replica: str) -> tuple[int, str]: ...
    async def give_back_slots(self, key_id: str, count: int, replica: str) -> None: ...
    async def sync(self, replica: str, holdings: dict) -> dict: ...
    async def correct(self, key_id: str, tpm: int, given_back: dict, charged: int,
                      incarnation: str) -> str: ...
    async def restore(self, replica: str, incarnation: str, parts: list,
                      holdings: dict) -> str: ...


class Verdict(NamedTuple):
    """A limited key's request: admitted or not, and what its rate-limit headers say.
    ``limit``/``remaining``/``reset_s`` describe requests per minute (None without
    ``rpm``), the ``token_`` ones tokens per minute (None without ``tpm`` or on a route
    whose tokens are not counted); ``refused`` names the limit that refused ("rpm",
    "concurrency" or "tpm"); ``reservation`` holds an admitted request's tokens, to be
    :meth:`settled <ReplicaQuota.settle>`. A tuple: one is made per limited request."""

    refused: Optional[str] = None
    limit: Optional[int] = None
    remaining: Optional[int] = None
    reset_s: float = 0.0
    retry_after_s: float = 0.0
    token_limit: Optional[int] = None
    token_remaining: Optional[int] = None
    token_reset_s: float = 0.0
    reservation: Optional["Reservation"] = None


class _Piece(NamedTuple):
    """Permits one request spent of one ``lease``; None: fallback permits, counted here
    alone."""
    lease: Optional["_RequestLease"]
    count: int


@dataclass
class Reservation:
    """The tokens one admitted request holds until :meth:`ReplicaQuota.settle`: where each
    came from, and the local second it was counted in. Settled once."""
    key_id: str  # tokens_id(...) of the request's key
    pieces: list[_Piece]
    second: int
    total: int
    settled: bool = False


@dataclass
class _RequestLease:
    second: int  # the ledger's second the permits are counted in
    left: int
    expires: float  # local clock
    incarnation: str  # the ledger that counted them: only it takes them back


@dataclass
class _KeyState:
    leases: list[_RequestLease] = field(default_factory=list)
    want: int = 1  # permits the next lease asks for
    leasing: Optional[asyncio.Task] = None  # this key's one lease request in flight
    waiting: int = 0  # requests waiting for that lease
    exhausted_until: float = 0.0  # local clock: rpm refused locally until then
    reset_at: float = 0.0  # local clock: when the window frees a permit, as last heard
    remaining: int = 0  # in the window, as the ledger last said (minus what we spent since)
    reset_s: float = 0.0
    concurrency: Optional[int] = None  # the limit as last seen
    slots_held: int = 0  # granted by the ledger, in use or idle
    slots_used: int = 0
    slots_pending: int = 0  # asked of the ledger, not answered yet
    slots_returning: int = 0  # given back, the ledger not known to have heard yet
    slot_refused_until: float = 0.0  # local clock
    #: Others wait for this key's slots, or it is above its limit (slots taken in fallback):
    #: a slot freed here goes back to the ledger at once, until the ledger grants one again.
    slots_contended: bool = False
    concurrency_told: Optional[int] = None  # the limit the ledger last heard for this key
    admitted: dict[int, int] = field(default_factory=dict)  # local second -> requests
    admitted_alone: dict[int, int] = field(default_factory=dict)  # of those, on fallback permits
    #: Tokens used by the key's last requests here, as settled (the newest last).
    usage: list[int] = field(default_factory=list)
    tpm: int = 0  # tokens: the limit as last seen
    charges: dict[str, int] = field(default_factory=dict)  # incarnation -> tokens to charge
    #: (incarnation, second) -> tokens reserved in a lease that has run out, not used: the
    #: ledger takes them off that second at the next heartbeat.
    refunds: dict[tuple[str, int], int] = field(default_factory=dict)

    def free_slot(self) -> None:
        """One slot fewer in use here; a slot of this key is free, so ask the ledger again."""
        self.slots_used -= 1
        self.slot_refused_until = 0.0


@dataclass
class _SlotClaim:
    """One requester's part in a slot lease: the lease task claims the granted slot for the
    requester at once (``taken``) unless the requester has gone (``gone``)."""
    taken: bool = False
    gone: bool = False

    def drop(self, state: _KeyState) -> None:
        """The requester went away: the slot, if claimed, is free here at once (any number
        of calls undo it once). Its give-back to the ledger waits for the lease task."""
        self.gone = True
        if self.taken:
            self.taken = False
            state.free_slot()


class ReplicaQuota:
    """Admission for limited keys in one replica. ``ledger`` makes the remote calls;
    ``clock`` is monotonic seconds. Not thread-safe: used from the replica's event loop.
    ``heartbeat=False`` leaves :meth:`upkeep` to the caller (tests)."""

    def __init__(self, ledger: LedgerCalls, replica: str, clock: Callable[[], float], *,
                 on_fallback: Callable[[bool], None] = lambda entered: None,
                 heartbeat: bool = True):
        self._ledger = ledger
        self._replica = replica
        self._clock = clock
        self._on_fallback = on_fallback
        self._heartbeat = heartbeat
        self._upkeep_task: Optional[asyncio.Task] = None
        self._keys: dict[str, _KeyState] = {}
        self._replicas = 1  # fallback shares' divisor
        self._replicas_at_least = 1  # the replicas the deployment runs at least
        self._incarnation: Optional[str] = None  # the ledger's, once it has answered a sync
        #: Ledgers known to be gone (seen replaced, or found older than the live one): a late
        #: answer of one is stale (its books are gone), never another restart. At most one
        #: entry per restart of the actor.
        self._left_behind: set[str] = set()
        self._deciding = asyncio.Lock()  # which ledger is live: one decision at a time
        self._failed_checks = 0  # of that decision: the checks waiting for it fail too
        #: Void grants whose give-back never reached their ledger: netted out of the window
        #: restored into that ledger if it is found live.
        self._void_grants: list[tuple[str, RequestGrant]] = []
        self._fallback_until: Optional[float] = None  # None: the ledger is in use
        self._rejoining = False  # back from fallback: the ledger must hear what we admitted
        self._reported_truth = True  # the last sync held no slot asked for or given back
        #: What the ledger must still hear: (token, {key id: {local second: requests}}); a
        #: part is sent again, with its token, until a restore is answered (the ledger
        #: applies a token once, so a restore applied whose answer was lost counts once).
        self._unrestored: list[tuple[str, dict[str, dict[int, int]]]] = []
        self._tasks: set[asyncio.Task] = set()  # background calls, kept from the collector

    def assume_replicas(self, replicas: int) -> None:
        """How many replicas the deployment runs at least: the fallback shares' divisor
        until the ledger says it hears from more (it counts replicas as they first reach
        it, so its first answers say too few)."""
        self._replicas_at_least = max(1, replicas)
        self._replicas = max(self._replicas, self._replicas_at_least)

    def reach_ledger_soon(self) -> None:
        """Start reaching the ledger now, in a task (its actor can take seconds to start the
        first time): the first limited requests then find it answering. In an event loop."""
        self._spawn(self.upkeep())

    @property
    def in_fallback(self) -> bool:
        return self._fallback_until is not None

    def admit_now(self, key_id: str, rpm: Optional[int], concurrency: Optional[int],
                  tpm: Optional[int] = None) -> Optional[Verdict]:
        """:meth:`admit`, when permits and a slot held here admit the request (a busy key,
        nearly always): no await, no remote call. None when only :meth:`admit` can decide
        (nothing held here, or the key is refused): call it then."""
        state = self._keys.get(key_id)
        if state is None or (concurrency is not None
                             and state.slots_used >= min(state.slots_held, concurrency)):
            return None
        now = self._clock()
        if tpm is not None:
            tokens = self._keys.get(tokens_id(key_id))
            if tokens is None or now < tokens.exhausted_until:
                return None
            tokens.tpm = tpm
            wanted = _estimate(tokens, tpm)
            if _available(tokens, now) < wanted:
                return None
        if rpm is not None and (now < state.exhausted_until
                                or not self._spend_local_permit(state, rpm, now)):
            return None
        reservation = None
        if tpm is not None:
            pieces = self._spend_local(tokens, tpm, now, wanted)
            reservation = self._reserve(tokens_id(key_id), tokens, pieces, wanted, now)
        if concurrency is not None:
            state.slots_used += 1
        state.concurrency = concurrency
        self._keep_up()
        return self._admitted(state, rpm, now, tpm, reservation)

    async def admit(self, key_id: str, rpm: Optional[int], concurrency: Optional[int],
                    tpm: Optional[int] = None) -> Verdict:
        """Admit one request of ``key_id`` (limits as its grant says now; ``tpm`` only for a
        request whose tokens are counted), or refuse it. An admitted request with
        ``concurrency`` must be released (:meth:`release`) when it ends, and one with a
        reservation settled (:meth:`settle`) when its usage is known (a request cancelled
        while this runs has nothing to release or settle)."""
        state = self._state(key_id)
        state.concurrency = concurrency
        self._keep_up()
        now = self._clock()
        tokens = None
        if rpm is not None and now < state.exhausted_until and not self._retry_due(now):
            return self._refusal("rpm", key_id, rpm, tpm)  # before taking a slot
        if tpm is not None:
            tokens = self._state(tokens_id(key_id))
            tokens.tpm = tpm
            if now < tokens.exhausted_until and not self._retry_due(now):
                return self._refusal("tpm", key_id, rpm, tpm)
        if concurrency is not None and not await self._take_slot(key_id, state, concurrency):
            return self._refusal("concurrency", key_id, rpm, tpm)
        reservation = None
        try:
            if tpm is not None:
                wanted = _estimate(tokens, tpm)
                taken = await self._take_permit(tokens_id(key_id), tokens, tpm, wanted, "tpm")
                if taken.__class__ is Verdict:
                    if concurrency is not None:
                        self.release_soon(key_id)
                    return self._refusal(taken, key_id, rpm, tpm)
                reservation = self._reserve(tokens_id(key_id), tokens, taken, wanted,
                                            self._clock())
            # The common case without an await: a permit from a lease held here.
            now = self._clock()  # again: taking a slot may have waited for the ledger
            if rpm is not None and not self._spend_local_permit(state, rpm, now):
                taken = await self._take_permit(key_id, state, rpm)
                if taken.__class__ is Verdict:
                    if reservation is not None:
                        self.give_back(reservation)
                    if concurrency is not None:
                        self.release_soon(key_id)
                    return self._refusal(taken, key_id, rpm, tpm)
                now = self._clock()
        except BaseException:  # cancelled while waiting for the ledger: nothing is kept
            if reservation is not None:
                self.give_back(reservation)
            if concurrency is not None:
                self.release_soon(key_id)
            raise
        return self._admitted(state, rpm, now, tpm, reservation)

    def _refusal(self, refused, key_id: str, rpm: Optional[int],
                 tpm: Optional[int]) -> Verdict:
        """The refusal ``refused`` (a Verdict, or the name of the limit), with what each of
        the key's limits says: its 429 carries the headers of every limit, as OpenAI's do."""
        state = self._state(key_id)
        tokens = self._state(tokens_id(key_id)) if tpm is not None else None
        if refused == "concurrency":
            refused = Verdict("concurrency", retry_after_s=1.0)
        elif refused.__class__ is str:
            refused = self._refused(refused, tokens, tpm) if refused == "tpm" else \
                self._refused(refused, state, rpm)
        now = self._clock()
        if rpm is not None and refused.limit is None:
            refused = refused._replace(limit=rpm, remaining=self._remaining(state, now, rpm),
                                       reset_s=state.reset_s)
        if tokens is not None and refused.token_limit is None:
            refused = refused._replace(token_limit=tpm,
                                       token_remaining=self._remaining(tokens, now, tpm),
                                       token_reset_s=tokens.reset_s)
        return refused

    def _state(self, key_id: str) -> _KeyState:
        state = self._keys.get(key_id)
        if state is None:
            state = self._keys[key_id] = _KeyState()
        return state

    def _admitted(self, state: _KeyState, rpm: Optional[int], now: float,
                  tpm: Optional[int] = None,
                  reservation: Optional[Reservation] = None) -> Verdict:
        """Count an admitted request in its second (fallback shares, restores) and say so."""
        _count(state.admitted, int(now))  # floor: the clock is never negative
        if tpm is None:
            return Verdict(None, rpm, self._remaining(state, now, rpm) if rpm else None,
                           state.reset_s)
        tokens = self._keys[reservation.key_id]
        return Verdict(None, rpm, self._remaining(state, now, rpm) if rpm else None,
                       state.reset_s, 0.0, tpm, self._remaining(tokens, now, tpm),
                       tokens.reset_s, reservation)

    def _reserve(self, key_id: str, state: _KeyState, pieces: list[_Piece], count: int,
                 now: float) -> Reservation:
        second = int(now)
        _count(state.admitted, second, count)
        return Reservation(key_id, pieces, second, count)

    def settle(self, reservation: Reservation, used: int) -> None:
        """The usage the engine reported for an admitted request: the reservation is
        corrected (see the module's docstring; tokens used beyond it are charged to the
        ledger by the heartbeat, or on fallback permits counted here alone), and the key's
        next requests reserve from its recent usage. No remote call, no await. A reservation is
        settled or given back once; later calls do nothing."""
        self._settle(reservation, used, learn=True)

    def settle_unfinished(self, reservation: Reservation, prompt_estimate: int,
                          generated: int) -> None:
        """A request whose usage never came whole (its client left, its app failed or timed
        out; :class:`~rayllm_auth.usage.Settlement`): settled with ``prompt_estimate`` plus
        what it is known to have ``generated``, or its reservation if more. Not learnt from:
        a client leaving early must not lower what the key's next requests reserve."""
        self._settle(reservation, max(reservation.total, prompt_estimate + generated),
                     learn=False)

    def give_back(self, reservation: Reservation) -> None:
        """An admitted request whose tokens the engine never used (refused before it reached
        the engine, or refused by it): its whole reservation goes back, and the key's recent
        usage is not changed."""
        self._settle(reservation, 0, learn=False)

    def _settle(self, reservation: Reservation, used: int, learn: bool) -> None:
        if reservation.settled:
            return
        reservation.settled = True
        state = self._keys.get(reservation.key_id)
        if state is None:
            return
        now = self._clock()
        if learn:
            state.usage.append(used)
            del state.usage[:-USAGE_SAMPLES]
        extra = used - reservation.total
        if extra < 0:
            self._refund(state, reservation, -extra, now)
        elif extra > 0:
            self._charge(state, extra, now)

    def _refund(self, state: _KeyState, reservation: Reservation, count: int,
                now: float) -> None:
        take_off(state.admitted, reservation.second, count)
        for piece in reversed(reservation.pieces):
            back = min(count, piece.count)
            count -= back
            lease = piece.lease
            if lease is None:  # a fallback permit: counted here alone
                take_off(state.admitted_alone, reservation.second, back)
            elif lease.incarnation in self._left_behind:
                pass  # its ledger is gone: the window restored into the live one has it
            elif lease.expires > now:
                # Back into its lease, spent again within LEASE_S of its grant like any
                # permit (later, it would be spent in a window that no longer counts it).
                lease.left += back
                if not any(held is lease for held in state.leases):  # out once spent
                    state.leases.append(lease)
            else:  # taken off its second by the heartbeat's correction
                where = (lease.incarnation, lease.second)
                state.refunds[where] = state.refunds.get(where, 0) + back
            if not count:
                break
        self._keep_up()

    def _charge(self, state: _KeyState, count: int, now: float) -> None:
        _count(state.admitted, int(now), count)
        for lease in state.leases:  # permits the ledger counted already
            if lease.left > 0 and lease.expires > now:
                taken = min(count, lease.left)
                lease.left -= taken
                count -= taken
                if not count:
                    return
        if self.in_fallback or self._incarnation is None:
            _count(state.admitted_alone, int(now), count)  # the ledger hears it on return
        else:  # charged by the next heartbeat, to the ledger that counted the rest
            state.charges[self._incarnation] = state.charges.get(self._incarnation, 0) + count
        self._keep_up()

    async def release(self, key_id: str) -> None:
        """A request admitted with a concurrency limit has ended. When it was the key's last
        one here, the key's slots go back to the ledger before this returns: call it before
        the response's last byte, and the client's next request finds its slot free on any
        replica. A busy key keeps its slots here (reused without remote calls)."""
        giving_back = self.release_soon(key_id)
        if giving_back is not None:  # shielded: a client gone meanwhile must not keep it taken
            await asyncio.shield(giving_back)

    def release_soon(self, key_id: str) -> Optional[asyncio.Task]:
        """:meth:`release` without waiting (a cancelled request's clean-up, and the
        middleware's own path, which awaits only a give-back): the slot is free here at
        once; when the key's slots go back to the ledger, they do in a task, returned."""
        state = self._keys.get(key_id)
        if state is not None and state.slots_used > 0:
            state.free_slot()
            give_back = self._slots_to_give_back(state)
            if give_back:
                return self._spawn(self._give_back_slots(key_id, state, give_back))
        return None

    # -- requests per minute -------------------------------------------------------------------

    async def _take_permit(self, key_id, state: _KeyState, limit: int, count: int = 1,
                           kind: str = "rpm"):
        """Spend ``count`` permits of ``key_id``'s window (``kind``: "rpm", or "tpm" for
        tokens): the pieces spent, else the refusal (a Verdict). One lease request per key
        at a time: requests arriving meanwhile wait for its answer, then spend from it."""
        while True:
            now = self._clock()
            pieces = self._spend_local(state, limit, now, count)
            if pieces is not None:
                return pieces
            if now < state.exhausted_until and not self._retry_due(now):
                return self._refused(kind, state, limit)
            if state.leasing is None:
                if self.in_fallback and not self._retry_due(now):
                    return self._fallback_permit(state, limit, now, count, kind)
                # A task, shielded: a requester that goes away does not cancel the lease,
                # so what the ledger grants lands here and is spent or given back.
                state.leasing = asyncio.get_running_loop().create_task(self._lease_permits(
                    key_id, state, limit, count - _available(state, now)))
            state.waiting += 1
            try:
                await asyncio.shield(state.leasing)
            finally:
                state.waiting -= 1

    def _spend_local_permit(self, state: _KeyState, rpm: int, now: float) -> bool:
        """Spend a permit of a lease held here that has not run out; False when there is none.
        (:meth:`_spend_local` for one permit, on the path of nearly every request.)"""
        for lease in state.leases:
            if lease.left > 0 and lease.expires > now:
                lease.left -= 1
                if lease.left == 0:  # spent before it ran out: ask for more next time
                    state.want = min(state.want * 2, self._largest_lease(rpm))
                return True
        return False

    def _spend_local(self, state: _KeyState, limit: int, now: float,
                     count: int) -> Optional[list[_Piece]]:
        """Spend ``count`` permits of the leases held here that have not run out, or none
        when they hold fewer: the pieces spent, or None."""
        if _available(state, now) < count:
            return None
        pieces = []
        for lease in state.leases:
            if count and lease.left > 0 and lease.expires > now:
                taken = min(count, lease.left)
                lease.left -= taken
                count -= taken
                pieces.append(_Piece(lease, taken))
                if lease.left == 0:  # spent before it ran out: ask for more next time
                    state.want = min(state.want * 2, self._largest_lease(limit))
        return pieces

    async def _lease_permits(self, key_id, state: _KeyState, limit: int, need: int = 1) -> None:
        """Ask the ledger for a lease of at least ``need`` permits."""
        try:
            # Spent leases go; one that ran out unused stays until upkeep gives it back.
            state.leases = [lease for lease in state.leases if lease.left > 0]
            # Enough for the requests waiting now or the adaptive size, but never more than
            # MAX_LEASE_SHARE of the limit (unless one request needs more: tokens): waiters
            # can go away, and what they leave behind must stay within the bound the README
            # states (a burst takes several leases).
            need = max(need, 1)
            want = max(min(max(state.want, state.waiting * need), self._largest_lease(limit)),
                       need)
            try:
                grant = await self._ledger.lease_requests(key_id, limit, want, self._replica,
                                                          need)
            except LedgerUnavailable as gone:
                self._enter_fallback(self._clock())
                if gone.late_answer is not None:
                    self._spawn(self._give_back_late_grant(key_id, gone.late_answer))
                return
            if self._incarnation is not None and grant.incarnation != self._incarnation:
                # Another ledger: a restart, or a late answer of one gone since. Spent only
                # once it is known to be the live one (else void; the waiters lease again).
                await self._hear(grant.incarnation)
                if grant.incarnation != self._incarnation:
                    if grant.incarnation not in self._left_behind:
                        # Void because the check failed: the ledger that granted it may be
                        # the live one, which would count it on top of the window restored
                        # into it. Back it goes (a ledger gone since ignores it).
                        self._spawn(self._give_back_grant(key_id, grant))
                    return
            # The grant is kept before anything else is awaited: the ledger counted it.
            now = self._clock()
            state.remaining, state.reset_s = grant.remaining, grant.reset_s
            state.reset_at = now + grant.reset_s
            if grant.granted < need:  # the window has not enough left (granted: none)
                state.exhausted_until = now + min(max(grant.reset_s, 0.05), RPM_RECHECK_S)
            if grant.granted:
                state.leases.append(_RequestLease(grant.second, grant.granted, now + LEASE_S,
                                                  grant.incarnation))
            await self._hear(grant.incarnation)
        finally:
            state.leasing = None

    async def _give_back_late_grant(self, key_id: str, answer: Awaitable) -> None:
        """A lease the ledger granted after this replica stopped waiting (and admitted on
        fallback permits instead) goes back (:meth:`_give_back_grant`)."""
        try:
            grant = await asyncio.wait_for(answer, COUNTED_S)
        except Exception:  # the ledger is gone (a new one starts empty) or still slow
            return
        await self._give_back_grant(key_id, grant)

    async def _give_back_grant(self, key_id: str, grant: RequestGrant) -> None:
        """Permits a ledger granted that this replica will not spend go back, else it would
        count them for a minute while nobody spends them. A ledger other than the one that
        granted them takes nothing off."""
        if not grant.granted:
            return
        try:
            await self._ledger.give_back_requests(key_id, grant.granted, grant.second,
                                                  grant.incarnation)
        except LedgerUnavailable as lost:
            # Not delivered (one only late still is: the ledger applies it). Granted by a
            # ledger neither known live nor gone: should it turn out live, the window restored
            # into it leaves them out. By the live one: they stay counted (errs on the limit's
            # side).
            if lost.late_answer is None and grant.incarnation not in self._left_behind \
                    and grant.incarnation != self._incarnation:
                self._void_grants.append((key_id, grant))

    def _remaining(self, state: _KeyState, now: Optional[float], rpm: int) -> int:
        """Requests left in the window as far as this replica knows: what the ledger had
        left at our last lease, plus our unspent permits; never above ``rpm`` (permits
        leased under a limit lowered since are still spent, the header says the new one)."""
        if now is None:
            now = self._clock()
        left = max(0, state.remaining)
        for lease in state.leases:
            if lease.expires > now:
                left += lease.left
        if state.charges:  # tokens used beyond their reservations, not yet charged
            left = max(0, left - sum(state.charges.values()))
        return min(left, rpm)

    @staticmethod
    def _largest_lease(rpm: int) -> int:
        return max(1, math.floor(rpm * MAX_LEASE_SHARE))

    def _refused(self, kind: str, state: _KeyState, limit: int) -> Verdict:
        """The refusal of a key whose window (``kind``: "rpm" or "tpm") is spent."""
        now = self._clock()
        wait = max(state.exhausted_until - now, state.reset_at - now, 0.0)
        if kind == "tpm":
            return Verdict("tpm", retry_after_s=wait, token_limit=limit, token_remaining=0,
                           token_reset_s=wait)
        return Verdict("rpm", limit, 0, wait, wait)

    def _fallback_permit(self, state: _KeyState, limit: int, now: float, count: int = 1,
                         kind: str = "rpm"):
        """Permits counted by this replica alone, against its share of the limit: the piece
        spent, or the refusal. A request is admitted when nothing is counted yet (a share is
        at least one request)."""
        share = max(1, math.ceil(limit / self._replicas))
        second = math.floor(now)
        recent = {s: n for s, n in state.admitted.items() if s > second - COUNTED_S}
        used = sum(recent.values())
        state.remaining = max(0, share - used - count)
        state.reset_s = (min(recent) + COUNTED_S - now) if recent else 0.0
        if used and used + count > share:
            state.reset_at = now + state.reset_s
            state.exhausted_until = now + max(state.reset_s, 0.05)
            return self._refused(kind, state, limit)
        # The ledger hears of it when it answers again; a permit of a lease is not counted
        # here: the ledger counted it when it granted the lease.
        _count(state.admitted_alone, second, count)
        return [_Piece(None, count)]

    # -- concurrency ---------------------------------------------------------------------------

    async def _take_slot(self, key_id, state: _KeyState, concurrency: int) -> bool:
        if state.slots_used < min(state.slots_held, concurrency):
            state.slots_used += 1  # an idle slot held here (a lowered limit holds fewer)
            return True
        now = self._clock()
        if state.slots_used >= concurrency or now < state.slot_refused_until:
            return False
        if self.in_fallback and not self._retry_due(now):
            return self._fallback_slot(state, concurrency)
        # A task, shielded: a slot the ledger grants is this requester's from the moment it
        # arrives (the restore that may follow is awaited after it, and another request must
        # neither take it nor give it back meanwhile); if the requester goes away, the slot
        # is free here at once and goes back to the ledger when the lease task is over.
        claim = _SlotClaim()
        leasing = asyncio.ensure_future(self._lease_slot(key_id, state, concurrency, claim))
        try:
            granted = await asyncio.shield(leasing)
        except asyncio.CancelledError:
            claim.drop(state)
            leasing.add_done_callback(lambda _: self._give_back_if_idle(key_id, state))
            raise
        if granted is None:
            return self._fallback_slot(state, concurrency)
        if not granted:
            state.slot_refused_until = self._clock() + SLOT_REFUSAL_S
        return granted

    async def _lease_slot(self, key_id, state: _KeyState, concurrency: int,
                          claim: _SlotClaim) -> Optional[bool]:
        """Whether the ledger granted a slot, claimed for the requester before anything else
        is awaited; None when the ledger is gone. Raises what ``lease_slots`` raises other
        than LedgerUnavailable (nothing is claimed then); a restore that fails after the
        claim keeps the slot the requester's (the ledger is then taken as gone)."""
        state.slots_pending += 1  # reported to the ledger as held while we wait
        try:
            granted, incarnation = await self._ledger.lease_slots(key_id, concurrency, 1,
                                                                  self._replica)
        except LedgerUnavailable as gone:
            self._enter_fallback(self._clock())
            if gone.late_answer is not None:
                self._spawn(self._correct_late_slot_grant(gone.late_answer))
            return None
        finally:
            state.slots_pending -= 1
        state.slots_held += granted
        if granted:
            state.slots_contended = False  # the ledger had room: reuse slots here again
        if not claim.gone and state.slots_used < min(state.slots_held, concurrency):
            state.slots_used += 1
            claim.taken = True
        try:
            await self._hear(incarnation)
        except BaseException:  # this task cancelled: its requester is told so, holds nothing
            claim.drop(state)
            raise
        if incarnation == self._incarnation:  # not a ledger gone since: it knows the limit
            state.concurrency_told = concurrency
        return claim.taken

    def _give_back_if_idle(self, key_id: str, state: _KeyState) -> None:
        """After a lease task whose requester went away: the key's slots go back to the
        ledger if no request of the key uses one here."""
        give_back = self._slots_to_give_back(state)
        if give_back:
            self._spawn(self._give_back_slots(key_id, state, give_back))

    async def _correct_late_slot_grant(self, answer: Awaitable) -> None:
        """A slot the ledger granted after this replica stopped waiting: the ledger hears
        the slots actually held here (a sync is the truth), else it would count the slot
        for this replica until it fell silent, refusing other replicas meanwhile."""
        try:
            granted, _ = await asyncio.wait_for(answer, COUNTED_S)
            if granted:
                await self._ledger.sync(self._replica, self._reported_holdings())
        except Exception:  # gone: a replica silent for HOLDING_TTL_S loses its slots anyway
            pass

    def _fallback_slot(self, state: _KeyState, concurrency: int) -> bool:
        """In flight counted by this replica alone, against its share (at least one)."""
        share = max(1, math.ceil(concurrency / self._replicas))
        if state.slots_used >= share:
            return False
        state.slots_used += 1
        state.slots_held = max(state.slots_held, state.slots_used)
        return True

    def _slots_to_give_back(self, state: _KeyState) -> int:
        """The slots held but not used here (all of them when no request of the key uses
        one; else only if the key is contended) move to ``slots_returning``: how many the
        caller must give back."""
        if (state.slots_used == 0 or state.slots_contended) and not self.in_fallback:
            idle = state.slots_held - state.slots_used
            if idle > 0:
                state.slots_held -= idle
                state.slots_returning += idle  # still reported until the ledger has them
                return idle
            return 0
        if self.in_fallback:
            state.slots_held = state.slots_used
        return 0

    async def _give_back_slots(self, key_id: str, state: _KeyState, count: int) -> None:
        """``count`` slots, already counted in ``slots_returning``, back to the ledger."""
        try:
            await self._ledger.give_back_slots(key_id, count, self._replica)
        except LedgerUnavailable:
            self._enter_fallback(self._clock())
        finally:
            state.slots_returning -= count

    # -- upkeep ----------------------------------------------------------------------------------

    def _keep_up(self) -> None:
        if self._heartbeat and (self._upkeep_task is None or self._upkeep_task.done()):
            self._upkeep_task = asyncio.get_running_loop().create_task(
                _keep_up_loop(weakref.ref(self)))

    def _idle(self) -> bool:
        """Nothing for a heartbeat to do: the ledger answering, nothing held, asked for or
        on its way back, and the last report was the truth (one sent while a slot was
        asked for or on its way back can count it after the ledger had its answer)."""
        return not self.in_fallback and self._reported_truth and not any(
            s.leases or s.slots_held or s.slots_used or s.slots_pending or s.slots_returning
            or s.leasing is not None or s.charges or s.refunds for s in self._keys.values())

    async def upkeep(self) -> None:
        """Give back expired request leases and idle slots beyond a (lowered) limit or of
        keys other replicas wait for, report the slots held (a heartbeat that keeps them),
        and restore our part into a restarted ledger. Skipped in fallback until a retry is
        due."""
        now = self._clock()
        if self.in_fallback and not self._retry_due(now):
            return
        try:
            for key_id, state in list(self._keys.items()):
                expired = [l for l in state.leases if l.expires <= now]
                if expired:  # out in one step, before any await: given back at most once,
                    # and a lease task replacing the list meanwhile cannot undo it
                    state.leases = [l for l in state.leases if l.expires > now]
                for lease in expired:
                    if lease.left:
                        state.want = max(1, state.want // 2)
                        await self._ledger.give_back_requests(key_id, lease.left, lease.second,
                                                              lease.incarnation)
                if state.charges or state.refunds:
                    await self._correct_tokens(key_id, state)
                if state.slots_used == 0:  # no request of the key here: hold nothing
                    await self._give_back_idle(key_id, state, 0)
                elif state.concurrency is not None and state.slots_held > state.concurrency:
                    await self._give_back_idle(key_id, state, state.concurrency)
                if state.slots_held and state.concurrency is not None \
                        and state.concurrency != state.concurrency_told:
                    # A busy key may never lease again: the ledger learns a lowered limit
                    # (or, restarted, any limit) from an empty lease, and the sync below
                    # then finds the key above it (contended: its holders give back).
                    _, told = await self._ledger.lease_slots(key_id, state.concurrency, 0,
                                                             self._replica)
                    if told == self._incarnation:  # not a ledger gone since
                        state.concurrency_told = state.concurrency
            reply = await self._ledger.sync(self._replica, self._reported_holdings())
            if not await self._hear(reply["incarnation"]) \
                    or reply["incarnation"] != self._incarnation:
                return  # a stale answer says nothing about the live ledger's books
            for key_id in reply["contended"]:
                state = self._keys.get(key_id)
                if state is not None:
                    state.slots_contended = True
                    await self._give_back_idle(key_id, state, 0)
            self._replicas = max(self._replicas_at_least, int(reply["replicas"]))
        except LedgerUnavailable:
            self._enter_fallback(self._clock())

    async def _hear(self, incarnation: str) -> bool:
        """The ledger answered a call: it hears what it must (:meth:`_heard`), then a replica
        in fallback goes back to cluster-wide limits. False, and in fallback (entered or
        kept, said once), when that failed in any way: a grant must still reach its
        requesters, and a ledger that answers but cannot be restored is not back."""
        if incarnation in self._left_behind:
            return False  # a late answer of a ledger that has restarted since: stale
        if self.in_fallback:
            self._rejoining = True  # _heard() restores what we admitted alone
        try:
            await self._heard(incarnation)
        except LedgerUnavailable:
            self._enter_fallback(self._clock())
            return False
        except Exception:
            logger.exception("rayllm-auth: restoring the limits ledger failed; limiting each "
                             "key to its share here until it answers again")
            self._enter_fallback(self._clock())
            return False
        self._leave_fallback()
        # Admitted alone while the restore was on its way: the next answer takes it.
        if any(state.admitted_alone for state in self._keys.values()):
            self._unrestored.append(_restore_part(self._keys, "admitted_alone"))
            for state in self._keys.values():
                state.admitted_alone.clear()
        return True

    async def _heard(self, incarnation: str) -> None:
        """Every answer names the ledger's incarnation. A new one (restarted, empty) gets
        what this replica admitted in the window before anything else; back from fallback,
        the ledger gets what was admitted on fallback permits; both with the slots held.
        Raises LedgerUnavailable (nothing is then forgotten: it is sent again, and the
        ledger applies each part once)."""
        if incarnation in self._left_behind:
            return  # an answer that reached the ledger before it restarted
        restarted = False
        if self._incarnation is None:
            self._incarnation = incarnation
        elif incarnation != self._incarnation:
            restarted = await self._find_the_live_ledger(incarnation)
        incarnation = self._incarnation
        if self._rejoining and not restarted:  # (a restart restores the whole window)
            self._unrestored.append(_restore_part(self._keys, "admitted_alone"))
        must_report = restarted or self._rejoining  # the slots held, at least
        if must_report:
            for state in self._keys.values():
                state.admitted_alone.clear()
            self._rejoining = False
        now = self._clock()
        sending = _still_counted(self._unrestored, now)
        self._unrestored = sending
        if not sending and not must_report:
            return
        # Ages from the end of each local second: on a ledger whose clock has another
        # fraction (another node) a request is counted a little long, never too short.
        parts = [(token, {k: [(max(0.0, now - second - 1), n) for second, n in counts.items()]
                          for k, counts in granted.items()}) for token, granted in sending]
        answered = await self._ledger.restore(self._replica, incarnation, parts,
                                              self._reported_holdings())
        sent = {token for token, _ in sending}
        self._unrestored = [part for part in self._unrestored if part[0] not in sent]
        if answered != incarnation:  # it restarted meanwhile and applied nothing
            await self._heard(answered)

    async def _find_the_live_ledger(self, other: str) -> bool:
        """An answer named ``other``, not the ledger this replica knows. Incarnations have no
        order: ``other`` is a restart, or the late answer of a ledger gone since (one this
        replica may never have heard). A sync sent now is answered by the live ledger (or a
        newer one), and decisions are made one at a time, so each such sync is sent after
        every answer decided before it: its answer is the newest, and decides. The others
        are forgotten (:meth:`_forget`). True when the live ledger is new to this replica (a
        restart: its books are empty, everything in the window is to be restored). Raises
        LedgerUnavailable (nothing changed)."""
        failed_before = self._failed_checks
        async with self._deciding:
            if other in self._left_behind or other == self._incarnation:
                return False  # decided meanwhile
            if self._failed_checks != failed_before:
                # One failed while this one waited: failing at once keeps K waiting checks
                # from costing the last requester K deadlines; upkeep retries.
                raise LedgerUnavailable("the ledger did not answer the check before")
            try:
                live = (await self._ledger.sync(self._replica,
                                                self._reported_holdings()))["incarnation"]
            except LedgerUnavailable:
                self._failed_checks += 1
                raise
            if live in self._left_behind:  # cannot be newest; never let it win
                return False
            for seen in {other, self._incarnation} - {live}:
                self._forget(seen)
            if live == self._incarnation:
                return False
            self._incarnation = live
            for state in self._keys.values():  # tell it the limits again
                state.concurrency_told = None
            token, window = _restore_part(self._keys, "admitted")
            for key_id, grant in self._void_grants:
                if grant.incarnation == live and key_id in window:
                    _net_out(window[key_id], grant.granted)
            self._void_grants = []
            self._unrestored = [(token, {k: c for k, c in window.items() if c})]
            return True

    def _forget(self, incarnation: str) -> None:
        """A ledger gone: its answers are stale from now on, and the permits it leased us
        are void (its books are gone; the live ledger hears what was spent of them in the
        window restored into it)."""
        self._left_behind.add(incarnation)
        self._void_grants = [v for v in self._void_grants if v[1].incarnation != incarnation]
        for state in self._keys.values():
            state.leases = [l for l in state.leases if l.incarnation != incarnation]
            # In the window restored into the live ledger:
            state.charges.pop(incarnation, None)
            state.refunds = {k: n for k, n in state.refunds.items() if k[0] != incarnation}

    async def _correct_tokens(self, key_id: str, state: _KeyState) -> None:
        """Send the key's token corrections (charges, refunds), one call per ledger that
        counted them. Taken out before the await: a correction the ledger did not get is
        sent again; one it got late (missed its deadline) is not, and counts twice if it
        was a charge (on the limit's side); another ledger ignores it (it got the whole
        window). Raises LedgerUnavailable."""
        for incarnation in {*state.charges, *(k[0] for k in state.refunds)}:
            charged = state.charges.pop(incarnation, 0)
            refunds = {second: n for (inc, second), n in state.refunds.items()
                       if inc == incarnation}
            for second in refunds:
                del state.refunds[(incarnation, second)]
            try:
                answer = await self._ledger.correct(key_id, state.tpm, refunds, charged,
                                                    incarnation)
            except LedgerUnavailable as lost:
                if lost.late_answer is None:
                    state.charges[incarnation] = state.charges.get(incarnation, 0) + charged
                    for second, n in refunds.items():
                        where = (incarnation, second)
                        state.refunds[where] = state.refunds.get(where, 0) + n
                raise
            await self._hear(answer)

    async def _give_back_idle(self, key_id: str, state: _KeyState, keep: int) -> None:
        """Idle slots beyond ``keep`` held (never one in use) go back to the ledger."""
        extra = state.slots_held - max(state.slots_used, keep)
        if extra > 0:
            state.slots_held -= extra
            state.slots_returning += extra
            await self._give_back_slots(key_id, state, extra)

    def _holdings(self) -> dict[str, int]:
        """Slots held per key, counting those asked for and not yet answered and those
        given back and not yet received: the ledger takes a sync as the truth, and must
        neither drop a grant on its way nor subtract a give-back twice."""
        holdings = {k: s.slots_held + s.slots_pending + s.slots_returning
                    for k, s in self._keys.items()}
        return {k: n for k, n in holdings.items() if n}

    def _reported_holdings(self) -> dict[str, int]:
        """:meth:`_holdings` for a report the ledger takes as the truth (a sync, a restore).
        One that counts a slot asked for or on its way back may count it after the ledger has
        had its answer: the heartbeat then goes on (:meth:`_idle`) to report again."""
        self._reported_truth = not any(s.slots_pending or s.slots_returning
                                       for s in self._keys.values())
        return self._holdings()

    def _spawn(self, coro) -> asyncio.Task:
        """Run ``coro`` in a task this object keeps until it ends (the loop keeps only
        weak references to tasks)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            coro.close()  # never started: no "coroutine was never awaited" warning
            raise
        task = loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _retry_due(self, now: float) -> bool:
        return self._fallback_until is not None and now >= self._fallback_until

    def _enter_fallback(self, now: float) -> None:
        entering = self._fallback_until is None
        self._fallback_until = now + RETRY_S
        self._keep_up()  # the retry's sync corrects what the ledger counts for us
        if entering:
            logger.error(
                "rayllm-auth: the limits ledger cannot be reached; limiting each key to its "
                "share here (limit / %d replicas, rounded up) until it answers again",
                self._replicas)
            self._on_fallback(True)

    def _leave_fallback(self) -> None:
        if self._fallback_until is not None:
            self._fallback_until = None
            for state in self._keys.values():  # the ledger decides again, not our share
                state.exhausted_until = 0.0
            logger.warning("rayllm-auth: the limits ledger answers again; cluster-wide limits")
            self._on_fallback(False)


async def _keep_up_loop(quota_ref: "weakref.ref[ReplicaQuota]") -> None:
    """A replica's heartbeat: upkeep every SYNC_S, off the request path, while it holds
    leases, and in fallback until the ledger answers (the ledger may still count slots for
    it that it released meanwhile: a give-back that failed, slots forgotten in fallback; only
    a sync, the replica's truth, takes them off). It holds its quota only while working: a
    quota nothing else uses any more (a middleware rebuilt) must not report under the same
    replica id as the one in use, erasing the slots that one holds."""
    while True:
        await asyncio.sleep(SYNC_S)
        quota = quota_ref()
        if quota is None:
            return
        try:
            await quota.upkeep()
        except Exception:  # never let the heartbeat die: the ledger would drop our slots
            logger.exception("rayllm-auth: limits upkeep failed; trying again")
        if quota._idle():
            return
        del quota


def _count(counts: dict[int, int], second: int, count: int = 1) -> None:
    """``count`` more in ``second``; seconds no longer counted go."""
    counts[second] = counts.get(second, 0) + count
    if len(counts) > COUNTED_S:
        for old in [s for s in counts if s <= second - COUNTED_S]:
            del counts[old]


def _net_out(counts: dict[int, int], count: int) -> None:
    """``count`` fewer in ``counts``, the oldest seconds first (the ledger counts them at
    the grant's second instead: never shorter)."""
    for second in sorted(counts):
        taken = min(count, counts[second])
        counts[second] -= taken
        count -= taken
        if not counts[second]:
            del counts[second]
        if not count:
            return


def _available(state: _KeyState, now: float) -> int:
    """Permits of the leases held here that have not run out."""
    return sum(lease.left for lease in state.leases if lease.left > 0 and lease.expires > now)


def _estimate(state: _KeyState, tpm: int) -> int:
    """Tokens a request of the key reserves: the median of its last USAGE_SAMPLES here (the
    higher of two middle ones; one before any request of it ended here), at most
    RESERVATION_SHARE of the limit: a replica that learnt of large requests is not refused
    for as long as others keep the window from being nearly empty (what a request uses
    beyond its reservation is charged, and carried over when it puts the window above the
    limit: see :meth:`~rayllm_auth.ledger.Ledger.correct`)."""
    usage = sorted(state.usage)
    return min(max(1, usage[len(usage) // 2]) if usage else 1,
               max(1, int(tpm * RESERVATION_SHARE)))


def _still_counted(parts, now: float):
    """``parts`` without the seconds a ledger no longer counts (their age, sent from the
    end of the second, would be COUNTED_S or more), and without empty parts."""
    oldest = now - COUNTED_S - 1
    trimmed = [(token, {k: {s: n for s, n in counts.items() if s > oldest}
                        for k, counts in granted.items()}) for token, granted in parts]
    trimmed = [(token, {k: c for k, c in granted.items() if c}) for token, granted in trimmed]
    return [(token, granted) for token, granted in trimmed if granted]


def _restore_part(keys: dict[str, _KeyState], which: str):
    """A copy of every key's ``admitted`` or ``admitted_alone`` counts, under a new token."""
    return uuid.uuid4().hex, {k: dict(getattr(s, which)) for k, s in keys.items()
                              if getattr(s, which)}


class InProcessLedger:
    """:class:`LedgerCalls` on a ledger in this process: limits for one process, where there
    is no Serve application to share them with (an app protected outside Serve, a test)."""

    def __init__(self, ledger: Ledger):
        self._ledger = ledger

    def __getattr__(self, method: str):
        if method.startswith("_"):
            raise AttributeError(method)
        bound = getattr(self._ledger, method)

        async def call(*args):
            return bound(*args)

        return call
