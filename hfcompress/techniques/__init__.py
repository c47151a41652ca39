"""The built-in techniques. Each subpackage registers itself when imported; the list is explicit."""

from hfcompress.techniques import gptq, pkd, rtn

__all__ = ["gptq", "pkd", "rtn"]
