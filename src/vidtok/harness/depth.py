"""Depth scaling for `vidtok bench`: time a few of a deep model's layers, report its released depth.

A 7B LLM does not fit this CPU's time budget at full depth, but its layers are identical in
shape: a prefill's time is a fixed part (embeddings, the LM head's last row, the vision
projector) plus one term per layer. The bench builds the model with the real widths and a few
layers, times every layer call with forward hooks (synchronised on a GPU), and replaces the layers'
measured sum by the mean time per layer times the released count:

    scaled stage = measured stage - sum(layer times) + sum over groups(mean time in group x target count)

Layers doing different work form separate groups: FastV's layers before K (all tokens) and from K
on (kept tokens only); Qwen2.5-VL's windowed and full-attention vision blocks. A guide pass runs
the layers below its deepest guide layer whole and stops inside that one (its partial time stays in
the fixed part), so its target count is the deepest guide layer's index at the released depth.
`benchmarks/depth_check.py` compares the scaled figures with a full-depth run of the 0.5B geometry.
"""

from __future__ import annotations

import time
from contextlib import contextmanager


def vision_layers(model) -> list:
    from ..models import adapter_for

    return list(adapter_for(model).vision_layers)


class LayerClock:
    """Wall time of every call of the given layers, in call order, tagged with the layer's index.

    Hooks are added only inside `watch()` and removed on exit, also after an error, so the model is
    exactly as before; they read the clock and return None, so outputs are unchanged."""

    def __init__(self, layers: list, sync=None):
        self.layers = layers
        self.sync = sync or (lambda: None)
        self.calls: list[tuple[int, float]] = []

    @contextmanager
    def watch(self):
        starts: dict[int, float] = {}
        handles = []

        def before(index):
            def hook(module, args, kwargs=None):
                self.sync()
                starts[index] = time.perf_counter()
            return hook

        def after(index):
            def hook(module, args, output):
                self.sync()
                self.calls.append((index, time.perf_counter() - starts.pop(index)))
            return hook

        try:
            for i, layer in enumerate(self.layers):
                handles.append(layer.register_forward_pre_hook(before(i)))
                handles.append(layer.register_forward_hook(after(i)))
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def scaled(self, measured: float, groups: dict[str, tuple[range, int]]) -> dict:
        """`measured` seconds with the layers' time scaled: `groups` maps a name to (the run's layer
        indexes in it, the target count). Returns the scaled seconds and what went into it."""
        grouped = [t for i, t in self.calls if any(i in indexes for indexes, _ in groups.values())]
        total = sum(grouped)  # a call in no group (none in vidtok's stages) stays in the fixed part, unscaled
        out = {"measured": measured, "layers_seconds": total, "groups": {}}
        scaled_layers = 0.0
        for name, (indexes, target) in groups.items():
            times = [t for i, t in self.calls if i in indexes]
            if not times:
                if target:
                    raise ValueError(f"depth scaling: no call of the {name} layers was timed, but the target runs {target} of them")
                continue
            mean = sum(times) / len(times)
            # a layer can run several times in one stage (one call per video in a batch): per call of the group's layers
            calls_per_layer = len(times) / len(indexes)
            scaled_layers += mean * calls_per_layer * target
            out["groups"][name] = {"layers_run": len(indexes), "calls": len(times), "mean_seconds": mean, "target_layers": target}
        out["seconds"] = measured - total + scaled_layers
        return out


def text_layers(model) -> list:
    from ..models import adapter_for

    return list(adapter_for(model).decoder_layers)


def _vision_groups(config, target: dict | None) -> dict[str, tuple]:
    v = config.vision_config
    if hasattr(v, "fullatt_block_indexes"):  # Qwen2.5-VL: windowed blocks and full-attention blocks cost differently
        full = set(v.fullatt_block_indexes)
        target_depth = (target or {}).get("depth", v.depth)
        target_full = len((target or {}).get("fullatt_block_indexes", v.fullatt_block_indexes))
        return {"vision (windowed)": ({i for i in range(v.depth) if i not in full}, target_depth - target_full),
                "vision (full attention)": (full, target_full)}
    return {"vision": (range(v.num_hidden_layers), (target or {}).get("num_hidden_layers", v.num_hidden_layers))}


