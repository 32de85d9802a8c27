# syntax=docker/dockerfile:1
#
# One image for every fastproxy role. The default (last) stage runs router, writer and sidecar as a
# non-root user; `--target agent` is the same image plus Debian's bcc for the eBPF node agent.
#
#   docker build -t ghcr.io/example/fastproxy:0.1.0 .
#   docker build --target agent -t ghcr.io/example/fastproxy:0.1.0-agent .
#
#   docker run --rm ghcr.io/example/fastproxy:0.1.0 router --listen 0.0.0.0:8080 --admin 0.0.0.0:9090 ...
#
# The roles are subcommands of the `fastproxy` entry point (k8s/ passes them as args).

# ---- 1. build: the project's wheel and every dependency's, nothing else ----------------------------
FROM python:3.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY fastproxy ./fastproxy
COPY statesync ./statesync
COPY probes ./probes
COPY scripts/build_compiled.py ./scripts/
# The dependencies all have manylinux wheels; the compiler is for the compiled form of the data path
# (fastproxy/proxy.py and exchange.py through Cython, from their own source: make compiled). The
# extensions land beside their .py and go into the wheel; this stage is thrown away with gcc.
RUN apt-get update \
 && apt-get install --yes --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/* \
 && pip install "cython>=3.0,<4" "setuptools>=68" \
 && python scripts/build_compiled.py \
 && pip wheel --wheel-dir /wheels .

# ---- 2. base: the installed wheel, a non-root user; shared by both targets -------------------------
FROM python:3.11-slim-bookworm AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    FASTPROXY_HEALTHCHECK_URL=http://127.0.0.1:9090/healthz
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-index --find-links=/wheels fastproxy \
 && groupadd --system --gid 10001 fastproxy \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
            --shell /usr/sbin/nologin fastproxy
# router: 8080 proxy, 9090 admin; sidecar: 8012 proxy, 9091 admin; agent: 9092 metrics
EXPOSE 8080 9090 8012 9091 9092
# /healthz of the role's admin port: the router's by default; the sidecar and the agent set
# FASTPROXY_HEALTHCHECK_URL to theirs (k8s/), the writer (no admin port) sets it empty to skip.
# Kubernetes ignores HEALTHCHECK and uses the probes in k8s/; this is for docker / compose.
HEALTHCHECK --interval=10s --timeout=3s --start-period=15s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request as r; u = os.environ.get('FASTPROXY_HEALTHCHECK_URL', ''); u and r.urlopen(u, timeout=2)"]
ENTRYPOINT ["fastproxy"]
CMD ["--help"]

# ---- 3. agent: the eBPF node agent (`docker build --target agent`) ---------------------------------
# What the agent needs, here and on the node (k8s/base/node-agent.yaml):
# - bcc: Debian's python3-bpfcc (bookworm's python3 is 3.11, like this image's, and bcc's Python
#   side is pure Python over libbcc), made importable by a .pth pointing at Debian's dist-packages;
#   it pulls clang/LLVM (~150 MB): the probe is compiled on the node, against its kernel;
# - root inside the container with CAP_BPF + CAP_PERFMON (kernel >= 5.8; else CAP_SYS_ADMIN), not
#   a privileged container, no hostNetwork;
# - the host's /lib/modules and /usr/src (kernel headers for bcc), /sys/kernel/tracing and
#   /sys/kernel/debug, mounted read-only.
FROM base AS agent
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3-bpfcc \
 && rm -rf /var/lib/apt/lists/* \
 && echo /usr/lib/python3/dist-packages > /usr/local/lib/python3.11/site-packages/debian-dist-packages.pth \
 && python -c "import bcc"
ENV FASTPROXY_HEALTHCHECK_URL=http://127.0.0.1:9092/healthz
USER root
CMD ["agent", "--check"]

# ---- 4. the default image: router, writer, sidecar, as uid 10001 ------------------------------------
FROM base AS runtime
USER 10001:10001
