"""This router as a member of its cluster: what the router orchestrator holds when its config
has a ``cluster`` section, and the few calls it makes.

    member = ClusterMember(cfg.cluster, router.routes)
    member.start()                                    # the store runs in the background
    member.gateway_up(gateway, prefixes)              # a REGISTER was accepted
    member.gateway_down(gateway)                      # that gateway's last link went
    member.refuses(gateway, prefixes)                 # another router's gateway holds one
    member.reconfigure(new_cluster_cfg)               # a reload changed the section
    await member.stop()                               # the lease revoked: our keys vanish

``remote`` is the table of the other routers' routes (polevpn.cluster.routes.RemoteRoutes),
installed into the router's own table as fallback claims, that the state keeps up to date.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Iterable
from typing import Any

from polevpn import __version__
from polevpn.cluster.keys import SITE_LOCAL, Layout, RouterInfo
from polevpn.cluster.state import ClusterState, RouteFactory, RouteSink
from polevpn.cluster.store import ClusterStore, client_for
from polevpn.common.logfmt import kv
from polevpn.config import ClusterConfig
from polevpn.packet.routing import IPNetwork

log = logging.getLogger("polevpn.cluster")

# what changes only the store's connection: a new session, the same lease kept if the new
# endpoints are the same etcd
_CONNECTION = ("etcd_endpoints", "etcd_username", "etcd_password", "etcd_ca", "etcd_cert",
               "etcd_key", "lease_ttl")
# what makes this router another member (of another cluster, or under another id)
_IDENTITY = ("name", "router_id", "prefix")


def _remote_routes(table: Any, router_id: str) -> tuple[RouteSink, RouteFactory]:
    # the remote route table and its route type (polevpn/cluster/routes.py); imported here so
    # that a router without a cluster section never needs it
    from polevpn.cluster.routes import RemoteRoute, RemoteRoutes

    return RemoteRoutes(table, router_id), RemoteRoute


class ClusterMember:
    def __init__(
        self,
        cfg: ClusterConfig,
        table: Any = None,
        *,
        sink: RouteSink | None = None,
        make_route: RouteFactory | None = None,
    ) -> None:
        self.cfg = cfg
        if sink is None or make_route is None:
            sink, make_route = _remote_routes(table, cfg.router_id)
        # the other routers' routes (RemoteRoutes), for forwarding and the views
        self.remote: Any = sink
        self._make_route = make_route
        self.started = time.time()
        self.state = self._new_state(cfg)
        self.store = ClusterStore(cfg, self.state)
        # an old store being stopped after a reconfiguration
        self._retiring: set[asyncio.Task] = set()

    def _new_state(self, cfg: ClusterConfig) -> ClusterState:
        me = RouterInfo(cfg.peer_address, self.started, __version__)
        return ClusterState(
            Layout(cfg.prefix, cfg.name), cfg.router_id, me, self.remote, self._make_route
        )

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        log.info(
            "cluster member",
            extra=kv(
                cluster=self.cfg.name,
                router_id=self.cfg.router_id,
                peer_address=self.cfg.peer_address_text,
                endpoints=",".join(self.cfg.etcd_endpoints),
                lease_ttl=self.cfg.lease_ttl,
            ),
        )
        self.store.start()

    async def stop(self) -> None:
        """Leave the cluster: the lease revoked (our keys vanish now), the other routers'
        routes withdrawn from the table."""
        await self.store.stop(revoke=True)
        if self._retiring:
            await asyncio.gather(*self._retiring, return_exceptions=True)
        for rid in list(self.state.routers):
            self.remote.drop_router(rid)
        self.state.routers.clear()

    # ------------------------------------------------------------------ this router
    def gateway_up(
        self, gateway: object, prefixes: Iterable[IPNetwork], site: str | None = None
    ) -> None:
        """``gateway`` holds ``prefixes`` here now (its own address among them)."""
        text = str(gateway)
        self.state.set_gateway(text, site or text, prefixes)
        self.store.kick()

    def local_up(self, gateway: object, prefixes: Iterable[IPNetwork]) -> None:
        """The router host's own networks (its TUN, the pseudo-gateway "local")."""
        self.gateway_up(gateway, prefixes, SITE_LOCAL)

    def gateway_down(self, gateway: object) -> None:
        self.state.drop_gateway(str(gateway))
        self.store.kick()

    def refuses(self, gateway: object, prefixes: Iterable[IPNetwork]) -> str | None:
        """Why ``gateway`` may not register ``prefixes`` here: the store says another router
        holds one of them (or a network overlapping it) for a different gateway."""
        return self.state.conflict(str(gateway), prefixes)

    # ------------------------------------------------------------------ reload
    def reconfigure(self, cfg: ClusterConfig) -> None:
        """A reload changed the cluster section (it is still there). New etcd settings start
        a new store at once; a new name, prefix or id leaves the old cluster first (lease
        revoked, the routes learnt there withdrawn). The peer credential and address take
        effect without touching the store."""
        old = self.cfg
        self.cfg = cfg
        identity = any(getattr(old, f) != getattr(cfg, f) for f in _IDENTITY)
        connection = any(getattr(old, f) != getattr(cfg, f) for f in _CONNECTION)
        if old.peer_address != cfg.peer_address and not identity:
            self.state.set_me(dataclasses.replace(self.state.me, peer_address=cfg.peer_address))
            self.store.kick()
        if not (identity or connection):
            self.store.cfg = cfg
            return
        old_store, old_state = self.store, self.state
        # no event may reach the old state once the new one shares its routers
        old_store.halt()
        state = self._new_state(cfg)
        for gateway, (site, nets) in old_state.gateways().items():
            state.set_gateway(gateway, site, nets)
        if identity:
            for rid in list(old_state.routers):
                self.remote.drop_router(rid)
        else:
            # the same cluster: what is known stays until the new store's snapshot replaces it
            state.routers = old_state.routers
            state.stale = old_state.stale
            state.revision = old_state.revision
        state.on_routers = old_state.on_routers
        self.state = state
        self.store = ClusterStore(cfg, state, client_for(cfg))
        # leaving a cluster (or an id) revokes; moving to other endpoints of the same one
        # lets the old lease lapse: the new store writes the same keys under its own lease,
        # so they never vanish in between
        task = asyncio.create_task(old_store.stop(revoke=identity))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)
        self.store.start()
