"""Evaluation: caption metrics, retrieval recall and other scores of model outputs against references."""
