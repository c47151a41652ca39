"""Quantized token embeddings, shared with a tied LM head, as a recipe stage."""

from hfcompress.registry import register_technique
from hfcompress.techniques.embeddings.config import EmbeddingQuantConfig
from hfcompress.techniques.embeddings.modifier import EmbeddingQuantModifier

__all__ = ["EmbeddingQuantConfig", "EmbeddingQuantModifier"]

register_technique(EmbeddingQuantConfig, EmbeddingQuantModifier)
