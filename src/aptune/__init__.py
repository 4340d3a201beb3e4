"""aptune: Adaptive Pruning and Tuning for Hugging Face transformers."""
