"""fleet-agent: probes a GPU node, reports to the controller, runs playbooks and verification."""
