"""The built-in techniques. Each subpackage registers itself when imported; the list is explicit."""

from hfcompress.techniques import rtn

__all__ = ["rtn"]
