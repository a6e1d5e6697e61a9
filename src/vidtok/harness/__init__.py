"""Measuring tools over the public API: evaluation, calibration (keyframe-prior analysis), the speed
benchmark, analytic FLOPs and the one-call picture."""
