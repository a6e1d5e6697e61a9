"""vidtok's vLLM plugin (src/vidtok/integrations/vllm, docs/vllm.md).

The settings tests are pure Python and run in any venv. The engine tests need vLLM, which pins its
own transformers and so lives in its own venv:

    scripts/setup-vllm.sh && .venv-vllm/bin/python -m pytest tests/test_vllm.py -k vllm

Each engine runs in a subprocess (this file is also the script it runs: `python tests/test_vllm.py
SPEC OUT`), on tiny random checkpoints written to a tmp folder: Qwen2.5-VL and LLaVA-OneVision with
text and vision head_dim 64 (vLLM's CPU attention takes 64), a main model and an assistant each,
float32, enforce_eager. vidtok.generate on the same checkpoints (transformers) is the reference.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

SETUP = "scripts/setup-vllm.sh, then .venv-vllm/bin/python -m pytest tests/test_vllm.py -k vllm"
HAS_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(not HAS_VLLM, reason=f"vLLM is not installed in this venv (it has its own): run {SETUP}")

FRAMES, SIZE, FPS = 8, 64, 2.0
RETENTION = 0.25
QUESTIONS = ("what shape is red ?", "which colour is the object ?")
MAX_TOKENS = 8
QWEN_LAYERS, LLAVA_LAYERS, ASSISTANT_LAYERS = [1, 2], [1, 2], [1]


# settings (pure Python, any venv) -----------------------------------------------------------

def _resolve(kwargs, **options):
    from vidtok.integrations.vllm.settings import resolve

    defaults = {"pruning_rate": None, "assistant": None, "main_layers": 3, "assistant_layers": 2}
    return resolve(kwargs, **{**defaults, **options})


def test_vllm_settings_defaults_and_overrides():
    settings = _resolve({}, pruning_rate=0.75)
    assert settings.retention == 0.25 and settings.guide == "self" and settings.layers == (2,)  # the last third of 3 layers
    settings = _resolve({"dytok_retention": 0.1, "dytok_layers": "0-1", "num_frames": 8}, pruning_rate=0.75)
    assert settings.retention == 0.1 and settings.layers == (0, 1)
    assert _resolve({"dytok_retention": 0.5}, assistant="/a").guide == "assistant"
    assert _resolve({"dytok_retention": 0.5, "dytok_guide": "none"}).layers is None
    assert _resolve({"dytok_retention": 1}).budget(4, 16) == 64 and _resolve({"dytok_retention": 0.25}).budget(4, 16) == 16
    # the server's defaults, a request's own over them; the server's layers belong to the server's guide
    server = {"dytok_retention": 0.3, "dytok_guide": "assistant", "dytok_layers": [0]}
    assert _resolve({}, server=server, assistant="/a") == _resolve(dict(server), assistant="/a")
    mine = _resolve({"dytok_guide": "self", "dytok_retention": 0.2}, server=server, assistant="/a")
    assert mine.guide == "self" and mine.layers == (2,) and mine.retention == 0.2


@pytest.mark.parametrize("kwargs, words", [
    ({"dytok_retention": 0}, "dytok_retention"),
    ({"dytok_retention": 1.5}, "dytok_retention"),
    ({"dytok_retention": "half"}, "dytok_retention"),
    ({"dytok_retention": True}, "dytok_retention"),
    ({"dytok_retention": 0.5, "dytok_ratio": 2}, "unknown DyToK setting"),
    ({"dytok_retention": 0.5, "dytok_guide": "inline"}, "dytok_guide"),
    ({"dytok_retention": 0.5, "dytok_guide": "assistant"}, "loaded no assistant"),
    ({"dytok_retention": 0.5, "dytok_layers": [7]}, "outside"),
    ({"dytok_retention": 0.5, "dytok_layers": "late"}, "dytok_layers"),
    ({"dytok_retention": 0.5, "dytok_guide": "none", "dytok_layers": [1]}, "leave it out"),
    ({"dytok_retention": 0.5, "dytok_assistant": "/elsewhere"}, "loaded once"),
    ({}, "--video-pruning-rate"),
])
def test_vllm_settings_refuse_bad_requests(kwargs, words):
    from vidtok.integrations.vllm.settings import SettingsError

    with pytest.raises(SettingsError, match=words):
        _resolve(kwargs)


def test_vllm_position_channels_round_trip_in_bf16():
    import torch

    from vidtok.integrations.vllm.runtime import channels_to_positions, positions_to_channels

    positions = torch.tensor([[0, 255, 256, 4095, 65535], [1, 2, 3, 700, 0], [9, 300, 30000, 5, 6]])
    assert torch.equal(channels_to_positions(positions_to_channels(positions, torch.bfloat16)), positions)


def test_vllm_plugin_imports_without_vllm():
    import vidtok.integrations.vllm as plugin

    assert plugin.hf_overrides("Qwen2_5_VLForConditionalGeneration") == {"architectures": ["DyToKQwen2_5_VLForConditionalGeneration"]}
    with pytest.raises(ValueError, match="supports"):
        plugin.hf_overrides("LlamaForCausalLM")


def reference_positions(before: int, groups: int, height: int, width: int, interval: float, after: int, kept) -> list:
    """Qwen's original rule token by token (text +1; vision (s + floor(g * interval), s + y, s + x);
    text after a video at its block's largest position + 1), the video cut to `kept` (per unit)."""
    import math

    rows = [[i, i, i] for i in range(before)]
    block = [[before + math.floor(g * interval), before + y, before + x]
             for g in range(groups) for y in range(height) for x in range(width)]
    rows += [block[g * height * width + i] for g, unit in enumerate(kept) for i in unit]
    nxt = max(max(r) for r in block) + 1
    return rows + [[nxt + i] * 3 for i in range(after)]


