#!/usr/bin/env bash
# One-command GPU check of avatarl: environment, GPU tests, multi-GPU DDP, short bf16 training runs and
# the throughput benchmark at the seed's default model, with every number gathered into one JSON.
#
#   scripts/gpu_check.sh                 # a CUDA machine: about 3-8 min on one H100, no network needed
#   scripts/gpu_check.sh --cpu-dry-run   # the same steps, tiny and on the CPU: proves the script end to end
#
# Writes $OUT/gpu_check.json (./gpu-check-out when OUT is unset) and one log per step beside it.
# Environment: PYTHON (default: .venv/bin/python when present, else python3); DATA_PATH (default: the first
# tinyshakespeare.txt in ../shared/data, shared/data, data or ~/.cache/avatarl); GPU_TYPE (the MFU peak
# when the device name is not recognised); GPU_CHECK_COMPILE=0 skips the torch.compile benchmark.
# Wheels in .whl/ (e.g. python-dotenv, pytest) are installed offline into a temporary site first.
# Exit status: 0 when every step that ran passed, 1 otherwise.
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DRY=0
case "${1:-}" in
    --cpu-dry-run) DRY=1 ;;
    "") ;;
    *) echo "usage: $0 [--cpu-dry-run]" >&2; exit 2 ;;
esac
DIR="${OUT:-$PWD/gpu-check-out}"
mkdir -p "$DIR"
DIR="$(cd "$DIR" && pwd)"
: > "$DIR/steps.tsv"
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$REPO/.venv/bin/python" ]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON=python3; fi
fi
STARTED=$SECONDS
WORK="$(mktemp -d "${TMPDIR:-/tmp}/avatarl-gpu-check.XXXXXX")"  # checkpoints and wheels: not worth returning
trap 'rm -rf "$WORK"' EXIT
cd "$REPO" || exit 1

say() { printf '\n=== %s\n' "$*"; }

# step NAME TIMEOUT_S CMD...: run with a time limit, log to $DIR/NAME.log, record "name rc seconds".
step() {
    local name=$1 limit=$2 begin=$SECONDS rc
    shift 2
    say "$name (limit ${limit}s)"
    timeout --kill-after=10 "$limit" "$@" > "$DIR/$name.log" 2>&1
    rc=$?
    tail -n 25 "$DIR/$name.log"
    printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - begin))" >> "$DIR/steps.tsv"
    echo "--- $name: exit $rc after $((SECONDS - begin))s"
    return $rc
}

skip() {  # skip NAME REASON
    say "$1 skipped: $2"
    printf '%s\tskipped\t0\t%s\n' "$1" "$2" >> "$DIR/steps.tsv"
}

