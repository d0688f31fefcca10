"""What the last forward did: ``vtprune.stats(model)`` returns a :class:`PruneStats`."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class StageStats:
    name: str                    # method name
    layer: int                   # decoder layer the stage ran before (0 = pre-LLM)
    kept_positions: torch.Tensor  # LongTensor, ascending: original positions of the visual tokens kept
    merged: int = 0              # extra merged tokens the stage added
    visual_out: int = 0          # visual tokens leaving the stage (kept + merged)
    #: LongTensor, ascending: for each merged token leaving the stage, the original position it takes (its
    #: anchor's); positions may repeat, and may equal a kept token's where a method places merged tokens at kept
    #: ones (SparseVLM's recycled tokens, VisionZip's contextual tokens on LLaVA-NeXT). len(kept_positions) +
    #: len(merged_positions) == visual_out. None when the stage holds no merged token
    merged_positions: torch.Tensor | None = None


def merged_positions(parts: list[torch.Tensor]) -> torch.Tensor | None:
    """``StageStats.merged_positions`` from per-span LongTensors of merged tokens' positions: ascending, or None
    when there is none."""
    joined = torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)
    return torch.sort(joined).values if joined.numel() else None


@dataclass
class SampleStats:
    visual_in: int                        # visual tokens before pruning (placeholders, newlines included)
    stages: list[StageStats] = field(default_factory=list)
    layer_lengths: list[int] = field(default_factory=list)  # sequence length entering each decoder layer
    visual_lengths: list[int] = field(default_factory=list)  # visual tokens entering each decoder layer
    flops: int | None = None              # analytic prefill FLOPs of the whole model (2 × multiply-adds)
    flops_unpruned: int | None = None
    #: videos only (None for a sample without video): visual tokens of each frame (Qwen: temporal group) that
    #: reach the last decoder layer — kept tokens plus merged tokens anchored in the frame — for the frames of
    #: all the sample's videos in sequence order (``video_frames`` tells which frames belong to which video)
    frame_kept: list[int] | None = None
    video_frames: list[int] = field(default_factory=list)  # frames of each video of the sample, in order

    @property
    def equivalent_tokens(self) -> float:
        """Visual tokens averaged over decoder layers."""
        if not self.visual_lengths:
            return float(self.visual_in)
        return sum(self.visual_lengths) / len(self.visual_lengths)

    @property
    def pruned(self) -> bool:
        """Whether any decoder layer saw fewer visual tokens than the input had."""
        return any(v < self.visual_in for v in self.visual_lengths)


@dataclass
class PruneStats:
    method: str
    samples: list[SampleStats]

    @property
    def equivalent_tokens(self) -> float:
        """Mean of the samples' equivalent visual tokens."""
        return sum(s.equivalent_tokens for s in self.samples) / max(len(self.samples), 1)

    @property
    def flops(self) -> int | None:
        if any(s.flops is None for s in self.samples):
            return None
        return sum(s.flops for s in self.samples)

    @property
    def flops_unpruned(self) -> int | None:
        if any(s.flops_unpruned is None for s in self.samples):
            return None
        return sum(s.flops_unpruned for s in self.samples)

    def summary(self) -> str:
        lines = [f"method: {self.method}"]
        for i, s in enumerate(self.samples):
            stages = "; ".join(
                f"{st.name}@L{st.layer}: kept {len(st.kept_positions)}" + (f" + merged {st.merged}" if st.merged else "")
                for st in s.stages
            )
            line = f"sample {i}: visual {s.visual_in} -> {s.equivalent_tokens:.1f} equivalent tokens"
            if stages:
                line += f" ({stages})"
            if s.frame_kept is not None:
                line += f"; per frame {s.frame_kept}"
            if s.flops is not None and s.flops_unpruned:
                line += f"; prefill {s.flops / 1e9:.3f} / {s.flops_unpruned / 1e9:.3f} GFLOPs" \
                        f" ({s.flops_unpruned / max(s.flops, 1):.2f}x fewer)"
            lines.append(line)
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()
