#!/usr/bin/env bash
# One-command GPU check of avatarl: environment, GPU tests, multi-GPU DDP, short bf16 training runs, the
# throughput benchmark at the seed's default model, and the BPE path at presets/gpt2-small.env size (AvataRL
# with a Hugging Face referee: bf16 vs NF4, top-k vs full action set), every number gathered into one JSON.
#
#   scripts/gpu_check.sh                       # a CUDA machine: about 4-8 min on one H100/H200, no network needed
#   scripts/gpu_check.sh --cpu-dry-run         # the same steps, tiny and on the CPU: proves the script end to end
#   GPU_CHECK_STEPS=bpe scripts/gpu_check.sh   # only these sections of tests,ddp,train,bench,bpe (default: all)
#
# Writes $OUT/gpu_check.json (./gpu-check-out when OUT is unset) and one log per step beside it.
# Environment: PYTHON (default: .venv/bin/python when present, else python3); DATA_PATH (default: the first
# tinyshakespeare.txt in ../shared/data, shared/data, data or ~/.cache/avatarl); GPU_TYPE (the MFU peak
# when the device name is not recognised); GPU_CHECK_COMPILE=0 skips the torch.compile benchmark.
# The JSON's keys, the BPE section's included (schema avatarl.gpu_check.bpe/1), are listed in docs/performance.md.
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

STEPS=",${GPU_CHECK_STEPS:-tests,ddp,train,bench,bpe},"
wanted() { [[ "$STEPS" == *",$1,"* ]]; }  # wanted SECTION: is it one of GPU_CHECK_STEPS

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
if ! wanted tests; then
    skip gpu_tests "not in GPU_CHECK_STEPS"
elif "$PYTHON" -c "import pytest" 2> /dev/null; then
    step gpu_tests 120 "$PYTHON" -m pytest -m gpu -q -rs -p no:cacheprovider "${GPU_TEST_FILES[@]}"
else
    skip gpu_tests "pytest is not installed (carry its wheels in .whl/)"
fi

# --- 2. DDP across 2 ranks: NCCL on 2 GPUs; the dry run uses gloo on the CPU
if ! wanted ddp; then
    skip ddp_2_ranks "not in GPU_CHECK_STEPS"
elif [ "$DRY" = 1 ] || [ "$GPUS" -ge 2 ]; then
    step ddp_2_ranks 150 "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node 2 -m avatarl train \
        "${TRAIN_COMMON[@]}" "${TRAIN_SIZE[@]}" --n-gpus 2 --checkpoint-dir "$WORK/ddp-ckpt"
else
    skip ddp_2_ranks "only $GPUS GPU visible: the NCCL check needs 2"
fi

# --- 3. short bf16 runs on one device: GRPO, then a referee and an AvataRL student
if wanted train; then
    step train_grpo 120 "$PYTHON" -m avatarl train "${TRAIN_COMMON[@]}" "${TRAIN_SIZE[@]}" \
        --checkpoint-dir "$WORK/grpo-ckpt"
    step train_referee 120 "$PYTHON" -m avatarl train-referee "${TRAIN_COMMON[@]}" "${TRAIN_SIZE[@]}" \
        --referee-iters 10 --checkpoint-dir "$WORK/avatarl-ckpt"
    step train_avatarl 120 "$PYTHON" -m avatarl train "${TRAIN_COMMON[@]}" "${TRAIN_SIZE[@]}" \
        --algorithm avatarl --checkpoint-dir "$WORK/avatarl-ckpt"
else
    for name in train_grpo train_referee train_avatarl; do skip "$name" "not in GPU_CHECK_STEPS"; done
fi

# --- 4. throughput at the seed's default model (flash-attn when installed, SDPA compared inside),
#        then with the rollout's decode steps replayed from a CUDA graph, then compiled as well
if wanted bench; then
    step bench_eager 240 "$PYTHON" -m avatarl bench throughput --device "$DEVICE" "${BENCH[@]}" "${SHAPE[@]}" \
        --json "$DIR/bench_eager.json"
    step bench_graphs 180 "$PYTHON" -m avatarl bench throughput --device "$DEVICE" "${BENCH[@]}" "${SHAPE[@]}" \
        --use-cuda-graphs true --json "$DIR/bench_graphs.json"
else
    for name in bench_eager bench_graphs; do skip "$name" "not in GPU_CHECK_STEPS"; done
fi

# --- 5. the BPE path at presets/gpt2-small.env size, offline: a byte-level BPE trained on the corpus and filled
#        up to GPT-2's 50,257 ids with unused special tokens (Tiny Shakespeare supports ~21.5k; the fill keeps the
#        50,304-wide padded head of the preset), the corpus prepared with it, a random-init GPT2LMHeadModel of
#        the student's 12 x 768 shape saved with that tokenizer as the Hugging Face referee (timing needs no
#        trained one), then AvataRL steps from the trainer's own build() / train_step(): REFEREE_QUANTIZE=none
#        (bf16), nf4, and ACTION_SET=full. Eager (USE_TORCH_COMPILE=false): compiling would take most of the time.
if [ "$DRY" = 1 ]; then
    BPE=(512 1 2 32 64 4 1 2)          # vocab, n_layer, n_head, n_emb, context, micro-batch, warm-up, timed steps
