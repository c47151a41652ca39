"""Data files shipped with hfcompress (see README.md here)."""
