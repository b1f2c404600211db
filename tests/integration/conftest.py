"""Shared fixtures for integration tests: a real controller and real agents (see fleet_support.py)."""

from tests.integration.fleet_support import controller, db_url, fleet, pg_url

__all__ = ["controller", "db_url", "fleet", "pg_url"]
