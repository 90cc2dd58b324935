"""The ledger as a Ray actor, and a replica's connection to it.

One named, detached actor per Serve application (``rayllm-auth-ledger-v3:<app>`` in the
``rayllm_auth`` namespace), created by the first replica that sees a limited key
(``get_if_exists``: every replica gets the same one), with no CPU reserved. Ray restarts it
if it dies (``max_restarts=-1``); replicas then restore what they admitted in the window
(:mod:`rayllm_auth.quota`). It lives on after its application is deleted (a few kilobytes);
``ray kill`` removes it.

Every call has a deadline (``CALL_TIMEOUT_S``): a ledger that does not answer in time is
treated as gone (fallback limits), never waited for; the call stays in flight, and a lease
the ledger grants after the deadline is given back (:mod:`rayllm_auth.quota`). The calls a
replica makes before its first call has ended (answered, failed or cancelled) have a longer
one (``FIRST_CONTACT_TIMEOUT_S``): they may be creating the actor, which takes seconds on a
busy node, and that is no outage (falling back then would let each replica admit a full
share of the keys' limits while the ledger starts). Every later call, a fallback's retries
included, has the short one.

Trust: the actor is reachable by any code that can reach the Ray cluster (as every Ray actor
is), which could change its books; the limits are as strong as access to the cluster, which
KubeRay keeps inside the pod network (Ray's own token auth, on by default from Ray 2.60, closes
it to processes without the cluster's token). The HTTP clients the limits apply to never reach
it: its name comes from Serve's application name, its key ids from the key file.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Optional
from rayllm_auth import metrics
from rayllm_auth.ledger import Ledger
from rayllm_auth.quota import InProcessLedger, LedgerUnavailable, ReplicaQuota

__all__ = ["LedgerActor", "RayLedger", "replica_quota", "NAMESPACE"]

logger = logging.getLogger("rayllm_auth")

NAMESPACE = "rayllm_auth"
#: A ledger call that takes longer than this counts as the ledger being gone.
CALL_TIMEOUT_S = 1.0
#: The same for the calls made before this replica's first call has ended (the actor may be
#: starting: a process, its runtime_env, on a node that may be loaded).
FIRST_CONTACT_TIMEOUT_S = 10.0


class LedgerActor(Ledger):
    """The ledger, served by Ray: its own monotonic clock."""

    def __init__(self):
        super().__init__(time.monotonic)


#: In the actor's name: a replica of a newer rayllm-auth with another ledger protocol never
#: talks to an older ledger still running (detached actors outlive upgrades).
# 2: restore takes parts with tokens, give-backs name the incarnation; 3: correct (tpm=)
PROTOCOL = 3


def actor_name(app_name: str) -> str:
    return f"rayllm-auth-ledger-v{PROTOCOL}:{app_name}"


class RayLedger:
    """:class:`~rayllm_auth.quota.LedgerCalls` on the application's ledger actor, created
    or found on first use and found again after a failure."""

    def __init__(self, app_name: str):
        self._name = actor_name(app_name)
        self._handle = None
        self._lookup: Optional[asyncio.Future] = None  # the one lookup in flight
        self._first_contact = True  # until a call has ended, whichever way

    def __getattr__(self, method: str):
        if method.startswith("_"):
            raise AttributeError(method)

        async def call(*args):
            answer = asyncio.ensure_future(self._call(method, args))
            answer.add_done_callback(_retrieve)
            deadline = FIRST_CONTACT_TIMEOUT_S if self._first_contact else CALL_TIMEOUT_S
            try:  # one deadline for finding the actor and calling it
                return await asyncio.wait_for(asyncio.shield(answer), deadline)
            except asyncio.TimeoutError:  # the call stays in flight: the ledger may apply it
                self._handle = None
                raise LedgerUnavailable("TimeoutError", late_answer=answer) from None
            except Exception as exc:  # Ray's actor errors: "not now"
                self._handle = None
                raise LedgerUnavailable(type(exc).__name__) from None
            finally:
                self._first_contact = False

        return call

    async def _call(self, method: str, args: tuple):
        if self._handle is None:
            # One lookup at a time (it blocks a thread until Ray answers), shared by callers.
            if self._lookup is None or self._lookup.done():
                self._lookup = asyncio.ensure_future(asyncio.to_thread(self._get_or_create))
            self._handle = await asyncio.shield(self._lookup)
        return await getattr(self._handle, method).remote(*args)

    def _get_or_create(self):
        import ray

        return ray.remote(LedgerActor).options(
            name=self._name, namespace=NAMESPACE, lifetime="detached", get_if_exists=True,
            max_restarts=-1, num_cpus=0,
        ).remote()


def _retrieve(answer: asyncio.Future) -> None:
    """A call nobody awaits any more ends quietly (asyncio logs an unretrieved error)."""
    if not answer.cancelled():
        answer.exception()


def replica_quota() -> ReplicaQuota:
    """The limits of the Serve replica this runs in, shared through its application's
    ledger; outside a Serve replica, limits for this process alone."""
    try:
        from ray import serve

        context = serve.get_replica_context()
    except Exception:  # not in a replica (RayServeException), or Serve not importable
        return ReplicaQuota(InProcessLedger(Ledger(time.monotonic)), "local", time.monotonic)
    quota = ReplicaQuota(RayLedger(context.app_name), context.replica_tag, time.monotonic,
                         on_fallback=metrics.record_limits_fallback)
    quota.assume_replicas(replicas_at_least(context))
    return quota


def replicas_at_least(context) -> int:
    """How many replicas the deployment of the Serve replica ``context`` runs at least: the
    fallback shares' smallest divisor (the ledger may say it hears from more). For an
    autoscaled deployment (Ray then leaves ``num_replicas``, and ``world_size``, at 1) its
    ``min_replicas``. Read once, when the replica builds its quota: a deployment scaled down
    in place since keeps the larger divisor (stricter fallback shares, never looser)."""
    config = getattr(context, "_deployment_config", None)
    autoscaling = getattr(config, "autoscaling_config", None)
    if autoscaling is not None:
        return max(1, getattr(autoscaling, "min_replicas", 0) or 0)
    return max(1, getattr(context, "world_size", 0) or getattr(config, "num_replicas", 0) or 0)
