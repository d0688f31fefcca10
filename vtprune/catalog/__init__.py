"""Built-in methods; importing this package registers them."""

from . import pre_llm  # noqa: F401
