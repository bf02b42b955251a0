"""Scale-out: members, rendezvous placement, leases in NATS KV, and the views each tier reads.

`placement` (pure), `leases` (the member's NATS KV protocol), `views` (what the tiers see). The engine state
of a handed-over address travels through the database via `watch.watchset.WatchSet` (acquire / release).
"""
