import math

import pytest
import torch

from vidtok import DyToK, FrameSignals, Full, Random, Uniform, VisionZip, adapter_for
from vidtok.compressors.diverse import DiverseSelect
from vidtok.compressors.segmerge import SegmentMerge
from vidtok.compressors.visionzip import visionzip_frame


def slow_visionzip(features, attention, metric, dominant, contextual):
    """Loop-by-loop VisionZip reference (independent of the tensor implementation)."""
    tokens = features.shape[0]
    order = sorted(range(tokens), key=lambda i: (-float(attention[i]), i))
    dom = order[:dominant]
    rest = [i for i in range(tokens) if i not in dom]
    if contextual == 0:
        return dom, [features[i] for i in dom]
    step = max(1, len(rest) // contextual)
    targets = [rest[p] for p in range(0, len(rest), step)][:contextual]
    members = {t: [] for t in targets}
    for i in rest:
        if i in targets:
            continue
        sims = []
        for t in targets:
            a, b = metric[i].double(), metric[t].double()
            sims.append(float(a @ b / (a.norm() * b.norm())))
        members[targets[max(range(len(targets)), key=lambda k: (sims[k], -k))]].append(i)
    merged = []
    for t in targets:
        extra = torch.stack([features[m] for m in members[t]]).mean(0) if members[t] else torch.zeros_like(features[t])
        merged.append(features[t] + extra)
    return dom + targets, [features[i] for i in dom] + merged


@pytest.mark.parametrize("dominant, contextual", [(6, 1), (12, 2), (3, 0), (0, 4), (10, 6)])
def test_visionzip_matches_slow_reference(dominant, contextual):
    g = torch.Generator().manual_seed(dominant * 10 + contextual)
    features, attention, metric = torch.randn(16, 5, generator=g), torch.rand(16, generator=g), torch.randn(16, 3, generator=g)
    index, tokens = visionzip_frame(features, attention, metric, dominant, contextual)
    ref_index, ref_tokens = slow_visionzip(features, attention, metric, dominant, contextual)
    assert index.tolist() == ref_index
    torch.testing.assert_close(tokens, torch.stack(ref_tokens))


def test_visionzip_split_matches_the_reference_pairs():
    vz = VisionZip()
    assert [vz.split(b) for b in (147, 98, 49, 35, 14)] == [(126, 21), (84, 14), (42, 7), (30, 5), (12, 2)]


def test_visionzip_contextual_token_adds_members_mean():
    features = torch.tensor([[10.0], [0.0], [1.0], [3.0]])
    attention = torch.tensor([1.0, 0.0, 0.0, 0.0])
    metric = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.1], [1.0, 0.2]])
    index, tokens = visionzip_frame(features, attention, metric, dominant=1, contextual=1)
    # token 0 dominant; target is token 1, members 2 and 3: 0 + mean(1, 3) = 2 (added, not averaged with the target)
    assert index.tolist() == [0, 1]
    assert tokens[:, 0].tolist() == [10.0, 2.0]


def signals(frames, tokens, seed=0):
    g = torch.Generator().manual_seed(seed)
    return FrameSignals(attention=torch.rand(frames, tokens, generator=g), metric=torch.randn(frames, tokens, 4, generator=g))


@pytest.mark.parametrize("compressor", [Uniform(), Random(seed=3), VisionZip()])
@pytest.mark.parametrize("budgets", [[16, 0, 5, 1], [3, 3, 3, 3], [16, 16, 16, 16], [0, 0, 0, 1]])
def test_kept_count_is_the_budget_and_order_is_spatial(compressor, budgets):
    features = torch.randn(4, 16, 8)
    tokens, kept = compressor.compress(features, budgets, signals(4, 16))
    assert [len(k) for k in kept] == budgets
    assert tokens.shape == (sum(budgets), 8)
    for k in kept:
        assert k == sorted(k) and len(set(k)) == len(k) and all(0 <= i < 16 for i in k)
    if budgets == [16] * 4:
        assert torch.equal(tokens, features.flatten(0, 1))


@pytest.mark.parametrize("compressor", [Uniform(), Random(seed=3), VisionZip(), DiverseSelect(), SegmentMerge(0.5)])
def test_a_batch_compresses_as_each_video_alone(compressor):
    # videos of different frame counts and budgets, signals with a companion width: one call = one call each
    g = torch.Generator().manual_seed(5)
    videos = []
    for frames, budgets in ((4, [16, 0, 5, 1]), (2, [3, 7]), (3, [5, 5, 1])):
        sig = signals(frames, 16, seed=frames)
        videos.append((torch.randn(frames, 16, 8, generator=g), budgets, FrameSignals(sig.attention, sig.metric, width=6)))
    together = compressor.compress_batch(videos)
    assert len(together) == 3
    for (features, budgets, sig), (tokens, kept) in zip(videos, together):
        alone_tokens, alone_kept = compressor.compress(features, budgets, sig)
        assert kept == alone_kept
        assert torch.allclose(tokens, alone_tokens, atol=1e-6, rtol=0)
    assert compressor.per_frame == (type(compressor) in (Uniform, VisionZip, DiverseSelect))


