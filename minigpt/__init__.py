"""minigpt: train a character-level GPT on any text and sample from it."""

__version__ = "0.1.0"
