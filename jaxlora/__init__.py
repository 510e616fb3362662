"""jaxlora: LoRA / QLoRA / full fine-tuning of Hugging Face models in JAX (Flax NNX).

The library knows nothing of TOML files or the command line: every component
declares its own small pydantic settings model next to its code, and
`runner/` composes them into a recipe.
"""

__version__ = "0.1.0"
