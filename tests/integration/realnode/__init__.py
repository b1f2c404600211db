"""The real-node path end to end (issue 12): a real controller and real `fleet-agent --executor ansible` processes,
real pip into real target venvs, and a fake upstream (tests/integration/harness/upstream.py) serving the artifacts."""
