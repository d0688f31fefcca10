"""TokenLayout: where each sample's visual tokens are and how they are organised.

Adapters build it from the processor inputs (``input_ids``, ``image_sizes``, ...); the engine and the
methods only read it. Everything is in the coordinates of the unpruned input sequence.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class TokenGroup:
    """Content tokens of one crop (or of the base image), in raster order.

    ``members``      LongTensor[g]: indices into the image span
    ``height``/``width``  patch grid of the group (height * width == g), or None if not a grid
    ``vision_row``   LongTensor[g]: row of the vision-encoder batch each token came from (for ViT signals)
    ``patch_index``  LongTensor[g]: index of each token among that row's patch tokens (CLS excluded)
    """

    members: torch.Tensor
    height: int | None
    width: int | None
    vision_row: torch.Tensor
    patch_index: torch.Tensor

    @property
    def size(self) -> int:
        return int(self.members.numel())

    @staticmethod
    def concat(groups: list[TokenGroup]) -> TokenGroup:
        """One group holding the tokens of several (a grid only if there is a single group)."""
        if len(groups) == 1:
            return groups[0]
        return TokenGroup(
            members=torch.cat([g.members for g in groups]),
            height=None,
            width=None,
            vision_row=torch.cat([g.vision_row for g in groups]),
            patch_index=torch.cat([g.patch_index for g in groups]),
        )


@dataclass
class ImageSpan:
    """All placeholder tokens of one image (or video) in one sample.

    ``positions``   LongTensor[n]: sequence positions of the placeholders, ascending (not contiguous where text
                    sits between them: Qwen3-VL's per-frame timestamps)
    ``structural``  BoolTensor[n]: tokens that are layout, not content (LLaVA-NeXT row newlines, the newline
                    closing a LLaVA-OneVision video); never pruned
    ``row``         LongTensor[n]: visual row id of each token; a structural token is kept iff a content token
                    of its row survives (or a merged token is anchored in it). -1 when rows do not apply.
    ``groups``      the content tokens split into crops / base image; a video: one group per frame (Qwen: per
                    temporal group of ``temporal_patch_size`` frames), in time order
    ``kind``        "image" or "video"
    ``frame_times`` video: Tensor[T] seconds of each frame (group), or None when the inputs do not say
    """

    positions: torch.Tensor
    structural: torch.Tensor
    row: torch.Tensor
    groups: list[TokenGroup]
    kind: str = "image"
    frame_times: torch.Tensor | None = None

    @property
    def is_video(self) -> bool:
        return self.kind == "video"

    @property
    def num_frames(self) -> int:
        """Frames (temporal groups) of a video; 1 for an image."""
        return len(self.groups) if self.is_video else 1

    def frame_of(self) -> torch.Tensor:
        """LongTensor[n]: the frame of each token of the span (0 for images; a video's structural tokens take
        the frame before them)."""
        frame = torch.zeros(self.num_tokens, dtype=torch.long)
        if self.is_video:
            for t, group in enumerate(self.groups):
                frame[group.members] = t
            frame = torch.cummax(frame, 0).values  # frames come in order: a structural token takes the one before
        return frame

    @property
    def num_tokens(self) -> int:
        return int(self.structural.numel())

    @property
    def num_vision_inputs(self) -> int:
        """Vision-encoder inputs (image, crops) this image used."""
        return int(torch.unique(torch.cat([g.vision_row for g in self.groups])).numel()) if self.groups else 0

    @property
    def num_content(self) -> int:
        return sum(g.size for g in self.groups)


@dataclass
class SampleLayout:
    images: list[ImageSpan] = field(default_factory=list)
    #: number of vision-encoder inputs (images, crops, frames) belonging to this sample
    vision_inputs: int = 0
    #: Qwen-VL families: (t, h, w) patch grid of each image, in order (the vision encoder's cost depends on it)
    vision_grids: list[tuple[int, int, int]] = field(default_factory=list)
    #: index of each image among the vision encoder's inputs of this forward (in ``images`` order; a video: its
    #: index among the videos); generate()'s beam / return-sequence copies of a sample share their sample's images
    image_ids: list[int] = field(default_factory=list)

    def image_index(self, length: int) -> torch.Tensor:
        """LongTensor[length]: index of the image (or video) each sequence position belongs to, -1 for text."""
        index = torch.full((length,), -1, dtype=torch.long)
        for i, image in enumerate(self.images):
            index[image.positions] = i
        return index

    def frame_index(self, length: int) -> torch.Tensor:
        """LongTensor[length]: frame of each position within its video (0 for images and text)."""
        index = torch.zeros(length, dtype=torch.long)
        for image in self.images:
            if image.is_video:
                index[image.positions] = image.frame_of()
        return index

    def patch_index(self, length: int) -> torch.Tensor:
        """LongTensor[length]: the place of each content token inside its frame, numbered so that tokens of
        the same place in the frames of one video share it and nothing else does (the tokens of each image and
        of each video get their own range); -1 for text and structural tokens. FrameFusion compares each token
        with the previous frame's token of the same place."""
        index = torch.full((length,), -1, dtype=torch.long)
        offset = 0
        for image in self.images:
            if not image.groups:
                continue
            if image.is_video:  # every frame numbers its tokens from the video's offset
                for group in image.groups:
                    index[image.positions[group.members]] = offset + torch.arange(group.size)
                offset += max(group.size for group in image.groups)
            else:  # an image is one frame: every token has a place of its own
                members = torch.cat([group.members for group in image.groups])
                index[image.positions[members]] = offset + torch.arange(members.numel())
                offset += int(members.numel())
        return index

    @property
    def videos(self) -> list[ImageSpan]:
        return [image for image in self.images if image.is_video]

    @property
    def num_visual(self) -> int:
        return sum(img.num_tokens for img in self.images)

    def visual_positions(self) -> torch.Tensor:
        if not self.images:
            return torch.empty(0, dtype=torch.long)
        return torch.cat([img.positions for img in self.images])
