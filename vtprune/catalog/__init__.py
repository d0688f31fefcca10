"""Built-in methods; importing this package registers them."""

from . import decode, in_llm, in_vit, pre_llm, pre_llm_more, video, video_llm  # noqa: F401
