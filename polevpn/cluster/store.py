"""The asyncio shell between etcd and ClusterState: this router's keys under a lease, and the
cluster's keys read and watched.

One session at a time, against whichever endpoint answers:

1. the lease: the one held before if etcd still has it (a short outage), else a new one
   (``lease_ttl`` from the config), and then every key of this router is written again;
2. the keys this router must hold (``ClusterState.pending``), in transactions;
3. a snapshot of the cluster's prefix, which replaces what the state knew (a resync);
4. then, until something fails: the lease renewed every third of its TTL, the prefix
   watched from the snapshot's revision on, and this router's changes written as they come
   (``kick``). A compacted watch reads a new snapshot and watches on from there.

A session that fails (an endpoint gone, a call timed out, the lease expired) is followed at
once by one on the next endpoint; when every endpoint has failed in a row, the store is
lost: ClusterState keeps what it knew (forwarding goes on with it) and marks it stale, and
the sessions are retried with a backoff up to ``MAX_BACKOFF``, and never more than a third of
the lease's TTL apart: etcd that comes back gives every lease it had its TTL again, and the
router must renew its own within that, or its keys vanish (and the other routers drop its
routes) just as the store returns. ``stop`` revokes the lease,
so that this router's keys vanish at once rather than after the TTL.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from dataclasses import dataclass

from polevpn.cluster.etcd import (
    GRPC_NOT_FOUND,
    Compacted,
    EtcdClient,
    EtcdError,
    EtcdUnavailable,
)
from polevpn.cluster.state import CONNECTED, LOST, ClusterState
from polevpn.common.counters import Counters
from polevpn.common.logfmt import kv
from polevpn.config import ClusterConfig

log = logging.getLogger("polevpn.cluster")

MIN_BACKOFF = 0.1
MAX_BACKOFF = 5.0
# a burst of registrations (gateways reconnecting after a restart) goes out in one write
FLUSH_DELAY = 0.02
# the longest a clean stop waits for the lease's revocation
REVOKE_TIMEOUT = 1.0
# a watch stream broken this many times in a row (no event between) ends the session
WATCH_RETRIES = 3


class LeaseLost(EtcdError):
    """etcd no longer has this router's lease: its keys are gone."""


@dataclass(slots=True)
class StoreStats(Counters):
    # sessions that failed (each an endpoint that did not answer, or a call that failed)
    errors: int = 0
    sessions: int = 0
    lease_grants: int = 0
    leases_lost: int = 0
    compactions: int = 0
    # watch streams opened again after they broke
    watch_restarts: int = 0
    # transactions written, and the keys put and deleted in them
    writes: int = 0
    puts: int = 0
    deletes: int = 0
    # times the store was declared lost
    lost: int = 0


def client_for(cfg: ClusterConfig) -> EtcdClient:
    return EtcdClient(
        cfg.etcd_endpoints,
        username=cfg.etcd_username,
        password=cfg.etcd_password,
        ca=cfg.etcd_ca,
        cert=cfg.etcd_cert,
        key=cfg.etcd_key,
        timeout=call_timeout(cfg.lease_ttl),
    )


def retry_ceiling(lease_ttl: int) -> float:
    """The longest pause between attempts while the store is lost: a third of the TTL (at
    most MAX_BACKOFF), so that with the jitter and a slow call the lease etcd restored on
    its return is renewed before it runs out."""
    return max(MIN_BACKOFF, min(MAX_BACKOFF, lease_ttl / 3))


def call_timeout(lease_ttl: int) -> float:
    """A call slower than a third of the TTL could let the lease lapse: it counts as failed."""
    return max(0.5, min(2.0, lease_ttl / 3))


