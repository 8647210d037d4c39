"""The master: durable event log, operator API and event stream."""
