"""Chinese text handling: word/character segmentation for evaluation (and later, tokenizer building)."""
