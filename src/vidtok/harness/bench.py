"""`vidtok bench`: where the time goes, full vs compressed, the guide's cost counted.

Every configuration of one run is measured side by side in the same process, after warm-up,
as the median of several repeats. Stages: video decode, vision encoder, guide (its own vision
pass when it has one, and its LLM pass), compression, LLM prefill, time to first token (vision +
guide + compression + prefill), decode tokens/s. Also peak RSS (CPU) or peak allocated memory
(GPU) and analytic prefill FLOPs (vidtok.flops). Ratios are to `full` in the same run.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import statistics
import tempfile
import threading
import time
from dataclasses import MISSING, InitVar, asdict, dataclass, field, fields
from pathlib import Path

import torch

from .. import flops
from ..compressors import GUIDES, METHODS, build_method
from ..importance import parse_layers
from ..models.base import cache_keyword
from ..pipeline import _Timer, device_sync, prepare

STAGES = ("decode", "vision", "guide_vision", "guide", "compress", "prefill")


@dataclass
class BenchConfig:
    name: str = field(metadata={"help": "result folder name"})
    main: dict = field(metadata={"help": '{"toy": geometry} | {"path": folder} | {"vision": {...}, "text": {...}} '
                                           '(+ "family": "qwen2_5_vl" and "frame_size": px for a Qwen2.5-VL geometry; + "scale_to": the released '
                                           'depths, {"text": {"num_hidden_layers": N}, "vision": {...}}, to time a few layers and report those)'})
    guide: dict | None = field(default=None, metadata={"help": "assistant geometry, as main; share_vision: copy main's tower"})
    frames: int = 32
    runs: list = field(default_factory=lambda: [{"method": "full"}, {"method": "visionzip", "guide": "none", "retentions": [0.25, 0.1]}])
    repeats: int = 3
    warmup: int = 1
    decode_tokens: int = 8
    device: str = "auto"
    dtype: str = "float32"
    seed: int = 0
    sweep_frames: list | None = field(default=None, metadata={"help": "a length sweep: every run at each frame count, ascending"})
    point_seconds: float = field(default=600.0, metadata={"help": "sweep: skip a length whose predicted time passes this"})
    goal: dict | None = field(default=None, metadata={"help": 'LLM-side speedup goals of the default-guide rows, {"0.25": 4.6, "0.1": 11}'})
    batch_sizes: list | None = field(default=None, metadata={"help": "throughput instead of stage timings: every run at each batch size "
                                                                      "(vidtok.generate on that many questions and videos at once)"})
    questions_per_video: int | list = field(default=1, metadata={"help": "throughput: also q questions on one video (the guide pass "
                                                                         "shared) beside q questions on q videos; a list for several q"})
    source: InitVar[str | None] = None  # the file the values came from, named in every error

    def __post_init__(self, source):
        self._source = str(source) if source is not None else "the bench config"
        _check_config(self, _Check(self._source))

    @classmethod
    def load(cls, path) -> "BenchConfig":
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except OSError as error:
            raise ValueError(f"cannot read the bench config {path}: {error.strerror or error}; examples are in benchmarks/configs/") from None
        except UnicodeDecodeError:
            raise ValueError(f"the bench config {path} is not UTF-8 text: write it as JSON") from None
        except json.JSONDecodeError as error:
            raise ValueError(f"the bench config {path} is not valid JSON: {error.msg} at line {error.lineno}, column {error.colno}") from None
        if not isinstance(data, dict):
            raise ValueError(f'the bench config {path} must hold one JSON object, {{"name": ..., "main": ...}}; it holds {_json_kind(data)}')
        names = {f.name: f for f in fields(cls)}
        unknown = set(data) - set(names)
        if unknown:
            raise ValueError(f"unknown bench config keys {sorted(unknown)} in {path}; allowed: {sorted(names)}")
        for name, f in names.items():  # a dataclass would say "__init__() missing 1 required positional argument"
            if name not in data and f.default is MISSING and f.default_factory is MISSING:
                raise ValueError(f"{name} is missing in {path}: add \"{name}\", the {f.metadata['help']}")
        return cls(**data, source=path)


def _json_kind(value) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "true/false", type(None): "null"}.get(type(value), "a number")


# ---- config checks: one helper per kind of check; each failure names the file, the key path, the value and the rule

BENCH_METHODS = tuple(m for m in METHODS if "+" not in m)
FAMILIES = ("llava_onevision", "qwen2_5_vl")
DTYPES = ("float32", "float16", "bfloat16")
DEVICES = "cpu, cuda, cuda:N or auto"
DEVICE_PATTERN = r"cpu|auto|cuda(:\d+)?"
RUN_KEYS = ("method", "guide", "retentions", "guide_pool", "guide_stride", "layers", "layer", "allocation")
TEXT_REQUIRED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
# the whole-number sizes of a geometry; transformers takes any value for them and fails only once the model is built
SIZES = frozenset({"hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size",
                   "max_position_embeddings", "image_size", "patch_size", "num_channels", "depth", "num_heads", "in_channels",
                   "spatial_merge_size", "temporal_patch_size", "window_size", "out_hidden_size", "tokens_per_second"})
KINDS = (((bool,), "true or false"), ((int, float), "a number"), ((str,), "a string"), ((list,), "a list"), ((dict,), "an object"))


def _is_whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class _Check:
    def __init__(self, source: str):
        self.source = source

    def error(self, path, value, problem) -> ValueError:
        return ValueError(f"{path} {value!r} in {self.source}: {problem}")

    def fail(self, path, value, rule):
        name = re.search(r"[^.\[\]]+(\[[^\]]*\])*$", path)[0]  # the last key of the path, with its index
        raise self.error(path, value, f"{name} must be {rule}")

    def missing(self, path, fix):
        raise ValueError(f"{path} is missing in {self.source}: {fix}")

    def kind(self, value, path, types, rule):
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):  # JSON true is no number
            self.fail(path, value, rule)
        return value

    def whole(self, value, path, least=1, most=None, why=""):
        if not _is_whole(value) or value < least or (most is not None and value > most):
            self.fail(path, value, f"a whole number {f'>= {least}' if most is None else f'in {least}..{most}'}{why}")
        return value

    def number(self, value, path, rule, high=math.inf):
        """A number in (0, high]."""
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value <= high:
            self.fail(path, value, rule)
        return value

    def choice(self, value, path, choices):
        if not isinstance(value, str) or value not in choices:
            self.fail(path, value, f"one of {', '.join(choices)}")
        return value

    def mapping(self, value, path, allowed):
        self.kind(value, path, (dict,), "an object {...}")
        unknown = sorted(set(value) - set(allowed), key=str)
        if unknown:
            raise ValueError(f"unknown keys {unknown} in {path} of {self.source}; allowed: {', '.join(sorted(allowed))}")
        return value

    def items(self, value, path, rule):
        if not isinstance(value, list) or not value:
            self.fail(path, value, f"a non-empty list of {rule}")
        return value


def _check_config(config: BenchConfig, check: _Check) -> None:
    """Every key, before any model is built: the settings, then the model specs, then the runs (which read the specs' depths)."""
    check.kind(config.name, "name", (str,), "a string (it names the result folder)")
    if not config.name.strip() or any(c in config.name for c in "/\\"):
        check.fail("name", config.name, "a non-empty name without / or \\ (it names the result folder)")
    # decode_tokens >= 1: the decode throughput is these tokens over their time, and 0 tokens would report 0 tokens/s
    for key, least in (("frames", 1), ("repeats", 1), ("warmup", 0), ("decode_tokens", 1), ("seed", 0)):
        check.whole(getattr(config, key), key, least)
    check.choice(config.dtype, "dtype", DTYPES)
    if not isinstance(config.device, str) or not re.fullmatch(DEVICE_PATTERN, config.device):
        check.fail("device", config.device, f"one of {DEVICES}")
    if config.sweep_frames is not None and not (isinstance(config.sweep_frames, list) and config.sweep_frames
                                                and all(_is_whole(n) and n >= 1 for n in config.sweep_frames)):
        check.fail("sweep_frames", config.sweep_frames, "a list of whole numbers >= 1 (the frame counts to measure)")
    check.number(config.point_seconds, "point_seconds", "a positive number of seconds")
    if config.batch_sizes is not None:
        for i, size in enumerate(check.items(config.batch_sizes, "batch_sizes", "whole numbers >= 1 (questions per generate call)")):
            check.whole(size, f"batch_sizes[{i}]")
        if any("scale_to" in (spec or {}) for spec in (config.main, config.guide) if isinstance(spec, dict)):
            raise check.error("batch_sizes", config.batch_sizes, "depth scaling (scale_to) scales stage timings; throughput is measured "
                                                                 "at the built depth: drop scale_to or batch_sizes")
        for key in ("sweep_frames", "goal"):
            if getattr(config, key) is not None:
                raise check.error(key, getattr(config, key), f"batch_sizes measures throughput at one length, not stage timings: "
                                                              f"drop {key} or batch_sizes")
    shares = config.questions_per_video if isinstance(config.questions_per_video, list) else [config.questions_per_video]
    for i, q in enumerate(shares):
        check.whole(q, "questions_per_video" if shares is not config.questions_per_video else f"questions_per_video[{i}]")
    if max(shares) > 1 and config.batch_sizes is None:
        raise check.error("questions_per_video", config.questions_per_video, "it is a throughput setting: add batch_sizes")
    if config.goal is not None:
        if config.sweep_frames is not None:
            raise check.error("goal", config.goal, "a goal is read at one length, and a sweep measures several: drop goal or sweep_frames")
        for retention, target in check.kind(config.goal, "goal", (dict,), 'an object of retention: LLM-side speedup, e.g. {"0.25": 4.6}').items():
            try:
                share = float(retention)
            except (TypeError, ValueError):
                share = math.nan
            if not 0 < share <= 1:
                raise check.error(f"goal[{retention!r}]", retention, 'the keys of goal must be retentions in (0, 1], e.g. "0.25"')
            check.number(target, f"goal[{retention!r}]", "a positive LLM-side speedup, e.g. 4.6")
    main = _check_spec(check, config.main, "main")
    guide = None if config.guide is None else _check_spec(check, config.guide, "guide", main, config.main)
    _check_runs(check, config.runs, main, guide)


def _check_spec(check: _Check, spec, at: str, main: dict | None = None, main_spec: dict | None = None) -> dict:
    """One model spec as build_model reads it. Returns its family, LLM depth and vision tower (None where only loading tells)."""
    from ..testbed.toy import GEOMETRIES, toy_config

    shared = {"toy", "path", "text", "vision", "scale_to"}
    check.mapping(spec, at, shared | ({"family", "frame_size"} if main is None else {"share_vision"}))
    shapes = [key for key in ("toy", "path", "text") if key in spec]
    if len(shapes) != 1:
        raise check.error(at, spec, 'a model spec names one model: {"toy": "test"}, {"path": folder} or {"vision": {...}, "text": {...}}')
    if shapes != ["text"] and {"vision", "family", "scale_to"} & set(spec):
        raise check.error(at, spec, "vision, family and scale_to describe a geometry: they go with text, not with toy or path")
    # a guide is built in main's family (build_model), so it names none of its own
    family = main["family"] if main else check.choice(spec.get("family", "llava_onevision"), f"{at}.family", FAMILIES)
    if "frame_size" in spec:
        check.whole(spec["frame_size"], f"{at}.frame_size", why=" (pixels)")
    if "share_vision" in spec:
        check.kind(spec["share_vision"], f"{at}.share_vision", (bool,), "true or false")
    if "toy" in spec:
        name = check.choice(spec["toy"], f"{at}.toy", tuple(GEOMETRIES))
        if family != "llava_onevision":
            raise check.error(f"{at}.toy", name, f"a toy is a LLaVA-OV model and main is a {family} geometry: give the guide a text geometry")
        info = {"family": family, "depth": GEOMETRIES[name][3], "tower": toy_config(name).vision_config.to_dict()}
    elif "path" in spec:
        if not isinstance(spec["path"], str) or not spec["path"]:
            check.fail(f"{at}.path", spec["path"], "a checkpoint folder's path")
        info = {"family": family, "depth": None, "tower": None}
    else:
        info = _check_geometry(check, spec, at, family, (main_spec or {}).get("vision") if main else None)
    if main and spec.get("share_vision") and main["tower"] and info["tower"]:
        differ = [f"{k} {main['tower'][k]} vs {info['tower'][k]}" for k in sorted(SIZES - {"out_hidden_size"})
                  if k in main["tower"] and k in info["tower"] and main["tower"][k] != info["tower"][k]]
        if differ:
            raise check.error(f"{at}.share_vision", True, f"share_vision copies main's vision tower into the guide, but the towers differ "
                                                          f"(main vs guide: {', '.join(differ)}); drop share_vision or give the guide main's tower")
    return info


def _check_sizes(check: _Check, value, path: str, base: dict, required=()) -> dict:
    """A text or vision geometry over the config build_model lays it on; returns the two merged."""
    check.mapping(value, path, base)
    for key in required:
        if key not in value:
            check.missing(f"{path}.{key}", f"add {key}, a whole number >= 1")
    for key, given in value.items():
        if key in SIZES:
            check.whole(given, f"{path}.{key}")
        else:  # the kind of transformers' default; a key it leaves None (or an odd kind) is passed on as given
            for types, rule in KINDS:
                if isinstance(base[key], types):
                    check.kind(given, f"{path}.{key}", types, f"{rule}, as in transformers' config")
                    break
    return {**base, **value}


def _check_geometry(check: _Check, spec: dict, at: str, family: str, vision_from: dict | None) -> dict:
    """A {"vision", "text"} geometry: the sizes whose mismatch the model constructors or the first forward would
    report as a tensor-shape error."""
    from transformers import Qwen2Config, SiglipVisionConfig

    from ..testbed.toy import QWEN_SPECIALS, SPECIALS, WORDS, qwen_toy_config

    qwen = family == "qwen2_5_vl"
    toy = qwen_toy_config("test") if qwen else None
    text = _check_sizes(check, spec["text"], f"{at}.text", (toy.text_config if qwen else Qwen2Config()).to_dict(), TEXT_REQUIRED)
    heads, hidden, kv = text["num_attention_heads"], text["hidden_size"], text["num_key_value_heads"]
    if hidden % heads:
        check.fail(f"{at}.text.num_attention_heads", heads, f"a divisor of hidden_size {hidden} (each head gets hidden_size / heads dimensions)")
    if hidden // heads % 2:
        check.fail(f"{at}.text.num_attention_heads", heads, f"such that hidden_size / heads is even (rotary embeddings turn pairs of "
                                                            f"dimensions), not {hidden} / {heads} = {hidden // heads}")
    if heads % kv:
        if "num_key_value_heads" not in spec["text"]:
            check.missing(f"{at}.text.num_key_value_heads", f"its default {kv} does not divide num_attention_heads {heads}: add it, a divisor of {heads}")
        check.fail(f"{at}.text.num_key_value_heads", kv, f"a divisor of num_attention_heads {heads} (query heads share key/value heads in equal groups)")
    words = len(SPECIALS) + len(WORDS) + (len(QWEN_SPECIALS) if qwen else 0)
    if text["vocab_size"] < words:
        check.fail(f"{at}.text.vocab_size", text["vocab_size"], f"a whole number >= {words} (the bench prompts with the toy tokenizer's {words} words)")
    vision_base = (toy.vision_config if qwen else SiglipVisionConfig()).to_dict()
    if "vision" not in spec:  # build_model gives a guide main's vision geometry, else the defaults
        _check_scale_to(check, spec, at, qwen, {**vision_base, **(vision_from or {})})
        return {"family": family, "depth": text["num_hidden_layers"], "tower": {**vision_base, **(vision_from or {})}}
    vision = _check_sizes(check, spec["vision"], f"{at}.vision", vision_base)
    _check_scale_to(check, spec, at, qwen, vision)
    heads_key = "num_heads" if qwen else "num_attention_heads"
    if vision["hidden_size"] % vision[heads_key]:
        check.fail(f"{at}.vision.{heads_key}", vision[heads_key], f"a divisor of hidden_size {vision['hidden_size']}")
    if qwen:
        if vision["hidden_size"] // vision[heads_key] % 4:
            check.fail(f"{at}.vision.{heads_key}", vision[heads_key], "such that hidden_size / num_heads is a multiple of 4 (the vision "
                       f"rotary embedding splits each head in quarters), not {vision['hidden_size']} / {vision[heads_key]}")
        blocks = check.items(vision["fullatt_block_indexes"], f"{at}.vision.fullatt_block_indexes", "block indexes (VisionZip ranks by them)")
        for i, block in enumerate(blocks):
            check.whole(block, f"{at}.vision.fullatt_block_indexes[{i}]", 0, vision["depth"] - 1, f" (a block of the depth-{vision['depth']} tower)")
    elif vision["patch_size"] > vision["image_size"]:
        check.fail(f"{at}.vision.patch_size", vision["patch_size"], f"at most image_size {vision['image_size']}")
    return {"family": family, "depth": text["num_hidden_layers"], "tower": vision}


def _check_scale_to(check: _Check, spec: dict, at: str, qwen: bool, vision: dict) -> None:
    """Depth scaling (harness.depth): the released values of the depth keys, each stack run with at least one layer."""
    if "scale_to" not in spec:
        return
    path = f"{at}.scale_to"
    vision_keys = ("depth", "fullatt_block_indexes") if qwen else ("num_hidden_layers",)
    check.mapping(spec["scale_to"], path, ("text", "vision"))
    if "text" in spec["scale_to"]:
        check.mapping(spec["scale_to"]["text"], f"{path}.text", ("num_hidden_layers",))
        for key, value in spec["scale_to"]["text"].items():
            check.whole(value, f"{path}.text.{key}", why=" (the released model's LLM depth)")
    if "vision" in spec["scale_to"]:
        target = check.mapping(spec["scale_to"]["vision"], f"{path}.vision", vision_keys)
        depth_key = vision_keys[0]
        depth = check.whole(target.get(depth_key, vision[depth_key]), f"{path}.vision.{depth_key}", why=" (the released tower's depth)")
        if qwen:
            blocks = check.items(target.get("fullatt_block_indexes", vision["fullatt_block_indexes"]), f"{path}.vision.fullatt_block_indexes",
                                 "block indexes")
            for i, block in enumerate(blocks):
                check.whole(block, f"{path}.vision.fullatt_block_indexes[{i}]", 0, depth - 1, f" (a block of the depth-{depth} tower)")
            if not set(vision["fullatt_block_indexes"]) or len(set(vision["fullatt_block_indexes"])) == vision["depth"]:
                raise check.error(f"{at}.vision.fullatt_block_indexes", vision["fullatt_block_indexes"],
                                  "depth scaling times windowed and full-attention blocks apart: the run needs at least one of each")


def _check_runs(check: _Check, runs, main: dict, guide: dict | None) -> None:
    from ..compressors.options import check_options

    for i, run in enumerate(check.items(runs, "runs", 'runs, e.g. {"method": "visionzip", "guide": "none", "retentions": [0.25]}')):
        at = f"runs[{i}]"
        check.mapping(run, at, RUN_KEYS)
        if "method" not in run:
            check.missing(f"{at}.method", f"add one of {', '.join(BENCH_METHODS)}")
        if isinstance(run["method"], str) and "+" in run["method"]:
            raise check.error(f"{at}.method", run["method"], "vidtok bench has no vision retention key for a composed method: "
                                                             "time the encoder and fastv rows apart, or use vidtok eval")
        method = check.choice(run["method"], f"{at}.method", BENCH_METHODS)
        guide_name = check.choice(run.get("guide", "none"), f"{at}.guide", GUIDES)
        # the one table of which option applies to which method (run, eval and lmms-eval read it too): a key expand_runs
        # would ignore is refused, so a row never measures something other than what the file says
        spell = lambda option: f"{at}.{'retentions' if option.name == 'retention' else option.name}"  # noqa: E731
        try:
            check_options({"retention" if key == "retentions" else key for key in run} - {"method", "guide"}, [(method, guide_name)], spell)
        except ValueError as error:
            raise ValueError(f"{at} in {check.source}: {error}") from None
        retentions = check.items(run.get("retentions", [1.0 if method == "full" else 0.25]), f"{at}.retentions", "numbers in (0, 1]")
        for j, retention in enumerate(retentions):
            check.number(retention, f"{at}.retentions[{j}]", "a number in (0, 1] (the share of visual tokens kept)", high=1)
        if method == "full" and retentions != [1.0]:  # expand_runs measures full at 1 whatever the file says
            check.fail(f"{at}.retentions", retentions, "[1.0] or absent: full keeps every token")
        pool = check.whole(run.get("guide_pool", 1), f"{at}.guide_pool", why=" (the guide sees each frame pooled k x k)")
        stride = check.whole(run.get("guide_stride", 1), f"{at}.guide_stride", why=" (the guide sees every k-th frame)")
        if guide_name == "assistant" and guide is None:
            raise check.error(f"{at}.guide", guide_name, 'the assistant is the config\'s "guide" model: add a "guide" spec, or use guide self')
        depth = main["depth"]
        layer = run.get("layer", 2)
        if "fastv" in method:
            check.whole(layer, f"{at}.layer", 1, None if depth is None else depth - 1, " (FastV's layer: the first that runs on the kept tokens only)")
        if run.get("layers") is not None:
            # inline layers are read below FastV's layer; a guide's, within its own LLM (unknown until a checkpoint loads)
            span = layer if guide_name == "inline" else (guide if guide_name == "assistant" else main)["depth"] or 10**9
            try:
                parse_layers(run["layers"], span)
            except ValueError as error:
                raise check.error(f"{at}.layers", run["layers"], str(error)) from None
        # what build_method refuses (a guide for full, keyframe without one, inline without FastV), before any model exists;
        # an assistant run is asked as "self": the rules are the same, and no assistant is loaded yet
        try:
            for retention in retentions:
                build_method(method, retention, "self" if guide_name == "assistant" else guide_name, guide_pool=pool, layer=layer,
                             guide_stride=stride, allocation=run.get("allocation"))
        except ValueError as error:
            raise ValueError(f"{at} in {check.source}: {error}") from None


def resolve_device(name, what: str = "device") -> torch.device:
    """The torch device `name` means on this machine; one it lacks is the user's to fix, before any model is built."""
    if not isinstance(name, str) or not re.fullmatch(DEVICE_PATTERN, name):
        raise ValueError(f"{what} {name!r}: expected one of {DEVICES}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if int(name.partition(":")[2] or 0) >= count:
            have = (f"this torch ({torch.__version__}) is built without CUDA" if not torch.backends.cuda.is_built() else
                    "torch sees no CUDA device" if not count else f"this machine has {count} CUDA device(s), cuda:0..cuda:{count - 1}")
            raise ValueError(f"{what} {name!r}: {have}; use cpu or auto")
    return torch.device(name)


def _check_checkpoints(config: BenchConfig) -> None:
    """A {"path": DIR} spec needs a saved checkpoint there: transformers would take a missing folder for a hub repo id."""
    for at, spec in (("main", config.main), ("guide", config.guide or {})):
        folder = Path(spec["path"]) if "path" in spec else None
        if folder is not None and not (folder / "config.json").is_file():
            problem = "the folder has no config.json" if folder.is_dir() else "no such folder"
            raise _Check(config._source).error(f"{at}.path", spec["path"], f"cannot load the checkpoint: {problem}; give a saved checkpoint "
                                               "folder (config.json, *.safetensors, tokenizer files). vidtok never downloads: fetch one "
                                               "first, e.g. `hf download llava-hf/llava-onevision-qwen2-0.5b-ov-hf --local-dir DIR`")


def build_model(spec: dict, seed: int, dtype, device, vision_from=None):
    from transformers import AutoModelForImageTextToText, LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    from ..testbed.toy import SPECIALS, build_toy_model

    if "path" in spec:
        try:
            return AutoModelForImageTextToText.from_pretrained(spec["path"], dtype=dtype).to(device).eval()
        except OSError as error:  # no folder, missing or unreadable files: the config names a bad checkpoint
            raise ValueError(f"cannot load the checkpoint {spec['path']!r} named in the bench config: {str(error).strip().splitlines()[0]}") from error
    if "toy" in spec:
        model = build_toy_model(spec["toy"], seed=seed)
    elif spec.get("family") == "qwen2_5_vl":
        from transformers import Qwen2_5_VLForConditionalGeneration

        from ..testbed.toy import qwen_toy_config

        config = qwen_toy_config("test")  # the toy vocabulary's marker ids; the geometry comes from the spec
        text = spec["text"]
        half = text["hidden_size"] // text["num_attention_heads"] // 2
        sections = [half // 4, (half - half // 4) // 2, half - half // 4 - (half - half // 4) // 2]  # 2:3:3 as Qwen2.5-VL's [16, 24, 24]
        config.vision_config = type(config.vision_config)(**{**config.vision_config.to_dict(), **(spec.get("vision") or vision_from or {}),
                                                             "out_hidden_size": text["hidden_size"]})
        base = {k: v for k, v in config.text_config.to_dict().items() if k != "layer_types"}  # derived again from the depth
        config.text_config = type(config.text_config)(**{**base, **text, "rope_parameters": {
            "rope_type": "default", "rope_theta": 1000000.0, "mrope_section": sections}})
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = Qwen2_5_VLForConditionalGeneration(config)
    else:
        vision = {"model_type": "siglip_vision_model", "vision_use_head": False, **(spec.get("vision") or (vision_from or {}))}
        text = {"model_type": "qwen2", "tie_word_embeddings": True, **spec["text"]}
        config = LlavaOnevisionConfig(
            vision_config=vision,
            text_config=text,
            video_token_index=SPECIALS.index("<video>"),
            image_token_index=SPECIALS.index("<image>"),
            vision_feature_layer=-1,
            vision_feature_select_strategy="full",
            tie_word_embeddings=True,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = LlavaOnevisionForConditionalGeneration(config)
    return model.to(device=device, dtype=dtype).eval()


class PeakMemory:
    """Peak process RSS on CPU; peak allocated memory on CUDA.

    On Linux the kernel keeps the high-water mark itself (VmHWM), and writing 5 to
    /proc/self/clear_refs resets it: exact, with no sampling to miss a short spike. Elsewhere a
    thread samples the RSS every 10 ms.
    """

    def __init__(self, device):
        self.device, self.peak, self._stop, self._thread = device, 0, threading.Event(), None

    @staticmethod
    def rss() -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    @staticmethod
    def _high_water_mark() -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            self._stop.wait(0.01)

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            self.peak = self.rss()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
        elif self._thread is None:
            self.peak = self._high_water_mark()
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self.rss())


def expand_runs(config: BenchConfig) -> list[dict]:
    rows = []
    for run in config.runs:
        method = run["method"]
        retentions = [1.0] if method == "full" else run.get("retentions", [0.25])
        for r in retentions:
            rows.append(
                {
                    "method": method,
                    "guide": run.get("guide", "none") if method != "full" else "none",
                    "retention": r,
                    "guide_pool": run.get("guide_pool", 1),
                    "guide_stride": run.get("guide_stride", 1),
                    "layers": run.get("layers"),
                    "layer": run.get("layer", 2),  # FastV's layer (unused by the other methods)
                    **({"allocation": run["allocation"]} if run.get("allocation") is not None else {}),
                }
            )
    if not any(r["method"] == "full" for r in rows):
        rows.insert(0, {"method": "full", "guide": "none", "retention": 1.0, "guide_pool": 1, "guide_stride": 1, "layers": None,
                        "layer": 2})
    return rows


def _method(row, assistant):
    """The method of a bench row (FastV rows: `layer`, default 2)."""
    from ..compressors import build_method

    retention = None if row["method"] == "full" else row["retention"]
    return build_method(row["method"], retention, row["guide"], assistant, row["layers"], guide_pool=row["guide_pool"], layer=row.get("layer", 2),
                        guide_stride=row["guide_stride"], allocation=row.get("allocation"))


@torch.no_grad()
def measure(model, tokenizer, video, question, method, frames, decode_tokens, scaling=None, row=None) -> dict:
    """One timed call: every stage once. With `scaling` (harness.depth), every layer call is timed
    too and the stages are also given at the released depth."""
    from .depth import DepthScaling

    clocks = scaling.clocks() if scaling is not None else None
    with DepthScaling.watch(clocks, "vision", "guide_vision", "self_guide", "guide"):
        prepared = prepare(model, tokenizer, video, question, method, frames=frames)
    seconds = prepared.plan.seconds
    timer = _Timer(seconds, device_sync(next(model.parameters()).device))
    with prepared.apply():  # FastV drops tokens inside the prefill (its choice is timed as part of it)
        with timer("prefill"), DepthScaling.watch(clocks, "prefill"):
            out = model(**prepared.inputs, use_cache=True, logits_to_keep=1)
        name = cache_keyword(model)
        past, mask = getattr(out, name), prepared.inputs["attention_mask"]
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        position = prepared.inputs.get("position_ids")
        with timer("decode_tokens"), DepthScaling.watch(clocks, "decode_tokens"):
            for _ in range(decode_tokens):
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                step = {}
                if position is not None:  # 3-D positions: the next token follows the last one on every axis
                    position = position[..., -1:] + 1
                    step["position_ids"] = position
                out = model(input_ids=token, attention_mask=mask, use_cache=True, **{name: past}, **step)
                past, token = getattr(out, name), out.logits[:, -1].argmax(-1, keepdim=True)
    out = {"seconds": dict(seconds), "plan": prepared.plan, "prompt_tokens": int(prepared.inputs["input_ids"].shape[1])}
    if scaling is not None:  # the scaled stages are the row's figures; what was run stays beside them
        out["seconds"], out["depth_scaling"] = scaling.apply(clocks, seconds, prepared.plan, row)
        out["measured_seconds"] = dict(seconds)
    return out


FLOPS_FAMILIES = ("llava_onevision", "qwen2_5_vl")  # whose vision towers and LLMs vidtok.flops models


def prefill_flops(model, guide_model, row, plan, prompt_tokens, shared_vision, grid=None, scale=None) -> dict | None:
    """Analytic FLOPs of the stages, or None for a family vidtok.flops does not model (Qwen3-VL's
    DeepStack mergers, Qwen3.5's linear-attention layers, MoE experts): timings only. `scale`
    (depth scaling) gives the released configs and the guide's deepest layer there."""
    config = scale["config"] if scale else model.config
    if config.model_type not in FLOPS_FAMILIES:
        return None
    in_prompt = sum(plan.vision_budgets) if plan.vision_budgets is not None else plan.visual_tokens_kept  # visual tokens the LLM receives
    trailing = adapter_trailing(model)
    text_tokens = prompt_tokens - in_prompt - trailing
    llm = flops.llm_prefill_flops(config, prompt_tokens)
    if plan.vision_budgets is not None:  # FastV: layers from K on run on the kept tokens only
        t = config.text_config
        llm = flops.fastv_prefill_flops(t, prompt_tokens, prompt_tokens - in_prompt + plan.visual_tokens_kept, plan.layer) + 2 * t.hidden_size * t.vocab_size
    qwen = config.model_type == "qwen2_5_vl"
    zipping = row["method"].startswith("visionzip") and in_prompt < plan.visual_tokens_in
    out = {
        "vision": flops.qwen_vision_flops(config, grid) if qwen else flops.vision_flops(config, plan.frames),
        "llm": llm,
        "guide": 0,
        "compress": 0 if not zipping else flops.qwen_visionzip_signal_flops(config, grid) if qwen else flops.visionzip_signal_flops(config, plan.frames),
    }
    if plan.guide_layers is not None and plan.guide != "inline":  # the inline prior is read inside the prefill: no pass of its own
        gconfig = (scale["guide_config"] if guide_model is not None else scale["config"]) if scale else (guide_model or model).config
        deepest = scale["guide_deepest"] if scale else max(plan.guide_layers)
        seen = -(-plan.frames // row["guide_stride"])  # the frames a strided guide sees
        guide_tokens = seen * plan.tokens_per_frame // row["guide_pool"] ** 2
        out["guide"] = flops.guide_flops(gconfig, text_tokens + guide_tokens + trailing, deepest)
        if guide_model is not None and qwen:
            v = gconfig.vision_config
            merger = 2 * (plan.frames * plan.tokens_per_frame) * (v.hidden_size * 4) * (v.hidden_size * 4 + v.out_hidden_size)
            out["guide"] += merger if shared_vision else flops.qwen_vision_flops(gconfig, grid)
        elif guide_model is not None:
            patches = (gconfig.vision_config.image_size // gconfig.vision_config.patch_size) ** 2
            out["guide"] += (
                plan.frames * flops.projector_flops(gconfig, patches) if shared_vision else flops.vision_flops(gconfig, plan.frames)
            )
    out["total"] = sum(out.values())
    return out


def adapter_trailing(model) -> int:
    from ..models import adapter_for

    return adapter_for(model).trailing_tokens


def _machine(device) -> dict:
    import transformers

    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def bench_video(path: Path, frames: int, size: int) -> Path:
    """A synthetic clip (the needle task's frames, upscaled) of `frames` frames at `size` px."""
    import numpy as np

    from ..testbed.synth import make_sample
    from ..video import write_video

    sample = make_sample(np.random.default_rng(0), frames=frames, needles=min(2, frames))
    scale = -(-size // sample.frames.shape[1])
    big = sample.frames.repeat(scale, axis=1).repeat(scale, axis=2)[:, :size, :size]
    write_video(path, big)
    return path


def run_bench(config: BenchConfig, out_dir, log=print) -> dict:
    from ..models import adapter_for
    from ..testbed.toy import build_tokenizer

    device = resolve_device(config.device, f"device in {config._source}")
    _check_checkpoints(config)
    dtype = getattr(torch, config.dtype)
    model = build_model(config.main, config.seed, dtype, device)
    if "path" in config.main:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(config.main["path"])
    else:
        tokenizer = build_tokenizer(model.config.model_type)
    guide_model, shared = None, False
    if config.guide is not None:
        guide_spec = {"family": config.main.get("family"), **config.guide} if config.main.get("family") else config.guide
        guide_model = build_model(guide_spec, config.seed + 1, dtype, device, vision_from=config.main.get("vision"))
        if config.guide.get("share_vision"):
            if model.config.model_type not in FLOPS_FAMILIES:
                raise ValueError(f"share_vision in a bench config copies a LLaVA-OV or Qwen2.5-VL vision tower; {model.config.model_type} "
                                 "assistants run their own tower: drop share_vision")
            if model.config.model_type == "qwen2_5_vl":  # the blocks are shared; each model keeps its own merger
                blocks = {k: v for k, v in model.model.visual.state_dict().items() if not k.startswith("merger.")}
                guide_model.model.visual.load_state_dict(blocks, strict=False)
            else:
                guide_model.model.vision_tower.load_state_dict(model.model.vision_tower.state_dict())
        shared = adapter_for(model).same_vision_tower(adapter_for(guide_model))
    rows = expand_runs(config)
    setup = {"model": model, "tokenizer": tokenizer, "guide_model": guide_model, "shared": shared, "device": device}
    scaled = [spec.get("scale_to") for spec in (config.main, config.guide or {})]
    if any(scaled):
        from .depth import DepthScaling

        guide_targets = dict(scaled[1] or {})
        if config.guide is not None and config.guide.get("share_vision") and (scaled[0] or {}).get("vision"):
            guide_targets["vision"] = scaled[0]["vision"]  # one tower: the released one
        setup["scaling"] = DepthScaling(model, guide_model, scaled[0], guide_targets, device_sync(device))
    report = {
        "config": asdict(config),
        "machine": _machine(device),
        "shared_vision_tower": shared,
        "geometry": {"main": model.config.to_dict(), "guide": guide_model.config.to_dict() if guide_model else None},
    }
    if "scaling" in setup:
        report["depth_scaling"] = {
            "main": scaled[0], "guide": scaled[1],
            "method": "the layers of each stack are built at the released width and a few of them run; every layer call is timed "
                      "(forward hooks) and a stage's seconds are its measured seconds minus its layers' sum plus the mean time per "
                      "layer times the released count (FastV: layers below and from K apart; Qwen2.5-VL's windowed and full-attention "
                      "blocks apart; a guide pass: the layers below its deepest guide layer). Seconds, ratios and FLOPs are at the "
                      "released depth; peak memory is the run's (fewer layers' weights); measured_seconds per repeat are the run's.",
        }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if config.sweep_frames:
        report.update(_sweep(config, setup, rows, out, log, report))
        report["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        (out / "bench.json").write_text(json.dumps(report, indent=1, default=str))
        return report
    if config.batch_sizes:
        from .throughput import plot_throughput, run_throughput

        adapter = adapter_for(model)
        with tempfile.TemporaryDirectory() as tmp:
            size = getattr(adapter, "image_size", None) or config.main.get("frame_size", 448)
            pixels = adapter.pixels(bench_video(Path(tmp) / "bench.mp4", config.frames, size), config.frames)
        report.update(run_throughput(config, setup, rows, pixels, log))
        report["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        (out / "bench.json").write_text(json.dumps(report, indent=1, default=str))
        plot_throughput(report["throughput"], out / "bench.png", f"{config.name}: {config.frames} frames, {report['machine']['device']}")
        return report
    results, plan = _bench_point(config, setup, rows, config.frames, log)
    report["rows"] = results
    if config.goal:
        report["goal"] = goal_report(results, config.goal)
    report["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    (out / "bench.json").write_text(json.dumps(report, indent=1, default=str))
    scaled = ", LLM and vision depths scaled to the released ones (a few layers timed)" if "depth_scaling" in report else ""
    plot_bench(results, out / "bench.png", f"{config.name}: {config.frames} frames x {plan.tokens_per_frame} tokens, {report['machine']['device']}"
               f"{scaled}", goal=config.goal)
    return report


def _bench_point(config: BenchConfig, setup: dict, rows: list[dict], frames: int, log) -> tuple[list[dict], object]:
    """Every row at one frame count, side by side (round-robin repeats); ratios to full of this point."""
    from ..models import adapter_for

    model, tokenizer, guide_model, shared, device = (setup[k] for k in ("model", "tokenizer", "guide_model", "shared", "device"))
    adapter = adapter_for(model)
    question = "what shape is red ?"
    with tempfile.TemporaryDirectory() as tmp:
        size = getattr(adapter, "image_size", None) or config.main.get("frame_size", 448)
        video = bench_video(Path(tmp) / "bench.mp4", frames, size)
        grid = adapter._grid(adapter.pixels(video, frames)) if hasattr(adapter, "_grid") else None
        methods = [_method(row, guide_model) for row in rows]
        scaling = setup.get("scaling")
        for row, method in zip(rows, methods):
            for _ in range(config.warmup):
                measure(model, tokenizer, video, question, method, frames, config.decode_tokens, scaling, row)
        # Round-robin over configurations, so a slow spell of a shared machine hits all of them alike.
        repeats = [[] for _ in rows]
        last = [None] * len(rows)
        for repeat in range(config.repeats):
            for i, method in enumerate(methods):
                with PeakMemory(device) as memory:
                    last[i] = measure(model, tokenizer, video, question, method, frames, config.decode_tokens, scaling, rows[i])
                repeats[i].append({"seconds": last[i]["seconds"], "peak_memory_bytes": memory.peak,
                                   **{k: last[i][k] for k in ("measured_seconds", "depth_scaling") if k in last[i]}})
            log(f"{frames} frames: repeat {repeat + 1}/{config.repeats} done")
        results = []
        for row, method, runs, m in zip(rows, methods, repeats, last):
            plan, prompt_tokens = m["plan"], m["prompt_tokens"]
            median = {s: statistics.median(r["seconds"].get(s, 0.0) for r in runs) for s in (*STAGES, "decode_tokens")}
            ttft = statistics.median(sum(r["seconds"].get(s, 0.0) for s in STAGES if s != "decode") for r in runs)
            sides = [sum(r["seconds"].get(s, 0.0) for s in ("guide_vision", "guide", "compress", "prefill")) for r in runs]
            peak = statistics.median(r["peak_memory_bytes"] for r in runs) / 2**20
            results.append(
                {
                    **row,
                    "frames": frames,
                    "description": str(method),
                    # a guided row with every guide setting at vidtok's default (layers: calibrated, else the last third)
                    "default_guide": row["guide"] != "none" and row["layers"] is None and row["guide_pool"] == 1
                    and row["guide_stride"] == 1,
                    "guide_layers": plan.guide_layers if scaling is None else scaling.guide_layers(row, plan),
                    **({} if scaling is None else {"run_guide_layers": plan.guide_layers}),
                    "fastv_layer": plan.layer,
                    "flops_retention": plan.flops_retention,
                    "visual_tokens_kept": plan.visual_tokens_kept,
                    "visual_tokens_in": plan.visual_tokens_in,
                    "prompt_tokens": prompt_tokens,
                    "stage_seconds": median,
                    "ttft_seconds": ttft,
                    "llm_side_seconds": statistics.median(sides),
                    "llm_side_seconds_range": [min(sides), max(sides)],  # the repeats' spread: this VM's noise
                    "decode_tokens_per_s": config.decode_tokens / median["decode_tokens"] if median["decode_tokens"] else None,
                    "guide_share": (median["guide_vision"] + median["guide"]) / ttft if ttft else 0.0,
                    "prefill_flops": prefill_flops(model, guide_model if row["guide"] == "assistant" else None, row, plan, prompt_tokens, shared, grid,
                                                   scale=None if scaling is None else scaling.flops_scale(row, plan)),
                    "peak_rss_mb": peak if device.type == "cpu" else None,
                    "peak_cuda_mb": peak if device.type == "cuda" else None,
                    "repeats": runs,
                }
            )
    full = next(r for r in results if r["method"] == "full")
    for r in results:
        r["ttft_speedup"] = full["ttft_seconds"] / r["ttft_seconds"]
        r["prefill_speedup"] = full["stage_seconds"]["prefill"] / r["stage_seconds"]["prefill"]
        r["llm_side_speedup"] = full["llm_side_seconds"] / r["llm_side_seconds"]
        r["flops_ratio"] = full["prefill_flops"]["total"] / r["prefill_flops"]["total"] if r["prefill_flops"] else None
    return results, last[0]["plan"]


def goal_report(rows: list[dict], goal: dict) -> dict:
    """Per retention: the goal, the best LLM-side speedup of a default-guide row, whether it is reached
    and by how much it falls short; the best row with any guide setting, and every guided row that
    reaches it; and why: the guide time the goal leaves beside the static row's compression +
    prefill of the same token count (full / goal - static), against what the default guide took."""
    full = next((row for row in rows if row["method"] == "full"), None)
    out = {}
    for retention, target in goal.items():
        r = float(retention)
        same = [row for row in rows if row["method"] != "full" and abs(row["retention"] - r) < 1e-9]
        guided = [row for row in same if row["guide"] != "none"]
        default = [row for row in guided if row["default_guide"]]
        best = max(default, key=lambda row: row["llm_side_speedup"], default=None)
        any_best = max(guided, key=lambda row: row["llm_side_speedup"], default=None)
        report = {
            "goal": target,
            "default_guide_speedup": best["llm_side_speedup"] if best else None,
            "reached": bool(best and best["llm_side_speedup"] >= target),
            "short_by": max(0.0, target - best["llm_side_speedup"]) if best else None,
            "best_row": None if any_best is None else {"description": any_best["description"], "layers": any_best["layers"],
                                                       "guide_pool": any_best["guide_pool"], "llm_side_speedup": any_best["llm_side_speedup"]},
            "rows_reaching": [row["description"] for row in guided if row["llm_side_speedup"] >= target],
        }
        static = [row for row in same if row["guide"] == "none" and (best is None or row["method"] == best["method"])]
        if full is not None and static and best is not None:
            # a guided row prefills exactly the static row's token count: what is left for the guide is the why
            left = full["llm_side_seconds"] / target - min(row["llm_side_seconds"] for row in static)
            took = best["stage_seconds"]["guide"] + best["stage_seconds"]["guide_vision"]
            report["guide_allowance_seconds"] = left
            report["default_guide_seconds"] = took
            report["why"] = (f"compression + prefill alone already miss the goal ({full['llm_side_seconds']:.2f} s / {target:g} = "
                             f"{full['llm_side_seconds'] / target:.2f} s)" if left <= 0 else
                             f"the goal leaves the guide {left:.2f} s ({100 * left / full['llm_side_seconds']:.1f}% of the full "
                             f"prefill) beside the static row's compression + prefill; the default guide took {took:.2f} s")
        out[retention] = report
    return out


def predict_seconds(measured: list[tuple[int, float]], frames: int) -> tuple[float, str]:
    """Time of a sweep point at `frames` from the (frames, seconds) measured so far, and how."""
    (n1, t1) = measured[-1]
    if len(measured) >= 2:
        (n0, t0) = measured[-2]
        if n1 > n0 and t1 > 0 and t0 > 0:
            import math

            exponent = max(1.0, math.log(t1 / t0) / math.log(n1 / n0))  # never below linear
            return t1 * (frames / n1) ** exponent, f"growing as length^{exponent:.2f}, as measured from {n0} to {n1} frames"
    return t1 * (frames / n1) ** 2, "scaled by the square of the length"


def _sweep(config: BenchConfig, setup: dict, rows: list[dict], out: Path, log, report: dict) -> dict:
    """The rows at each of `sweep_frames`, ascending. A length whose time, extrapolated from the
    points before it, would pass `point_seconds` is not started: the sweep stops there and says so.
    The extrapolation follows the growth measured between the last two points (a power law in the
    length); after the first point alone, the square of the length (attention's bound)."""
    lengths = sorted(config.sweep_frames)
    points, stopped = [], None
    for frames in lengths:
        if points:
            predicted, how = predict_seconds([(p["frames"], p["seconds"]) for p in points], frames)
            if predicted > config.point_seconds:
                last = points[-1]
                stopped = {"frames": frames, "predicted_seconds": predicted, "limit_seconds": config.point_seconds,
                           "reason": f"{frames} frames would take about {predicted:.0f} s (from {last['frames']} frames' "
                                     f"{last['seconds']:.0f} s, {how}), over the {config.point_seconds:.0f} s limit per point"}
                log(f"sweep stops before {frames} frames: {stopped['reason']}")
                break
        start = time.perf_counter()
        results, _ = _bench_point(config, setup, rows, frames, log)
        elapsed = time.perf_counter() - start
        points.append({"frames": frames, "seconds": elapsed, "rows": results})
        # each finished point is kept, marked incomplete until the sweep ends
        partial = {**report, "complete": False, "sweep": points, "stopped": stopped}
        (out / "bench.json").write_text(json.dumps(partial, indent=1, default=str))
    plot_sweep(points, out / "sweep.png", f"{config.name}: cost vs video length")
    return {"complete": True, "sweep": points, "stopped": stopped, "rows": [r for p in points for r in p["rows"]]}


def plot_sweep(points: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    keys = []
    for point in points:
        for r in point["rows"]:
            key = (r["method"], r["guide"], r["retention"])
            if key not in keys:
                keys.append(key)
    for i, key in enumerate(keys):
        rs = [(p["frames"], r) for p in points for r in p["rows"] if (r["method"], r["guide"], r["retention"]) == key]
        xs = [f for f, _ in rs]
        name = "full" if key[0] == "full" else f"{key[0]}" + ("" if key[1] == "none" else f" + DyToK ({key[1]})") + f" {100 * key[2]:g}%"
        colour = f"C{i}"
        left.plot(xs, [r["ttft_seconds"] for _, r in rs], "o-", color=colour, label=f"{name}: to first token")
        left.plot(xs, [r["llm_side_seconds"] for _, r in rs], "s--", color=colour, alpha=0.6, label=f"{name}: LLM side")
        if key[1] not in ("none", "inline"):
            left.plot(xs, [r["stage_seconds"]["guide"] + r["stage_seconds"]["guide_vision"] for _, r in rs], "^:", color=colour,
                      alpha=0.8, label=f"{name}: guide")
        memory = [r["peak_rss_mb"] if r["peak_rss_mb"] is not None else r["peak_cuda_mb"] for _, r in rs]
        right.plot(xs, memory, "o-", color=colour, label=name)
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xticks([p["frames"] for p in points], [str(p["frames"]) for p in points])
        ax.set_xlabel("frames")
        ax.grid(alpha=0.3)
    left.set_yscale("log")
    left.set_ylabel("seconds (median)")
    right.set_ylabel("peak memory (MB)")
    left.legend(fontsize=6)
    right.legend(fontsize=6)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(rows) -> str:
    head = (f"{'frames':>6} {'method':<10}{'guide':<10}{'pool':>5}{'stride':>7}{'layers':>7}{'retention':>10}{'tokens':>8}{'ttft s':>9}{'ttft x':>8}"
            f"{'llm-side x':>11}{'prefill x':>10}{'guide %':>8}{'TFLOPs':>8}{'RSS MB':>8}")
    lines = [head]
    for r in rows:
        mem = r["peak_rss_mb"] if r["peak_rss_mb"] is not None else r["peak_cuda_mb"]
        layers = f"{min(r['guide_layers'])}-{max(r['guide_layers'])}" if r["guide_layers"] else "-"
        lines.append(
            f"{r.get('frames', '-'):>6} {r['method']:<10}{r['guide']:<10}{r['guide_pool']:>5}{r.get('guide_stride', 1):>7}{layers:>7}{r['retention']:>10g}{r['visual_tokens_kept']:>8}"
            f"{r['ttft_seconds']:>9.3f}{r['ttft_speedup']:>8.2f}{r['llm_side_speedup']:>11.2f}{r['prefill_speedup']:>10.2f}"
            f"{100 * r['guide_share']:>8.1f}{(r['prefill_flops']['total'] / 1e12 if r['prefill_flops'] else float('nan')):>8.3f}{mem:>8.0f}"
        )
    return "\n".join(lines)


def plot_bench(rows, path, title, goal: dict | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 7), gridspec_kw={"width_ratios": [1, 1.4]})
    groups = {}
    for r in rows:
        if r["method"] != "full":
            key = f"{r['method']}" + ("" if r["guide"] == "none" else f" + DyToK ({r['guide']}" + (f", pool {r['guide_pool']}" if r["guide_pool"] != 1 else "")
                   + (f", stride {r['guide_stride']}" if r.get("guide_stride", 1) != 1 else "") + (f", layers {r['layers']}" if r["layers"] else "") + ")")
            groups.setdefault(key, []).append(r)
    for i, (key, rs) in enumerate(groups.items()):
        rs = sorted(rs, key=lambda r: r["retention"])
        xs = [100 * r["retention"] for r in rs]
        colour = f"C{i}"
        left.plot(xs, [r["ttft_speedup"] for r in rs], "o-", color=colour, label=f"{key}: to first token")
        left.plot(xs, [r["llm_side_speedup"] for r in rs], "s--", color=colour, alpha=0.6, label=f"{key}: guide + compress + prefill")
    left.axhline(1, color="gray", linestyle=":")
    for retention, target in (goal or {}).items():  # the LLM-side goal of the default-guide rows
        left.plot([100 * float(retention)], [target], "k*", markersize=12, label="LLM-side goal" if retention == next(iter(goal)) else None)
    left.set_xlabel("visual tokens kept (%)")
    left.set_ylabel("speedup vs full (same run, medians)")
    left.grid(alpha=0.3)
    left.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14))
    def label(r):
        if r["method"] == "full":
            return "full"
        extra = (f" pool{r['guide_pool']}" if r["guide_pool"] != 1 else "") + (f" stride{r['guide_stride']}" if r.get("guide_stride", 1) != 1 else "")
        extra += f" L{r['layers']}" if r["layers"] else ""
        return f"{r['method']} {r['guide']}{extra} {100 * r['retention']:g}%"

    labels = [label(r) for r in rows]
    bottom = [0.0] * len(rows)
    for stage in ("vision", "guide_vision", "guide", "compress", "prefill"):
        values = [r["stage_seconds"][stage] for r in rows]
        right.bar(range(len(rows)), values, bottom=bottom, label=stage)
        bottom = [b + v for b, v in zip(bottom, values)]
    right.set_xticks(range(len(rows)), labels, rotation=45, ha="right", fontsize=7)
    right.set_ylabel("seconds to first token (median)")
    right.legend(fontsize=7)
    right.grid(axis="y", alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
