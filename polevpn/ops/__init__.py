"""Operations: the REST API and dashboard, Prometheus metrics, their HTTP server and
polevpn-ctl.

Layers: polevpn/__init__.py says which may import which.
"""