class ClusterStore:
    def __init__(
        self, cfg: ClusterConfig, state: ClusterState, client: EtcdClient | None = None
    ) -> None:
        self.cfg = cfg
        self.state = state
        self.client = client if client is not None else client_for(cfg)
        self.stats = StoreStats()
        self.lease = 0
        # the TTL etcd granted, and what was left of it at the last renewal
        self.lease_ttl = 0
        self.lease_remaining = 0
        self.last_error: str | None = None
        self._kick = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._failures = 0

    @property
    def endpoint(self) -> str:
        return self.client.endpoint

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="cluster-store")

    def kick(self) -> None:
        """This router's registrations changed: write them soon."""
        self._kick.set()

    def halt(self) -> None:
        """Stop taking events now (a reconfiguration replaces this store); ``stop`` still
        ends it."""
        if self._task is not None:
            self._task.cancel()

    async def stop(self, revoke: bool = True) -> None:
        """End the sessions; with ``revoke``, this router's keys vanish from the store now."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        lease, self.lease = self.lease, 0
        if revoke and lease:
            try:
                async with asyncio.timeout(REVOKE_TIMEOUT):
                    await self.client.lease_revoke(lease)
                log.info("cluster lease revoked", extra=kv(lease=f"{lease:x}"))
            except (EtcdError, TimeoutError, OSError) as exc:
                # its keys expire with it after the TTL
                log.warning(
                    "cluster lease not revoked", extra=kv(lease=f"{lease:x}", error=exc)
                )
        await self.client.close()

    # ------------------------------------------------------------------ sessions
    async def _run(self) -> None:
        backoff = MIN_BACKOFF
        while True:
            began = time.monotonic()
            try:
                await self._session()
            except LeaseLost:
                # etcd answers: a new lease at once, and every key written again under it
                continue
            except (EtcdError, OSError) as exc:
                self.stats.errors += 1
                self.last_error = str(exc)[:200]
                self._failures += 1
                level = logging.WARNING if self.state.store == CONNECTED else logging.DEBUG
                log.log(level, "cluster store error",
                        extra=kv(endpoint=self.endpoint, error=self.last_error))
            if time.monotonic() - began > self.cfg.lease_ttl:
                backoff = MIN_BACKOFF  # the session lasted: start over gently
            if self._failures >= len(self.cfg.etcd_endpoints) and self.state.store != LOST:
                self.stats.lost += 1
                self.state.store_lost(time.monotonic())
                log.warning(
                    "cluster store lost",
                    extra=kv(
                        endpoints=",".join(self.cfg.etcd_endpoints),
                        error=self.last_error,
                        routers=len(self.state.routers),
                        remote_routes=self.state.routes_count(),
                    ),
                )
            if self._failures < len(self.cfg.etcd_endpoints):
                continue  # the next endpoint at once
            await asyncio.sleep(backoff * random.uniform(0.8, 1.2))
            backoff = min(retry_ceiling(self.cfg.lease_ttl), backoff * 2)

    async def _session(self) -> None:
        self.stats.sessions += 1
        client = self.client
        if self.lease:
            remaining = await client.lease_keepalive(self.lease)
            if remaining <= 0:
                self._lease_lost()
        if not self.lease:
            self.lease, self.lease_ttl = await client.lease_grant(self.cfg.lease_ttl)
            self.lease_remaining = self.lease_ttl
            self.stats.lease_grants += 1
            self.state.lease_granted(self.lease)
        await self._flush()
        await self._resync()
        was = self.state.store
        down_since = self.state.since
        self.state.store_up(time.monotonic())
        self._failures = 0
        fields: dict[str, object] = {
            "endpoint": self.endpoint,
            "lease": f"{self.lease:x}",
            "ttl": self.lease_ttl,
            "revision": self.state.revision,
            "routers": len(self.state.routers),
            "remote_routes": self.state.routes_count(),
            "keys": self.state.held,
        }
        if was == LOST and down_since is not None:
            fields["down_s"] = round(time.monotonic() - down_since, 1)
            log.info("cluster store back", extra=kv(**fields))
        else:
            log.info("cluster store connected", extra=kv(**fields))
        tasks = [
            asyncio.create_task(self._keepalive()),
            asyncio.create_task(self._watch()),
            asyncio.create_task(self._writer()),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for t in done:
            t.result()  # raises what ended the session
        raise EtcdError("cluster session ended")  # (no task ends without an error)

    def _lease_lost(self) -> None:
        self.stats.leases_lost += 1
        log.warning("cluster lease lost", extra=kv(lease=f"{self.lease:x}"))
        self.lease = 0

    async def _keepalive(self) -> None:
        interval = max(0.5, self.lease_ttl / 3)
        while True:
            await asyncio.sleep(interval)
            remaining = await self.client.lease_keepalive(self.lease)
            if remaining <= 0:
                self._lease_lost()
                raise LeaseLost("lease expired")
            self.lease_remaining = remaining

    async def _watch(self) -> None:
        """The cluster's prefix, from the revision the state knows on. A stream that breaks
        is opened again from where it was (the lease's renewals say whether etcd itself is
        gone); one whose revision was compacted meanwhile reads a new snapshot first."""
        root = self.state.layout.root
        failures = 0
        while True:
            try:
                async for batch in self.client.watch(root, self.state.revision + 1):
                    failures = 0
                    for ev in batch.events:
                        if ev.value is None:
                            self.state.delete(ev.key, ev.mod_revision)
                        else:
                            self.state.put(ev.key, ev.value, ev.mod_revision, ev.lease)
                    if self.state.dirty:
                        self.kick()  # one of our keys vanished or was overwritten
            except Compacted as exc:
                self.stats.compactions += 1
                self.state.compacted()
                log.info(
                    "cluster watch compacted",
                    extra=kv(revision=self.state.revision, compacted=exc.compact_revision),
                )
                await self._resync()
            except EtcdUnavailable as exc:
                failures += 1
                self.stats.watch_restarts += 1
                if failures > WATCH_RETRIES:
                    raise
                log.debug("cluster watch restarts", extra=kv(error=exc))
                await asyncio.sleep(MIN_BACKOFF * failures)

    async def _resync(self) -> None:
        revision, kvs = await self.client.snapshot(self.state.layout.root)
        self.state.snapshot(revision, ((kv_.key, kv_.value, kv_.lease) for kv_ in kvs))
        if self.state.pending() != ({}, []):
            self.kick()

    async def _writer(self) -> None:
        while True:
            await self._kick.wait()
            await asyncio.sleep(FLUSH_DELAY)
            self._kick.clear()
            await self._flush()

    async def _flush(self) -> None:
        puts, deletes = self.state.pending()
        if not puts and not deletes:
            return
        try:
            await self.client.txn(puts.items(), deletes, self.lease)
        except EtcdError as exc:
            if exc.code == GRPC_NOT_FOUND:  # "requested lease not found"
                self._lease_lost()
                raise LeaseLost(str(exc)) from None
            raise
        self.state.confirm(puts, deletes)
        self.stats.writes += 1
        self.stats.puts += len(puts)
        self.stats.deletes += len(deletes)

    # ------------------------------------------------------------------ questions
    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()


async def wait_connected(store: ClusterStore, timeout: float) -> bool:
    """Until ``store`` is connected (tests, and callers that want to know)."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            while store.state.store != CONNECTED:
                await asyncio.sleep(0.02)
            return True
    return False
