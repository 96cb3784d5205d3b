"""The OpenAPI 3.0 document of the router's REST API (polevpn.ops.api), served at
``/api/v1/openapi.json``.

It is the reference for the API's shapes: tests/test_api.py runs schemathesis against a live
router with this document, so a reply that strays from it fails there. The counter names are
passed in by the API, which takes them from the router's own stats dataclasses.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from polevpn import __version__

API_PREFIX = "/api/v1"

# packets the router dropped, by reason; the API's "drops" object has exactly these keys
DROP_REASONS = {
    "no_route": "no route to the destination address",
    "spoofed": "source address outside the networks the sending gateway registered (anti_spoofing)",
    "queue_full": "the destination gateway's send queue was full (send_queue_bytes), or it "
    "was closing",
    "malformed": "a super-packet that was not a valid IP packet with a virtio-net header a "
    "kernel would write (docs/protocol.md section 15)",
    "hairpin": "the destination was routed back to the gateway that sent it",
    "unregistered": "packets from a connection that had not registered yet",
    "link_local": "IPv6 from :: or fe80::/10 that the gateway did not register (its host's "
    "MLD reports): link-scope, never forwarded, not counted as spoofed",
    "links_down": "to a multi-link gateway none of whose links was up",
    "oversized": "an IP packet of 65,528 bytes or more (from a super-packet) for a gateway "
    "without super-packets: no frame holds it",
    "closing": "from a connection the router was closing, e.g. one replaced by a newer "
    "connection of its gateway or link: stale, never forwarded",
    "peer_transit": "from another router of the cluster, for a network only a third router "
    "holds: a packet crosses at most one router link",
}

Schema = dict[str, Any]


def _int(description: str | None = None) -> Schema:
    s: Schema = {"type": "integer", "minimum": 0}
    if description:
        s["description"] = description
    return s


def _nullable(schema: Schema) -> Schema:
    return {**schema, "nullable": True}


def _object(properties: dict[str, Schema], description: str | None = None) -> Schema:
    s: Schema = {
        "type": "object",
        "required": list(properties),
        "properties": properties,
        "additionalProperties": False,
    }
    if description:
        s["description"] = description
    return s


TRANSPORT: Schema = {"type": "string", "enum": ["tls", "kcp"]}
# a gateway's or a route's: a multi-link gateway's links may use both
GATEWAY_TRANSPORT: Schema = {
    "type": "string",
    "enum": ["tls", "kcp", "mixed"],
    "description": "mixed: a multi-link gateway whose links do not all use one transport",
}
LOSS_DESCRIPTION = (
    "share of the data segments the router sent on this link that were retransmissions, "
    "since it connected: on tls:// the kernel's tcpi_total_retrans / tcpi_data_segs_out, on "
    "kcp:// KCP's timeout resends / (new segments + those resends). It estimates loss "
    "towards the gateway (a lost ACK costs a resend too); null when unknown or before any "
    "data was sent"
)
TIMESTAMP: Schema = {"type": "string", "format": "date-time", "description": "RFC 3339, UTC"}

FEC = _object(
    {
        "state": {
            "type": "string",
            "enum": ["off", "offered", "on"],
            "description": "offered: this side offers FEC and the peer has not taken it up yet",
        },
        "parity": _int("parity shards per group now (adaptive mode moves it with the loss)"),
        "parity_sent": _int("parity shards sent"),
        "recovered": _int("payloads rebuilt from parity (losses KCP did not have to resend)"),
        "unrecoverable": _int("groups given up with data missing and too little parity"),
        "loss": {
            "type": "number",
            "minimum": 0,
            "description": "loss ratio measured on what the router receives, last interval",
        },
    },
    "forward error correction on this kcp:// link",
)

KCP = _object(
    {
        "srtt_ms": _nullable(
            {"type": "number", "minimum": 0, "description": "KCP's smoothed round-trip time"}
        ),
        "retransmissions": _nullable(_int("KCP segments resent after their timeout")),
        "fec": _nullable(FEC),
    },
    "KCP figures of a kcp:// link",
)

RTT: Schema = _nullable(
    {
        "type": "number",
        "minimum": 0,
        "description": "round-trip time: KCP's srtt on kcp://, the kernel's TCP "
        "estimate on tls://; null when unknown",
    }
)

LINK = _object(
    {
        "name": {"type": "string", "description": "the link's name in the gateway's config"},
        "weight": {
            "type": "number",
            "exclusiveMinimum": True,
            "minimum": 0,
            "description": "its share of the flows among the links that are up",
        },
        "backup": {
            "type": "boolean",
            "description": "carries traffic only while no primary link is up",
        },
        "up": {
            "type": "boolean",
            "description": "false while the router has heard nothing on it for timeout_ms",
        },
        "downs": _int("times it went down since it connected"),
        "timeout_ms": _int("silence after which the router counts it as down"),
        "transport": TRANSPORT,
        "peer": {
            "type": "string",
            "description": "underlay address:port it connects from (IPv6 as [address]:port)",
        },
        "features": {
            "type": "array",
            "items": {"type": "string"},
            "description": "protocol extensions agreed in AUTH on this link",
        },
        "connected_at": TIMESTAMP,
        "uptime": {"type": "number", "minimum": 0, "description": "seconds since it connected"},
        "packets_in": _int("packets received on this link"),
        "packets_out": _int("packets sent on this link"),
        "bytes_in": _int("IP bytes received on this link"),
        "bytes_out": _int("IP bytes sent on this link"),
        "rtt_ms": RTT,
        "retransmissions": _nullable(
            _int(
                "data segments the router sent again (tls: tcpi_total_retrans; kcp: resends "
                "after a timeout)"
            )
        ),
        "segments_sent": _nullable(_int("data segments the router sent, resends included")),
        "loss": _nullable(
            {"type": "number", "minimum": 0, "maximum": 1, "description": LOSS_DESCRIPTION}
        ),
        "kcp": _nullable(KCP),
    },
    "one link (connection) of a multi-link gateway",
)

GATEWAY = _object(
    {
        "gateway": {
            "type": "string",
            "description": "the gateway's address",
            "example": "169.254.0.1",
        },
        "peer": {
            "type": "string",
            "description": "underlay address:port it connects from; a multi-link gateway's "
            "links' peers, comma-separated",
        },
        "transport": GATEWAY_TRANSPORT,
        "networks": {
            "type": "array",
            "items": {"type": "string", "description": "CIDR"},
            "description": "networks it registered, without its own address",
        },
        "features": {
            "type": "array",
            "items": {"type": "string"},
            "description": "protocol extensions agreed in AUTH",
        },
        "connected_at": {
            **TIMESTAMP,
            "description": "RFC 3339, UTC; a multi-link gateway's oldest link's",
        },
        "uptime": {
            "type": "number",
            "minimum": 0,
            "description": "seconds since it connected (its oldest link)",
        },
        "packets_in": _int("packets received from the gateway (summed over its links)"),
        "packets_out": _int("packets sent to the gateway (summed over its links)"),
        "bytes_in": _int("IP bytes received from the gateway (summed over its links)"),
        "bytes_out": _int("IP bytes sent to the gateway (summed over its links)"),
        "rtt_ms": {
            **RTT,
            "description": RTT["description"] + "; null for a multi-link gateway (see its links)",
        },
        "kcp": _nullable(KCP),
        "links": {
            "type": "array",
            "items": {"$ref": "#/components/schemas/Link"},
            "description": "a multi-link gateway's links, by name; empty for a plain gateway",
        },
    },
    "a registered gateway",
)

ROUTE = _object(
    {
        "network": {"type": "string", "description": "CIDR"},
        "gateway": {"type": "string", "description": "the gateway it is routed to"},
        "transport": GATEWAY_TRANSPORT,
    }
)

LISTENER = _object(
    {
        "transport": TRANSPORT,
        "address": {"type": "string"},
        "port": {"type": "integer", "minimum": 0, "maximum": 65535},
    }
)

ERROR = _object({"error": {"type": "string", "description": "what went wrong, one line"}})

_TEXT: Schema = {"type": "string"}
CLUSTER_STORE = _object(
    {
        "state": {
            "type": "string",
            "enum": ["connecting", "connected", "lost"],
            "description": "lost: no etcd endpoint answers; the routes last known stay in use",
        },
        "since": _nullable({**TIMESTAMP, "description": "when the state last changed"}),
        "endpoint": {**_TEXT, "description": "the etcd endpoint in use or last tried"},
        "revision": _int("the store revision the known routes reflect"),
        "lease": _nullable({**_TEXT, "description": "this router's lease id (hex)"}),
        "lease_ttl": _int("seconds, as granted"),
        "lease_remaining": _int("seconds left at the last renewal"),
        "keys": _int("this router's keys the store holds under its lease"),
        "stale": {"type": "boolean", "description": "the store is lost: what is known may "
                  "be out of date"},
        "last_error": _nullable(_TEXT),
    }
)
CLUSTER_ROUTER = _object(
    {
        "router_id": _TEXT,
        "peer_address": {**_TEXT, "description": "host:port; empty while its key is missing"},
        "started_at": _nullable(TIMESTAMP),
        "version": _TEXT,
        "state": {
            "type": "string",
            "enum": ["self", "up", "stale", "incomplete"],
            "description": "self: this router; stale: the store is lost; incomplete: routes "
            "without the router's own key",
        },
        "routes": _int("networks it publishes"),
    }
)
REMOTE_ROUTE = _object(
    {
        "router_id": _TEXT,
        "network": {**_TEXT, "description": "CIDR"},
        "gateway": {**_TEXT, "description": "the gateway that registered it at that router"},
        "site": {**_TEXT, "description": "its office: the gateway address, or local for "
                 "the router host's own networks"},
    }
)
PEER_LINK = _object(
    {
        "router_id": _TEXT,
        "address": _TEXT,
        "state": {"type": "string", "enum": ["up", "connecting", "down"]},
        "since": _nullable(TIMESTAMP),
        "packets_in": _int(),
        "packets_out": _int(),
        "bytes_in": _int(),
        "bytes_out": _int(),
        "rtt_ms": _nullable({"type": "number", "minimum": 0}),
        "direction": {
            "type": "string",
            "enum": ["dialed", "accepted", "dials", "accepts", ""],
            "description": "who dialed the link up, or who is to dial while it is down "
            "(the router with the lower id dials)",
        },
        "peer": {"type": "string", "description": "the far end of the link up, or empty"},
        "connects": _int("times a link to that router came up"),
        "last_error": {"type": "string", "description": "why the last try or link failed"},
        "rate_in": {"type": "number", "minimum": 0, "description": "IP bytes/s received"},
        "rate_out": {"type": "number", "minimum": 0, "description": "IP bytes/s sent"},
        "drops": _object(
            {
                "queue_full": _int("not sent: the link's queue was full"),
                "spoofed": _int("from a source that router does not announce"),
                "transit": _int("from that router for a third one (never passed on)"),
            }
        ),
    }
)


PATH_STATE: Schema = {
    "type": "string",
    "enum": ["relayed", "punching", "direct"],
    "description": "relayed: through the router; punching: an attempt under way (still "
    "relayed); direct: gateway to gateway",
}
DIRECT_SIDE = _object(
    {
        "gateway": _TEXT,
        "state": PATH_STATE,
        "cause": {
            "type": "string",
            "enum": ["none", "no_answer", "silence", "handshake", "expired", "revoked",
                     "unreported"],
            "description": "why it is not (or no longer) direct, as the gateway reports it; "
            "unreported: no DIRECT_STATUS from it for this pair yet",
        },
        "rtt_ms": _nullable({"type": "number", "minimum": 0}),
        "bytes_sent": _int("IP bytes it sent over the direct path, since the offer"),
        "bytes_received": _int("IP bytes it received over the direct path"),
        "refused": _int("packets from the peer it refused (outside the peer's grant)"),
        "endpoint": _nullable({**_TEXT, "description": "ip:port of the peer in use"}),
        "reported": _nullable({**TIMESTAMP, "description": "when its last status came"}),
    },
    "one gateway of a pair, as its last DIRECT_STATUS says",
)  # fmt: skip
DIRECT_PAIR = _object(
    {
        "pair_id": {**_TEXT, "description": "hex, 32 digits; a new one at each renewal"},
        "gateways": {"type": "array", "items": _TEXT, "minItems": 2, "maxItems": 2},
        "created": TIMESTAMP,
        "expires": TIMESTAMP,
        "state": {**PATH_STATE, "description": "direct only when both sides report it"},
        "sides": {
            "type": "array",
            "items": {"$ref": "#/components/schemas/DirectSide"},
            "minItems": 2,
            "maxItems": 2,
        },
    },
    "two gateways with live key material for a direct path",
)
DIRECT_ENDPOINT = _object(
    {
        "gateway": _TEXT,
        "public": _nullable(
            {**_TEXT, "description": "ip:port its endpoint probes came from (its NAT)"}
        ),
        "host": {
            "type": "array",
            "items": _TEXT,
            "description": "ip:port it reported (DIRECT_CANDIDATES)",
        },
    },
    "a gateway connected with direct paths agreed",
)


def _direct() -> Schema:
    def items(ref: str) -> Schema:
        return {"type": "array", "items": {"$ref": f"#/components/schemas/{ref}"}}

    return _object(
        {
            "enabled": {
                "type": "boolean",
                "description": "direct paths offered: the direct section's enable, with a "
                "kcp listener",
            },
            "pairs": items("DirectPair"),
            "endpoints": items("DirectEndpoint"),
            "counters": {
                "type": "object",
                "description": "the rendezvous' counters since start (offers, revokes_*, "
                "probes_*, ...); empty without a kcp listener",
                "additionalProperties": _int(),
            },
        }
    )


def _cluster() -> Schema:
    def items(ref: str) -> Schema:
        return {"type": "array", "items": {"$ref": f"#/components/schemas/{ref}"}}

    return _object(
        {
            "name": _TEXT,
            "router_id": _TEXT,
            "peer_address": _TEXT,
            "store": {"$ref": "#/components/schemas/ClusterStore"},
            "routers": items("ClusterRouter"),
            "remote_routes": items("RemoteRoute"),
            "local_routes": _int("networks this router publishes"),
            "counters": {
                "type": "object",
                "description": "the cluster state's and store's counters since start",
                "additionalProperties": _int(),
            },
            "peer_links": items("PeerLink"),
        }
    )


def _status(counters: Iterable[str]) -> Schema:
    names = list(counters)
    return _object(
        {
            "version": {"type": "string"},
            "started_at": TIMESTAMP,
            "uptime": {"type": "number", "minimum": 0, "description": "seconds"},
            "listen": {"type": "array", "items": {"$ref": "#/components/schemas/Listener"}},
            "connections": _int("open gateway connections, registered or not yet"),
            "gateways": _int("registered gateways, a multi-link gateway counted once"),
            "links": _int("links of the multi-link gateways"),
            "links_up": _int("those of them up"),
            "routes": _int("prefixes in the routing table"),
            "pending": _int("connections accepted and not yet registered"),
            "counters": {
                "type": "object",
                "description": "the router's counters since start: RouterStats, the "
                "connection limits' refusals, and with a kcp listener the kcp_ ones",
                "required": names,
                "properties": {n: _int() for n in names},
                "additionalProperties": _int(),
            },
            "drops": _object(
                {reason: _int(text) for reason, text in DROP_REASONS.items()},
                "packets dropped since start, by reason",
            ),
            "cluster": _nullable(
                _object(
                    {
                        "name": _TEXT,
                        "router_id": _TEXT,
                        "store": {"type": "string", "enum": ["connecting", "connected", "lost"]},
                    },
                    "the router's cluster (details: /api/v1/cluster); null for a router alone",
                )
            ),
        }
    )


def _json(ref: str, description: str) -> Schema:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}},
    }


def _get(summary: str, ok: Schema, *, public: bool = False, more: Schema | None = None) -> Schema:
    op: Schema = {"summary": summary, "responses": {"200": ok, **(more or {})}}
    if public:
        op["security"] = []
    else:
        op["responses"]["401"] = {"$ref": "#/components/responses/Unauthorized"}
    return op


def document(counters: Iterable[str]) -> Schema:
    """The OpenAPI document; ``counters``: the counter names every status reply has."""
    p = API_PREFIX
    not_found = {"404": _json("Error", "no such gateway")}
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "polevpn router API",
            "version": __version__,
            "description": "Read-only views of the router (status, gateways, routes) and a "
            "config reload. Every /api/v1 operation but this document needs "
            "'Authorization: Bearer <api_token>'. Replies are JSON; errors are "
            '{"error": "..."}.',
        },
        "security": [{"bearer": []}],
        "paths": {
            f"{p}/status": {"get": _get("router status and counters", _json("Status", "status"))},
            f"{p}/gateways": {
                "get": _get(
                    "registered gateways, by address",
                    _json("GatewayList", "the registered gateways"),
                )
            },
            f"{p}/gateways/{{address}}": {
                "parameters": [
                    {
                        "name": "address",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string", "minLength": 1},
                        "example": "169.254.0.1",
                    }
                ],
                "get": _get(
                    "one registered gateway",
                    _json("Gateway", "the gateway"),
                    more={**not_found, "400": _json("Error", "path not UTF-8")},
                ),
            },
            f"{p}/routes": {
                "get": _get("the routing table", _json("RouteList", "active routes, IPv4 first"))
            },
            f"{p}/cluster": {
                "get": _get(
                    "the router's cluster: store, routers, remote routes, peer links",
                    _json("Cluster", "the cluster as this router knows it"),
                    more={"404": _json("Error", "this router is in no cluster")},
                )
            },
            f"{p}/direct": {
                "get": _get(
                    "direct paths between gateways: pairs, their state, the endpoints",
                    _json("Direct", "what the router's rendezvous holds"),
                )
            },
            f"{p}/reload": {
                "post": {
                    "summary": "reload the config file, as SIGHUP does",
                    "responses": {
                        "200": _json("Reload", "reloaded; what changed"),
                        "400": _json("Error", "the config file is invalid; nothing changed"),
                        "401": {"$ref": "#/components/responses/Unauthorized"},
                    },
                }
            },
            f"{p}/openapi.json": {
                "get": _get(
                    "this document",
                    {
                        "description": "OpenAPI 3.0 document",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    },
                    public=True,
                )
            },
            "/": {
                "get": _get(
                    "the dashboard page (it asks for the token and calls the API)",
                    {
                        "description": "HTML page",
                        "content": {"text/html": {"schema": {"type": "string"}}},
                    },
                    public=True,
                    more={"404": _json("Error", "no dashboard installed")},
                )
            },
            "/favicon.ico": {
                "get": {
                    "summary": "no icon (so browsers stop asking)",
                    "security": [],
                    "responses": {"204": {"description": "no icon"}},
                }
            },
        },
        "components": {
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "the router's api_token (or the content of api_token_file)",
                }
            },
            "responses": {
                "Unauthorized": {
                    "description": "no or wrong bearer token",
                    "headers": {
                        "WWW-Authenticate": {"required": True, "schema": {"type": "string"}}
                    },
                    "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/Error"}}
                    },
                }
            },
            "schemas": {
                "Error": ERROR,
                "Listener": LISTENER,
                "Status": _status(counters),
                "Gateway": GATEWAY,
                "Link": LINK,
                "GatewayList": _object(
                    {
                        "gateways": {
                            "type": "array",
                            "items": {"$ref": "#/components/schemas/Gateway"},
                        }
                    }
                ),
                "Route": ROUTE,
                "RouteList": _object(
                    {"routes": {"type": "array", "items": {"$ref": "#/components/schemas/Route"}}}
                ),
                "Cluster": _cluster(),
                "ClusterStore": CLUSTER_STORE,
                "ClusterRouter": CLUSTER_ROUTER,
                "RemoteRoute": REMOTE_ROUTE,
                "PeerLink": PEER_LINK,
                "Direct": _direct(),
                "DirectPair": DIRECT_PAIR,
                "DirectSide": DIRECT_SIDE,
                "DirectEndpoint": DIRECT_ENDPOINT,
                "Reload": _object(
                    {
                        "reloaded": {"type": "boolean", "enum": [True]},
                        "changes": {
                            "type": "array",
                            "items": {"type": "string"},
                            "description": "what the reload changed, one line each; may be empty",
                        },
                    }
                ),
            },
        },
    }
