#!/usr/bin/env bash
# Attack throughput on one GPU: the evaluator's per-chunk work (clean pass, AutoAttack stage by stage, FMN, FMN from
# AutoAttack's adversarial examples) on pyautoattack's CIFAR-shaped ResNet-18 (examples/model_test.pt), with the
# model as loaded ("plain") and prepared by bench.performance.fast_model ("fast"), against a bare pyautoattack
# run_standard_evaluation on the same inputs. There is no CIFAR here: the inputs are random images pushed by gradient
# ascent on the model's logit margin to margins spread over 5..40 (see benchmarks/attack_throughput.py), 256 of them
# as one chunk, AutoAttack-standard, Linf 8/255, full float32 (TF32 off, deterministic cuDNN).
#
# Sized to finish within 8 minutes on one H100; the figures are written to OUT_DIR/gpu_throughput.json after every
# run, so a run cut off by the time limit keeps the runs it finished (the bare run goes first).
#
# Usage:
#   benchmarks/gpu_throughput.sh [OUT_DIR] [extra attack_throughput.py options]
#   N=4 DEVICE=cpu benchmarks/gpu_throughput.sh /tmp/gpu-check --margin 2:4   # the same path, tiny, on a CPU
# Environment: PYTHON (default .venv/bin/python if present, else python), N (256), DEVICE (cuda),
#              LIMIT_S (470, the wall-clock limit of the Python run).
set -euo pipefail

cd "$(dirname "$0")/.."
out=${1:-gpu-throughput}
shift || true
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python; fi
fi
mkdir -p "$out"

"$PYTHON" - <<'EOF' | tee "$out/device.txt"
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
for i in range(torch.cuda.device_count()):
    print(i, torch.cuda.get_device_name(i))
EOF
if command -v nvidia-smi >/dev/null; then nvidia-smi >"$out/nvidia-smi.txt" 2>&1 || true; fi

timeout "${LIMIT_S:-470}" "$PYTHON" benchmarks/attack_throughput.py \
    --model resnet18-test --device "${DEVICE:-cuda}" --n "${N:-256}" --version standard \
    --variants plain,fast --bare --min-seconds 0.5 --json "$out/gpu_throughput.json" "$@" \
    2>&1 | tee "$out/gpu_throughput.log"
