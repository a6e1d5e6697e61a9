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

The toy Qwen2.5-VL pair (`--family qwen2_5_vl`) follows the same recipe with the temporal group
(two frames merged into one set of 4x4 LLM tokens) as the unit:

    python -m vidtok.testbed.train --family qwen2_5_vl --geometry main --out src/vidtok/testbed/assets/toy-qwen2.5-vl
    python -m vidtok.testbed.train --family qwen2_5_vl --geometry assistant \
        --vision-from src/vidtok/testbed/assets/toy-qwen2.5-vl --out src/vidtok/testbed/assets/toy-qwen2.5-vl-assistant

The v1 + v2 pair (testbed v2, `vidtok.testbed.events`) is the shipped v1 pair fine-tuned on v1
needles and v2's needle and majority questions:

    python -m vidtok.testbed.train --task mixed --start src/vidtok/testbed/assets/toy-main --geometry main \
        --out src/vidtok/testbed/assets/toy-v2-main --minutes 30 --kinds needle,majority
    python -m vidtok.testbed.train --task mixed --start src/vidtok/testbed/assets/toy-assistant --geometry assistant \
        --out src/vidtok/testbed/assets/toy-v2-assistant --minutes 20 --kinds needle,majority

The vocabulary gains v2's words (after v1's, whose ids stay; count answers start as the mean
shape answer), the vision tower stays frozen (v2's objects are v1's shapes and colours, cell by
cell), a quarter of the batches are v1 needles at 16 frames, the rest one v2 kind per batch on a
16 -> 32 frame curriculum (a stage ends at 0.9 train accuracy or when its equal share of the CPU
budget is spent); the last prompt token's attention at LLM layer 1 is pulled onto the answer's
evidence tokens (the guide layer both models' calibration found), and the word embeddings learn
at 5x the rate. Order, count and change questions are not learnt by these 4- and 2-layer toys
at this budget: 36 CPU minutes on all five kinds (with training-only probes asking the visual
tokens for the previous event's colour, their event's first colour and frames shown so far)
left them at chance at 32 frames (count 0.20, change 0.40 against 1/3, order 0.27); 30 more from
the shipped toy-v2-main, those three kinds weighted 3:1 on a 12 -> 16 -> 24 -> 32 curriculum
(940 steps), left order 0.35, count 0.18, change 0.34. So the shipped pair trains on the two
kinds it learns.

What differs for Qwen2.5-VL, and why. A merged token covers one 16-px cell in *both* frames of its pair, so it
often holds two objects, and the answer needs binding: the shape of the object whose colour was
asked, not of its neighbour in the other frame.

- Stage 1 trains the whole tower (patch embedding, windowed and full-attention blocks, merger)
  on random frame pairs, with heads naming each frame's colour/shape per merged token (two
  slots) and which (colour, shape) objects the token holds (multi-label).
- Joint training freezes the whole tower, merger included: trained on the curriculum's first
  stage (pairs of identical frames) it forgot distinct pairs. The assistant (`--vision-from`)
  copies the main model's patch embedding and blocks and trains only its own merger (its
  output is the assistant LLM's width) in stage 1.
- The last prompt token's attention at LLM layer 1 (softmax over the visual keys, mean over
  heads: what a DyToK guide reads) is pulled onto the queried needle's token (`--attend-layer`,
  -1 for off). Without it, 2-frame accuracy crept from 0.6 to 0.8 in 2,500 steps, wrong on half
  of the cells shared by two objects; with it, 0.93 in 700.
