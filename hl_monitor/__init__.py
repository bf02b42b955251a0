"""hl-monitor: Hyperliquid whale monitor that turns fills into one exact signal per order."""

__version__ = "0.1.0"
