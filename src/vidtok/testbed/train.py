"""Train the toy LLaVA-OneVision models on the synthetic needle task, from scratch, on a CPU.

    python -m vidtok.testbed.train --out src/vidtok/testbed/assets/toy-main --geometry main
    python -m vidtok.testbed.train --out src/vidtok/testbed/assets/toy-assistant --geometry assistant \
        --vision-from src/vidtok/testbed/assets/toy-main

What makes it train in minutes (plain answer-only training from scratch learned nothing in 30
CPU minutes): a vision-only stage with auxiliary per-token heads (colour/none, shape/none) on
the pooled tokens; then joint training with that loss kept and the vision tower frozen; a probe
making the last prompt token name the queried colour after LLM layer 0; and a frame curriculum
1 -> 2 -> 4 -> 8 -> 16, advancing at >= 0.9 train accuracy. The heads and the probe are
training-only: they are not part of the saved model.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .synth import CELL, MASKS, RGB, make_sample
from .toy import COLOURS, SHAPES, build_tokenizer, build_toy_model
from ..video import preprocess


def random_frames(rng: np.random.Generator, count: int, size: int = 64):
    """Frames of objects in any colour, with per-cell labels (0 = empty) for the vision stage."""
    grid = size // CELL
    images = np.zeros((count, size, size, 3), dtype=np.uint8)
    colour_labels = np.zeros((count, grid * grid), dtype=np.int64)
    shape_labels = np.zeros((count, grid * grid), dtype=np.int64)
    for i in range(count):
        for slot in rng.permutation(grid * grid)[: int(rng.integers(4, 12))]:
            c, s = int(rng.integers(len(COLOURS))), int(rng.integers(len(SHAPES)))
            r, col = divmod(int(slot), grid)
            images[i, r * CELL : (r + 1) * CELL, col * CELL : (col + 1) * CELL][MASKS[SHAPES[s]]] = RGB[COLOURS[c]]
            colour_labels[i, slot], shape_labels[i, slot] = c + 1, s + 1
    return images, torch.from_numpy(colour_labels), torch.from_numpy(shape_labels)


class AuxHeads(torch.nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.colour = torch.nn.Linear(width, len(COLOURS) + 1)
        self.shape = torch.nn.Linear(width, len(SHAPES) + 1)
        self.probe = torch.nn.Linear(width, len(COLOURS))

    def token_loss(self, tokens, colour_labels, shape_labels):
        return F.cross_entropy(self.colour(tokens).flatten(0, 1), colour_labels.flatten()) + F.cross_entropy(
            self.shape(tokens).flatten(0, 1), shape_labels.flatten()
        )


def _video_tokens(model, pixels):
    """[B, F, 3, S, S] -> pooled video tokens [B, F*T + 1, D] (newline last)."""
    return model.model.get_video_features(pixels, return_dict=True).pooler_output


def _schedule(optimizer, step, lr, warmup=50):
    for group in optimizer.param_groups:
        group["lr"] = lr * min(1.0, (step + 1) / warmup)


def train_vision(model, heads, steps, batch, lr, rng, log):
    params = list(model.model.vision_tower.parameters()) + list(model.model.multi_modal_projector.parameters())
    optimizer = torch.optim.AdamW(params + list(heads.parameters()), lr=lr, weight_decay=0.01)
    tokens_per_frame = model.model.apply_pooling(torch.zeros(1, (64 // 8) ** 2, 1)).shape[1]
    for step in range(steps):
        images, colours, shapes = random_frames(rng, batch)
        pixels = preprocess(images, 64)[:, None]
        tokens = _video_tokens(model, pixels)[:, :-1].reshape(batch, tokens_per_frame, -1)
        loss = heads.token_loss(tokens, colours, shapes)
        _schedule(optimizer, step, lr)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == steps - 1:
            accuracy = (heads.colour(tokens).argmax(-1) == colours).float().mean().item()
            log(f"vision step {step} loss {loss.item():.3f} colour-acc {accuracy:.3f}")


def _batch(rng, frames, batch, tokenizer, adapter):
    samples = [make_sample(rng, frames=frames, needles=min(2, frames)) for _ in range(batch)]
    prompt = [adapter.input_ids(tokenizer, s.question, frames * adapter.tokens_per_frame + 1)[0] for s in samples]
    vocab = tokenizer.get_vocab()
    answers = torch.tensor([vocab[s.answer] for s in samples])
    eos = torch.full((batch, 1), tokenizer.eos_token_id)
    input_ids = torch.cat([torch.stack(prompt), answers[:, None], eos], dim=1)
    pixels = torch.stack([preprocess(s.frames, 64) for s in samples])
    colour = torch.tensor([COLOURS.index(s.question.split()[-2]) for s in samples])
    labels = torch.from_numpy(np.stack([s.labels for s in samples])).flatten(1, 2)  # [B, F*T, 2]
    colour_labels, shape_labels = labels[..., 0], labels[..., 1]
    return input_ids, pixels, answers, colour, colour_labels, shape_labels


def train_joint(model, heads, tokenizer, steps, batch, lr, rng, log, curriculum, advance_at, deadline):
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    from ..models import adapter_for

    adapter = adapter_for(model)
    model.model.vision_tower.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad] + list(heads.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    level, recent, history = 0, [], []
    for step in range(steps):
        frames = curriculum[level]
        input_ids, pixels, answers, colour, colour_labels, shape_labels = _batch(rng, frames, batch, tokenizer, adapter)
        video = _video_tokens(model, pixels)
        out = model(
            input_ids=input_ids,
            mm_encoder_outputs={"video": BaseModelOutputWithPooling(pooler_output=video)},
            output_hidden_states=True,
        )
        last = input_ids.shape[1] - 3  # the last prompt token predicts the answer
        answer_loss = F.cross_entropy(out.logits[:, last], answers) + F.cross_entropy(
            out.logits[:, last + 1], input_ids[:, -1]
        )
        probe_loss = F.cross_entropy(heads.probe(out.hidden_states[1][:, last]), colour)
        aux_loss = heads.token_loss(video[:, :-1], colour_labels, shape_labels)
        loss = answer_loss + 0.5 * probe_loss + 0.5 * aux_loss
        _schedule(optimizer, step, lr)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        recent = (recent + [(out.logits[:, last].argmax(-1) == answers).float().mean().item()])[-20:]
        accuracy = sum(recent) / len(recent)
        history.append({"step": step, "frames": frames, "loss": loss.item(), "accuracy": accuracy})
        if step % 25 == 0:
            log(f"joint step {step} frames {frames} loss {loss.item():.3f} acc {accuracy:.3f}")
        if len(recent) == 20 and accuracy >= advance_at:
            if level + 1 < len(curriculum):
                level, recent = level + 1, []
                log(f"step {step}: curriculum -> {curriculum[level]} frames")
            elif accuracy >= 0.99:
                log(f"step {step}: {accuracy:.3f} at {frames} frames, done")
                break
        if time.monotonic() > deadline:
            log(f"step {step}: time budget spent")
            break
    return history


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder to save the model, tokenizer and card to")
    parser.add_argument("--geometry", default="main", help="toy geometry: main, assistant or test")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--vision-steps", type=int, default=300)
    parser.add_argument("--steps", type=int, default=3000, help="max joint steps")
    parser.add_argument("--minutes", type=float, default=15.0, help="time budget of the joint stage")
    parser.add_argument("--curriculum", default="1,2,4,8,16")
    parser.add_argument("--advance-at", type=float, default=0.9)
    parser.add_argument("--vision-from", help="copy (and freeze) the vision tower of this saved toy model instead of stage 1")
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    model = build_toy_model(args.geometry, seed=args.seed).train()
    tokenizer = build_tokenizer()
    heads = AuxHeads(model.config.text_config.hidden_size)
    start = time.monotonic()
    if args.vision_from:
        from transformers import LlavaOnevisionForConditionalGeneration

        donor = LlavaOnevisionForConditionalGeneration.from_pretrained(args.vision_from)
        model.model.vision_tower.load_state_dict(donor.model.vision_tower.state_dict())
    else:
        train_vision(model, heads, args.vision_steps, args.batch, args.lr, rng, print)
    curriculum = [int(x) for x in args.curriculum.split(",")]
    history = train_joint(
        model, heads, tokenizer, args.steps, args.batch, args.lr, rng, print, curriculum, args.advance_at,
        deadline=time.monotonic() + 60 * args.minutes,
    )
    model.eval()
    out = Path(args.out)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "training.json").write_text(json.dumps({"args": vars(args), "seconds": time.monotonic() - start, "history": history[-50:]}, indent=1))
    (out / "README.md").write_text(_card(args, history, time.monotonic() - start))
    print(f"saved to {out} after {time.monotonic() - start:.0f} s")


def _card(args, history, seconds) -> str:
    final = history[-1] if history else {}
    return f"""# vidtok toy model ({args.geometry})

A LLaVA-OneVision-architecture model (SigLIP + Qwen2, `LlavaOnevisionForConditionalGeneration`)
trained from scratch on vidtok's synthetic needle task ("what shape is <colour> ?", 64-px frames,
16 tokens per frame). It is a testbed for token compression, not a general video model.

- Command: `python -m vidtok.testbed.train --out {args.out} --geometry {args.geometry} --seed {args.seed}{' --vision-from ' + args.vision_from if args.vision_from else ''}`
- Trained {seconds / 60:.1f} CPU minutes; last train accuracy {final.get('accuracy', float('nan')):.3f}
  at {final.get('frames')} frames.
- Training used auxiliary heads that are **not** part of this checkpoint: per-token colour/shape
  classifiers on the pooled visual tokens, and a probe asking the last prompt token to name the
  queried colour after LLM layer 0.
"""


if __name__ == "__main__":
    main()