else
    BPE=(50257 12 12 768 1024 16 3 10)
fi
cat > "$WORK/bpe_setup.py" <<'PY'
"""The BPE path's inputs: a BPE trained on the corpus (filled up to VOCAB ids), a random-init GPT2LMHeadModel
saved with it as the referee, and the corpus prepared with it. Writes the facts to OUT as JSON."""
import json
import subprocess
import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

work, corpus, out = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
vocab, n_layer, n_head, n_emb, context = (int(v) for v in sys.argv[4:9])
avatarl = [sys.executable, "-m", "avatarl"]
subprocess.run([*avatarl, "tokenizer", "train", "--vocab-size", str(vocab), "--output", str(work / "bpe"), corpus],
               check=True)
tok = Tokenizer.from_file(str(work / "bpe" / "tokenizer.json"))
trained = tok.get_vocab_size()
tok.add_special_tokens([f"<|unused_{i}|>" for i in range(vocab - trained)])  # never in the text: width only
fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
referee = work / "hf-referee"
fast.save_pretrained(referee)
torch.manual_seed(0)
model = GPT2LMHeadModel(GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_emb, n_positions=context,
                                   vocab_size=len(fast), bos_token_id=fast.bos_token_id,
                                   eos_token_id=fast.eos_token_id))
model.save_pretrained(referee)
subprocess.run([*avatarl, "prepare", corpus, "--output", str(work / "bpe-data"), "--tokenizer", str(referee),
                "--num-proc", "4"], check=True)
setup = {"corpus": corpus, "bpe_trained_ids": trained, "tokenizer_ids": len(fast),
         "referee": {"model": "GPT2LMHeadModel, random init", "n_layer": n_layer, "n_head": n_head, "n_embd": n_emb,
                     "n_positions": context, "vocab_size": len(fast), "parameters": model.num_parameters()}}
out.write_text(json.dumps(setup, indent=2) + "\n")
print(json.dumps(setup, indent=2))
PY
cat > "$WORK/bpe_measure.py" <<'PY'
"""AvataRL steps on the BPE data with the Hugging Face referee, one row per referee setting: the trainer's own
build() and train_step(), timed after a warm-up (CUDA synchronised around each step), peak memory per row."""
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from avatarl import distributed as D
from avatarl.progress import gpu_peak_tflops
from avatarl.config import ConfigError
from avatarl.config_sources import load_config
from avatarl.errors import first_line
from avatarl.referee import module_bytes
from avatarl.run_dir import prepare_run_dir
from avatarl.trainer import build, train_step

work, device, out = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
n_layer, n_head, n_emb, context, micro, warmup, timed = (int(v) for v in sys.argv[4:11])
common = {"DEVICE": device, "DATA_PATH": str(work / "bpe-data"), "TOKENIZER": "char",
          "REFEREE_PATH": str(work / "hf-referee"), "N_LAYER": str(n_layer), "N_HEAD": str(n_head),
          "N_EMB": str(n_emb), "CONTEXT_LEN": str(context), "BATCH": str(micro), "MICRO_BATCH": str(micro),
          "WARMUP_ITERS": "1", "TOTAL_ITERS": "100000", "USE_TORCH_COMPILE": "false", "USE_WANDB": "false",
          "LOG_INTERVAL": "100000", "EVAL_INTERVAL": "100000", "RESUME": "never", "OVERWRITE": "true"}
ROWS = {"referee_none": {"REFEREE_QUANTIZE": "none", "ACTION_SET": "topk"},
        "referee_nf4": {"REFEREE_QUANTIZE": "nf4", "ACTION_SET": "topk"},
        "action_set_full": {"REFEREE_QUANTIZE": "none", "ACTION_SET": "full"}}
cuda = device == "cuda"
gpu, peak = gpu_peak_tflops(torch.cuda.get_device_name(), "H100") if cuda else (None, None)


def sync():
    if cuda:
        torch.cuda.synchronize()


