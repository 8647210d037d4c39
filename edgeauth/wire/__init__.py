"""Sans-io protocol code shared by the master and the edges (no reactor, no I/O)."""
