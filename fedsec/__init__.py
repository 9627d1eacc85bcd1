"""fedsec: federated learning that stays correct under hostile clients and a curious server."""

__version__ = "0.1.0"