@needs_vllm
@pytest.mark.parametrize("chunks", [[None], [5, 11, 30]])
def test_vllm_qwen_kept_tokens_keep_their_full_layout_positions_through_the_pruning_hook(chunks):
    """vLLM's GPU runners call recompute_mrope_positions (its CPU runner never does: the engine tests
    take the other path there), chunk by chunk; the result must be Qwen's rule on the full layout."""
    import types

    import torch
    from vllm.model_executor.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration

    from vidtok.integrations.vllm.qwen2_5_vl import CHANNELS, DyToKQwen2_5_VL
    from vidtok.integrations.vllm.runtime import positions_to_channels
    from vidtok.models.mrope import vision_block

    video, start, end = 30, 28, 29
    config = types.SimpleNamespace(image_token_id=31, video_token_id=video, vision_start_token_id=start,
                                   vision_config=types.SimpleNamespace(spatial_merge_size=2, tokens_per_second=2))
    model = types.SimpleNamespace(config=config)
    model.iter_mm_grid_thw = lambda features: Qwen2_5_VLForConditionalGeneration.iter_mm_grid_thw(model, features)
    kept = [[0, 5], [], [1, 2, 3, 15], [7]]  # 4 groups of 4x4 tokens, 7 kept
    budget = sum(map(len, kept))
    ids = [1, 2, start] + [video] * budget + [end, 3, 4, 5]
    field = lambda value: types.SimpleNamespace(data=value)  # noqa: E731
    feature = types.SimpleNamespace(modality="video", mm_position=types.SimpleNamespace(offset=3, length=budget),
                                    data={"video_grid_thw": field(torch.tensor([4, 8, 8])),
                                          "second_per_grid_ts": field(torch.tensor([1.0]))})
    positions, delta = DyToKQwen2_5_VL.get_mrope_input_positions(model, ids, [feature])
    relative = vision_block(0, 4, 4, 4, 2.0)[:, [u * 16 + i for u, unit in enumerate(kept) for i in unit]]
    embedding = torch.cat([torch.randn(budget, 8), positions_to_channels(relative, torch.float32)], 1)
    done = 0
    for size in chunks:  # a prefill in chunks hands each its part of the video
        size = size or len(ids)
        inside = [n for n in range(done, min(done + size, len(ids))) if ids[n] == video]
        if inside:
            first = inside[0] - 3
            part = [embedding[first : first + len(inside)]]
            cleaned, positions, delta = DyToKQwen2_5_VL.recompute_mrope_positions(model, ids, part, positions, done)
            assert cleaned[0].shape[-1] == 8 and CHANNELS == 6
        done += size
    expected = reference_positions(3, 4, 4, 4, 2.0, 4, kept)
    assert positions.T.tolist() == expected
    assert delta == max(map(max, expected)) + 1 - len(ids)


