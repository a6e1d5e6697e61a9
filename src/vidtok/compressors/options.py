"""Which user-facing options apply to which methods: one table for `vidtok run`, `vidtok eval`,
`vidtok bench` configs and the lmms-eval `--model_args`, so that all of them accept and refuse
the same things. An option given for a method it does not shape is refused, never ignored.

Methods and guides are spelled as the command line spells them (`METHODS`, `GUIDES`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Option:
    name: str  # the Python / --model_args / bench-config key; the CLI flag is --name-with-dashes
    what: str  # what it sets
    applies: str  # where it applies, in words
    test: Callable[[str, str], bool]  # (method, guide) -> whether it applies

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def _guided(guide: str) -> bool:
    return guide != "none"


def _separate_guide_pass(guide: str) -> bool:
    return guide in ("self", "assistant")


OPTIONS: tuple[Option, ...] = (
    # full takes only retention 1 (a value check of build_method's): it applies everywhere
    Option("retention", "the kept share of visual tokens", "every method (full: 1 only)", lambda m, g: True),
    Option("layer", "FastV's layer (tokens are dropped from it on)", "fastv and ENCODER+fastv", lambda m, g: "fastv" in m),
    Option("vision_retention", "the encoder's share before FastV", "ENCODER+fastv", lambda m, g: "+" in m),
    Option("match_flops", "FastV's keep ratio solved for a share of the prefill FLOPs (vidtok run)", "fastv", lambda m, g: m == "fastv"),
    Option("seed", "the random compressor's draw", "random and random+fastv (vidtok run: also --sample)",
           lambda m, g: m.startswith("random")),
    Option("assistant", "the assistant model", "guide assistant", lambda m, g: g == "assistant"),
    Option("layers", "the guide's layers", "guide self, assistant or inline", lambda m, g: _guided(g)),
    Option("cap", "the most tokens a unit keeps", "guide self, assistant or inline", lambda m, g: _guided(g)),
    Option("floor", "the fewest tokens a unit keeps", "guide self, assistant or inline (not keyframe)",
           lambda m, g: _guided(g) and m != "keyframe"),
    Option("guide_pool", "the guide's pooled view of each unit", "guide self or assistant", lambda m, g: _separate_guide_pass(g)),
    Option("guide_stride", "the guide's view of every k-th unit", "guide self or assistant", lambda m, g: _separate_guide_pass(g)),
    # which split fits which guide (uniqueness without one, mix with one, ...) is a value check of build_method's
    Option("allocation", "how the budget is split across units: uniform, proportional, binary, uniqueness, mix[:W]",
           "every method but full (uniform, uniqueness: guide none; proportional, binary, mix: a guide)", lambda m, g: m != "full"),
)
BY_NAME = {option.name: option for option in OPTIONS}


def check_options(given: Iterable[str], runs: Iterable[tuple[str, str]], spell: Callable[[Option], str] = lambda o: o.flag) -> None:
    """Refuse each given option that applies to none of `runs` ((method, guide) pairs: one for
    `vidtok run`, every configuration of an evaluation). `spell` names an option as the caller's
    user writes it (`--layer`, `layer=`, a config key)."""
    runs = list(runs)
    for name in given:
        option = BY_NAME.get(name)
        if option is None or any(option.test(method, guide) for method, guide in runs):
            continue
        shown = ", ".join(sorted({f"{m} (guide {g})" for m, g in runs}))
        raise ValueError(f"{spell(option)} sets {option.what}, which applies to {option.applies}, not to {shown}: "
                         f"drop {spell(option)} or pick a method it applies to")


def options_table() -> str:
    """The table as Markdown (docs/options.md holds it; a test keeps the two equal)."""
    rows = ["| option | sets | applies to |", "|---|---|---|"]
    rows += [f"| `{o.flag}` / `{o.name}=` | {o.what} | {o.applies} |" for o in OPTIONS]
    return "\n".join(rows) + "\n"