def test_a_batch_of_different_token_grids_or_bad_budgets():
    sig = signals(2, 16)
    a = (torch.randn(2, 16, 8), [4, 4], sig)
    b = (torch.randn(2, 9, 8), [4, 4], signals(2, 9))  # another grid: compressed alone, still right
    for (features, budgets, s), (tokens, kept) in zip((a, b), VisionZip().compress_batch([a, b])):
        assert kept == VisionZip().compress(features, budgets, s)[1]
    # a mistake names its video and that video's own frame, not a position in the joined batch
    with pytest.raises(ValueError, match="video 1 of the batch: frame 1: budget 17 outside 0..16"):
        VisionZip().compress_batch([a, (torch.randn(2, 16, 8), [4, 17], sig)])
    with pytest.raises(ValueError, match="video 1 of the batch: 3 budgets for 2 frames"):
        Uniform().compress_batch([a, (torch.randn(2, 16, 8), [1, 1, 1], sig)])
    # signals of another video's frame count: refused, never lined up with the wrong frames after joining
    with pytest.raises(ValueError, match=r"video 0 of the batch: its attention is of shape \(3, 16\)"):
        VisionZip().compress_batch([(torch.randn(1, 16, 8), [4], signals(3, 16)), (torch.randn(3, 16, 8), [4, 4, 4], signals(1, 16))])


def test_a_subclass_with_its_own_selection_batches_one_video_at_a_time():
    class Positional(Uniform):  # reads where a frame is: joining videos would shift it
        def select_frames(self, features, frames, budget, signals):
            return super().select_frames(features, frames, budget + 0 * frames[0], signals)

    class Declared(Positional):
        per_frame = True

    class Renamed(VisionZip):
        name = "renamed"

    assert (Positional.per_frame, Declared.per_frame, Renamed.per_frame, Uniform.per_frame) == (False, True, True, True)


def test_order_flag_keeps_the_compressors_own_order():
    features = torch.randn(1, 16, 8)
    sig = signals(1, 16)
    _, kept = VisionZip(spatial_order=False).compress(features, [7], sig)
    top = torch.sort(sig.attention[0], descending=True, stable=True).indices[:6].tolist()
    assert kept[0][:6] == top


def test_uniform_is_an_even_stride():
    _, kept = Uniform().compress(torch.randn(1, 16, 2), [4])
    assert kept == [[2, 6, 10, 14]]


def test_random_is_seeded():
    features = torch.randn(2, 16, 2)
    assert Random(seed=1).compress(features, [5, 5])[1] == Random(seed=1).compress(features, [5, 5])[1]
    assert Random(seed=1).compress(features, [5, 5])[1] != Random(seed=2).compress(features, [5, 5])[1]


def test_visionzip_without_signals_is_a_clear_error():
    with pytest.raises(ValueError, match="attention"):
        VisionZip().compress(torch.randn(1, 16, 2), [4])


@pytest.mark.parametrize("bad", [0, -0.5, 1.5])
def test_bad_retention(bad):
    with pytest.raises(ValueError, match="retention"):
        VisionZip(retention=bad)
    with pytest.raises(ValueError, match="retention"):
        DyToK(Uniform(), retention=bad)


def test_dytok_checks_its_arguments():
    with pytest.raises(TypeError, match="base compressor"):
        DyToK("visionzip")
    with pytest.raises(ValueError, match="guide"):
        DyToK(Uniform(), guide="other")
    with pytest.raises(ValueError, match="cap"):
        DyToK(Uniform(), cap=0)
    with pytest.raises(ValueError, match="exceeds"):
        DyToK(Uniform(), cap=17).budgets([1, 1], 4, 16)
    with pytest.raises(ValueError, match="Full"):
        Full(retention=0.5)
    assert DyToK(VisionZip(retention=0.3)).retention == 0.3
    assert DyToK(VisionZip(retention=0.3), retention=0.1).retention == 0.1


def test_vision_signals_match_eager_reference(model):
    """Attention received and mean keys, pooled, against SigLIP's own eager attention weights."""
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    adapter = adapter_for(model)
    encoded = adapter.encode_video(pixels, signals=True)
    features, _, sig = encoded.features, encoded.newline, encoded.signals
    tower = model.model.vision_tower
    tower.set_attn_implementation("eager")
    try:
        out = tower(pixels, output_attentions=True, output_hidden_states=True)
    finally:
        tower.set_attn_implementation("sdpa")
    received = out.attentions[-1].double().mean(dim=(1, 2))  # [F, N]: mean over heads and queries
    grid = int(math.isqrt(received.shape[1]))
    pooled = torch.nn.functional.interpolate(received.reshape(2, 1, grid, grid), size=(grid // 2, grid // 2), mode="bilinear")
    torch.testing.assert_close(sig.attention.double(), pooled.reshape(2, -1), atol=1e-6, rtol=1e-5)
    assert sig.metric.shape[:2] == features.shape[:2]


@pytest.mark.parametrize("seed", range(4))
def test_visionzip_over_a_video_matches_the_slow_reference_frame_by_frame(seed):
    """Frames with equal budgets are selected together (one vectorised call): each frame must still
    be exactly what the loop-by-loop reference keeps of it."""
    g = torch.Generator().manual_seed(seed)
    frames, tokens = 9, 16
    features, attention, metric = torch.randn(frames, tokens, 5, generator=g), torch.rand(frames, tokens, generator=g), torch.randn(frames, tokens, 3, generator=g)
    budgets = torch.randint(0, tokens + 1, (frames,), generator=g).tolist()
    budgets[1] = budgets[4] = budgets[7] = 7  # a group sharing one budget
    compressor = VisionZip()
    out, kept = compressor.compress(features, budgets, FrameSignals(attention=attention, metric=metric))
    expected_tokens, expected_kept = [], []
    for f, budget in enumerate(budgets):
        if budget in (0, tokens):
            index = list(range(budget))
            chosen = [features[f, i] for i in index]
        else:
            index, chosen = slow_visionzip(features[f], attention[f], metric[f], *compressor.split(budget))
        order = sorted(range(len(index)), key=lambda k: index[k])
        expected_kept.append([index[k] for k in order])
        expected_tokens += [chosen[k] for k in order]
    assert kept == expected_kept
    torch.testing.assert_close(out, torch.stack(expected_tokens) if expected_tokens else out[:0])
