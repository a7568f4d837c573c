"""Examples an operator can copy (not part of the installed package)."""
