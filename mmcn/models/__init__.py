"""Models: Oscar-style caption and retrieval models on transformers' BERT (tensors in, tensors out)."""
