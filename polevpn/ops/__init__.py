"""Operations: the REST API and dashboard, Prometheus metrics, their HTTP server and
polevpn-ctl. They read the daemons through their read models (router/view.py,
gateway/view.py), which polevpn.cli hands them with the servers it starts.

Layers: polevpn/__init__.py says which may import which.
"""
