"""Deployment on Flower's deployment engine: TLS certificates and SuperNode keys.

* :mod:`fedsec.deploy.certs` — ``fedsec certs``: a CA, the SuperLink's
  certificate and SuperNode authentication keys, made with ``cryptography``.
"""
