"""3-D rotary positions of the Qwen-VL line (mrope), computed by vidtok from the original rule.

Text tokens advance one position at a time, the same on the temporal, height and width axes. A
vision block of T x H x W merged tokens starting at position s gets (s + floor(t * interval),
s + h, s + w); text after it starts at the block's **largest** position + 1 (the original Qwen
rule; transformers 5.23-5.24's `get_rope_index` advances by max(H, W) only, ignoring the
temporal extent, while its `rope_deltas` use max + 1: prefill and decode positions then
disagree). A compressed video keeps the positions its tokens had in the full layout.
"""

from __future__ import annotations

import torch


def vision_block(start: int, groups: int, height: int, width: int, interval: float) -> torch.Tensor:
    """[3, groups * height * width] positions of one vision block, unit-major then raster."""
    t = (torch.arange(groups, dtype=torch.float64) * interval).long()
    tt, hh, ww = torch.meshgrid(t, torch.arange(height), torch.arange(width), indexing="ij")
    return torch.stack([tt.flatten(), hh.flatten(), ww.flatten()]) + start


def layout_positions(segments) -> torch.Tensor:
    """Positions [3, S] of a prompt given as segments: ("text", n) or ("vision", groups, height, width, interval)."""
    parts, start = [], 0
    for segment in segments:
        if segment[0] == "text":
            block = torch.arange(start, start + segment[1]).expand(3, -1)
        else:
            block = vision_block(start, *segment[1:])
        parts.append(block)
        if block.shape[1]:
            start = int(block.max()) + 1
    return torch.cat(parts, dim=1) if parts else torch.zeros(3, 0, dtype=torch.long)
