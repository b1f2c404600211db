"""Shared core of fleetctl: the node facts contract, the error hierarchy, the wire API."""
