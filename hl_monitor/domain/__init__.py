"""The shared words of the service, below every layer: addresses, tiers, priorities and the signal record.

Everything here is plain data and protocols (no I/O); every layer may import it, it imports only
`hl_monitor.errors`. See docs/architecture.md §1 for the layers.
"""
