"""The model: the book's GPT-2, its sizes and weights, LoRA, and the classifier built on it."""
