"""Presentation: ``plots`` (PNG figures) and ``html`` (the self-contained report)."""