class DepthScaling:
    """Which layers a bench measurement times in which stage, and how many of each the released model has.

    `targets` / `guide_targets`: the released values of the depth keys, as in a bench spec's
    `scale_to` ({"text": {"num_hidden_layers": 28}, "vision": {"num_hidden_layers": 27}}; Qwen2.5-VL's
    vision: {"depth": 32, "fullatt_block_indexes": [7, 15, 23, 31]}); a key left out keeps the run's value."""

    STACKS = ("vision", "guide_vision", "self_guide", "guide", "prefill", "decode_tokens")

    def __init__(self, model, guide_model, targets: dict | None, guide_targets: dict | None, sync=None):
        self.model, self.guide_model, self.sync = model, guide_model, sync
        self.targets, self.guide_targets = targets or {}, guide_targets or {}

    def depth(self, guide: bool = False) -> int:
        model, targets = (self.guide_model, self.guide_targets) if guide else (self.model, self.targets)
        return targets.get("text", {}).get("num_hidden_layers", model.config.text_config.num_hidden_layers)

    def configs(self) -> tuple:
        """The released configs (for analytic FLOPs): the run's, with the target depth keys."""
        import copy

        out = []
        for model, targets in ((self.model, self.targets), (self.guide_model, self.guide_targets)):
            if model is None:
                out.append(None)
                continue
            config = copy.deepcopy(model.config)
            for key, value in targets.get("text", {}).items():
                setattr(config.text_config, key, value)
            for key, value in targets.get("vision", {}).items():
                setattr(config.vision_config, key, value)
            out.append(config)
        return tuple(out)

    def clocks(self) -> dict[str, LayerClock]:
        """Fresh clocks for one measurement, one per stage and stack."""
        guide = self.guide_model
        return {
            "vision": LayerClock(vision_layers(self.model), self.sync),
            "guide_vision": LayerClock(vision_layers(guide) if guide is not None else [], self.sync),
            "self_guide": LayerClock(text_layers(self.model), self.sync),
            "guide": LayerClock(text_layers(guide) if guide is not None else [], self.sync),
            "prefill": LayerClock(text_layers(self.model), self.sync),
            "decode_tokens": LayerClock(text_layers(self.model), self.sync),
        }

    @staticmethod
    @contextmanager
    def watch(clocks: dict[str, LayerClock] | None, *names: str):
        from contextlib import ExitStack

        with ExitStack() as stack:
            for name in names if clocks is not None else ():
                stack.enter_context(clocks[name].watch())
            yield

    def apply(self, clocks: dict[str, LayerClock], seconds: dict, plan, row: dict) -> tuple[dict, dict]:
        """The stage seconds at the released depth, and per stage what went into them."""
        scaled, details = dict(seconds), {}

        def scale(stage, clock, groups):
            if clock.calls and stage in seconds:
                details[stage] = clock.scaled(seconds[stage], groups)
                scaled[stage] = details[stage]["seconds"]

        run = self.model.config.text_config.num_hidden_layers
        scale("vision", clocks["vision"], _vision_groups(self.model.config, self.targets.get("vision")))
        if self.guide_model is not None:
            scale("guide_vision", clocks["guide_vision"], _vision_groups(self.guide_model.config, self.guide_targets.get("vision")))
        if plan.guide_layers and plan.guide in ("self", "assistant"):
            # the pass runs every layer below the deepest guide layer, then stops inside that one
            guide = plan.guide == "assistant"
            deepest = max(self.guide_layers(row, plan))
            scale("guide", clocks["guide" if guide else "self_guide"], {"guide": (range(max(plan.guide_layers)), deepest)})
        target = self.depth()
        if plan.vision_budgets is not None:  # FastV: layers below K see every token, the rest the kept ones
            k = plan.layer
            prefill = {"below FastV's layer": (range(k), k), "from FastV's layer": (range(k, run), target - k)}
        else:
            prefill = {"all": (range(run), target)}
        scale("prefill", clocks["prefill"], prefill)
        scale("decode_tokens", clocks["decode_tokens"], {"all": (range(run), target)})
        return scaled, details

    def guide_layers(self, row: dict, plan) -> list[int] | None:
        """The guide layers at the released depth (the run's own are its cut depth's); the inline prior's are the run's."""
        from ..importance import parse_layers

        if not plan.guide_layers or plan.guide not in ("self", "assistant"):
            return plan.guide_layers
        return parse_layers(row.get("layers"), self.depth(plan.guide == "assistant"))

    def flops_scale(self, row: dict, plan) -> dict:
        """What `bench.prefill_flops` needs to count the released depth: the configs and the guide's deepest layer there."""
        config, guide_config = self.configs()
        layers = self.guide_layers(row, plan) if plan.guide in ("self", "assistant") else None
        return {"config": config, "guide_config": guide_config, "guide_deepest": max(layers) if layers else None}
