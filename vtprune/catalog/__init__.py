"""Built-in methods; importing this package registers them."""

from . import decode, in_llm, in_vit, pre_llm, video, video_llm  # noqa: F401
