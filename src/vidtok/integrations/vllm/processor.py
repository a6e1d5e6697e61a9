"""The processing side of the plugin: how many placeholders a video gets, and what travels with it.

vLLM fixes a prompt's length when it processes the request, before any encoder runs. DyToK's
global budget B = round(r x U x T) is known then (U units of T tokens, r the request's retention),
so the processor writes B placeholders (+ the family's uncompressed extras: LLaVA-OV's newline);
only the split of B across units depends on the question, and the model decides it.

What the model needs rides in the video item's processed kwargs, one entry per video:
    dytok_prompt_ids  the request's prompt token ids, the video still one marker (the guide's prompt)
    dytok_budget      B
    dytok_guide       0 none, 1 self, 2 assistant
    dytok_layers      the guide layers
and the video item's hash (vLLM's processor cache, encoder cache and prefix-cache key) covers the
prompt and the settings: two questions on one video never share a compressed embedding.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from contextvars import ContextVar

import torch

from .settings import GUIDE_CODES, Settings, SettingsError, resolve, split_kwargs

# the key under which the resolved settings and the prompt travel inside hf_processor_mm_kwargs
CARRIED = "dytok__request"
FIELDS = ("dytok_prompt_ids", "dytok_budget", "dytok_guide", "dytok_layers")
_DUMMY: ContextVar[bool] = ContextVar("vidtok_vllm_dummy", default=False)


@functools.lru_cache(maxsize=8)
def _text_depth(folder: str) -> int:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(folder).get_text_config().num_hidden_layers


class DyToKProcessorMixin:
    """Mixed in before a family's vLLM multimodal processor. A family adds `_dytok_shape` (units and
    tokens per unit of processed video `index`) and its own `_get_prompt_updates` (`_dytok_budget`)."""

    def _dytok_settings(self, hf_processor_mm_kwargs: Mapping[str, object]) -> Settings:
        ctx = self.info.ctx
        mm_config = ctx.get_mm_config()
        server = dict(mm_config.mm_processor_kwargs or {})
        assistant = server.get("dytok_assistant")
        return resolve(
            {k: v for k, v in hf_processor_mm_kwargs.items() if k != CARRIED},
            server=server,
            pruning_rate=mm_config.video_pruning_rate,
            assistant=assistant,
            main_layers=self.info.get_hf_config().get_text_config().num_hidden_layers,
            assistant_layers=_text_depth(assistant) if assistant else None,
            main_folder=ctx.model_config.model,
        )

    def get_dummy_mm_inputs(self, *args, **kwargs):
        """vLLM sizes its encoder cache and profiles memory with these: a video keeps every token
        here, since a request may ask for retention 1 (the server's settings are still checked)."""
        token = _DUMMY.set(True)
        try:
            return super().get_dummy_mm_inputs(*args, **kwargs)
        finally:
            _DUMMY.reset(token)

    def apply(self, inputs, timing_ctx):
        videos = inputs.mm_data_items.get_all_counts().get("video", 0)
        if videos:
            settings = self._dytok_settings(inputs.hf_processor_mm_kwargs)
            if _DUMMY.get():
                return super().apply(inputs, timing_ctx)
            if videos > 1 and settings.retention < 1:
                raise SettingsError(f"DyToK compresses one video per prompt, this one has {videos}: send one video per request, "
                                    "or dytok_retention=1 to keep every token")
            carried = {"prompt": tuple(int(t) for t in inputs.prompt), "settings": settings.key()}
            inputs = dataclasses.replace(inputs, hf_processor_mm_kwargs={**inputs.hf_processor_mm_kwargs, CARRIED: carried})
        return super().apply(inputs, timing_ctx)

    def _get_mm_hashes(self, inputs):
        carried = inputs.hf_processor_mm_kwargs.get(CARRIED)
        _, rest = split_kwargs(inputs.hf_processor_mm_kwargs)  # images and the rest hash as without the plugin
        hashes = super()._get_mm_hashes(dataclasses.replace(inputs, hf_processor_mm_kwargs=rest))
        if carried is not None and hashes.get("video"):
            from vllm.multimodal.hasher import MultiModalHasher

            algorithm = self.info.ctx.get_mm_config().mm_hasher_algorithm
            hashes = dict(hashes)
            hashes["video"] = [MultiModalHasher.hash_kwargs(algorithm, video=h, dytok_prompt=list(carried["prompt"]),
                                                            dytok_settings=list(carried["settings"])) for h in hashes["video"]]
        return hashes

    def _apply_hf_processor_main(self, mm_items, hf_kwargs):
        carried = hf_kwargs.get(CARRIED)
        _, rest = split_kwargs(hf_kwargs)
        processed = super()._apply_hf_processor_main(mm_items, rest)
        count = mm_items.get_all_counts().get("video", 0)
        if carried is None or not count:
            return processed
        retention, guide, layers = carried["settings"]
        settings = Settings(retention, guide, layers)
        prompt = torch.tensor(carried["prompt"], dtype=torch.long)
        budgets = []
        for index in range(count):
            units, per_unit = self._dytok_shape(processed, index)
            try:
                budgets.append(settings.budget(units, per_unit))
            except ValueError as error:
                raise SettingsError(f"dytok_retention={retention:g} on a video of {units} x {per_unit} tokens: {error}") from None
        processed["dytok_prompt_ids"] = [prompt] * count
        processed["dytok_budget"] = torch.tensor(budgets, dtype=torch.long)[:, None]
        processed["dytok_guide"] = torch.full((count, 1), GUIDE_CODES[guide], dtype=torch.long)
        processed["dytok_layers"] = [torch.tensor(layers or (), dtype=torch.long)] * count
        return processed

    def _get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs):
        from vllm.multimodal.inputs import MultiModalFieldConfig

        config = dict(super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs))
        if "dytok_budget" in hf_inputs:
            config.update({name: MultiModalFieldConfig.batched("video", keep_on_cpu=True) for name in FIELDS})
        return config

    @staticmethod
    def _dytok_budget(out_mm_kwargs, item_idx: int) -> int | None:
        """The video's budget B (None: a video processed without the plugin's fields)."""
        item = out_mm_kwargs["video"][item_idx]
        if "dytok_budget" not in item:
            return None
        return int(item["dytok_budget"].data.reshape(-1)[0])

    def _dytok_shape(self, processed, index: int) -> tuple[int, int]:
        raise NotImplementedError
