"""The web console served at `/ui/` (README "Console")."""

from hl_monitor.ops.console.feed import LiveFeed
from hl_monitor.ops.console.routes import ConsoleDeps, add_console, notify_admin_changes

__all__ = ["ConsoleDeps", "LiveFeed", "add_console", "notify_admin_changes"]
