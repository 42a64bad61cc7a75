"""Chinese text: segmentation for the caption metrics, the en→zh label table and translation, model tokenizers."""
