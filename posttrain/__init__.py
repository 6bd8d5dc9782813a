"""posttrain: LLM post-training as a pipeline of cached, gated, reversible stages."""

__version__ = "0.1.0"
