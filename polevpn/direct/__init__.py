"""Direct paths between gateways through NAT, the router as rendezvous and fallback relay
(issue 18; docs/protocol.md section 18). Sans-IO; the sockets are polevpn/io/direct_socket.py,
the orchestrators wire it in (gateway/direct.py, router/router.py).

    messages   the control frames (DIRECT_*) and the 64-byte UDP probes, strict codecs
    keys       the router's per-pair key material and what both gateways derive from it
    endpoint   the UDP probe to the router's kcp:// port: the gateway's public mapping
    punch      hole punching for one pair: probes, acks, nomination, keepalives, deadline
    path       per peer: relayed, punching or direct, fallback on silence, re-punch backoff
    acl        anti-spoofing on what a direct peer sends: its granted networks only
    session    one peer's attempt and path: punch, DTLS+KCP, the proofs, IP packets
    manager    a gateway's direct paths, all peers: offers, revokes, routes, statuses
    rendezvous the router's part: endpoint tokens, offers on traffic, renewal, revocation
"""
