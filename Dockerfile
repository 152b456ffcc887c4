# One image for every genq role: `genq migrate`, `genq api ...`, `genq worker`.
#
#   docker build -t genq .                       # CPU-only torch (default)
#   docker build -t genq:cuda \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 .
#
# The build stage fills a virtual environment at /opt/venv; the runtime stage
# copies only that, so pip, its cache and the sources stay out of the image.

FROM python:3.11-slim AS build

# Where torch comes from. The CPU index keeps the image ~1 GB instead of
# several; point it at a CUDA index (or https://pypi.org/simple) for GPUs.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

RUN python -m venv /opt/venv

# torch first and on its own: the largest layer, rebuilt only when the index changes.
RUN pip install --index-url "$TORCH_INDEX_URL" torch

# Then the other dependencies, read from pyproject.toml, so that editing the
# code does not reinstall them. torch is already satisfied and stays as is.
WORKDIR /src
COPY pyproject.toml ./
RUN python -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' \
        > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt

# Finally the project itself (non-editable: the packages land in site-packages,
# migrations included, so /src is not needed at run time).
COPY . .
RUN pip install . \
 && genq --help > /dev/null


FROM python:3.11-slim AS runtime

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HF_HOME=/models/hf \
    TORCHINDUCTOR_CACHE_DIR=/models/hf/torchinductor \
    GENQ_DATA_DIR=/data

# A fixed non-root uid/gid, so bind-mounted model folders can be made readable to it.
# /models/hf (the Hugging Face cache) and /data (the embedded SQLite default,
# used only when GENQ_DATABASE_URL / GENQ_BROKER_URL are unset) belong to it;
# a named volume mounted there starts with that ownership.
RUN groupadd --system --gid 10001 genq \
 && useradd --system --uid 10001 --gid genq --create-home --home-dir /home/genq \
        --shell /usr/sbin/nologin genq \
 && mkdir -p /models/hf /data \
 && chown genq:genq /models/hf /data

# A C++ compiler for torch.compile: in bf16 on a CPU the worker compiles its decode
# step's attention with it at start (GENQ_COMPILE_ATTENTION); without one it serves
# uncompiled, somewhat slower, and says so in its log. The compiled kernels are kept
# in the model volume (TORCHINDUCTOR_CACHE_DIR above), so a restart reuses them.
# jemalloc: with GENQ_ALLOCATOR=auto the worker runs itself under it (cli/allocator.py).
RUN apt-get update \
 && apt-get install -y --no-install-recommends g++ libjemalloc2 \
 && rm -rf /var/lib/apt/lists/*

COPY --from=build /opt/venv /opt/venv

USER genq
WORKDIR /home/genq
VOLUME ["/models/hf"]
EXPOSE 8000

ENTRYPOINT ["genq"]
CMD ["--help"]
