#!/usr/bin/env bash
# Reproduces the testbed results under benchmarks/results/ from the shipped toy models.
# Weights: python -m vidtok.testbed.train --out src/vidtok/testbed/assets/toy-main --geometry main
#          python -m vidtok.testbed.train --out src/vidtok/testbed/assets/toy-assistant --geometry assistant --vision-from src/vidtok/testbed/assets/toy-main
set -euo pipefail
cd "$(dirname "$0")/.."
vidtok synth data/calib --count 100 --seed 7
vidtok calibrate data/calib --model src/vidtok/testbed/assets/toy-main --plot benchmarks/results/prior-toy-main.png
vidtok calibrate data/calib --model src/vidtok/testbed/assets/toy-assistant --plot benchmarks/results/prior-toy-assistant.png
vidtok synth data/test16 --count 200 --seed 1
# --overwrite: the committed results predate result identities (README), so they are recomputed
vidtok eval data/test16 --out benchmarks/results/eval-test16 --quiet --overwrite
# harder, out of the training distribution: 32 frames, 3 needles
vidtok synth data/hard32 --count 100 --seed 3 --frames 32 --needles 3
vidtok eval data/hard32 --out benchmarks/results/eval-hard32 --methods visionzip --retentions 0.03125,0.0625,0.125,0.25 --quiet --overwrite
vidtok viz --retention 0.125 --out benchmarks/results/viz-sample.png
# the second family: the toy Qwen2.5-VL pair (weights: python -m vidtok.testbed.train --family qwen2_5_vl, README)
vidtok calibrate data/calib --model src/vidtok/testbed/assets/toy-qwen2.5-vl --plot benchmarks/results/prior-toy-qwen2.5-vl.png
vidtok calibrate data/calib --model src/vidtok/testbed/assets/toy-qwen2.5-vl-assistant --plot benchmarks/results/prior-toy-qwen2.5-vl-assistant.png
vidtok eval data/test16 --model toy-qwen2.5-vl --assistant toy-qwen2.5-vl-assistant --methods visionzip,fastv --guides none,self,assistant --retentions 0.0625,0.125,0.25 --out benchmarks/results/eval-test16-qwen2.5-vl --quiet --overwrite
# binary keyframe selection (the guide's top frames whole) beside DyToK's proportional split
vidtok eval data/test16 --methods keyframe,visionzip --guides self,assistant --retentions 0.0625,0.125,0.25 --out benchmarks/results/eval-test16-keyframe --quiet --overwrite
vidtok eval data/hard32 --methods keyframe,visionzip --guides self,assistant --retentions 0.0625,0.125,0.25 --out benchmarks/results/eval-hard32-keyframe --quiet --overwrite
# accuracy vs analytic guide cost per guide setting, the v1 pair on v1 and the hard split
python benchmarks/guide_curve.py --model src/vidtok/testbed/assets/toy-main --assistant src/vidtok/testbed/assets/toy-assistant --split data/test16 --split data/hard32 --out benchmarks/results/guide-curve
# testbed v2 and the v1 + v2 pair (weights: python -m vidtok.testbed.train --task mixed ..., README): the kinds it learnt
vidtok calibrate data/calib --model toy-v2-main --plot benchmarks/results/prior-toy-v2-main.png
vidtok calibrate data/calib --model toy-v2-assistant --plot benchmarks/results/prior-toy-v2-assistant.png
vidtok synth data/v2test --task events --kinds needle,majority --count 200 --seed 1
vidtok eval data/v2test --model toy-v2 --assistant toy-v2-assistant --methods keyframe,visionzip --guides none,self,assistant --retentions 0.0625,0.125,0.25 --out benchmarks/results/eval-v2test --quiet --overwrite
# all five kinds held out: accuracy (the pair answers only needle and majority) and evidence survival per kind
vidtok synth data/v2all --task events --count 250 --seed 2
vidtok eval data/v2all --model toy-v2 --assistant toy-v2-assistant --methods visionzip --guides none,self,assistant --retentions 0.125 --out benchmarks/results/eval-v2all --quiet --overwrite
# the cheap-guide curve on v1 + v2, the v1 + v2 pair
python benchmarks/guide_curve.py --model src/vidtok/testbed/assets/toy-v2-main --assistant src/vidtok/testbed/assets/toy-v2-assistant --split data/test16 --split data/v2test --out benchmarks/results/guide-curve-v2
