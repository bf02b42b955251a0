"""Chaos suite: scripted faults against the real service (subprocess), real NATS and a real database."""
