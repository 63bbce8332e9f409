"""Data: prepare domains from folders or the built-in digits, and the training datasets over them."""
