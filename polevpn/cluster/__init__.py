"""Several routers for one network, sharing their routes through etcd (issue 17).

The layer between the router orchestrator and io: the router imports it; it imports io,
proto, packet, config and common.

    keys      sans-IO: the etcd key layout, encoding and validation of what is read back
    state     sans-IO: ClusterState, store events in, decisions out (remote routes to apply,
              keys this router must hold)
    etcd      the etcd v3 JSON gateway client (asyncio streams + h11)
    store     the asyncio adapter: lease, keepalive, snapshot + watch, reconnect, resync
    member    what the router holds as a member of its cluster, and the calls it makes
    view      frozen snapshots of the cluster for ops
    routes    the table of remote routes (RemoteRoutes) forwarding looks up
    peers     router-to-router links
"""
