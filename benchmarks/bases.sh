#!/usr/bin/env bash
# The new bases (DiverseSelect, SegmentMerge) beside VisionZip, each alone, with the uniqueness
# split, with DyToK (self, assistant) and with the mix of prior and uniqueness, at 6.25 / 12.5 /
# 25% of the visual tokens, on four splits and both trained families (issue 23); then how far each
# shipped assistant's frame weights agree with its main model's. Writes one eval folder per split x
# family under benchmarks/results/bases/, the summary figure and table, and guide-agreement.txt.
# About an hour on 2 idle cores; every eval resumes where a killed run stopped.
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
vidtok eval data/test16 "${GRID[@]}" --out $R/test16-llava-ov
vidtok eval data/test16 "${QWEN[@]}" "${GRID[@]}" --out $R/test16-qwen2.5-vl
vidtok eval data/v2test --model toy-v2 --assistant toy-v2-assistant "${GRID[@]}" --limit 100 --out $R/v2test-llava-ov-v2
vidtok eval data/hard32 "${GRID[@]}" --out $R/hard32-llava-ov
vidtok eval data/scene16 "${GRID[@]}" --out $R/scene16-llava-ov
vidtok eval data/scene16 "${QWEN[@]}" "${GRID[@]}" --limit 100 --out $R/scene16-qwen2.5-vl
vidtok eval data/hard32 "${QWEN[@]}" "${GRID[@]}" --out $R/hard32-qwen2.5-vl
python benchmarks/bases_figure.py $R
vidtok synth data/calib --count 100 --seed 7
out=benchmarks/results/guide-agreement.txt
: > $out
for pair in "toy-main toy-assistant" "toy-qwen2.5-vl toy-qwen2.5-vl-assistant" "toy-v2-main toy-v2-assistant"; do
  set -- $pair
  echo "\$ vidtok calibrate data/calib --model $1 --assistant $2 --limit 60 --dry-run" >> $out
  vidtok calibrate data/calib --model $1 --assistant $2 --limit 60 --dry-run 2>/dev/null | tail -2 >> $out
done
