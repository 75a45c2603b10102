"""Retrieval for RagQuery: passages, embeddings, the collection store and hybrid search."""
