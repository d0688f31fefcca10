"""Built-in methods; importing this package registers them."""

from . import in_llm, in_vit, pre_llm  # noqa: F401