def measure(name, overrides):
    cfg, _ = load_config({**common, **overrides, "CHECKPOINT_DIR": str(work / f"bpe-run-{name}")}, environ={},
                         preset="gpt2-small")
    row = {"referee_quantize": str(cfg.referee.referee_quantize), "action_set": str(cfg.avatarl.action_set)}
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    info = D.init_distributed(cfg.run.device)
    try:
        run = build(cfg, info, "student", prepare_run_dir(cfg, "student"))
    except ConfigError as err:  # REFEREE_QUANTIZE=nf4 without CUDA or bitsandbytes: reported, not a failure
        return {**row, "status": "skipped", "reason": str(err)}
    finite = all([train_step(run) for _ in range(warmup)])
    times = []
    for _ in range(timed):
        sync()
        started = time.perf_counter()
        finite = train_step(run) and finite
        sync()
        times.append(time.perf_counter() - started)
    median = statistics.median(times)
    tokens = cfg.optim.batch * cfg.model.context_len
    referee = run.objective.referee
    lm = referee.lm  # the Hugging Face model inside HFRefereeLM
    ref_params = lm.num_parameters()  # counts 4-bit weights unpacked
    # FLOPs: F(C) per token for the student (forward + backward), a third of that estimate for the referee forward
    ref_flops = (6.0 * ref_params + 12.0 * lm.config.n_layer * lm.config.n_embd * context) / 3.0
    flops = (run.raw_model.flops_per_token(context) + ref_flops) * tokens
    memory = module_bytes(referee)
    row.update(status="pass" if finite else "fail (non-finite step)", median_s=median, min_s=min(times),
               times_s=times, tokens_per_s=tokens / median, flops_per_iter=flops,
               achieved_tflops=flops / median / 1e12, mfu=flops / median / (peak * 1e12) if cuda else None,
               peak_memory_mib=torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
               referee_memory_bytes=memory, referee_memory_mib=memory / 2**20,
               referee_dtypes=sorted({str(p.dtype).removeprefix("torch.") for p in referee.parameters()}),
               referee_parameters=ref_params, student_parameters=run.raw_model.num_params(),
               student_vocab=run.raw_model.config.vocab_size, valid_vocab=run.raw_model.config.valid_vocab_size)
    del run, referee, lm
    gc.collect()
    return row


report = {"schema": "avatarl.gpu_check.bpe/1", "device": device, "gpu": gpu, "peak_bf16_tflops": peak,
          "setup": json.loads((work / "bpe_setup.json").read_text()),
          "config": {"preset": "gpt2-small", "n_layer": n_layer, "n_head": n_head, "n_emb": n_emb,
                     "context_len": context, "micro_batch": micro, "batch": micro, "use_torch_compile": False,
                     "warmup_iters": warmup, "timed_iters": timed},
          "rows": {}}
for name, overrides in ROWS.items():
    try:
        report["rows"][name] = measure(name, overrides)
    except Exception as err:  # noqa: BLE001 - one failing row (e.g. bitsandbytes without this GPU's kernels)
        report["rows"][name] = {"referee_quantize": overrides["REFEREE_QUANTIZE"],
                                "action_set": overrides["ACTION_SET"],
                                "status": f"fail ({type(err).__name__}: {first_line(err)[:300]})"}
    print(name, json.dumps(report["rows"][name]), flush=True)
none, nf4 = report["rows"]["referee_none"], report["rows"]["referee_nf4"]
both = none["status"] == nf4["status"] == "pass"
report["ratios"] = {
    "nf4_over_none_step_time": nf4["median_s"] / none["median_s"] if both else None,
    "nf4_over_none_referee_memory": nf4["referee_memory_bytes"] / none["referee_memory_bytes"] if both else None,
    "none_minus_nf4_peak_memory_mib": none["peak_memory_mib"] - nf4["peak_memory_mib"] if both and cuda else None}
out.write_text(json.dumps(report, indent=2) + "\n")
sys.exit(0 if all(row["status"] in ("pass", "skipped") for row in report["rows"].values()) else 1)
PY
if ! wanted bpe; then
    skip bpe_setup "not in GPU_CHECK_STEPS"
    skip bpe_avatarl "not in GPU_CHECK_STEPS"
elif ! "$PYTHON" -c "import transformers" 2> /dev/null; then
    skip bpe_setup "transformers is not installed: the Hugging Face referee needs it"
    skip bpe_avatarl "transformers is not installed"
elif step bpe_setup 240 "$PYTHON" "$WORK/bpe_setup.py" "$WORK" "$DATA_PATH" "$WORK/bpe_setup.json" "${BPE[@]:0:5}"
then
    step bpe_avatarl 300 "$PYTHON" "$WORK/bpe_measure.py" "$WORK" "$DEVICE" "$DIR/bpe_avatarl.json" "${BPE[@]:1:7}"
else
    skip bpe_avatarl "bpe_setup failed"
fi

if ! wanted bench; then
    skip bench_compile "not in GPU_CHECK_STEPS"
elif [ "${GPU_CHECK_COMPILE:-1}" = 0 ]; then
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
for name in ("bench_eager", "bench_graphs", "bench_compile", "bpe_avatarl"):
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
for name, row in report.get("bpe_avatarl", {}).get("rows", {}).items():
    if row["status"] != "pass":
        print(f"bpe {name}: {row['status']} {row.get('reason', '')}")
        continue
    mfu = f", MFU {row['mfu']:.3f}" if row["mfu"] is not None else ""
    peak = f", peak {row['peak_memory_mib']:,.0f} MiB" if row["peak_memory_mib"] is not None else ""
    print(f"bpe {name}: {row['tokens_per_s']:,.0f} tokens/s{mfu}{peak}, referee {row['referee_memory_mib']:,.1f} MiB")
print(f"wrote {out / 'gpu_check.json'}")
sys.exit(0 if all(r["status"] in ("pass", "skipped") for r in steps.values()) else 1)
EOF
rc=$?
echo "gpu_check: $([ $rc = 0 ] && echo PASS || echo FAIL) in $((SECONDS - STARTED))s"
exit $rc
