"""The knowledge base: documents in, text out, chunks embedded locally and indexed in Chroma."""
