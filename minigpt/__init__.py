"""minigpt: train a character-level GPT on any text and sample from it.

From Python (see minigpt/api.py and the README's "Use from Python"):

    import minigpt
    result = minigpt.train("configs/tiny.yaml", data="my.txt", overrides={"train.max_iters": 200})
    model = minigpt.load(result.run_dir)
    print(model.generate("Once", max_new_tokens=100))

The API is imported on first use, so `import minigpt` does not import torch.
"""

__version__ = "0.1.0"

_API = {
    "load": "minigpt.api", "train": "minigpt.api", "size": "minigpt.api", "Model": "minigpt.api", "Conversation": "minigpt.api",
    "resolve_config": "minigpt.api", "Config": "minigpt.config", "TrainResult": "minigpt.training",
    "Explanation": "minigpt.explain", "MiniGPTError": "minigpt.errors", "Interrupted": "minigpt.errors",
}
__all__ = sorted(_API)


def __getattr__(name: str):
    """Import a public name of the API when it is first used."""
    if name not in _API:
        raise AttributeError(f"module 'minigpt' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_API[name]), name)