# checkpoints --------------------------------------------------------------------------------

def _sharpen(model, seed: int) -> None:
    """Random weights large enough that attention is peaked and answers depend on the question
    (the default init gives near-uniform frame weights and one repeated token)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.ndim >= 2:
                scale = 0.3 if any(key in name for key in ("q_proj", "k_proj", "attn.qkv")) else 0.1
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)


def _save_random(model_class, config, seed: int, folder: Path) -> None:
    """A seeded random model of `config`, `_sharpen`ed, its end and pad ids set, saved to `folder`."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config).eval()
    _sharpen(model, seed)
    model.generation_config.eos_token_id = config.text_config.eos_token_id
    model.generation_config.pad_token_id = config.text_config.pad_token_id
    model.save_pretrained(folder)


def _save_tokenizer_fixups(folder: Path, video: str, image: str) -> None:
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["video_token"], config["image_token"] = video, image
    path.write_text(json.dumps(config, indent=2))


def build_qwen(folder: Path, seed: int, text_layers: int, text: tuple = (128, 2, 1, 256), vision: tuple = (128, 4, 2, 256),
               max_positions: int = 2048) -> Path:
    """A random Qwen2.5-VL checkpoint with the toy tokenizer and a processor; `text` = (width, heads,
    KV heads, MLP), `vision` = (width, depth, heads, MLP); head_dim 64 (vLLM's CPU attention takes it)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    from vidtok.testbed.toy import QWEN_SPECIALS, SPECIALS, WORDS, build_tokenizer

    width, heads, kv_heads, mlp = text
    v_width, depth, v_heads, v_mlp = vision
    head_dim = width // heads
    assert head_dim == 64 and v_width // v_heads == 64, "vLLM's CPU attention takes head_dim 64"
    tokenizer = build_tokenizer("qwen2_5_vl")
    ids = {name: len(SPECIALS) + len(WORDS) + i for i, name in enumerate(QWEN_SPECIALS)}
    config = Qwen2_5_VLConfig(
        vision_config={"depth": depth, "hidden_size": v_width, "intermediate_size": v_mlp, "num_heads": v_heads,
                       "out_hidden_size": width, "patch_size": 8, "spatial_merge_size": 2, "temporal_patch_size": 2,
                       "window_size": 32, "fullatt_block_indexes": [depth // 2 - 1, depth - 1], "tokens_per_second": 2,
                       "in_channels": 3},
        text_config={"hidden_size": width, "intermediate_size": mlp, "num_hidden_layers": text_layers, "num_attention_heads": heads,
                     "num_key_value_heads": kv_heads, "vocab_size": len(SPECIALS) + len(WORDS) + len(QWEN_SPECIALS),
                     "max_position_embeddings": max_positions,
                     "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                         "mrope_section": [head_dim // 8, head_dim // 8, head_dim // 4]},
                     "eos_token_id": SPECIALS.index("<|im_end|>"), "pad_token_id": SPECIALS.index("<pad>"), "bos_token_id": None,
                     "tie_word_embeddings": True},
        video_token_id=ids["<|video_pad|>"], image_token_id=ids["<|image_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=True)
    _save_random(Qwen2_5_VLForConditionalGeneration, config, seed, folder)
    mean, std = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
    size = {"shortest_edge": 16 * 16, "longest_edge": 16 * 16 * 1024}
    common = {"patch_size": 8, "merge_size": 2, "temporal_patch_size": 2, "size": size, "image_mean": mean, "image_std": std}
    Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(**common), tokenizer=tokenizer,
                        video_processor=Qwen2VLVideoProcessor(**common, min_frames=2, max_frames=64),
                        chat_template=tokenizer.chat_template).save_pretrained(folder)
    _save_tokenizer_fixups(folder, "<|video_pad|>", "<|image_pad|>")
    return folder


def _released_vision_names(folder: Path) -> None:
    """The vision tower's weights under the names of the released LLaVA-OV checkpoints
    (vision_tower.vision_model.*), which vLLM 0.32 reads; transformers 5.19 saves vision_tower.*
    and reads either."""
    from safetensors.torch import load_file, save_file

    path = folder / "model.safetensors"
    weights = load_file(path)
    save_file({("vision_tower.vision_model." + k[len("vision_tower."):] if k.startswith("vision_tower.") else k): v
               for k, v in weights.items()}, path, metadata={"format": "pt"})


def build_llava(folder: Path, seed: int, text_layers: int) -> Path:
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, LlavaOnevisionProcessor
    from transformers.models.llava_onevision.image_processing_llava_onevision import LlavaOnevisionImageProcessor
    from transformers.models.llava_onevision.video_processing_llava_onevision import LlavaOnevisionVideoProcessor

    from vidtok.testbed.toy import SPECIALS, WORDS, build_tokenizer

    tokenizer = build_tokenizer()
    config = LlavaOnevisionConfig(
        vision_config={"model_type": "siglip_vision_model", "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
                       "num_attention_heads": 2, "image_size": SIZE, "patch_size": 8},
        text_config={"model_type": "qwen2", "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": text_layers,
                     "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": len(SPECIALS) + len(WORDS),
                     "max_position_embeddings": 2048, "tie_word_embeddings": True, "eos_token_id": SPECIALS.index("<|im_end|>"),
                     "pad_token_id": SPECIALS.index("<pad>"), "bos_token_id": None},
        image_token_index=SPECIALS.index("<image>"), video_token_index=SPECIALS.index("<video>"), vision_feature_layer=-1,
        vision_feature_select_strategy="full", tie_word_embeddings=True, image_grid_pinpoints=[[SIZE, SIZE]])
    _save_random(LlavaOnevisionForConditionalGeneration, config, seed, folder)
    _released_vision_names(folder)
    size = {"height": SIZE, "width": SIZE}
    common = {"size": size, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}
    LlavaOnevisionProcessor(image_processor=LlavaOnevisionImageProcessor(**common, image_grid_pinpoints=[[SIZE, SIZE]]),
                            video_processor=LlavaOnevisionVideoProcessor(**common), tokenizer=tokenizer,
                            num_image_tokens=(SIZE // 8) ** 2, vision_feature_select_strategy="full",
                            chat_template=tokenizer.chat_template).save_pretrained(folder)
    _save_tokenizer_fixups(folder, "<video>", "<image>")
    return folder


def frames():
    import numpy as np

    return np.random.default_rng(0).integers(0, 256, (FRAMES, SIZE, SIZE, 3), dtype=np.uint8)


def metadata() -> dict:
    return {"fps": FPS, "duration": FRAMES / FPS, "total_num_frames": FRAMES, "frames_indices": list(range(FRAMES)),
            "video_backend": "opencv", "do_sample_frames": False}


def prompt(tokenizer, question: str, media: str = "video") -> str:
    """The chat prompt with a video, an image (the toy template renders only videos: the video's
    marker is swapped for the image's) or no media."""
    content = ([{"type": "video"}] if media != "none" else []) + [{"type": "text", "text": question}]
    text = tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False)
    if media == "image":
        video, image = ("<|video_pad|>", "<|image_pad|>") if "<|video_pad|>" in text else ("<video>", "<image>")
        text = text.replace(video, image)
    return text


