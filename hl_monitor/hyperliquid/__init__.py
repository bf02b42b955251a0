"""Hyperliquid protocol knowledge: typed frames, encoders, constants, REST client, symbols. No service logic."""
