#!/usr/bin/env bash
# GPU check, for when a CUDA GPU is at hand (about 6-8 minutes on one H100):
#   1. the CUDA-relevant tests (compile, GPU assignment, memory, data on the device);
#   2. the default run on CUDA (small CNN, Fashion-MNIST, 2 epochs): test_acc, time, peak GPU
#      memory (and peak resident memory);
#   3. scripts/bench.py on CUDA: quantized / float training-step ratios, eager and compiled;
#   4. the digits_tiny study with 4 workers sharing the GPU (2 per GPU), against 1 worker:
#      wall ratio and identical final results;
# then one summary table. Outputs under $OUT (default: a temp dir).
#   bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
PY=${PYTHON:-python3}

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: no CUDA GPU visible (torch.cuda.is_available() is False): run it on a GPU box"
  exit 2
fi
"$PY" -c "import torch; print('gpu_check:', torch.cuda.get_device_name(0), 'x', torch.cuda.device_count(), 'torch', torch.__version__)"

status() { if [ "$1" -eq 0 ]; then echo ok; else echo "FAILED ($1)"; fi; }

# 1. tests that touch CUDA code paths (they also run without a GPU; here they see one)
t0=$SECONDS
timeout 300 "$PY" -m pytest -q -x tests/test_compile.py tests/test_gpu_assign.py \
  tests/test_memory.py tests/test_data.py > "$OUT/tests.log" 2>&1
tests_rc=$?
tests_s=$((SECONDS - t0))

# 2. the default run on the GPU
t0=$SECONDS
timeout 300 "$PY" -m qexp.cli train trainer.device=cuda trainer.epochs=2 trainer.progress=none \
  "hydra.run.dir=$OUT/default_run" > "$OUT/default_run.log" 2>&1
run_rc=$?
run_s=$((SECONDS - t0))

# 3. training-step ratios on the GPU (wall clock, synchronised)
timeout 240 "$PY" scripts/bench.py --device cuda --rounds 7 --steps 10 > "$OUT/bench.log" 2>&1
bench_rc=$?

# 4. a small study, several workers on one GPU
timeout 300 "$PY" scripts/bench_study.py --preset digits_tiny --workers 4 > "$OUT/study.log" 2>&1
study_rc=$?

"$PY" - "$OUT" <<'EOF'
import json, re, sys
from pathlib import Path
out = Path(sys.argv[1])
rows = []
m = out / "default_run" / "metrics.json"
if m.is_file():
    d = json.loads(m.read_text())
    rows += [("default run test_acc", f"{d.get('test_acc', float('nan')):.4f}"),
             ("default run train time (s)", f"{d.get('train_time_s', float('nan')):.1f}"),
             ("default run samples/s", f"{d.get('samples_per_s')}"),
             ("default run peak GPU memory (MB)", f"{d.get('peak_gpu_mb')}"),
             ("default run peak resident memory (MB)", f"{d.get('peak_rss_mb')}"),
             ("default run compiled", f"{d.get('compiled')}")]
bench = (out / "bench.log").read_text() if (out / "bench.log").is_file() else ""
model = None
for line in bench.splitlines():
    head = re.match(r"^(\w+) \(", line)
    if head:
        model = head.group(1)
    ratio = re.match(r"^\s+(\S+) / (\S+)\s+([\d.]+)", line)
    if ratio and model:
        rows.append((f"{model}: {ratio.group(1)} / {ratio.group(2)}", ratio.group(3)))
study = (out / "study.log").read_text() if (out / "study.log").is_file() else ""
for line in study.splitlines():
    if "wall ratio" in line or "identical" in line:
        rows.append(("study digits_tiny " + line.strip().split(":")[0], line.split(":")[-1].strip()))
width = max((len(k) for k, _ in rows), default=10)
print("\n| check | value |\n|---|---|")
for k, v in rows:
    print(f"| {k:<{width}} | {v} |")
EOF
echo
echo "| step | status |"
echo "|---|---|"
echo "| CUDA-relevant tests (${tests_s}s) | $(status $tests_rc) |"
echo "| default run on CUDA (${run_s}s) | $(status $run_rc) |"
echo "| bench.py on CUDA | $(status $bench_rc) |"
echo "| study, 4 workers on the GPU | $(status $study_rc) |"
echo "logs in $OUT"
[ $tests_rc -eq 0 ] && [ $run_rc -eq 0 ] && [ $bench_rc -eq 0 ] && [ $study_rc -eq 0 ]