# the engine subprocess --------------------------------------------------------------------------

def run_engine(spec: dict, folder: Path, timeout: int = 900, fails: bool = False):
    """Run `spec` (a model, its engine options and batches of requests) in a fresh Python process;
    `fails`: the engine must not start, and its stderr is returned."""
    spec_path, out_path = folder / f"{spec['name']}.spec.json", folder / f"{spec['name']}.out.json"
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TOKENIZERS_PARALLELISM": "false"}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, __file__, str(spec_path), str(out_path)], env=env, capture_output=True, text=True,
                          timeout=timeout)
    if fails:
        assert done.returncode, f"the vLLM engine {spec['name']} started, it should have been refused"
        return done.stderr
    if done.returncode:
        raise AssertionError(f"the vLLM engine {spec['name']} failed (exit {done.returncode}):\n{done.stderr[-6000:]}")
    result = json.loads(out_path.read_text())
    result["wall_seconds"] = time.perf_counter() - started
    return result


def _engine_main(spec_path: str, out_path: str) -> None:
    import numpy as np
    from PIL import Image
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    spec = json.loads(Path(spec_path).read_text())
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    llm = LLM(model=spec["model"], enforce_eager=True, max_model_len=2048, dtype="float32", kv_cache_memory_bytes=2**26,
              limit_mm_per_prompt={"video": 1, "image": 1}, **spec.get("engine", {}))
    video = (frames(), metadata())
    image = Image.fromarray(np.asarray(frames()[0]))
    out = {"engine_seconds": time.perf_counter() - started, "batches": []}
    plugin = spec.get("plugin", False)
    for batch in spec["batches"]:
        requests = []
        for request in batch:
            item = {"prompt": prompt(tokenizer, request["question"], request.get("media", "video"))}
            if request.get("media", "video") == "video":
                item["multi_modal_data"] = {"video": video}
            elif request["media"] == "image":
                item["multi_modal_data"] = {"image": image}
            if request.get("kwargs"):
                item["mm_processor_kwargs"] = request["kwargs"]
            requests.append(item)
        if plugin:
            llm.apply_model(lambda model: model.dytok_records.clear())
        started = time.perf_counter()
        try:
            results = llm.generate(requests, SamplingParams(temperature=0, max_tokens=MAX_TOKENS), use_tqdm=False)
        except Exception as error:  # a refused request: the message, and the engine goes on
            out["batches"].append({"error": f"{type(error).__name__}: {error}"})
            continue
        entry = {"seconds": time.perf_counter() - started, "tokens": [list(r.outputs[0].token_ids) for r in results],
                 "prompt_lengths": [len(r.prompt_token_ids) for r in results]}
        if plugin:
            entry["records"] = llm.apply_model(lambda model: list(model.dytok_records))[0]
        out["batches"].append(entry)
    Path(out_path).write_text(json.dumps(out))


