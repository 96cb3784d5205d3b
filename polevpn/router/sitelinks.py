"""One site's links at the router: which connections belong together, and who carries what.

A gateway with several uplinks keeps one authenticated connection per link, all registering
the same gateway address and networks, each with its link's name, weight and role. The
router holds them as one site: a new connection for a link the site already has replaces
that link's old connection (the link reconnected), any other name adds a link, and a
registration without a link name (a PoleVPN gateway, or ours with one link) replaces the
whole site, as PoleVPN's REGISTER always did.

Sans-IO: connections are opaque hashable objects; the router closes what ``register`` says
to close and asks ``pick`` for the connection of each packet.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from polevpn.packet.multipath import FlowTable, Path
from polevpn.proto.messages import MAX_LINKS

C = TypeVar("C", bound=Hashable)



@dataclass(frozen=True)
class LinkInfo:
    """What a REGISTER says about its link; ``name`` None: a plain single-link gateway."""

    name: str | None = None
    weight: float = 1.0
    backup: bool = False


class TooManyLinks(Exception):
    pass


@dataclass
class _Link(Generic[C]):
    conn: C
    info: LinkInfo
    path_id: int
    up: bool = True


@dataclass
class SiteLinks(Generic[C]):
    """The connections of one gateway address."""

    links: dict[str | None, _Link[C]] = field(default_factory=dict)
    flows: FlowTable = field(default_factory=FlowTable)
    # path id -> connection, kept with ``links``: ``pick`` runs per packet
    by_path: dict[int, C] = field(default_factory=dict)
    # a link keeps its path id across reconnects, so it gets back exactly its old flows
    # and the other links' flows never move for it
    _ids: dict[str | None, int] = field(default_factory=dict)

    def register(self, conn: C, info: LinkInfo) -> list[C]:
        """Take ``conn`` as the connection of its link; returns the connections it replaces.

        Raises TooManyLinks (and changes nothing) when a new link would exceed MAX_LINKS.
        """
        if info.name is None:
            replaced = [link.conn for link in self.links.values() if link.conn != conn]
            self._reset()
        else:
            # other named links on other connections stay; the plain link, this link's old
            # connection and this connection's earlier registration (another name) go
            stays = {
                n
                for n, link in self.links.items()
                if n is not None and n != info.name and link.conn != conn
            }
            if len(stays) >= MAX_LINKS:
                raise TooManyLinks(f"a site may have at most {MAX_LINKS} links")
            gone = [n for n in self.links if n not in stays]
            replaced = [self.links[n].conn for n in gone if self.links[n].conn != conn]
            for n in gone:
                self._drop(n)
        if info.name not in self._ids and len(self._ids) >= 4 * MAX_LINKS:
            # names seen long ago: forget them (bounded memory whatever a gateway sends)
            self._ids = {n: i for n, i in self._ids.items() if n in self.links}
        path_id = self._ids.get(info.name)
        if path_id is None:
            path_id = max(self._ids.values(), default=0) + 1
            self._ids[info.name] = path_id
        self.links[info.name] = _Link(conn, info, path_id)
        self.by_path[path_id] = conn
        self.flows.add(Path(path_id, info.weight, info.backup), up=True)
        return replaced

    def unregister(self, conn: C) -> bool:
        """``conn`` closed; True when the site has no links left."""
        for name, link in list(self.links.items()):
            if link.conn == conn:
                self._drop(name)
        return not self.links

    def set_up(self, conn: C, up: bool) -> bool:
        """A link's health changed (heartbeats late, or back); True when that moved flows."""
        for link in self.links.values():
            if link.conn == conn:
                link.up = up
                return self.flows.set_up(link.path_id, up)
        return False

    def any_up(self) -> bool:
        return any(link.up for link in self.links.values())

    def pick(self, pkt: bytes | memoryview) -> C | None:
        """The connection for a packet to this site: one link per flow, None when all down."""
        links = self.links
        if len(links) == 1:
            (link,) = links.values()
            return link.conn if link.up else None
        path_id = self.flows.pick(pkt)
        if path_id is None:
            return None
        return self.by_path[path_id]

    def connections(self) -> list[C]:
        return [link.conn for link in self.links.values()]

    def _drop(self, name: str | None) -> None:
        link = self.links.pop(name)
        del self.by_path[link.path_id]
        self.flows.remove(link.path_id)

    def _reset(self) -> None:
        self.links.clear()
        self.by_path.clear()
        self.flows = FlowTable()


class Site(Generic[C]):
    """A gateway with several links: the route target of its networks.

    Forwarding asks ``links.pick`` for the connection of each packet, so the packets of one
    flow take one link and a link that goes down hands its flows to the others.
    """

    __slots__ = ("gateway", "links", "prefixes", "withdrawn")
    # what forwarding asks of every route target: no link to another router
    router_link = False

    def __init__(self, gateway: object) -> None:
        self.gateway = gateway
        self.links: SiteLinks[C] = SiteLinks()
        # the gateway's host prefix first, then its networks
        self.prefixes: list = []
        # its routes taken out of the table while none of its links is up (a router of a
        # cluster, where another router may reach the gateway: Router._site_claims)
        self.withdrawn = False

    @property
    def networks(self) -> tuple:
        return tuple(self.prefixes[1:])
