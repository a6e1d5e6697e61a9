#!/usr/bin/env bash
# Does each trained pair's prior hold as the video grows (issue 24)? Per-layer calibration of every
# shipped toy model at 8, 16 and 32 frames (one needle per question), then full tokens against
# VisionZip + DyToK (assistant) at 12.5% on 200 questions at 16 and at 32 frames, both families.
# Writes benchmarks/results/lengths/: calibrate.txt and one eval folder per split x family.
# About 8 minutes on 2 idle cores.
set -euo pipefail
cd "$(dirname "$0")/.."
R=benchmarks/results/lengths
mkdir -p $R
vidtok synth data/calib8 --count 100 --seed 7 --frames 8
vidtok synth data/calib --count 100 --seed 7
vidtok synth data/calib32 --count 100 --seed 7 --frames 32
vidtok synth data/test16 --count 200 --seed 1
vidtok synth data/test32 --count 200 --seed 5 --frames 32
out=$R/calibrate.txt
: > $out
for model in toy-main toy-assistant toy-qwen2.5-vl toy-qwen2.5-vl-assistant; do
  for split in calib8 calib calib32; do
    echo "\$ vidtok calibrate data/$split --model $model --dry-run" >> $out
    vidtok calibrate data/$split --model $model --dry-run 2>/dev/null >> $out
  done
done
for split in test16 test32; do
  vidtok eval data/$split --methods full,visionzip --guides assistant --retentions 0.125 --batch-size 8 --quiet --out $R/$split-llava-ov
  vidtok eval data/$split --model toy-qwen2.5-vl --assistant toy-qwen2.5-vl-assistant --methods full,visionzip --guides assistant \
    --retentions 0.125 --batch-size 8 --quiet --out $R/$split-qwen2.5-vl
done