# references from vidtok.generate (transformers) --------------------------------------------------

def unpatchify(pixel_values, grid, patch=8, merge=2, temporal=2):
    """Qwen2-VL's processor output [t*h*w, 3*tp*p*p] back to frames [t*tp, 3, H, W] (the inverse of its patchify)."""
    t, h, w = grid
    x = pixel_values.reshape(t, h // merge, w // merge, merge, merge, 3, temporal, patch, patch)
    return x.permute(0, 6, 5, 1, 3, 7, 2, 4, 8).reshape(t * temporal, 3, h * patch, w * patch)


def processed_pixels(folder: Path, family: str):
    """The video's pixel values exactly as vLLM's processor (the checkpoint's own) makes them, as vidtok takes them."""
    from transformers import AutoProcessor
    from transformers.video_utils import VideoMetadata

    processor = AutoProcessor.from_pretrained(folder)
    info = VideoMetadata(**{k: v for k, v in metadata().items() if k not in ("do_sample_frames", "video_backend")})
    out = processor.video_processor(videos=[frames()], video_metadata=[info], do_sample_frames=False, return_tensors="pt")
    if family == "qwen":
        return unpatchify(out["pixel_values_videos"], out["video_grid_thw"][0].tolist())
    return out["pixel_values_videos"][0]


def vidtok_reference(main: Path, assistant: Path, family: str, guide: str, question: str, layers) -> dict:
    import torch
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    import vidtok
    from vidtok import DyToK, VisionZip

    model = AutoModelForImageTextToText.from_pretrained(main, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(main)
    if guide == "none":
        method = VisionZip(retention=RETENTION)
    elif guide == "self":
        method = DyToK(VisionZip(), retention=RETENTION, guide="self", layers=layers)
    else:
        helper = AutoModelForImageTextToText.from_pretrained(assistant, dtype=torch.float32).eval()
        method = DyToK(VisionZip(), retention=RETENTION, guide=helper, layers=ASSISTANT_LAYERS)
    result = vidtok.generate(model, tokenizer, processed_pixels(main, family), question, method, max_new_tokens=MAX_TOKENS)
    return {"kept": result.plan.kept, "budgets": result.plan.budgets, "frame_weights": result.plan.frame_weights,
            "tokens": result.sequences[0, result.prompt_tokens:].tolist()}


# the engine runs, once per module ------------------------------------------------------------------

GUIDES = ("self", "assistant", "none")


def _batches(layers):
    guided = [{"question": q, "kwargs": {"dytok_guide": g, **({"dytok_layers": ASSISTANT_LAYERS} if g == "assistant" else {})}}
              for q in QUESTIONS for g in GUIDES]
    return [
        guided,  # 0: vidtok's equal, every guide (two questions on one video in one batch)
        [{"question": QUESTIONS[0], "kwargs": {"dytok_retention": 1.0}}],  # 1: every token kept
        [{"question": QUESTIONS[0], "kwargs": {"dytok_retention": 0}}],  # 2: refused
        [{"question": QUESTIONS[0], "kwargs": {"dytok_retention": 0.25, "dytok_ratio": 3}}],  # 3: refused
        [{"question": QUESTIONS[0]}, {"question": QUESTIONS[0]}, {"question": QUESTIONS[1]}],  # 4: after the refusals; a repeat
        [{"question": QUESTIONS[0], "media": "none"}, {"question": QUESTIONS[0], "media": "image"}],  # 5: text only, image
    ]


def _stock_batches():
    return [[{"question": QUESTIONS[0]}], [{"question": QUESTIONS[0], "media": "none"}, {"question": QUESTIONS[0], "media": "image"}]]


FAMILIES = {
    "qwen": (build_qwen, "DyToKQwen2_5_VLForConditionalGeneration", QWEN_LAYERS),
    "llava": (build_llava, "DyToKLlavaOnevisionForConditionalGeneration", LLAVA_LAYERS),
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    """Checkpoints, the plugin's engine run, the stock engine run and vidtok's references, per family."""
    if not HAS_VLLM:
        pytest.skip(f"vLLM is not installed in this venv (it has its own): run {SETUP}")
    name = request.param
    build, architecture, layers = FAMILIES[name]
    folder = tmp_path_factory.mktemp(f"vllm-{name}")
    main, assistant = build(folder / "main", seed=0, text_layers=3), build(folder / "assistant", seed=1, text_layers=2)
    plugin = run_engine({"name": f"{name}-plugin", "model": str(main), "plugin": True, "batches": _batches(layers),
                         "engine": {"hf_overrides": {"architectures": [architecture]},
                                    "mm_processor_kwargs": {"dytok_retention": RETENTION, "dytok_guide": "self", "dytok_layers": layers,
                                                            "dytok_assistant": str(assistant)}}}, folder)
    stock = run_engine({"name": f"{name}-stock", "model": str(main), "batches": _stock_batches()}, folder)
    # the same requests with the prompt cut into 12-token prefill chunks (the video spread over several)
    chunked = run_engine({"name": f"{name}-chunked", "model": str(main), "plugin": True, "batches": _batches(layers)[:1],
                          "engine": {"hf_overrides": {"architectures": [architecture]}, "enable_chunked_prefill": True,
                                     "max_num_batched_tokens": 12,
                                     "mm_processor_kwargs": {"dytok_retention": RETENTION, "dytok_guide": "self", "dytok_layers": layers,
                                                             "dytok_assistant": str(assistant)}}}, folder)
    references = {(q, g): vidtok_reference(main, assistant, name, g, q, ASSISTANT_LAYERS if g == "assistant" else layers)
                  for q in QUESTIONS for g in GUIDES}
    return {"name": name, "main": main, "assistant": assistant, "plugin": plugin, "stock": stock, "chunked": chunked,
            "references": references, "layers": layers, "folder": folder}


def _records_by_prompt(entry, tokenizer_folder):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    return {(tokenizer.decode(r["prompt_ids"]), r["guide"]): r for r in entry["records"]}, tokenizer


@needs_vllm
def test_vllm_keeps_the_tokens_vidtok_keeps_and_answers_alike(family):
    entry = family["plugin"]["batches"][0]
    assert "error" not in entry, entry
    records, tokenizer = _records_by_prompt(entry, family["main"])
    requests = [(q, g) for q in QUESTIONS for g in GUIDES]
    for (question, guide), tokens in zip(requests, entry["tokens"]):
        reference = family["references"][(question, guide)]
        record = records[(tokenizer.decode(tokenizer(prompt(tokenizer, question))["input_ids"]), guide)]
        assert record["budgets"] == reference["budgets"], (question, guide)
        assert record["kept"] == reference["kept"], (question, guide)
        if reference["frame_weights"] is not None:
            assert record["frame_weights"] == pytest.approx(reference["frame_weights"], rel=1e-3, abs=1e-6)
        assert tokens == reference["tokens"], (question, guide)


@needs_vllm
def test_vllm_two_questions_on_one_video_keep_their_own_tokens(family):
    records, tokenizer = _records_by_prompt(family["plugin"]["batches"][0], family["main"])
    first, second = (records[(tokenizer.decode(tokenizer(prompt(tokenizer, q))["input_ids"]), "self")] for q in QUESTIONS)
    assert first["frame_weights"] != second["frame_weights"]
    assert first["kept"] != second["kept"]  # the toy's peaked attention splits the budget differently per question
    repeat = family["plugin"]["batches"][4]
    assert "error" not in repeat, repeat
    assert repeat["tokens"][0] == repeat["tokens"][1]
    assert repeat["tokens"][0] == family["plugin"]["batches"][0]["tokens"][0]  # the same question, guide and video


@needs_vllm
def test_vllm_retention_one_equals_vllm_without_the_plugin(family):
    kept_all, stock = family["plugin"]["batches"][1], family["stock"]["batches"][0]
    assert kept_all["tokens"] == stock["tokens"] and kept_all["prompt_lengths"] == stock["prompt_lengths"]


@needs_vllm
def test_vllm_compressed_prompt_holds_the_budget(family):
    entry = family["plugin"]["batches"][0]
    full = family["stock"]["batches"][0]["prompt_lengths"][0]  # the first question, every token
    record = entry["records"][0]
    units, per_unit = record["units"], record["per_unit"]
    budget = round(RETENTION * units * per_unit)
    assert entry["prompt_lengths"][: len(GUIDES)] == [full - units * per_unit + budget] * len(GUIDES)


@needs_vllm
def test_vllm_bad_settings_are_refused_per_request_and_the_engine_goes_on(family):
    zero, unknown, after = (family["plugin"]["batches"][n] for n in (2, 3, 4))
    assert "dytok_retention" in zero["error"] and "(0, 1]" in zero["error"]
    assert "dytok_ratio" in unknown["error"] and "known ones" in unknown["error"]
    assert "error" not in after and len(after["tokens"]) == 3


@needs_vllm
def test_vllm_text_and_image_requests_pass_through_untouched(family):
    plugin, stock = family["plugin"]["batches"][5], family["stock"]["batches"][1]
    assert "error" not in plugin, plugin
    assert plugin["tokens"] == stock["tokens"] and plugin["prompt_lengths"] == stock["prompt_lengths"]


@needs_vllm
def test_vllm_a_chunked_prefill_answers_as_one_prefill(family):
    assert family["chunked"]["batches"][0]["tokens"] == family["plugin"]["batches"][0]["tokens"]
    assert family["chunked"]["batches"][0]["records"] == family["plugin"]["batches"][0]["records"] or sorted(
        map(json.dumps, family["chunked"]["batches"][0]["records"])) == sorted(map(json.dumps, family["plugin"]["batches"][0]["records"]))


@needs_vllm
def test_vllm_an_assistant_of_another_family_is_refused_at_start(family, tmp_path):
    build = build_llava if family["name"] == "qwen" else build_qwen
    other = build(tmp_path / "other", seed=2, text_layers=2)
    architecture = FAMILIES[family["name"]][1]
    stderr = run_engine({"name": "refused", "model": str(family["main"]), "plugin": True, "batches": [],
                         "engine": {"hf_overrides": {"architectures": [architecture]},
                                    "mm_processor_kwargs": {"dytok_retention": RETENTION, "dytok_assistant": str(other)}}},
                        tmp_path, fails=True)
    assert "use an assistant of the main model's family" in stderr


if __name__ == "__main__":
    _engine_main(*sys.argv[1:3])
