"""Video decoding (PyAV, which ships its own FFmpeg), uniform frame sampling, SigLIP preprocessing.

The transformers video processors need torchvision, which cannot be installed beside the pinned
CPU torch, so the preprocessing LLaVA-OneVision uses (resize to a square, bicubic; scale to
[0, 1]; normalise with mean = std = 0.5) lives here.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch


class VideoError(ValueError):
    """A video that cannot be read or used: a missing or undecodable file, a bad frame count, shape or dtype."""


def sample_indices(total: int, frames: int) -> list[int]:
    """`frames` indices spread uniformly over [0, total - 1], first and last included (as LLaVA-OV)."""
    if frames < 1:
        raise VideoError(f"frames must be >= 1, got {frames}")
    if total < frames:
        raise VideoError(f"the video has {total} frames, {frames} were asked for; ask for {total} frames or fewer")
    return np.linspace(0, total - 1, frames).round().astype(int).tolist()


def _stream_info(path: str) -> tuple[int, float]:
    """(frame count from the header, frames per second) of the first video stream."""
    import av

    if not os.path.isfile(path):
        raise VideoError(f"no video file at {path!r}")
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise VideoError(f"{path!r} has no video stream")
            stream = container.streams.video[0]
            rate = float(stream.average_rate or stream.base_rate or 0)
            return int(stream.frames), rate
    except av.error.FFmpegError as error:
        raise VideoError(f"cannot read video {path!r}: {error}; check the file is a video FFmpeg can decode") from None


def read_clip(path: str | os.PathLike, frames: int | None = None, fps: float | None = None, default: int = 32) -> tuple[np.ndarray, float]:
    """Frames sampled uniformly, either a fixed count or `fps` per second of video (at least 1, at
    most every frame), and the seconds between two sampled frames (0.5, 2 fps, when the file
    states no frame rate): uint8 [F, H, W, 3], seconds."""
    decoded, indices, rate = _sample_clip(path, frames, fps, default)
    count = len(indices)
    spacing = (indices[-1] - indices[0]) / (count - 1) / rate if count > 1 and rate else (1 / rate if rate else 0.5)
    return decoded, spacing


def read_clip_times(path: str | os.PathLike, frames: int | None = None, fps: float | None = None, default: int = 32,
                    fps_count=None) -> tuple[np.ndarray, list[float]]:
    """As read_clip, with each sampled frame's time in seconds (its index / the frame rate; 2 fps
    when the file states no rate): what a timestamped layout (Qwen3-VL) prints before each group.
    `fps_count(total, rate, fps)`: a model's own frame count for `fps` (default: read_clip's)."""
    decoded, indices, rate = _sample_clip(path, frames, fps, default, fps_count)
    return decoded, [i / rate if rate else i * 0.5 for i in indices]


def _fps_count(total: int, rate: float, fps: float) -> int:
    """Frames for `fps` per second of video: rounded, at least 1, at most every frame."""
    return int(min(total, max(1, round(total / rate * fps))))


def _sample_clip(path, frames, fps, default, fps_count=None) -> tuple[np.ndarray, list[int], float]:
    path = os.fspath(path)
    total, rate = _stream_info(path)
    if fps is not None:
        if frames is not None:
            raise VideoError("give either frames (a fixed count) or fps (frames per second of video), not both")
        if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not fps > 0 or not np.isfinite(fps):
            raise VideoError(f"fps must be a positive number, got {fps!r}")
        if not rate or not total:
            raise VideoError(f"{path!r} states no frame rate or frame count: sample a fixed number of frames instead of fps")
        frames = (fps_count or _fps_count)(total, rate, fps)
    count = default if frames is None else frames
    decoded, indices = _decode(path, count)
    return decoded, indices, rate


def read_frames(path: str | os.PathLike, frames: int) -> np.ndarray:
    """Decode `frames` uniformly sampled RGB frames: uint8 [F, H, W, 3]."""
    return _decode(path, frames)[0]


def _decode(path, frames: int) -> tuple[np.ndarray, list[int]]:
    """The frames and the indices of the decoded frames they are (what their times derive from:
    the header's frame count can be absent or wrong, the indices are what was decoded)."""
    import av
    from av.video.reformatter import VideoReformatter

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise VideoError(f"no video file at {path!r}")
    # frame.to_ndarray(format=...) builds a new swscale context for every frame (7 ms for a 64-px frame
    # here, 10x the decode); one reformatter keeps its context across the video's frames, same pixels
    reformatter = VideoReformatter()

    def rgb(frame):
        return reformatter.reformat(frame, format="rgb24").to_ndarray()

    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise VideoError(f"{path!r} has no video stream")
            stream = container.streams.video[0]
            # Trust the header's frame count only to skip frames we don't keep; verify it after decoding.
            if stream.frames >= frames:
                wanted = sample_indices(stream.frames, frames)
                kept, count = {}, 0
                for count, frame in enumerate(container.decode(stream), start=1):
                    if count - 1 in wanted:
                        kept[count - 1] = rgb(frame)
                if count == stream.frames:
                    return np.stack([kept[i] for i in wanted]), wanted
        with av.open(path) as container:
            decoded = [rgb(frame) for frame in container.decode(video=0)]
    except av.error.FFmpegError as error:
        raise VideoError(f"cannot read video {path!r}: {error}; check the file is a video FFmpeg can decode") from None
    if not decoded:
        raise VideoError(f"{path!r} holds no decodable frames")
    indices = sample_indices(len(decoded), frames)
    return np.stack([decoded[i] for i in indices]), indices


def preprocess(frames: np.ndarray | torch.Tensor, size: int, mean: Sequence[float] = (0.5,) * 3, std: Sequence[float] = (0.5,) * 3) -> torch.Tensor:
    """uint8 RGB frames [F, H, W, 3] -> float pixel values [F, 3, size, size] for SigLIP."""
    from PIL import Image

    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or 0 in frames.shape:
        raise VideoError(f"expected RGB frames [F>0, H>0, W>0, 3], got shape {frames.shape}")
    if frames.dtype != np.uint8:
        raise VideoError(f"expected uint8 frames, got {frames.dtype}")
    resized = [
        np.asarray(Image.fromarray(f).resize((size, size), Image.Resampling.BICUBIC)) if f.shape[:2] != (size, size) else f
        for f in frames
    ]
    pixels = torch.from_numpy(np.stack(resized)).permute(0, 3, 1, 2).float() / 255.0
    mean_t, std_t = torch.tensor(mean)[:, None, None], torch.tensor(std)[:, None, None]
    return (pixels - mean_t) / std_t


VIDEO_TYPES = ("a video file path (str or pathlib.Path), uint8 RGB frames [F, H, W, 3] (a numpy array, torch tensor or list of "
               "frames), or float pixel values [F, 3, H, W] already normalised for the model (a torch tensor)")


def as_frames(video) -> np.ndarray:
    """uint8 RGB frames [F, H, W, 3] from what a caller passed that is neither a path nor float
    pixel values, or a VideoError naming what was given and what is accepted."""
    if isinstance(video, (bytes, bytearray, memoryview)):
        raise VideoError(f"video was given as {type(video).__name__} (an encoded file's bytes?); vidtok takes {VIDEO_TYPES}: "
                         "write the bytes to a file and pass its path")
    if not isinstance(video, (np.ndarray, torch.Tensor, list, tuple)):
        raise VideoError(f"video was given as {type(video).__name__} ({video!r:.40}); vidtok takes {VIDEO_TYPES}")
    frames = video.cpu().numpy() if isinstance(video, torch.Tensor) else np.asarray(video)
    if frames.ndim != 4 or frames.shape[-1] != 3 or 0 in frames.shape:
        raise VideoError(f"expected RGB frames [F>0, H>0, W>0, 3], got shape {frames.shape}; vidtok takes {VIDEO_TYPES}")
    if np.issubdtype(frames.dtype, np.floating):
        raise VideoError(
            f"the frames are a numpy array of {frames.dtype}: vidtok reads RGB frames as uint8 0..255 "
            "(for values in [0, 1]: np.clip(frames * 255, 0, 255).round().astype(np.uint8)), or float pixel values "
            "[F, 3, H, W] already normalised for the model as a torch tensor"
        )
    if frames.dtype != np.uint8:
        raise VideoError(f"expected uint8 RGB frames, got {frames.dtype}; convert them with frames.astype(np.uint8) (values 0..255)")
    return frames


def fingerprint(video):
    """What identifies a video's content, to tell a cache whether it still holds the same video: a
    file's real path, size, modification time and inode (rewriting or replacing the file changes
    them), an array's type, shape, dtype and a hash of every byte (an in-place edit changes it).
    Hashing is about 1 GB/s, small beside decoding or encoding the frames."""
    import dataclasses
    import hashlib

    if isinstance(video, (str, os.PathLike)):
        path = os.path.realpath(os.fspath(video))
        try:
            stat = os.stat(path)
        except OSError:
            return ("file", path, None)
        return ("file", path, stat.st_size, stat.st_mtime_ns, stat.st_ino)
    if isinstance(video, torch.Tensor):
        flat = video.detach().cpu().contiguous().reshape(-1)
        return ("tensor", tuple(video.shape), str(video.dtype), hashlib.blake2b(flat.view(torch.uint8).numpy(), digest_size=16).hexdigest())
    if isinstance(video, np.ndarray) and video.dtype != object:
        flat = np.ascontiguousarray(video).reshape(-1)
        return ("ndarray", video.shape, str(video.dtype), hashlib.blake2b(flat.view(np.uint8), digest_size=16).hexdigest())
    if dataclasses.is_dataclass(video) and not isinstance(video, type):
        return (type(video).__name__, tuple(fingerprint(getattr(video, f.name)) for f in dataclasses.fields(video)))
    if isinstance(video, (list, tuple)):
        return (type(video).__name__, tuple(fingerprint(v) for v in video))
    return (type(video).__name__, repr(video))


def file_identity(path, known: dict | None = None) -> dict | None:
    """{"size", "mtime_ns", "sha256"} of a file, None when it cannot be read. `known`: an earlier
    identity of the file; while its size and mtime still match, its hash is trusted instead of
    reading the file again (a rewrite changes the mtime; a copy elsewhere is re-hashed and matches)."""
    import hashlib

    try:
        stat = os.stat(path)
        if known and (known.get("size"), known.get("mtime_ns")) == (stat.st_size, stat.st_mtime_ns):
            return dict(known)
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError:
        return None
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest.hexdigest()}


