"""Data: tokenizers, sources of documents, and the Grain pipelines that turn them into batches."""
