"""Invoke collections of the lab, one module per namespace (added in tasks.py)."""
