"""Deployment on Flower's deployment engine: TLS certificates and SuperNode keys.

* :mod:`fedsec.deploy.certs` — ``fedsec certs``: a CA, the SuperLink's
  certificate and SuperNode authentication keys, made with ``cryptography``.
* :mod:`fedsec.deploy.lan_superlink` — Flower's SuperLink with only its Fleet
  API on the LAN address; the Control and Runtime APIs stay on loopback.
* :mod:`fedsec.deploy.signatures` — Ed25519 signatures on client replies.
"""