def check_frames(frames) -> None:
    if frames is not None and (isinstance(frames, bool) or not isinstance(frames, (int, np.integer)) or frames < 1):
        raise VideoError(f"frames must be a whole number >= 1 (or None for the default), got {frames!r}")


def load_pixels(video, frames: int | None, size: int, mean, std, fps: float | None = None) -> torch.Tensor:
    """A path, uint8 frames [F, H, W, 3] or pixel values [F, 3, S, S] -> pixel values."""
    check_frames(frames)
    if isinstance(video, (str, os.PathLike)):
        video, _ = read_clip(video, frames, fps)
        frames = None if fps is not None else frames
    elif fps is not None:
        raise VideoError("fps sampling needs a video file; for frames or pixel values already sampled, drop fps")
    if isinstance(video, torch.Tensor) and video.is_floating_point():
        if video.ndim != 4 or tuple(video.shape[1:]) != (3, size, size):
            raise VideoError(f"pixel values must be [F, 3, {size}, {size}] for this model, got {tuple(video.shape)}")
        pixels = video
    else:
        pixels = preprocess(as_frames(video), size, mean, std)
    if pixels.shape[0] == 0:
        raise VideoError("the video has zero frames")
    if pixels.is_floating_point() and not torch.isfinite(pixels).all():
        bad = int((~torch.isfinite(pixels)).sum())
        raise VideoError(f"the pixel values hold {bad} NaN or infinite values; clean the frames (e.g. torch.nan_to_num) before calling")
    if frames is not None and pixels.shape[0] != frames:
        raise VideoError(f"the video has {pixels.shape[0]} frames, {frames} were asked for")
    return pixels


def write_video(path: str | os.PathLike, frames: np.ndarray, fps: int = 4) -> None:
    """uint8 RGB frames [F, H, W, 3] -> an mp4 (H.264, lossless-ish: crf 0, yuv444p)."""
    import av

    frames = np.asarray(frames, dtype=np.uint8)
    with av.open(os.fspath(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv444p"
        stream.options = {"crf": "0", "preset": "ultrafast"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
