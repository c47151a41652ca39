"""Measurement: perplexity, size, decode speed."""

from hfcompress.eval.perplexity import PerplexityResult, perplexity, text_perplexity
from hfcompress.eval.size import SizeReport, size_report
from hfcompress.eval.speed import DecodeSpeed, decode_speed

__all__ = [
    "DecodeSpeed",
    "PerplexityResult",
    "SizeReport",
    "decode_speed",
    "perplexity",
    "size_report",
    "text_perplexity",
]
