"""Bridges to the tools researchers already use (optional extras; the core never imports them)."""
