"""Rollouts: `fleetctl rollout flash-attn` — canaries, batches, failure budget, build once / install many.

``core`` is pure (table-tested); ``models`` the tables; ``engine`` the asyncio driver inside the
controller; ``service`` the operations behind the HTTP API (``api``); ``progress`` the terminal view.
"""
