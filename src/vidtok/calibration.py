"""Calibrated guide layers: a checkpoint's own choice, stored in its folder.

`vidtok calibrate` (harness/analysis.py) measures on a labelled split which guide layers hold a
model's keyframe prior and writes them beside the model's config, in `vidtok.json`. They belong
to the checkpoint, not to the testbed: `vidtok run`, `vidtok eval` and the lmms-eval plugin read
them here when no guide layers are given. Part of the core: imports nothing from testbed/,
harness/ or integrations/.
"""

from __future__ import annotations

import json
from pathlib import Path

CALIBRATION_FILE = "vidtok.json"


def calibrated_layers(model):
    """Guide layers stored beside a model's config by `vidtok calibrate`, or None."""
    folder = getattr(model, "name_or_path", None) if model is not None else None
    if not folder:
        return None
    path = Path(folder) / CALIBRATION_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text())["guide_layers"]


def default_guide_layers(guide: str, model, assistant, fastv_layer: int = 2):
    """Guide layers when none are given: the calibrated ones of the guide model ("self": the main
    model, "assistant"); for the inline prior, the main model's calibrated layers below FastV's
    layer, else None (every layer below it); None for static budgets."""
    if guide == "none":
        return None
    layers = calibrated_layers(assistant if guide == "assistant" else model)
    if guide == "inline" and layers is not None and max(layers) >= fastv_layer:
        return None
    return layers
