"""Secure aggregation (SecAgg+) building blocks: encoding, Shamir sharing, key agreement, masking, neighbour graph."""  # noqa: E501
