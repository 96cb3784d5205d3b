"""Changes to the host the daemons run on: netlink, sysctl/nft set-up and its undo, privileges.

Layers: polevpn/__init__.py says which may import which.
"""
