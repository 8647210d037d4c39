"""The edge: stream subscriber, local state, gate and reverse proxy."""
