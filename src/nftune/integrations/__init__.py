"""Bridges to other training engines (optional dependencies)."""
