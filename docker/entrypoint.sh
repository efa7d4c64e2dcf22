#!/bin/sh
# Entrypoint of the avatarl image: make the run directories usable, then replace this shell with the
# command. The `exec "$@"` matters: the trainer becomes the container's main process and receives
# `docker stop` / Kubernetes SIGTERM itself (it checkpoints and exits 0), and Modal starts its own
# runner through this same line.
set -eu

if [ "$#" -eq 0 ]; then
    set -- avatarl train
fi

# A variable with an empty value (a `NAME=` line in .env, which compose passes on as it is) means unset, for
# the libraries too: WANDB_MODE= must not stop wandb, CUDA_VISIBLE_DEVICES= must not hide every GPU.
# printenv checks each candidate name: a line of a multi-line value that looks like `NAME=` changes nothing.
for name in $(env | sed -n 's/^\([A-Za-z_][A-Za-z0-9_]*\)=$/\1/p'); do
    if [ -z "$(printenv "$name")" ]; then
        unset "$name"
    fi
done

# A container started with an arbitrary --user (HOST_UID) has no writable home; caches need one.
if [ ! -w "${HOME:-/nonexistent}" ]; then
    HOME="/tmp/avatarl-home-$(id -u)"
    export HOME
    mkdir -p "$HOME"
fi

for dir in "${CHECKPOINT_DIR:-}" "${DATA_CACHE_DIR:-}" "${HF_HOME:-}"; do
    [ -n "$dir" ] || continue
    mkdir -p "$dir" 2> /dev/null || true
    if [ ! -w "$dir" ]; then
        echo "avatarl-entrypoint: $dir is not writable by uid $(id -u)." >&2
        echo "  Fix on the host: sudo chown -R $(id -u) <the directory mounted at $dir>," >&2
        echo "  or set HOST_UID in .env to the owner of that directory." >&2
        case "$*" in
            *train*) exit 1 ;;
        esac
    fi
done

exec "$@"
