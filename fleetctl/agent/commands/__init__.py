"""fleet-agent's subcommands: one module per command, each exposing ``register``."""
