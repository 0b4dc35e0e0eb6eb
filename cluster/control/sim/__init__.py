"""A trace-driven discrete-event simulator of a radixserve cluster (see ``simulator``)."""