# --- offline extras: wheels carried in .whl/ go into a private site, ahead of the repo on PYTHONPATH
SITE="$WORK/site"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G "$REPO/.whl/*.whl" > /dev/null; then
    say "installing $(ls "$REPO"/.whl/*.whl | wc -l) wheel(s) from .whl/ into $SITE"
    if "$PYTHON" -m pip install --quiet --no-index --no-deps --target "$SITE" "$REPO"/.whl/*.whl; then
        export PYTHONPATH="$SITE:$PYTHONPATH"
    else  # pure-python wheels import straight from the zip
        for wheel in "$REPO"/.whl/*.whl; do export PYTHONPATH="$wheel:$PYTHONPATH"; done
    fi
fi
export PYTHONUNBUFFERED=1 USE_WANDB=false

# --- corpus: no network on the GPU machine, so it must be found locally
if [ -z "${DATA_PATH:-}" ]; then
    for candidate in "$REPO/../shared/data/tinyshakespeare.txt" "$REPO/shared/data/tinyshakespeare.txt" \
                     "$REPO/data/tinyshakespeare.txt" "$HOME/.cache/avatarl/tinyshakespeare.txt"; do
        if [ -f "$candidate" ]; then DATA_PATH="$candidate"; break; fi
    done
fi
if [ -z "${DATA_PATH:-}" ]; then
    echo "error: no tinyshakespeare.txt found; set DATA_PATH to a local UTF-8 text file" >&2
    exit 1
fi
export DATA_PATH

say "environment"
if command -v nvidia-smi > /dev/null; then nvidia-smi 2>&1 | tee "$DIR/nvidia-smi.txt"; else
    echo "nvidia-smi not found" | tee "$DIR/nvidia-smi.txt"; fi
"$PYTHON" - "$DIR/env.json" <<'EOF'
import importlib, json, platform, sys
import torch
info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}
for module in ("flash_attn", "dotenv", "tqdm", "numpy", "pytest", "avatarl"):
    try:
        info[module] = getattr(importlib.import_module(module), "__version__", "installed")
    except Exception as err:  # a missing optional module is a fact to report, not a failure here
        info[module] = f"missing ({type(err).__name__}: {err})"
json.dump(info, open(sys.argv[1], "w"), indent=2)
print(json.dumps(info, indent=2))
EOF
GPUS=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
if [ "$DRY" = 0 ] && [ "$GPUS" = 0 ]; then
    echo "error: no CUDA device visible; use --cpu-dry-run to exercise the script on a CPU" >&2
    exit 1
fi

if [ "$DRY" = 1 ]; then
    DEVICE=cpu; TRAIN_MODEL=(--n-layer 1 --n-head 2 --n-emb 32); TRAIN_SIZE=(--batch 16 --micro-batch 8)
    BENCH=(--n-layer 1 --n-head 2 --n-emb 32 --micro-batch 4 --batch 4 --quick)
    export OMP_NUM_THREADS=1
else
    DEVICE=cuda; TRAIN_MODEL=(--n-layer 2 --n-head 4 --n-emb 128); TRAIN_SIZE=(--batch 256 --micro-batch 128)
    BENCH=(--n-layer 6 --n-head 8 --n-emb 512 --micro-batch 512 --batch 512)
fi
SHAPE=(--context-len 32 --horizon 8 --k-samples 4)
TRAIN_COMMON=(--device "$DEVICE" "${TRAIN_MODEL[@]}" "${SHAPE[@]}" --use-amp true --amp-dtype bfloat16
              --total-iters 10 --warmup-iters 2 --log-interval 5 --eval-interval 5 --eval-windows 64
              --sample-interval 0 --checkpoint-interval 5 --resume never --overwrite true)

# --- 1. GPU-marked tests (flash-attn vs SDPA, KV cache on CUDA in bf16, the benchmark on CUDA)
mapfile -t GPU_TEST_FILES < <(grep -l "mark.gpu" tests/test_*.py)  # only these: others may need extras
if "$PYTHON" -c "import pytest" 2> /dev/null; then
    step gpu_tests 120 "$PYTHON" -m pytest -m gpu -q -rs -p no:cacheprovider "${GPU_TEST_FILES[@]}"
else
    skip gpu_tests "pytest is not installed (carry its wheels in .whl/)"
fi

# --- 2. DDP across 2 ranks: NCCL on 2 GPUs; the dry run uses gloo on the CPU
if [ "$DRY" = 1 ] || [ "$GPUS" -ge 2 ]; then
    step ddp_2_ranks 150 "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node 2 -m avatarl train \
        "${TRAIN_COMMON[@]}" "${TRAIN_SIZE[@]}" --n-gpus 2 --checkpoint-dir "$WORK/ddp-ckpt"
else
    skip ddp_2_ranks "only $GPUS GPU visible: the NCCL check needs 2"
fi

# --- 3. short bf16 runs on one device: GRPO, then a referee and an AvataRL student
step train_grpo 120 "$PYTHON" -m avatarl train "${TRAIN_COMMON[@]}" "${TRAIN_SIZE[@]}" \
    --checkpoint-dir "$WORK/grpo-ckpt"
step train_referee 120 "$PYTHON" -m avatarl train-referee "${TRAIN_COMMON[@]}" "${TRAIN_SIZE[@]}" \
    --referee-iters 10 --checkpoint-dir "$WORK/avatarl-ckpt"
step train_avatarl 120 "$PYTHON" -m avatarl train "${TRAIN_COMMON[@]}" "${TRAIN_SIZE[@]}" \
    --algorithm avatarl --checkpoint-dir "$WORK/avatarl-ckpt"

# --- 4. throughput at the seed's default model (flash-attn when installed, SDPA compared inside),
#        then with the rollout's decode steps replayed from a CUDA graph, then compiled as well
step bench_eager 240 "$PYTHON" -m avatarl bench throughput --device "$DEVICE" "${BENCH[@]}" "${SHAPE[@]}" \
    --json "$DIR/bench_eager.json"
step bench_graphs 180 "$PYTHON" -m avatarl bench throughput --device "$DEVICE" "${BENCH[@]}" "${SHAPE[@]}" \
    --use-cuda-graphs true --json "$DIR/bench_graphs.json"
if [ "${GPU_CHECK_COMPILE:-1}" = 0 ]; then
    skip bench_compile "GPU_CHECK_COMPILE=0"
elif [ "$((SECONDS - STARTED))" -gt 300 ]; then
    skip bench_compile "$((SECONDS - STARTED))s already spent: keeping the check within ~8 minutes"
else
    step bench_compile 180 "$PYTHON" -m avatarl bench throughput --device "$DEVICE" "${BENCH[@]}" "${SHAPE[@]}" \
        --use-torch-compile true --use-cuda-graphs true --json "$DIR/bench_compile.json"
fi

# --- gather everything into one JSON and judge it
say "summary"
"$PYTHON" - "$DIR" "$DRY" "$WORK" <<'EOF'
import json, math, sys
from pathlib import Path

out, dry, work = Path(sys.argv[1]), sys.argv[2] == "1", Path(sys.argv[3])

def finite_metrics(run_dir):
    """Records of metrics.jsonl, and whether every number in them is finite."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return None, False
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    numbers = [v for r in records for v in r.values() if isinstance(v, (int, float))]
    return records, bool(records) and all(math.isfinite(v) for v in numbers)

steps = {}
for line in (out / "steps.tsv").read_text().splitlines():
    name, rc, seconds, *reason = line.split("\t")
    steps[name] = {"status": "skipped" if rc == "skipped" else ("pass" if rc == "0" else f"fail (exit {rc})"),
                   "seconds": int(seconds), **({"reason": reason[0]} if reason else {})}
for name, run_dir in (("train_grpo", "grpo-ckpt"), ("ddp_2_ranks", "ddp-ckpt"),
                      ("train_referee", "avatarl-ckpt/referee"), ("train_avatarl", "avatarl-ckpt")):
    if steps.get(name, {}).get("status") == "pass":
        records, finite = finite_metrics(work / run_dir)
        steps[name]["last_metrics"] = records[-1] if records else None
        divergence = [r["replica_divergence"] for r in records or [] if "replica_divergence" in r]
        if not finite:
            steps[name]["status"] = "fail (missing or non-finite metrics)"
        elif name == "ddp_2_ranks" and (not divergence or max(divergence) > 1e-6):
            steps[name]["status"] = f"fail (replicas diverged: {divergence})"
report = {"dry_run": dry, "environment": json.loads((out / "env.json").read_text()),
          "nvidia_smi": (out / "nvidia-smi.txt").read_text(), "steps": steps}
for name in ("bench_eager", "bench_graphs", "bench_compile"):
    path = out / f"{name}.json"
    if path.is_file():
        report[name] = json.loads(path.read_text())
(out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
for name, result in steps.items():
    print(f"{name:<16}{result['status']:<40}{result['seconds']:>5}s  {result.get('reason', '')}")
for name in ("bench_eager", "bench_graphs", "bench_compile"):
    if name in report:
        b = report[name]
        print(f"{name}: {b['config']['attention']}, cuda_graphs={b['config']['cuda_graphs']}, "
              f"{b['throughput']['grpo_contexts_per_s']:,.0f} GRPO contexts/s, "
              + ", ".join(f"{k} {v:.3f}" for k, v in b["ratios"].items()))
print(f"wrote {out / 'gpu_check.json'}")
sys.exit(0 if all(r["status"] in ("pass", "skipped") for r in steps.values()) else 1)
EOF
rc=$?
echo "gpu_check: $([ $rc = 0 ] && echo PASS || echo FAIL) in $((SECONDS - STARTED))s"
exit $rc
