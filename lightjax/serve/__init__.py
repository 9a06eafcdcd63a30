"""Serving a model over the OpenAI API with continuous batching (scripts/serve.py, docs/serving.md)."""
