"""Small LLaVA-OneVision models built from configs in code, with a word-level tokenizer.

These are the project's own testbed: the real transformers architecture (SigLIP + Qwen2 in
`LlavaOnevisionForConditionalGeneration`) at a size that trains and runs on a CPU.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .vocab import COLOURS, SHAPES, V2_WORDS

SPECIALS = ("<pad>", "<unk>", "<|im_start|>", "<|im_end|>", "<video>", "<image>")
WORDS = ("user", "assistant", "what", "shape", "colour", "is", "the", "?", "which", "object") + SHAPES + COLOURS

# One `<video>` marker in the rendered prompt; the adapter expands it to the placeholder count.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }} "
    "{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'video' %}<video> {% elif c['type'] == 'text' %}{{ c['text'] }} {% endif %}"
    "{% endfor %}{% endif %}<|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}"
)

# Qwen-VL's markers, after the words so the LLaVA-OV vocabulary (and the shipped models) keep their ids.
QWEN_SPECIALS = ("<|vision_start|>", "<|vision_end|>", "<|video_pad|>", "<|image_pad|>")
QWEN_CHAT_TEMPLATE = CHAT_TEMPLATE.replace("<video> ", "<|vision_start|> <|video_pad|> <|vision_end|> ")
# The words of Qwen3-VL's timestamps ("<12.5 seconds>", digits split one by one), after the markers.
TIME_WORDS = ("<", ">", ".", "seconds") + tuple("0123456789")
TIMESTAMPED = ("qwen3_vl", "qwen3_vl_moe", "qwen3_5")

# geometry name -> (vision width, vision layers, text width, text layers, text heads, kv heads)
GEOMETRIES = {
    "main": (96, 2, 128, 4, 4, 2),
    "assistant": (96, 2, 64, 2, 2, 1),
    "test": (32, 2, 32, 3, 4, 2),
}


def build_tokenizer(family: str = "llava_onevision", events: bool = False):
    """Word-level tokenizer with the toy vocabulary and a chat template (saved as tokenizer.json);
    `family="qwen2_5_vl"` adds Qwen-VL's vision markers and renders a video as they do; the
    timestamped families (Qwen3-VL, Qwen3.5) also the words of their timestamps; `events` (LLaVA-OV)
    the words of testbed v2's questions and answers, after v1's, so v1's ids stay."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    qwen = family != "llava_onevision"
    timestamped = family in TIMESTAMPED
    if events and family != "llava_onevision":
        raise ValueError("the events (testbed v2) vocabulary is built for the toy LLaVA-OV family")
    extra = (QWEN_SPECIALS if qwen else ()) + (TIME_WORDS if timestamped else ()) + (V2_WORDS if events else ())
    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS + extra)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    if timestamped:
        core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token="<unk>",
        pad_token="<pad>",
        eos_token="<|im_end|>",
        bos_token=None,
        extra_special_tokens={"video_token": "<video>", "image_token": "<image>"},
    )
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<video>", "<image>", *(QWEN_SPECIALS if qwen else ())]})
    tok.chat_template = QWEN_CHAT_TEMPLATE if qwen else CHAT_TEMPLATE
    return tok


# geometry name -> (vision width, vision depth, full-attention blocks, text width, text layers, heads, kv heads)
QWEN_GEOMETRIES = {
    "main": (96, 4, [1, 3], 128, 4, 4, 2),
    "assistant": (96, 4, [1, 3], 64, 2, 2, 1),
    "test": (32, 4, [1, 3], 32, 3, 4, 2),
}


