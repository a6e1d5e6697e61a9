"""The released checkpoints' configurations (tests/fixtures/released/, each folder's SOURCE.md says
where every file comes from), at their real geometry, through vidtok.prepare and vidtok.generate.

Random weights, nothing downloaded. What is kept from each release: token ids, vocabulary sizes,
patch / merge / temporal patch sizes, the vision depth and the block indexes a method reads
(Qwen2.5-VL's window size and full-attention blocks, Qwen3-VL's DeepStack indexes, Qwen3.5's
attention / linear-attention layer pattern), head dims and rope sections, the preprocessor configs and
the chat templates. Where a release file was not found (SOURCE.md): LLaVA-OV's, Qwen3-VL-2B's and
Qwen3.5's config.json are built from `config.facts.json` (values quoted by public sources, the rest
transformers' defaults, which no test reads); Qwen3-VL and Qwen3.5, whose chat templates were not
found, are prompted through the Qwen2.5-VL release template; Qwen3.5, whose video preprocessor config
was not found, is given frames whose size neither candidate budget changes. What is cut, to run on 2
CPU cores in under a minute per test (the overrides are in the fixtures below):
- the LLM depth (2 layers; 4 for Qwen3-VL, whose DeepStack feeds LLM layers 0-2; Qwen3.5 the first
  layers of its released pattern, 3 linear-attention layers then an attention layer: 4 for the 27B,
  8 for the 0.8B guide, so that its guide layers are a choice among two attention layers);
- the vision towers' width (hidden 256, 16 heads of 16, MLP 4x smaller), depth kept for the Qwen
  towers; SigLIP's depth cut to 4 too (LLaVA-OV reads its last layer, whatever the depth);
- LLM widths, where the full width is too slow at these prompt lengths (6,000+ tokens for LLaVA-OV):
  LLaVA-OV 7B keeps its 28 heads and 4 KV heads at head_dim 16 (hidden 448); the Qwen models keep
  head_dim 128 (their rope sections need it) with fewer heads at the released GQA ratio (Qwen2.5-VL
  7B 7:1 and 3B 8:1, Qwen3-VL 8B 4:1 and 2B 4:2), hidden 896 / 1024 / 512 / 512; Qwen3.5 keeps
  head_dim 256 (partial rotary 0.25: 64 rotated dims, its rope sections 11 + 11 + 10 = 32 pairs) and
  the linear-attention head dims (128), with fewer heads at the released ratios (27B 24:4 attention
  and 16:48 linear key:value heads, 0.8B 8:2 and 16:16), hidden 640 / 512; MLPs narrowed alike;
  LLaVA-OV 0.5B keeps its full width;
- the LLaVA-OV and Qwen2.5-VL assistants' vision blocks take the main model's weights, so that each
  pair runs one tower (vidtok shares it; Qwen3-VL and Qwen3.5 assistants always run their own).
"""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import vidtok
from vidtok import DyToK, VisionZip, adapter_for, generate, prepare

from test_qwen2_5_vl import reference_positions

RELEASED = Path(__file__).parent / "fixtures" / "released"
Q = "what colour is the ball ?"
WORDS = ("system", "user", "assistant", "You", "are", "a", "helpful", ".", "what", "colour", "is", "the", "ball", "?",
         "<", ">", "seconds") + tuple("0123456789")


def released(name: str, file: str):
    return json.loads((RELEASED / name / file).read_text())


def release_config(name: str) -> dict:
    folder = RELEASED / name
    if (folder / "config.json").is_file():
        return json.loads((folder / "config.json").read_text())
    return json.loads((folder / "config.facts.json").read_text())["config"]


# tokenizer: the real special tokens at their real ids, a few words, the real chat template --------

def released_tokenizer(specials: dict[str, int], template: str, eos: str, pad: str):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, **{w: i + 1 for i, w in enumerate(WORDS)}}
    taken = set(specials.values())
    for i in range(len(vocab), max(taken) + 1):  # filler up to the 151k range, so every real id exists
        if i not in taken:
            vocab[f"<unused_{i}>"] = i
    vocab.update(specials)
    assert len(set(vocab.values())) == len(vocab)
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token=eos, pad_token=pad, bos_token=None)
    tok.add_special_tokens({"additional_special_tokens": list(specials)})
    tok.chat_template = template
    for name, i in specials.items():
        assert tok.convert_tokens_to_ids(name) == i
    return tok


