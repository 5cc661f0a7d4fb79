"""skipray: SkipDecode-style skip decoding for causal language models, at cluster scale on Ray."""

__version__ = "0.1.0"