def qwen_toy_config(geometry: str = "test", patch_size: int = 8, window_size: int = 32):
    """A Qwen2_5_VLConfig of the toy vocabulary: 8-px patches merged 2x2, so a 64-px frame pair is 4x4 = 16 tokens."""
    from transformers import Qwen2_5_VLConfig

    vw, depth, full, tw, tl, th, tkv = QWEN_GEOMETRIES[geometry]
    vocab = len(SPECIALS) + len(WORDS) + len(QWEN_SPECIALS)
    ids = {name: len(SPECIALS) + len(WORDS) + i for i, name in enumerate(QWEN_SPECIALS)}
    head_dim = tw // th
    return Qwen2_5_VLConfig(
        vision_config={"depth": depth, "hidden_size": vw, "intermediate_size": vw * 2, "num_heads": 2, "out_hidden_size": tw,
                       "patch_size": patch_size, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": window_size,
                       "fullatt_block_indexes": full, "tokens_per_second": 2, "in_channels": 3},
        text_config={"hidden_size": tw, "intermediate_size": tw * 2, "num_hidden_layers": tl, "num_attention_heads": th,
                     "num_key_value_heads": tkv, "vocab_size": vocab, "max_position_embeddings": 2048,
                     "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [head_dim // 8, head_dim // 8, head_dim // 4]},
                     "eos_token_id": SPECIALS.index("<|im_end|>"), "pad_token_id": SPECIALS.index("<pad>"), "bos_token_id": None,
                     "tie_word_embeddings": True},
        video_token_id=ids["<|video_pad|>"], image_token_id=ids["<|image_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )


def build_qwen_toy_model(geometry: str = "test", seed: int = 0, **config_kwargs):
    """Random-weight toy Qwen2.5-VL (deterministic from `seed`), in eval mode, float32."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    config = qwen_toy_config(geometry, **config_kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config.eos_token_id = config.text_config.eos_token_id
    model.generation_config.pad_token_id = config.text_config.pad_token_id
    return model.eval()


def qwen3_toy_config(model_type: str = "qwen3_vl", patch_size: int = 8, deepstack: tuple[int, ...] = (0, 1), text_layers: int = 4):
    """A tiny Qwen3-VL (`qwen3_vl`, `qwen3_vl_moe`) or Qwen3.5 (`qwen3_5`) config of the toy
    vocabulary, random weights only: 8-px patches merged 2x2 (a 64-px frame pair is 4x4 = 16
    tokens); Qwen3-VL's DeepStack from vision blocks `deepstack` into the first len(deepstack) LLM
    layers; Qwen3.5's LLM alternating linear-attention and attention layers (0, 2: linear)."""
    from transformers import Qwen3VLConfig, Qwen3VLMoeConfig

    vocab = len(SPECIALS) + len(WORDS) + len(QWEN_SPECIALS) + len(TIME_WORDS)
    ids = {name: len(SPECIALS) + len(WORDS) + i for i, name in enumerate(QWEN_SPECIALS)}
    width, heads, head_dim = 32, 4, 8
    text = {"hidden_size": width, "intermediate_size": width * 2, "num_hidden_layers": text_layers, "num_attention_heads": heads,
            "num_key_value_heads": 2, "head_dim": head_dim, "vocab_size": vocab, "max_position_embeddings": 2048,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1], "mrope_interleaved": True},
            "pad_token_id": SPECIALS.index("<pad>"), "tie_word_embeddings": True}
    config_cls = Qwen3VLConfig
    if model_type in ("qwen3_5", "qwen3_5_moe"):  # a hybrid LLM: linear-attention (gated delta rule) layers between attention layers
        from transformers import Qwen3_5Config, Qwen3_5MoeConfig

        text.update({"layer_types": (["linear_attention", "full_attention"] * text_layers)[:text_layers], "head_dim": 16,
                     "linear_conv_kernel_dim": 4, "linear_key_head_dim": 8, "linear_value_head_dim": 8,
                     "linear_num_key_heads": 2, "linear_num_value_heads": 4})
        text["rope_parameters"] = {**text["rope_parameters"], "partial_rotary_factor": 0.5}
        config_cls, deepstack = Qwen3_5Config, ()
        if model_type == "qwen3_5_moe":
            text.update({"moe_intermediate_size": width, "shared_expert_intermediate_size": width, "num_experts": 4,
                         "num_experts_per_tok": 2})
            config_cls = Qwen3_5MoeConfig
    elif model_type == "qwen3_vl_moe":
        text.update({"moe_intermediate_size": width, "num_experts": 4, "num_experts_per_tok": 2, "decoder_sparse_step": 1})
        config_cls = Qwen3VLMoeConfig
    elif model_type != "qwen3_vl":
        raise ValueError(f"unknown Qwen3 model type {model_type!r}: qwen3_vl, qwen3_vl_moe, qwen3_5 or qwen3_5_moe")
    vision = {"depth": max(deepstack, default=0) + 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
              "out_hidden_size": width, "patch_size": patch_size, "spatial_merge_size": 2, "temporal_patch_size": 2,
              "num_position_embeddings": 64, "in_channels": 3}
    if not model_type.startswith("qwen3_5"):
        vision["deepstack_visual_indexes"] = list(deepstack)
    return config_cls(
        vision_config=vision,
        text_config=text,
        video_token_id=ids["<|video_pad|>"], image_token_id=ids["<|image_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )


def build_qwen3_toy_model(model_type: str = "qwen3_vl", seed: int = 0, **config_kwargs):
    """Random-weight toy Qwen3-VL, Qwen3-VL-MoE or Qwen3.5 (deterministic from `seed`), in eval mode, float32."""
    from transformers import AutoModelForImageTextToText

    config = qwen3_toy_config(model_type, **config_kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForImageTextToText.from_config(config)
    model.generation_config.eos_token_id = SPECIALS.index("<|im_end|>")
    model.generation_config.pad_token_id = SPECIALS.index("<pad>")
    return model.eval()


def toy_config(geometry: str = "main", image_size: int = 64, patch_size: int = 8):
    """A LlavaOnevisionConfig for one of GEOMETRIES (64-px frames, 8-px patches -> 16 tokens/frame)."""
    from transformers import LlavaOnevisionConfig

    if geometry not in GEOMETRIES:
        raise ValueError(f"unknown toy geometry {geometry!r}; choose one of {sorted(GEOMETRIES)}")
    vw, vl, tw, tl, th, tkv = GEOMETRIES[geometry]
    vocab = len(SPECIALS) + len(WORDS)
    return LlavaOnevisionConfig(
        vision_config={
            "model_type": "siglip_vision_model",
            "hidden_size": vw,
            "intermediate_size": vw * 2,
            "num_hidden_layers": vl,
            "num_attention_heads": 4,
            "image_size": image_size,
            "patch_size": patch_size,
        },
        text_config={
            "model_type": "qwen2",
            "hidden_size": tw,
            "intermediate_size": tw * 2,
            "num_hidden_layers": tl,
            "num_attention_heads": th,
            "num_key_value_heads": tkv,
            "vocab_size": vocab,
            "max_position_embeddings": 2048,
            "tie_word_embeddings": True,
            "eos_token_id": SPECIALS.index("<|im_end|>"),
            "pad_token_id": SPECIALS.index("<pad>"),
            "bos_token_id": None,
        },
        image_token_index=SPECIALS.index("<image>"),
        video_token_index=SPECIALS.index("<video>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        tie_word_embeddings=True,
        image_grid_pinpoints=[[image_size, image_size]],
    )


def build_toy_model(geometry: str = "main", seed: int = 0, **config_kwargs):
    """Random-weight toy model (deterministic from `seed`), in eval mode, float32."""
    from transformers import LlavaOnevisionForConditionalGeneration

    config = toy_config(geometry, **config_kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaOnevisionForConditionalGeneration(config)
    model.generation_config.eos_token_id = config.text_config.eos_token_id
    model.generation_config.pad_token_id = config.text_config.pad_token_id
    return model.eval()


# shipped defaults --------------------------------------------------------------------------

ASSETS = Path(__file__).parent / "assets"
RANDOM_NOTE = "the default model has random weights (no trained toy model is shipped in this install): its answers are meaningless"


def default_video() -> Path:
    return ASSETS / "sample" / "sample.mp4"


def default_question() -> str:
    import json

    return json.loads((ASSETS / "sample" / "sample.json").read_text())["question"]


def load_default():
    """(model, tokenizer, assistant or None, note or None): the shipped trained toy pair if present,
    else a random-weight toy model built in code (deterministic, seed 0)."""
    from transformers import LlavaOnevisionForConditionalGeneration

    main, assistant = ASSETS / "toy-main", ASSETS / "toy-assistant"
    if (main / "config.json").is_file():
        from transformers import AutoTokenizer

        model = LlavaOnevisionForConditionalGeneration.from_pretrained(main).eval()
        guide = LlavaOnevisionForConditionalGeneration.from_pretrained(assistant).eval() if (assistant / "config.json").is_file() else None
        return model, AutoTokenizer.from_pretrained(main), guide, None
    return build_toy_model("main", seed=0), build_tokenizer(), None, RANDOM_NOTE
