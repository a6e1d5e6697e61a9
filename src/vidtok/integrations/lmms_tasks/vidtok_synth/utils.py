"""Helpers of the vidtok_synth lmms-eval task. Scoring matches `vidtok eval`: the first word of the
answer must equal the needle's shape."""

import os
from pathlib import Path


def _split() -> Path:
    chosen = os.environ.get("VIDTOK_SYNTH_SPLIT")
    path = Path(chosen) if chosen else Path(__file__).with_name("data")
    if path.is_dir():
        path = path / "questions.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"vidtok_synth: no split at {path}; write one with `vidtok synth DIR` and set VIDTOK_SYNTH_SPLIT=DIR")
    return path.resolve()


SPLIT = _split()
data_files = {"test": str(SPLIT)}


def doc_to_visual(doc):
    return [str(SPLIT.parent / doc["video"])]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def process_results(doc, results):
    words = results[0].split()
    prediction = words[0] if words else ""
    return {"accuracy": float(prediction == doc["answer"])}