def qwen_tokenizer(name: str, template_from: str):
    tokens = released(name, "special_tokens.json")
    template = released(template_from, "chat_template.json")["chat_template"]
    return released_tokenizer(tokens["added_tokens"], template, tokens["eos_token"], tokens["pad_token"])


def llava_tokenizer(name: str):
    return released_tokenizer(released(name, "added_tokens.json"), released(name, "chat_template.json")["chat_template"],
                              "<|im_end|>", "<|endoftext|>")


# models: released configs, cut -------------------------------------------------------------------

NARROW_VISION = {"hidden_size": 256, "num_heads": 16}


def cut(name: str, text: dict, vision: dict, seed: int = 0, vision_from=None, eos: int = 151645, pad: int = 151643):
    """A random-weight model of `name`'s released config with the text / vision overrides applied
    (eos / pad: the ids of its tokenizer's <|im_end|> and <|endoftext|>, Qwen2's by default)."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    raw = release_config(name)
    raw = {**raw, "vision_config": {**raw["vision_config"], **vision}}
    if "text_config" in raw:
        raw["text_config"] = {**raw["text_config"], **text}
    else:  # Qwen2.5-VL's release files (transformers 4.41) keep the text keys flat
        raw.update(text)
    raw.pop("architectures", None)
    config = AutoConfig.for_model(**raw)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForImageTextToText.from_config(config)
    model = model.eval()
    model.name_or_path = str(RELEASED / name)  # the adapters read the released (video) preprocessor config from here
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = pad
    if vision_from is not None:  # one tower design in the pair: the assistant runs the main model's
        tower = vision_from.model.vision_tower if hasattr(vision_from.model, "vision_tower") else vision_from.model.visual
        mine = model.model.vision_tower if hasattr(model.model, "vision_tower") else model.model.visual
        state = {k: v for k, v in tower.state_dict().items() if not k.startswith("merger.")}
        mine.load_state_dict(state, strict=False)
    return model


def chat_ids(tokenizer, expand: str, by: str):
    """The chat template's rendering of [video, question], its video marker replaced by `by`, tokenized."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": Q}]}],
                                         add_generation_prompt=True, tokenize=False)
    assert text.count(expand) == 1
    return text, tokenizer(text.replace(expand, by), add_special_tokens=False)["input_ids"]


def frames(count: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(count, size, size, 3), dtype=np.uint8)


def timestamped_blocks(budgets) -> str:
    """Qwen3-VL's released processor layout of a video given as frames (no file: 2 fps, 0.5 s apart): per
    group of 2 frames "<t seconds>" + vision start + its kept tokens + vision end, t the mean time of the
    group's frames."""
    stamps = [(2 * g * 0.5 + (2 * g + 1) * 0.5) / 2 for g in range(len(budgets))]
    return "".join(f"<{t:.1f} seconds><|vision_start|>" + "<|video_pad|>" * b + "<|vision_end|>" for t, b in zip(stamps, budgets))


