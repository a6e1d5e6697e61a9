"""vidtok: DyToK dynamic token compression for Video LLMs on Hugging Face transformers."""

from .allocation import Allocation, Even, Keyframes, Mix, Prior, Uniqueness, frame_uniqueness
from .budget import allocate_budgets, total_budget
from .compressors import Composed, Compressor, DiverseSelect, DyToK, FastV, FrameSignals, Full, Random, SegmentMerge, Uniform, VisionZip
from .importance import frame_weights, last_token_attention, parse_layers
from .models import UnsupportedModelError, adapter_for, register_adapter, supported_model_types
from .pipeline import ModelOutputError, Plan, Prepared, Result, VideoCache, generate, prepare
from .video import VideoError, preprocess, read_frames

__version__ = "0.1.0"

__all__ = [
    "Allocation",
    "Even",
    "Keyframes",
    "Mix",
    "Prior",
    "Uniqueness",
    "frame_uniqueness",
    "Composed",
    "Compressor",
    "DiverseSelect",
    "DyToK",
    "FastV",
    "FrameSignals",
    "Full",
    "Plan",
    "Prepared",
    "Random",
    "Result",
    "SegmentMerge",
    "Uniform",
    "UnsupportedModelError",
    "ModelOutputError",
    "VideoCache",
    "VideoError",
    "VisionZip",
    "adapter_for",
    "allocate_budgets",
    "frame_weights",
    "generate",
    "last_token_attention",
    "parse_layers",
    "prepare",
    "preprocess",
    "read_frames",
    "register_adapter",
    "supported_model_types",
    "total_budget",
]
