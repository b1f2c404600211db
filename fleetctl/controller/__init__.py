"""fleet-controller: registry, resolver, rollouts, execution, verification, dashboard."""