def timestamped_positions(ids: list, vision_start: int, kept, side: int) -> torch.Tensor:
    """[3, 1, S] positions of a timestamped prompt: text +1; a group's block is one temporal step, a kept
    token at (s, s + row, s + col) of the full side x side grid; text after a block at the full block's
    largest position + 1."""
    rows, position, i, g = [], 0, 0, 0
    while i < len(ids):
        rows.append([position] * 3)
        position += 1
        if ids[i] == vision_start:
            rows += [[position, position + k // side, position + k % side] for k in kept[g]]
            position += side
            i, g = i + 1 + len(kept[g]), g + 1
        else:
            i += 1
    return torch.tensor(rows).T[:, None, :]


# LLaVA-OneVision 0.5B / 7B -----------------------------------------------------------------------

LLAVA_HALF, LLAVA_SEVEN = "llava_onevision_qwen2_0_5b_ov_hf", "llava_onevision_qwen2_7b_ov_hf"
SIGLIP_CUT = {"hidden_size": 256, "num_attention_heads": 16, "intermediate_size": 4304 // 4, "num_hidden_layers": 4}


@pytest.fixture(scope="module")
def llava_pair():
    half = cut(LLAVA_HALF, {"num_hidden_layers": 2}, SIGLIP_CUT)
    seven = cut(LLAVA_SEVEN, {"num_hidden_layers": 2, "hidden_size": 448, "intermediate_size": 18944 // 8}, SIGLIP_CUT, seed=1,
                vision_from=half)
    return seven, half


def _prepare_pair(main, guide, tokenizer, video):
    """DyToK + VisionZip 25% guided by `guide` on `video`, through a cache the test goes on using: (prepared, method, cache)."""
    cache = vidtok.VideoCache(video)
    method = DyToK(VisionZip(0.25), guide=guide)
    return prepare(main, tokenizer, video, Q, method, cache=cache), method, cache


def test_llava_onevision_at_release_geometry(llava_pair):
    seven, half = llava_pair
    tokenizer = llava_tokenizer(LLAVA_SEVEN)
    video = frames(32, 384)
    # the released rule: 384-px frames in 14-px patches, a 27 x 27 grid bilinearly pooled to ceil(27 / 2)^2
    vision = release_config(LLAVA_SEVEN)["vision_config"]
    grid = vision["image_size"] // vision["patch_size"]
    per_frame = math.ceil(grid / 2) ** 2
    assert (grid, per_frame) == (27, 196)
    assert (seven.config.text_config.vocab_size, half.config.text_config.vocab_size) == (152128, 151936)
    # the released pair (7B main, 0.5B assistant: 152128 and 151936 embedding rows, one tokenizer) is accepted
    prepared, method, cache = _prepare_pair(seven, half, tokenizer, video)
    plan = prepared.plan
    assert plan.unit == "frame" and plan.frames == 32 and plan.tokens_per_frame == per_frame
    assert sum(plan.budgets) == plan.total_budget == round(0.25 * 32 * per_frame) == 1568
    assert [len(k) for k in plan.kept] == plan.budgets
    # the prompt: the chat template's rendering, its <video> the kept tokens and one newline after the whole video
    text, expected = chat_ids(tokenizer, "<video>", "<video>" * (1568 + 1))
    assert text == f"<|im_start|>user\n<video>\n{Q}<|im_end|>\n<|im_start|>assistant\n"  # this template has no system prompt
    assert prepared.inputs["input_ids"][0].tolist() == expected
    assert "position_ids" not in prepared.inputs  # LLaVA-OV: plain 1-D positions, the model's own
    # VisionZip reads vision_feature_layer (-1: the tower's last layer)
    adapter = adapter_for(seven)
    tower = seven.model.vision_tower
    assert seven.config.vision_feature_layer == -1
    assert adapter._feature_attention_module() is getattr(tower, "vision_model", tower).encoder.layers[-1].self_attn
    result = generate(seven, tokenizer, video, Q, method, cache=cache, max_new_tokens=1)
    assert result.plan.budgets == plan.budgets and result.sequences.shape[1] == len(expected) + 1
    assert cache.computed.get("vision") == 1  # one tower run for the pair and both calls


# Qwen2.5-VL 3B / 7B ------------------------------------------------------------------------------

QWEN25_THREE, QWEN25_SEVEN = "qwen2_5_vl_3b_instruct", "qwen2_5_vl_7b_instruct"
QWEN25_VISION = {**NARROW_VISION, "intermediate_size": 3420 // 4}


def smart_resize(height, width, factor, low, high):
    """Qwen2-VL's resize rule, written out: sides to multiples of factor, area within [low, high]."""
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > high:
        beta = math.sqrt(height * width / high)
        h, w = math.floor(height / beta / factor) * factor, math.floor(width / beta / factor) * factor
    elif h * w < low:
        beta = math.sqrt(low / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


@pytest.fixture(scope="module")
def qwen25_pair():
    # head_dim 128 kept (mrope_section 16 + 24 + 24 = 64 = head_dim / 2): fewer heads, the GQA ratio kept
    seven = cut(QWEN25_SEVEN, {"num_hidden_layers": 2, "hidden_size": 896, "num_attention_heads": 7, "num_key_value_heads": 1,
                               "intermediate_size": 18944 // 4}, {**QWEN25_VISION, "out_hidden_size": 896})
    three = cut(QWEN25_THREE, {"num_hidden_layers": 2, "hidden_size": 1024, "num_attention_heads": 8, "num_key_value_heads": 1,
                               "intermediate_size": 11008 // 2}, {**QWEN25_VISION, "out_hidden_size": 1024}, seed=1, vision_from=seven)
    return seven, three


def test_qwen2_5_vl_at_release_geometry(qwen25_pair):
    seven, three = qwen25_pair
    tokenizer = qwen_tokenizer(QWEN25_SEVEN, QWEN25_SEVEN)
    video = frames(16, 448)
    pre, config = released(QWEN25_SEVEN, "preprocessor_config.json"), release_config(QWEN25_SEVEN)
    factor = pre["patch_size"] * pre["merge_size"]
    size = smart_resize(448, 448, factor, pre["min_pixels"], pre["max_pixels"])
    groups, per_group = 16 // pre["temporal_patch_size"], (size[0] // factor) * (size[1] // factor)
    assert (size, groups, per_group) == ((448, 448), 8, 256)
    assert (seven.config.text_config.vocab_size, three.config.text_config.vocab_size) == (152064, 151936)
    # the released pair (7B main, 3B assistant: 152064 and 151936 embedding rows, one tokenizer) is accepted
    prepared, method, cache = _prepare_pair(seven, three, tokenizer, video)
    plan = prepared.plan
    assert plan.unit == "temporal_group" and plan.frames == groups and plan.tokens_per_frame == per_group
    assert sum(plan.budgets) == round(0.25 * groups * per_group) == 512 and [len(k) for k in plan.kept] == plan.budgets
    # the prompt: the released template, its default system prompt included, its one video placeholder the kept tokens
    text, expected = chat_ids(tokenizer, "<|video_pad|>", "<|video_pad|>" * 512)
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|><|video_pad|>")
    ids = prepared.inputs["input_ids"][0].tolist()
    assert ids == expected
    # positions: the original rule on the full layout (2 tokens per second, 0.5 s per frame given without a file: 2
    # steps per group; text after the video at its largest position + 1), the kept tokens where that layout puts them
    at = ids.index(config["video_token_id"])
    interval = config["vision_config"]["tokens_per_second"] * pre["temporal_patch_size"] * 0.5
    side = size[0] // factor
    after = len(ids) - at - 512
    layout = reference_positions(at, groups, side, side, interval, after)
    flat = torch.tensor([at + g * per_group + i for g, k in enumerate(plan.kept) for i in k])
    want = torch.cat([layout[..., :at], layout[..., flat], layout[..., layout.shape[-1] - after:]], dim=-1)
    assert torch.equal(prepared.inputs["position_ids"], want)
    assert int(want[0, 0, at + 512]) == int(layout[:, 0, at: at + groups * per_group].max()) + 1
    # VisionZip ranks by the last full-attention block of the released depth (31), not a windowed one
    adapter = adapter_for(seven)
    assert len(seven.model.visual.blocks) == config["vision_config"]["depth"] == 32
    assert adapter._ranking_block() is seven.model.visual.blocks[max(config["vision_config"]["fullatt_block_indexes"])].attn
    assert max(config["vision_config"]["fullatt_block_indexes"]) == 31 and seven.config.vision_config.window_size == 112
    result = generate(seven, tokenizer, video, Q, method, cache=cache, max_new_tokens=1)
    assert result.plan.budgets == plan.budgets and result.sequences.shape[1] == len(ids) + 1
    assert cache.computed.get("vision") == 1  # one tower run: the 3B runs only its merger on the 7B's blocks' output


# Qwen3-VL 2B / 8B --------------------------------------------------------------------------------

QWEN3_TWO, QWEN3_EIGHT = "qwen3_vl_2b_instruct", "qwen3_vl_8b_instruct"
QWEN3_VISION = {**NARROW_VISION, "intermediate_size": 4304 // 4}


@pytest.fixture(scope="module")
def qwen3_pair():
    # head_dim 128 kept (mrope_section 24 + 20 + 20 = 64); 4 LLM layers: DeepStack feeds layers 0-2
    eight = cut(QWEN3_EIGHT, {"num_hidden_layers": 4, "hidden_size": 512, "num_attention_heads": 4, "num_key_value_heads": 1,
                              "intermediate_size": 12288 // 8}, {**QWEN3_VISION, "out_hidden_size": 512})
    two = cut(QWEN3_TWO, {"num_hidden_layers": 4, "hidden_size": 512, "num_attention_heads": 4, "num_key_value_heads": 2,
                          "intermediate_size": 6144 // 4}, {**QWEN3_VISION, "intermediate_size": 4096 // 4, "out_hidden_size": 512}, seed=1)
    return eight, two


def test_qwen3_vl_at_release_geometry(qwen3_pair):
    eight, two = qwen3_pair
    # the Qwen3-VL chat template was not found (SOURCE.md): the Qwen2.5-VL release template stands in
    tokenizer = qwen_tokenizer(QWEN3_EIGHT, QWEN25_SEVEN)
    video = frames(16, 448)
    vp, config = released(QWEN3_EIGHT, "video_preprocessor_config.json"), release_config(QWEN3_EIGHT)
    factor = vp["patch_size"] * vp["merge_size"]
    # Qwen3-VL's video budget covers frames x height x width
    assert vp["size"]["shortest_edge"] <= 16 * 448 * 448 <= vp["size"]["longest_edge"] and 448 % factor == 0
    groups, per_group = 16 // vp["temporal_patch_size"], (448 // factor) ** 2
    assert (groups, per_group) == (8, 196)
    # the released pair (8B main, 2B assistant) is accepted
    prepared, method, cache = _prepare_pair(eight, two, tokenizer, video)
    plan = prepared.plan
    assert plan.frames == groups and plan.tokens_per_frame == per_group
    assert sum(plan.budgets) == round(0.25 * groups * per_group) == 392 and [len(k) for k in plan.kept] == plan.budgets
    # the released processor's layout: per group "<t seconds>" + start + its kept tokens + end
    _, expected = chat_ids(tokenizer, "<|vision_start|><|video_pad|><|vision_end|>", timestamped_blocks(plan.budgets))
    ids = prepared.inputs["input_ids"][0].tolist()
    assert ids == expected
    # positions: each kept token where the full layout puts it
    assert torch.equal(prepared.inputs["position_ids"], timestamped_positions(ids, config["vision_start_token_id"], plan.kept, 448 // factor))
    # VisionZip reads the last block (all blocks attend over the whole group)
    adapter = adapter_for(eight)
    assert len(eight.model.visual.blocks) == config["vision_config"]["depth"] == 27
    assert adapter._ranking_block() is eight.model.visual.blocks[26].attn
    # DeepStack: one list per released index (8, 16, 24), each holding exactly the kept tokens
    assert list(eight.config.vision_config.deepstack_visual_indexes) == [8, 16, 24]
    video_out = prepared.inputs["mm_encoder_outputs"]["video"]
    assert len(video_out.deepstack_features) == 3
    assert all(d[0].shape[0] == video_out.pooler_output[0].shape[0] == 392 for d in video_out.deepstack_features)
    # and aligned: the compression treats every list as the main features' own channels, so a kept token left
    # as it was (a dominant one) is left as it was in every list, and a merged one is merged in every list
    encoded = cache.entries[("vision", id(eight), True, None)][0]  # the main tower's encoding the call used (signals read)
    flat = torch.tensor([g * per_group + i for g, k in enumerate(plan.kept) for i in k])
    untouched = (encoded.features.flatten(0, 1)[flat] - video_out.pooler_output[0]).abs().amax(-1) < 1e-5
    assert 0 < int(untouched.sum()) < 392
    for companion, sent in zip(encoded.companions, video_out.deepstack_features):
        assert torch.equal((companion.flatten(0, 1)[flat] - sent[0]).abs().amax(-1) < 1e-5, untouched)
    result = generate(eight, tokenizer, video, Q, method, cache=cache, max_new_tokens=1)
    assert result.plan.budgets == plan.budgets and result.sequences.shape[1] == len(ids) + 1


# Qwen3.5 27B / 0.8B ------------------------------------------------------------------------------

QWEN35_BIG, QWEN35_SMALL = "qwen3_5_27b", "qwen3_5_0_8b"
# transformers' Qwen3VLVideoProcessor (the video processor its auto classes give qwen3_5) class default `size`: the
# pixel budget of the whole video when a checkpoint ships no video preprocessor config
VIDEO_PROCESSOR_DEFAULT_BUDGET = (128 * 32 * 32, 32 * 32 * 768)


def hybrid_cut(name: str, layers: int, **widths) -> dict:
    """Text overrides: the first `layers` layers of the released layer pattern, and narrower widths."""
    return {"num_hidden_layers": layers, "layer_types": release_config(name)["text_config"]["layer_types"][:layers], **widths}


@pytest.fixture(scope="module")
def qwen35_pair():
    # head_dim 256 and the rope parameters kept; fewer heads at the released ratios (attention 24:4 and 8:2, linear
    # key:value 16:48 and 16:16); the released layer pattern's first 4 (27B) and 8 (0.8B) layers
    ids = released(QWEN35_BIG, "special_tokens.json")["added_tokens"]
    eos, pad = ids["<|im_end|>"], ids["<|endoftext|>"]
    big = cut(QWEN35_BIG, hybrid_cut(QWEN35_BIG, 4, hidden_size=640, num_attention_heads=6, num_key_value_heads=1,
                                     intermediate_size=17408 // 8, linear_num_key_heads=2, linear_num_value_heads=6),
              {**NARROW_VISION, "intermediate_size": 4304 // 4, "out_hidden_size": 640}, eos=eos, pad=pad)
    small = cut(QWEN35_SMALL, hybrid_cut(QWEN35_SMALL, 8, hidden_size=512, num_attention_heads=4, num_key_value_heads=1,
                                         intermediate_size=3584 // 2, linear_num_key_heads=2, linear_num_value_heads=2),
                {**NARROW_VISION, "intermediate_size": 3072 // 4, "out_hidden_size": 512}, seed=1, eos=eos, pad=pad)
    return big, small


def test_qwen3_5_at_release_geometry(qwen35_pair):
    big, small = qwen35_pair
    # the Qwen3.5 chat template was not found (SOURCE.md): the Qwen2.5-VL release template stands in, rendered with
    # the Qwen3.5 tokenizer's special tokens at their ids
    tokenizer = qwen_tokenizer(QWEN35_BIG, QWEN25_SEVEN)
    config, small_config = release_config(QWEN35_BIG), release_config(QWEN35_SMALL)
    vision = config["vision_config"]
    factor = vision["patch_size"] * vision["spatial_merge_size"]
    # the built models hold the released pattern's first layers: 3 linear-attention layers, then attention
    assert big.config.text_config.layer_types == config["text_config"]["layer_types"][:4] == ["linear_attention"] * 3 + ["full_attention"]
    assert small.config.text_config.layer_types == small_config["text_config"]["layer_types"][:8]
    assert (big.config.text_config.head_dim, small.config.text_config.head_dim) == (256, 256)
    assert big.config.text_config.rope_parameters["mrope_section"] == config["text_config"]["rope_parameters"]["mrope_section"] == [11, 11, 10]
    assert (big.config.text_config.vocab_size, small.config.text_config.vocab_size) == (248320, 248320)
    # no Qwen3.5 video preprocessor config was found (SOURCE.md): frames whose size neither the budget transformers
    # applies without one nor the Qwen3-VL release file's changes, so the grid is the patch x merge rule alone
    count, size = 8, 288
    qwen3_vl = released(QWEN3_EIGHT, "video_preprocessor_config.json")["size"]
    for low, high in (VIDEO_PROCESSOR_DEFAULT_BUDGET, (qwen3_vl["shortest_edge"], qwen3_vl["longest_edge"])):
        assert low <= count * size * size <= high
    assert size % factor == 0
    groups, side = count // vision["temporal_patch_size"], size // factor
    per_group = side * side
    assert (factor, groups, per_group) == (32, 4, 81)
    video = frames(count, size)
    # the released pair (27B main, 0.8B assistant: one tokenizer, one layout) is accepted
    prepared, method, cache = _prepare_pair(big, small, tokenizer, video)
    plan = prepared.plan
    assert plan.unit == "temporal_group" and plan.frames == groups and plan.tokens_per_frame == per_group
    assert sum(plan.budgets) == round(0.25 * groups * per_group) == 81 and [len(k) for k in plan.kept] == plan.budgets
    # the guide layers default to the last third of the assistant's attention layers: of its 8 layers 3 and 7 attend,
    # the last third of two is the last one (the last third of all 8 layers would be 6-7, and 6 has no attention)
    assert adapter_for(small).attention_layers == [3, 7] and adapter_for(big).attention_layers == [3]
    assert plan.guide == "assistant" and plan.guide_layers == [7]
    # FastV ranks at layer K-1: K = 4 (after the attention layer 3) is accepted, K = 3 (after a linear one) refused
    adapter_for(small).check_fastv_layer(4)
    with pytest.raises(ValueError, match="linear-attention layer"):
        adapter_for(small).check_fastv_layer(3)
    # the released processor's layout, as for Qwen3-VL, with the Qwen3.5 tokenizer's ids (248053-248057)
    _, expected = chat_ids(tokenizer, "<|vision_start|><|video_pad|><|vision_end|>", timestamped_blocks(plan.budgets))
    ids = prepared.inputs["input_ids"][0].tolist()
    assert ids == expected
    assert ids.count(config["video_token_id"]) == 81 and ids.count(config["vision_start_token_id"]) == groups
    assert (config["video_token_id"], config["vision_start_token_id"]) == (248057, 248053)
    # positions: each kept token where the full layout puts it
    assert torch.equal(prepared.inputs["position_ids"], timestamped_positions(ids, config["vision_start_token_id"], plan.kept, side))
    # VisionZip reads the last of the released 27 blocks; no DeepStack: the LLM gets the kept tokens only
    assert len(big.model.visual.blocks) == vision["depth"] == 27 and len(small.model.visual.blocks) == small_config["vision_config"]["depth"] == 12
    assert adapter_for(big)._ranking_block() is big.model.visual.blocks[26].attn
    video_out = prepared.inputs["mm_encoder_outputs"]["video"]
    assert not getattr(video_out, "deepstack_features", None) and video_out.pooler_output[0].shape == (81, 640)
    result = generate(big, tokenizer, video, Q, method, cache=cache, max_new_tokens=1)
    assert result.plan.budgets == plan.budgets and result.sequences.shape[1] == len(ids) + 1
    # each model ran its own tower, once for both calls
    assert cache.computed.get("vision") == 1 and cache.computed.get("guide_vision") == 1


# pairs across families ---------------------------------------------------------------------------

def test_cross_family_pairs_are_refused(llava_pair, qwen25_pair, qwen3_pair, qwen35_pair):
    video = frames(4, 448)
    seven_q25, three_q25 = qwen25_pair
    eight, _ = qwen3_pair
    _, half = llava_pair
    big, small = qwen35_pair
    tokenizer = qwen_tokenizer(QWEN25_SEVEN, QWEN25_SEVEN)
    qwen35_tokenizer = qwen_tokenizer(QWEN35_BIG, QWEN25_SEVEN)
    for main, guide, words in ((seven_q25, half, tokenizer), (seven_q25, eight, tokenizer), (eight, three_q25, tokenizer),
                               (eight, small, tokenizer), (big, eight, qwen35_tokenizer)):
        with pytest.raises(ValueError, match="does not match the main model"):
            prepare(main, words, video, Q, DyToK(VisionZip(0.25), guide=guide))
