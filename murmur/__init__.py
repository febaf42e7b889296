"""murmur: peer-to-peer federated learning for hospitals.

The repository keeps its parts in folders at its root (node/, gossip/, crypto/, models/,
topologies/); the installed distribution exposes them as murmur.node, murmur.gossip, ... through
setuptools' package-dir mapping (pyproject.toml), so nothing with a generic name lands in
site-packages beside other distributions' `node` or `models`.
"""
