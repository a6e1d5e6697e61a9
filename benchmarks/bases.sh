#!/usr/bin/env bash
# The new bases (DiverseSelect, SegmentMerge) beside VisionZip, each alone, with the uniqueness
# split, with DyToK (self, assistant) and with the mix of prior and uniqueness, at 6.25 / 12.5 /
# 25% of the visual tokens, on four splits and both trained families (issue 23). Writes one eval
# folder per split x family under benchmarks/results/bases/ and the summary figure and table.
# About 30 CPU minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
R=benchmarks/results/bases
vidtok synth data/test16 --count 200 --seed 1
vidtok synth data/hard32 --count 100 --seed 3 --frames 32 --needles 3
vidtok synth data/scene16 --count 200 --seed 11 --scene 4
vidtok synth data/v2test --task events --kinds needle,majority --count 200 --seed 1
GRID=(--methods visionzip,diverse,segmerge --guides none,self,assistant --allocations default,uniqueness,mix
      --retentions 0.0625,0.125,0.25 --batch-size 8 --quiet)
QWEN=(--model toy-qwen2.5-vl --assistant toy-qwen2.5-vl-assistant)
for split in test16 scene16 hard32; do
  vidtok eval data/$split "${GRID[@]}" --out $R/$split-llava-ov
  vidtok eval data/$split "${QWEN[@]}" "${GRID[@]}" --out $R/$split-qwen2.5-vl
done
vidtok eval data/v2test --model toy-v2 --assistant toy-v2-assistant "${GRID[@]}" --out $R/v2test-llava-ov-v2
python benchmarks/bases_figure.py $R
