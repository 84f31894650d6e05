"""Evaluation from embeddings: metrics, the 12 retrieval directions, compression analysis
(Appendix G), benchmark manifest adapters and the embedding cache file."""
