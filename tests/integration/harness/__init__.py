"""Real test harness for the playbooks: Debian roots (debootstrap + overlay), a signed apt
repository served over HTTP, stand-in wheels and sdists. Nothing here mocks apt, gpg, pip
or Ansible; only the GPU-specific payloads (nvcc, flash_attn) are stand-ins."""
