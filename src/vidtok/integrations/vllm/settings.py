"""DyToK settings of one vLLM request: read from `mm_processor_kwargs` (the server's, overridden by
the request's), checked before anything runs. Pure Python: nothing here imports vLLM.

    dytok_retention   kept share of the video's tokens, in (0, 1]; default 1 - the server's
                      --video-pruning-rate (the flag that turns vLLM's pruning path on)
    dytok_guide       "self" (the main model's own attention), "assistant" (the checkpoint the
                      server loaded with dytok_assistant) or "none" (static, even split);
                      default "assistant" when the server has one, else "self"
    dytok_layers      guide layers: a list of ints, "A-B" or "A,B,C"; default the guide
                      checkpoint's calibrated layers (vidtok.json beside it), else the last third
    dytok_assistant   server-wide: the assistant checkpoint folder, loaded once at start-up; a
                      request may repeat the server's value, never name another

Every other `dytok_*` key is an error that names the known ones.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass

from ...budget import check_retention, total_budget
from ...calibration import CALIBRATION_FILE
from ...importance import parse_layers

PREFIX = "dytok_"
KEYS = ("dytok_retention", "dytok_guide", "dytok_layers", "dytok_assistant")
GUIDES = ("self", "assistant", "none")
GUIDE_CODES = {"none": 0, "self": 1, "assistant": 2}


class SettingsError(ValueError):
    """A request's DyToK settings are wrong: vLLM refuses that request (an HTTP 400 from the server)."""


@dataclass(frozen=True)
class Settings:
    retention: float
    guide: str
    layers: tuple[int, ...] | None  # None with guide "none"

    def key(self) -> tuple:
        """What makes a compressed video differ, for vLLM's cache keys."""
        return (self.retention, self.guide, self.layers)

    def budget(self, units: int, per_unit: int) -> int:
        """DyToK's global budget B = round(r x U x T), fixed before the encoder runs."""
        return units * per_unit if self.retention == 1 else total_budget(self.retention, units, per_unit)


def split_kwargs(kwargs: Mapping[str, object]) -> tuple[dict, dict]:
    """(DyToK's own keys, every other key) of an mm_processor_kwargs mapping."""
    ours = {k: v for k, v in kwargs.items() if isinstance(k, str) and k.startswith(PREFIX)}
    return ours, {k: v for k, v in kwargs.items() if k not in ours}


def calibrated(folder: str | None) -> list[int] | None:
    """Guide layers `vidtok calibrate` stored beside a checkpoint (vidtok.json), or None."""
    import json

    if not folder or not os.path.isfile(os.path.join(folder, CALIBRATION_FILE)):
        return None
    with open(os.path.join(folder, CALIBRATION_FILE)) as f:
        return json.load(f)["guide_layers"]


def resolve(
    request: Mapping[str, object],
    *,
    server: Mapping[str, object] | None = None,
    pruning_rate: float | None,
    assistant: str | None,
    main_layers: int,
    assistant_layers: int | None = None,
    main_folder: str | None = None,
) -> Settings:
    """A request's settings from its mm_processor_kwargs over the server's (`server`).

    `pruning_rate`: the server's --video-pruning-rate; `assistant`: the server's assistant folder
    (None: no assistant loaded); `main_layers` / `assistant_layers`: each guide's LLM depth;
    `main_folder`: the main checkpoint's folder (its calibrated layers). The server's dytok_layers
    belong to the server's guide: a request that picks another guide gets that guide's default."""
    asked, defaults = split_kwargs(request)[0], split_kwargs(server or {})[0]
    for where, ours in (("the request's", asked), ("the server's", defaults)):
        unknown = sorted(set(ours) - set(KEYS))
        if unknown:
            raise SettingsError(f"unknown DyToK setting(s) {', '.join(map(repr, unknown))} in {where} mm_processor_kwargs; "
                                f"the known ones are {', '.join(KEYS)}")
    named = asked.get("dytok_assistant")
    if named is not None and (assistant is None or os.path.realpath(str(named)) != os.path.realpath(assistant)):
        loaded = f"the server loaded {assistant!r}" if assistant else "the server loaded none"
        raise SettingsError(f"dytok_assistant={named!r}: the assistant is loaded once, when the server starts ({loaded}); "
                            "start the server with --mm-processor-kwargs '{\"dytok_assistant\": FOLDER}' and leave it out of requests")

    retention = asked.get("dytok_retention", defaults.get("dytok_retention"))
    if retention is None:
        if not pruning_rate:
            raise SettingsError("no retention: pass mm_processor_kwargs={'dytok_retention': r} (per request, or the server's "
                                "--mm-processor-kwargs), or start the server with --video-pruning-rate R (default retention 1 - R)")
        retention = round(1.0 - float(pruning_rate), 12)
    try:
        check_retention(retention)
    except ValueError as error:
        raise SettingsError(f"dytok_retention: {error}") from None
    if not math.isfinite(float(retention)):
        raise SettingsError(f"dytok_retention must be a finite number in (0, 1], got {retention!r}")

    server_guide = defaults.get("dytok_guide", "assistant" if assistant else "self")
    guide = asked.get("dytok_guide", server_guide)
    for value in (server_guide, guide):
        if value not in GUIDES:
            raise SettingsError(f"dytok_guide must be one of {', '.join(GUIDES)}, got {value!r}")
    if guide == "assistant" and assistant is None:
        raise SettingsError("dytok_guide='assistant', but the server loaded no assistant: start it with "
                            "--mm-processor-kwargs '{\"dytok_assistant\": FOLDER}', or use dytok_guide='self'")
    layers = asked.get("dytok_layers")
    if guide == "none":
        if layers is not None:
            raise SettingsError("dytok_layers chooses a guide's layers; with dytok_guide='none' there is none: leave it out")
        return Settings(float(retention), guide, None)
    if layers is None and guide == server_guide:
        layers = defaults.get("dytok_layers")
    if layers is None:
        layers = calibrated(assistant if guide == "assistant" else main_folder)
    depth = assistant_layers if guide == "assistant" else main_layers
    try:
        chosen = parse_layers(layers, depth)
    except ValueError as error:
        raise SettingsError(f"dytok_layers: {error}") from None
    return Settings(float(retention), guide, tuple(chosen))
