"""Stand-ins for the cluster components nanorun does not ship (they play them against the real test
API server)."""
