"""polevpn: layer-3 site-to-site VPN router and gateway, wire-compatible with PoleVPN."""

__version__ = "0.1.0"