- Curriculum 1 -> 2 -> 4 -> 8 -> 16 frames, a single frame completed to a pair by repeating it
  (the adapter's rule for an odd count): one object per cell first. Starting at 2 frames stayed
  at chance for 800 steps.
- Pixels normalised with the CLIP mean/std vidtok's adapter uses, frames kept at 64 px (the
  saved video_preprocessor_config.json says both); the LLM gets the 3-D positions vidtok
  computes (the adapter's model_inputs) for frames 0.25 s apart, as a 16-frame synth mp4
  (4 fps) is read.
- One CPU thread by default (`--threads`): the encoder makes one attention call per window and
  per temporal group, thousands of tiny calls that two threads on a loaded machine made ~5x
  slower. `--minutes` is CPU time here, so a shared machine's load or a paused process does
  not eat the budget.
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
from .toy import COLOURS, SHAPES, build_qwen_toy_model, build_tokenizer, build_toy_model
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
        group["lr"] = lr * group.get("scale", 1.0) * min(1.0, (step + 1) / warmup)


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


def _training_log(out: Path):
    """A log function printing each line and appending it to out/training.log, and that file."""
    out.mkdir(parents=True, exist_ok=True)
    log_file = open(out / "training.log", "w")

    def log(message):
        print(message, flush=True)
        log_file.write(message + "\n")
        log_file.flush()

    return log, log_file


# Testbed v2 (LLaVA-OV): the shipped v1 pair fine-tuned on v1 + v2 questions ---------------------


def _tensors(samples, evidence, kinds, frames, tokenizer, adapter):
    """Samples -> input ids (prompt, answer, end), pixels, answers, the queried colour, and the pull
    target: 1 on the visual tokens the answer needs (`evidence`: (frame, token) pairs per sample)."""
    per_frame = adapter.tokens_per_frame
    prompt = [adapter.input_ids(tokenizer, s.question, frames * per_frame + 1)[0] for s in samples]
    vocab = tokenizer.get_vocab()
    answers = torch.tensor([vocab[s.answer] for s in samples])
    eos = torch.full((len(samples), 1), tokenizer.eos_token_id)
    input_ids = torch.cat([torch.stack(prompt), answers[:, None], eos], dim=1)
    pixels = torch.stack([preprocess(s.frames, 64) for s in samples])
    colour = torch.tensor([COLOURS.index(next(w for w in s.question.split() if w in COLOURS)) for s in samples])
    target = torch.zeros(len(samples), frames * per_frame)
    for i, pairs in enumerate(evidence):
        for f, token in pairs:
            target[i, f * per_frame + token] = 1.0
    return input_ids, pixels, answers, colour, target, kinds


def _event_batch(rng, frames, batch, tokenizer, adapter, kinds=None):
    """A batch of v2 samples of one kind (one question length, so one answer position), drawn from `kinds`."""
    from .events import KINDS, make_event_sample

    kinds = kinds or KINDS
    kind = kinds[int(rng.integers(len(kinds)))]
    clutter = (1, 3) if frames <= 8 else (4, 8)  # the shortest curriculum stage with little clutter
    samples = [make_event_sample(rng, kind, frames=frames, clutter=clutter) for _ in range(batch)]
    return _tensors(samples, [s.evidence for s in samples], [s.kind for s in samples], frames, tokenizer, adapter)


def _needle_batch(rng, frames, batch, tokenizer, adapter):
    """A batch of v1 needle samples; the evidence is the needle's token."""
    samples = [make_sample(rng, frames=frames, needles=min(2, frames)) for _ in range(batch)]
    return _tensors(samples, [[(s.needle_frame, s.needle_token)] for s in samples], ["v1"] * batch, frames, tokenizer, adapter)


def train_mixed(model, heads, tokenizer, steps, batch, lr, rng, log, curriculum, advance_at, deadline, attend_layer=1, v1_share=0.25,
                kinds=None):
    """Fine-tuning on v1 needles and v2 events, the vision tower frozen: answer + end token, the
    probe naming the queried colour after layer 0, and the last prompt token's attention at
    `attend_layer` (softmax over the visual keys, mean over heads: what a guide reads) pulled onto
    the tokens the answer needs. v2's frame curriculum advances when v2 train accuracy passes
    `advance_at`; a share `v1_share` of the steps are v1 batches at 16 frames."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    from .._seam import observe_attention
    from ..models import adapter_for

    adapter = adapter_for(model)
    model.model.vision_tower.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad] + list(heads.parameters())
    # the (tied) word embeddings learn at 5x: v2's answer words start at the mean embedding, many
    # nats below v1's shapes, and at the common rate count and change stayed at 0% for 200 steps
    embedding = model.get_input_embeddings().weight
    optimizer = torch.optim.AdamW([{"params": [p for p in params if p is not embedding], "scale": 1.0},
                                   {"params": [embedding], "scale": 5.0}], lr=lr, weight_decay=0.01)
    level, recent, history, by_kind = 0, [], [], {}
    began = time.process_time()
    for step in range(steps):
        v1 = rng.random() < v1_share
        frames = 16 if v1 else curriculum[level]
        if v1:
            input_ids, pixels, answers, colour, target, batch_kinds = _needle_batch(rng, frames, batch, tokenizer, adapter)
        else:
            input_ids, pixels, answers, colour, target, batch_kinds = _event_batch(rng, frames, batch, tokenizer, adapter, kinds)
        video = _video_tokens(model, pixels)
        last = input_ids.shape[1] - 3  # the last prompt token predicts the answer
        visual = (input_ids[0] == adapter.video_token_id).nonzero().squeeze(1)[:-1]  # the newline last
        attention = {}

        def observe(module, query, key, scaling, **_):
            k = key[:, :, visual].repeat_interleave(query.shape[1] // key.shape[1], dim=1)
            attention["probs"] = (torch.einsum("bhd,bhnd->bhn", query[:, :, last], k) * scaling).softmax(-1).mean(1)

        with observe_attention(model, ["text_config"], {adapter.decoder_layers[attend_layer].self_attn: observe}):
            out = model(input_ids=input_ids, mm_encoder_outputs={"video": BaseModelOutputWithPooling(pooler_output=video)},
                        output_hidden_states=True, use_cache=False)
        answer_loss = F.cross_entropy(out.logits[:, last], answers) + F.cross_entropy(out.logits[:, last + 1], input_ids[:, -1])
        probe_loss = F.cross_entropy(heads.probe(out.hidden_states[1][:, last]), colour)
        pull = -(attention["probs"] * target).sum(-1).clamp(min=1e-6).log().mean()
        loss = answer_loss + 0.5 * probe_loss + 0.5 * pull
        _schedule(optimizer, step, lr)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        hits = (out.logits[:, last].argmax(-1) == answers).float()
        for kind, hit in zip(batch_kinds, hits.tolist()):
            by_kind[kind] = (by_kind.get(kind, []) + [hit])[-200:]
        if not v1:
            recent = (recent + [hits.mean().item()])[-20:]
        accuracy = sum(recent) / len(recent) if recent else 0.0
        history.append({"step": step, "frames": frames, "loss": loss.item(), "v2_accuracy": accuracy, "v1": v1})
        if step % 25 == 0:
            kinds_text = " ".join(f"{k} {sum(v) / len(v):.2f}" for k, v in sorted(by_kind.items()))
            log(f"mixed step {step} frames {frames} loss {loss.item():.3f} (answer {answer_loss.item():.3f} pull {pull.item():.3f}) "
                f"v2 acc {accuracy:.3f} | {kinds_text}")
        # a stage also ends when its equal share of the time budget is spent: a kind the toy does not
        # learn (order) must not hold the whole run at a length shorter than the testbed's
        out_of_time = time.process_time() > began + (deadline - began) * (level + 1) / len(curriculum)
        if level + 1 < len(curriculum) and (out_of_time or (len(recent) == 20 and accuracy >= advance_at)):
            level, recent = level + 1, []
            log(f"step {step}: v2 curriculum -> {curriculum[level]} frames" + (" (stage time spent)" if out_of_time else ""))
        if time.process_time() > deadline:
            log(f"step {step}: time budget spent")
            break
    history[-1]["by_kind"] = {k: sum(v) / len(v) for k, v in by_kind.items()}
    return history


def main_mixed(args):
    """--task mixed: start from a shipped v1 model (--start), extend its vocabulary with v2's
    words, and fine-tune on v1 + v2 with its vision tower frozen."""
    from transformers import LlavaOnevisionForConditionalGeneration

    out = Path(args.out)
    log, log_file = _training_log(out)

    torch.set_num_threads(args.threads or 1)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    if not args.start:
        raise SystemExit("--task mixed fine-tunes a shipped v1 model: give --start FOLDER (e.g. src/vidtok/testbed/assets/toy-main)")
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(args.start).train()
    tokenizer = build_tokenizer(events=True)
    old = model.get_input_embeddings().weight.shape[0]
    model.resize_token_embeddings(len(tokenizer), mean_resizing=True)  # v1's ids are kept; v2's words appended
    model.config.text_config.vocab_size = len(tokenizer)
    from .events import NUMBERS

    with torch.no_grad():  # count answers start as the mean shape answer: as likely as a shape, not ~19 nats below
        embedding, vocab = model.get_input_embeddings().weight, tokenizer.get_vocab()
        shapes = embedding[[vocab[w] for w in SHAPES]].mean(0)
        for word in NUMBERS:
            embedding[vocab[word]] = shapes + 0.01 * torch.randn_like(shapes)
    heads = AuxHeads(model.config.text_config.hidden_size)
    log(f"from {args.start}: vocabulary {old} -> {len(tokenizer)} words")
    start, cpu_start = time.monotonic(), time.process_time()
    curriculum = [int(x) for x in args.curriculum.split(",")]
    history = train_mixed(model, heads, tokenizer, args.steps, args.batch, args.lr, rng, log, curriculum, args.advance_at,
                          deadline=time.process_time() + 60 * args.minutes, attend_layer=args.attend_layer,
                          v1_share=args.v1_share, kinds=args.kinds.split(",") if args.kinds else None)
    model.eval()
    seconds, cpu_seconds = time.monotonic() - start, time.process_time() - cpu_start
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "training.json").write_text(json.dumps({"args": vars(args), "seconds": seconds, "cpu_seconds": cpu_seconds,
                                                   "history": history[-50:]}, indent=1))
    (out / "README.md").write_text(mixed_card(args, history, seconds, cpu_seconds))
    log(f"saved to {out} after {seconds:.0f} s")
    log_file.close()


def mixed_card(args, history, seconds, cpu_seconds) -> str:
    """The model card of a --task mixed run (args: the run's argparse namespace or its saved dict)."""
    args = argparse.Namespace(**args) if isinstance(args, dict) else args
    final = history[-1]
    command = f"python -m vidtok.testbed.train --task mixed --start {args.start} --geometry {args.geometry} --out {args.out}"
    for flag, value, default in (("--minutes", args.minutes, None), ("--kinds", args.kinds, None), ("--seed", args.seed, 0),
                                 ("--curriculum", args.curriculum, "16,32"), ("--lr", args.lr, 2e-3), ("--advance-at", args.advance_at, 0.9),
                                 ("--v1-share", args.v1_share, 0.25), ("--attend-layer", args.attend_layer, 1), ("--batch", args.batch, 32)):
        if value != default:
            command += f" {flag} {value:g}" if isinstance(value, float) else f" {flag} {value}"
    kinds = args.kinds.replace(",", ", ") if args.kinds else "all five kinds"
    return f"""# vidtok toy model, testbed v1 + v2 ({args.geometry})

The shipped v1 toy model `{Path(args.start).name}` (LLaVA-OneVision architecture) fine-tuned on v1
needle questions and testbed v2 questions (`vidtok.testbed.events`; here: {kinds}), its
vocabulary extended by v2's words and its vision tower frozen. A testbed for token compression,
not a general video model.

- Command: `{command}`
- {seconds / 60:.1f} minutes ({cpu_seconds / 60:.1f} CPU minutes, {args.threads or 1} thread(s)); v2 curriculum
  {args.curriculum} frames; train accuracy over the last 200 samples per kind at the end:
  {', '.join(f"{k} {v:.2f}" for k, v in sorted(final.get('by_kind', {}).items()))}.
- Losses: answer and end token; a probe naming the queried colour after LLM layer 0; the last
  prompt token's attention at LLM layer {args.attend_layer} pulled onto the tokens the answer needs
  (training-only heads, not part of this checkpoint).
"""


# Qwen2.5-VL ---------------------------------------------------------------------------------

QWEN_SIZE = 64  # frames are used as they are: min = max pixels = 64 x 64
QWEN_SECONDS_PER_FRAME = 0.25  # 16 frames read from a 16-frame mp4 written at 4 fps (synth.write_split)


def _qwen_normalisation():
    from ..models.qwen2_5_vl import CLIP_MEAN, CLIP_STD

    return CLIP_MEAN, CLIP_STD


def qwen_pixels(frames: np.ndarray) -> torch.Tensor:
    """uint8 [..., H, W, 3] -> [..., 3, H, W] scaled to [0, 1] and normalised as the saved preprocessor config says."""
    mean, std = _qwen_normalisation()
    x = torch.from_numpy(np.ascontiguousarray(frames)).movedim(-1, -3).float() / 255.0
    return (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


def qwen_preprocessor_config(patch: int = 8, merge: int = 2, temporal: int = 2) -> dict:
    mean, std = _qwen_normalisation()
    return {
        "video_processor_type": "Qwen2VLVideoProcessor",
        "do_resize": True,
        "size": {"shortest_edge": QWEN_SIZE * QWEN_SIZE, "longest_edge": QWEN_SIZE * QWEN_SIZE},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(mean),
        "image_std": list(std),
        "do_convert_rgb": True,
        "patch_size": patch,
        "temporal_patch_size": temporal,
        "merge_size": merge,
    }


class QwenAuxHeads(AuxHeads):
    """Per merged token, two slots (the pair's first and second frame): colour/none and shape/none;
    and which (colour, shape) objects the token holds, in either frame (multi-label), so a token
    says "red circle" whichever frame of the pair it is in."""

    def __init__(self, width: int, slots: int = 2):
        super().__init__(width)
        self.slots = slots
        self.colour = torch.nn.Linear(width, slots * (len(COLOURS) + 1))
        self.shape = torch.nn.Linear(width, slots * (len(SHAPES) + 1))
        self.pairs = torch.nn.Linear(width, len(COLOURS) * len(SHAPES))
        self.answer = torch.nn.Linear(width, len(SHAPES))

    def logits(self, tokens):
        return (self.colour(tokens).unflatten(-1, (self.slots, -1)), self.shape(tokens).unflatten(-1, (self.slots, -1)))

    def token_loss(self, tokens, colour_labels, shape_labels):
        colour, shape = self.logits(tokens)
        present = colour_labels > 0
        index = (colour_labels - 1).clamp(min=0) * len(SHAPES) + (shape_labels - 1).clamp(min=0)
        pairs = torch.zeros(*index.shape[:-1], len(COLOURS) * len(SHAPES))
        pairs.scatter_add_(-1, index, present.float())
        return F.cross_entropy(colour.flatten(0, -2), colour_labels.flatten()) + F.cross_entropy(
            shape.flatten(0, -2), shape_labels.flatten()
        ) + F.binary_cross_entropy_with_logits(self.pairs(tokens), pairs.clamp(max=1))


def _pair_labels(labels: torch.Tensor, temporal: int = 2) -> torch.Tensor:
    """Per-frame cell labels [B, F, cells] -> per merged token [B, F/temporal * cells, temporal]."""
    b, f, cells = labels.shape
    return labels.reshape(b, f // temporal, temporal, cells).transpose(2, 3).reshape(b, f // temporal * cells, temporal)


def _qwen_tokens(model, adapter, pixels: torch.Tensor, seconds: float) -> torch.Tensor:
    """Normalised pixels [B, F, 3, S, S] -> the merger's LLM tokens [B, F/2 * T, D], each video as
    adapter.encode_video gives it (the encoder attends within one temporal group at a time)."""
    from ..models.qwen2_5_vl import QwenVideo

    videos = [adapter.pixels(QwenVideo(p, seconds)) for p in pixels]
    grids = torch.tensor([list(adapter._grid(v)) for v in videos])
    patches = torch.cat([adapter._patchify(v) for v in videos])
    out = model.model.get_video_features(patches, video_grid_thw=grids, return_dict=True).pooler_output
    return torch.stack(list(out))


def train_vision_qwen(model, heads, steps, batch, lr, rng, log, merger_only=False):
    """Stage 1 on random frame pairs: the whole tower, or only the merger (the blocks copied from another model)."""
    from ..models import adapter_for

    adapter = adapter_for(model)
    visual = model.model.visual
    params = list((visual.merger if merger_only else visual).parameters())
    if merger_only:
        visual.requires_grad_(False)
        visual.merger.requires_grad_(True)
    optimizer = torch.optim.AdamW(params + list(heads.parameters()), lr=lr, weight_decay=0.01)
    for step in range(steps):
        images, colours, shapes = random_frames(rng, 2 * batch, QWEN_SIZE)
        pixels = qwen_pixels(images).reshape(batch, 2, 3, QWEN_SIZE, QWEN_SIZE)
        colours, shapes = _pair_labels(colours.reshape(batch, 2, -1)), _pair_labels(shapes.reshape(batch, 2, -1))
        tokens = _qwen_tokens(model, adapter, pixels, QWEN_SECONDS_PER_FRAME)
        loss = heads.token_loss(tokens, colours, shapes)
        _schedule(optimizer, step, lr)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == steps - 1:
            colour_logits, shape_logits = heads.logits(tokens)
            accuracy = (colour_logits.argmax(-1) == colours).float().mean().item()
            shape_accuracy = (shape_logits.argmax(-1) == shapes).float().mean().item()
            log(f"vision step {step} loss {loss.item():.3f} colour-acc {accuracy:.3f} shape-acc {shape_accuracy:.3f}")


def _qwen_batch(rng, frames, batch, tokenizer, adapter):
    samples = [make_sample(rng, frames=frames, needles=min(2, frames)) for _ in range(batch)]
    pad = -frames % adapter.temporal  # an odd count is completed by repeating the last frame, as the adapter does
    video = np.stack([s.frames for s in samples])
    labels = torch.from_numpy(np.stack([s.labels for s in samples]))  # [B, F, cells, 2]
    if pad:
        video = np.concatenate([video, np.repeat(video[:, -1:], pad, axis=1)], axis=1)
        labels = torch.cat([labels, labels[:, -1:].expand(-1, pad, -1, -1)], dim=1)
    tokens = (frames + pad) // adapter.temporal * (QWEN_SIZE // adapter.factor) ** 2
    prompt = [adapter.input_ids(tokenizer, s.question, tokens)[0] for s in samples]
    vocab = tokenizer.get_vocab()
    answers = torch.tensor([vocab[s.answer] for s in samples])
    eos = torch.full((batch, 1), tokenizer.eos_token_id)
    input_ids = torch.cat([torch.stack(prompt), answers[:, None], eos], dim=1)
    pixels = qwen_pixels(video)
    colour = torch.tensor([COLOURS.index(s.question.split()[-2]) for s in samples])
    colour_labels, shape_labels = _pair_labels(labels[..., 0]), _pair_labels(labels[..., 1])
    return input_ids, pixels, answers, colour, colour_labels, shape_labels


def _qwen_layout(adapter, pixels, seconds):
    """The encoded video's layout (grid and time scale) as adapter.encode_video reports it, for one sample's pixels."""
    from ..models.qwen2_5_vl import QwenVideo

    with torch.no_grad():
        return adapter.encode_video(adapter.pixels(QwenVideo(pixels, seconds)))


def train_joint_qwen(model, heads, tokenizer, steps, batch, lr, rng, log, curriculum, advance_at, deadline, answer_layer=None,
                     attend_layer=None, anneal=0, anneal_all=False):
    """The joint stage; with `anneal`, it ends once the last frame count reaches `advance_at` (or the
    time or step budget is spent), and that many more steps follow at the last frame count with
    the learning rate falling linearly to 0: at a constant 3e-3 the main model spiked from 0.98 to
    0.74 train accuracy after 1,250 steps at 16 frames and ran out of time recovering. With
    `anneal_all`, the annealing steps take the curriculum's frame counts in turn, so that the
    shorter lengths are not forgotten while the longest is learnt."""
    from .._seam import observe_attention
    from ..models import adapter_for

    adapter = adapter_for(model)
    model.model.visual.requires_grad_(False)  # merger included: trained on pairs of identical frames it would forget distinct ones
    params = [p for p in model.parameters() if p.requires_grad] + list(heads.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    level, recent, history, layouts, annealing = 0, [], [], {}, None
    for step in range(steps + anneal):
        frames = curriculum[level] if annealing is None or not anneal_all else curriculum[(step - annealing) % len(curriculum)]
        input_ids, pixels, answers, colour, colour_labels, shape_labels = _qwen_batch(rng, frames, batch, tokenizer, adapter)
        if frames not in layouts:
            layouts[frames] = _qwen_layout(adapter, pixels[0], QWEN_SECONDS_PER_FRAME)
        with torch.no_grad():
            video = _qwen_tokens(model, adapter, pixels, QWEN_SECONDS_PER_FRAME)  # [B, N, D]
        # the positions vidtok gives this prompt at inference (the same for every sample of a batch:
        # one question length, one layout); the answer and end tokens continue the text after the video
        per_sample = [adapter.model_inputs(ids[None], v, layouts[frames]) for ids, v in zip(input_ids, video)]
        inputs = dict(per_sample[0])
        inputs["input_ids"] = input_ids
        inputs["attention_mask"] = torch.ones_like(input_ids)
        inputs["position_ids"] = torch.cat([p["position_ids"] for p in per_sample], dim=1)
        inputs["mm_encoder_outputs"]["video"].pooler_output = (video.flatten(0, 1),)
        last = input_ids.shape[1] - 3  # the last prompt token predicts the answer
        attention = {}
        if attend_layer is None:
            out = model(**inputs, output_hidden_states=True, use_cache=False)
        else:
            def observe(module, query, key, scaling, **_):
                # the last prompt token's attention to the visual keys (softmax over them only, mean
                # over heads): what a guide reads; kept with its gradient
                k = key[:, :, visual].repeat_interleave(query.shape[1] // key.shape[1], dim=1)
                attention["probs"] = (torch.einsum("bhd,bhnd->bhn", query[:, :, last], k) * scaling).softmax(-1).mean(1)

            visual = (input_ids[0] == adapter.video_token_id).nonzero().squeeze(1)
            with observe_attention(model, ["text_config"], {adapter.decoder_layers[attend_layer].self_attn: observe}):
                out = model(**inputs, output_hidden_states=True, use_cache=False)
        answer_loss = F.cross_entropy(out.logits[:, last], answers) + F.cross_entropy(
            out.logits[:, last + 1], input_ids[:, -1]
        )
        probe_loss = F.cross_entropy(heads.probe(out.hidden_states[1][:, last]), colour)
        if answer_layer is not None:  # deep supervision: the answer's shape, read after LLM layer `answer_layer`
            shapes = torch.tensor([SHAPES.index(tokenizer.convert_ids_to_tokens(int(a))) for a in answers])
            probe_loss = probe_loss + F.cross_entropy(heads.answer(out.hidden_states[answer_layer + 1][:, last]), shapes)
        aux_loss = heads.token_loss(video, colour_labels, shape_labels)
        if attention:  # the queried needle's token (its colour is the video's only one of that colour)
            needle = (colour_labels == colour[:, None, None] + 1).any(-1).float()
            probe_loss = probe_loss - (attention["probs"] * needle).sum(-1).clamp(min=1e-6).log().mean()
        loss = answer_loss + 0.5 * probe_loss + 0.5 * aux_loss
        if annealing is None:
            _schedule(optimizer, step, lr)
        else:
            for group in optimizer.param_groups:
                group["lr"] = lr * (1 - (step - annealing) / anneal)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        recent = (recent + [(out.logits[:, last].argmax(-1) == answers).float().mean().item()])[-20:]
        accuracy = sum(recent) / len(recent)
        history.append({"step": step, "frames": frames, "loss": loss.item(), "accuracy": accuracy,
                        "lr": optimizer.param_groups[0]["lr"]})
        if step % 25 == 0:
            log(f"joint step {step} frames {frames} loss {loss.item():.3f} (answer {answer_loss.item():.3f} "
                f"probe {probe_loss.item():.3f} aux {aux_loss.item():.3f}) acc {accuracy:.3f}")
        if annealing is not None:
            if step + 1 - annealing >= anneal:
                log(f"step {step}: annealed, {accuracy:.3f} at {frames} frames")
                break
            continue
        finished = None
        if len(recent) == 20 and accuracy >= advance_at:
            if level + 1 < len(curriculum):
                level, recent = level + 1, []
                log(f"step {step}: curriculum -> {curriculum[level]} frames")
            elif anneal or accuracy >= 0.99:  # annealing starts once the last frame count is learnt
                finished = f"{accuracy:.3f} at {frames} frames, done"
        if finished is None and time.process_time() > deadline:
            finished = "time budget spent"
        if finished is None and step + 1 >= steps:
            finished = "step limit"
        if finished is not None:
            if not anneal:
                log(f"step {step}: {finished}")
                break
            annealing, level = step + 1, len(curriculum) - 1
            log(f"step {step}: {finished}; annealing the learning rate to 0 over {anneal} steps at {curriculum[level]} frames")
    return history


def main_qwen(args):
    from transformers import Qwen2_5_VLForConditionalGeneration

    out = Path(args.out)
    log, log_file = _training_log(out)

    torch.set_num_threads(args.threads or 1)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    if args.start:  # fine-tune a trained pair member: its tower (merger included) stays frozen, so the pair still shares it
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(args.start, dtype=torch.float32).train()
    else:
        model = build_qwen_toy_model(args.geometry, seed=args.seed).train()
    tokenizer = build_tokenizer("qwen2_5_vl")
    heads = QwenAuxHeads(model.config.text_config.hidden_size, slots=model.config.vision_config.temporal_patch_size)
    start, cpu_start = time.monotonic(), time.process_time()
    if args.start:
        log(f"starting from {args.start}; no vision stage (the tower is frozen), fresh training-only heads")
    elif args.vision_from:
        # the donor's patch embedding and blocks; the merger (whose output is this LLM's width) is trained below
        donor = Qwen2_5_VLForConditionalGeneration.from_pretrained(args.vision_from)
        for name in ("patch_embed", "blocks"):
            getattr(model.model.visual, name).load_state_dict(getattr(donor.model.visual, name).state_dict())
        del donor
        log(f"vision tower (patch embedding, blocks) from {args.vision_from}; stage 1 trains the merger only")
    if not args.start:
        train_vision_qwen(model, heads, args.vision_steps, args.batch, args.lr, rng, log, merger_only=bool(args.vision_from))
    curriculum = [int(x) for x in args.curriculum.split(",")]
    history = train_joint_qwen(
        model, heads, tokenizer, args.steps, args.batch, args.lr, rng, log, curriculum, args.advance_at,
        attend_layer=None if args.attend_layer < 0 else args.attend_layer, anneal=args.anneal, answer_layer=args.answer_probe,
        anneal_all=args.anneal_lengths == "all",
        deadline=time.process_time() + 60 * args.minutes,  # CPU time: a shared machine's load and pauses do not count
    )
    model.eval()
    seconds, cpu_seconds = time.monotonic() - start, time.process_time() - cpu_start
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    vision = model.config.vision_config
    preprocessor = qwen_preprocessor_config(vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size)
    (out / "video_preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2) + "\n")
    (out / "training.json").write_text(json.dumps({"args": vars(args), "seconds": seconds, "cpu_seconds": cpu_seconds,
                                                   "history": history[-50:]}, indent=1))
    (out / "README.md").write_text(_qwen_card(args, history, seconds, cpu_seconds))
    log(f"saved to {out} after {time.monotonic() - start:.0f} s")
    log_file.close()


def _qwen_card(args, history, seconds, cpu_seconds=None) -> str:
    final = history[-1] if history else {}
    cpu = "" if cpu_seconds is None else f" ({cpu_seconds / 60:.1f} CPU minutes, {args.threads or 1} thread(s))"
    command = f"python -m vidtok.testbed.train --family qwen2_5_vl --geometry {args.geometry} --out {args.out}"
    for flag, value, default in (("--seed", args.seed, 0), ("--start", args.start, None), ("--vision-from", args.vision_from, None),
                                 ("--minutes", args.minutes, 25.0), ("--anneal-lengths", args.anneal_lengths, "last"),
                                 ("--steps", args.steps, 8000), ("--vision-steps", args.vision_steps, 300),
                                 ("--anneal", args.anneal, 1000), ("--attend-layer", args.attend_layer, 1),
                                 ("--curriculum", args.curriculum, "1,2,4,8,16"), ("--lr", args.lr, 3e-3), ("--batch", args.batch, 32)):
        if value != default:
            command += f" {flag} {value:g}" if isinstance(value, float) else f" {flag} {value}"
    vision = (
        f"fine-tuned from `{args.start}`; the vision tower, merger included, stayed frozen"
        if args.start else
        "patch embedding and blocks copied from the main model (frozen); only its merger was trained here, in stage 1"
        if args.vision_from else "vision tower trained from scratch here (stage 1), then frozen"
    )
    attend = "" if args.attend_layer < 0 else (
        f"\n- The last prompt token's attention at LLM layer {args.attend_layer} (softmax over the visual keys, mean over heads)"
        "\n  was pulled onto the queried needle's token during training."
    )
    how = f"trained from scratch (frame counts {args.curriculum.replace(',', ', ')} in turn)"
    if args.start:
        first = f"python -m vidtok.testbed.train --family qwen2_5_vl --geometry {args.geometry} --out {args.start}"
        if args.geometry == "assistant":  # the main model's tower, which the main model's fine-tune leaves as it was
            first += f" --vision-from {args.start.replace('-assistant', '')}"
        how = (f"trained in two steps: from scratch on 1 -> 16 frames (`{first}`), then fine-tuned on "
               f"{args.curriculum.replace(',', ', ')} frames (the command below)")
    return f"""# vidtok toy Qwen2.5-VL model ({args.geometry})

A Qwen2.5-VL-architecture model (`Qwen2_5_VLForConditionalGeneration`: windowed ViT with
full-attention blocks, 2x2 patch merger, Qwen2 LLM with 3-D rotary positions) {how}, on
vidtok's synthetic needle task ("what shape is <colour> ?", frames of 64 px).
8-px patches, temporal patch 2, 2x2 merge: each pair of frames (a temporal group) is 4x4 = 16
LLM tokens, one per 16-px object cell. It is a testbed for token compression, not a general
video model.

- Command: `{command}`
- Trained {seconds / 60:.1f} minutes{cpu}; last train accuracy {final.get('accuracy', float('nan')):.3f} at {final.get('frames')} frames;
  {vision}.
- Input: frames kept at 64 px (`video_preprocessor_config.json`: min = max pixels = 4096),
  scaled to [0, 1] and normalised with the CLIP mean/std; positions as vidtok computes them for
  frames 0.25 s apart (a 16-frame synth mp4 at 4 fps).
- Training used auxiliary heads that are **not** part of this checkpoint: per merged token,
  colour/shape classifiers for each frame of its pair and the (colour, shape) objects it holds,
  and a probe asking the last prompt token to name the queried colour after LLM layer 0.{attend}
"""


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder to save the model, tokenizer and card to")
    parser.add_argument("--family", default="llava_onevision", choices=["llava_onevision", "qwen2_5_vl"], help="model family")
    parser.add_argument("--task", default="needle", choices=["needle", "mixed"],
                        help="needle: v1 from scratch; mixed: fine-tune a shipped v1 model (--start) on v1 + v2 (LLaVA-OV)")
    parser.add_argument("--start", help="the trained model folder to fine-tune (--task mixed: the v1 model; Qwen needle task: "
                                        "a pair member, its vision tower kept frozen)")
    parser.add_argument("--kinds", help="--task mixed: the v2 question kinds to train on, comma-separated (default all)")
    parser.add_argument("--v1-share", type=float, default=0.25, help="--task mixed: the share of steps on v1 needle batches")
    parser.add_argument("--geometry", default="main", help="toy geometry: main, assistant or test")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=None, help="learning rate (default 3e-3; mixed 2e-3)")
    parser.add_argument("--vision-steps", type=int, default=300)
    parser.add_argument("--steps", type=int, default=None, help="max joint steps (default 3000; Qwen 8000)")
    parser.add_argument("--minutes", type=float, default=None,
                        help="time budget of the joint stage (default 15; Qwen 25 CPU minutes, before annealing)")
    parser.add_argument("--curriculum", default=None, help="frame counts, comma-separated (default 1,2,4,8,16; mixed 16,32)")
    parser.add_argument("--advance-at", type=float, default=None, help="train accuracy that ends a curriculum stage (default 0.9)")
    parser.add_argument("--vision-from", help="copy (and freeze) the vision tower of this saved toy model instead of stage 1 "
                                              "(Qwen: its patch embedding and blocks; stage 1 then trains only the merger)")
    parser.add_argument("--answer-probe", type=int, default=None,
                        help="Qwen: also probe the answer's shape after this LLM layer (deep supervision; it did not speed up binding)")
    parser.add_argument("--attend-layer", type=int, default=1,
                        help="Qwen: supervise the last prompt token's attention at this LLM layer to the needle's token "
                             "(-1: off)")
    parser.add_argument("--anneal", type=int, default=None,
                        help="Qwen: after the joint stage, this many steps at the last frame count with the learning rate "
                             "falling to 0 (default 1000)")
    parser.add_argument("--anneal-lengths", default="last", choices=["last", "all"],
                        help="Qwen: the annealing steps run at the last frame count, or at every curriculum count in turn")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (Qwen default 1: its encoder makes thousands of tiny attention calls, "
                             "which more threads slow down)")
    args = parser.parse_args(argv)
    qwen = args.family == "qwen2_5_vl"
    if args.task == "mixed":
        if qwen:
            parser.error("--task mixed is for the toy LLaVA-OV family")
        args.curriculum = args.curriculum or "16,32"
        args.advance_at = 0.9 if args.advance_at is None else args.advance_at
        args.lr = 2e-3 if args.lr is None else args.lr
        args.steps = args.steps or 4000
        args.minutes = args.minutes or 25.0
        return main_mixed(args)
    for name, llava, qwen_default in (("curriculum", "1,2,4,8,16", "1,2,4,8,16"), ("steps", 3000, 8000), ("minutes", 15.0, 25.0),
                                      ("anneal", None, 1000), ("lr", 3e-3, 3e-3), ("advance_at", 0.9, 0.9)):
        if getattr(args, name) is None:
            setattr(args, name, qwen_default if qwen else llava)
    if not qwen and args.anneal is not None:
        parser.error("--anneal is for --family qwen2_5_vl")
    if not qwen and (args.start or args.anneal_lengths != "last"):
        parser.error("--start and --anneal-lengths with --task needle are for --family qwen2_5_vl")
    if args.start and args.vision_from:
        parser.error("--start keeps the started model's own vision tower; drop --vision-from")
    if args.family == "qwen2_5_vl":
        return main_qwen(args)
    if args.threads:
        torch.set_num_threads(args.threads)

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
