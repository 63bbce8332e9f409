"""Serving: the one inference engine and what runs on it (translate, sample)."""
