"""fleetctl: get the fastest correct attention onto every GPU node of a mixed fleet.

One import namespace for the three programs (docs/architecture.md): ``fleetctl.fleet`` (the shared core),
``fleetctl.agent`` (``fleet-agent``), ``fleetctl.controller`` (``fleetctl`` and ``fleet-controller``); the Ansible
playbooks are package data under ``fleetctl/playbooks``.
"""
