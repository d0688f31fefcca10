"""Built-in methods; importing this package registers them."""

from . import in_llm, pre_llm  # noqa: F401
