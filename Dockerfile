# segstream service image. CPU by default; for NVIDIA GPUs build with
#   docker build --build-arg BASE=nvidia/cuda:12.5.1-cudnn-runtime-ubuntu22.04 --build-arg EXTRAS=gpu,gst .
ARG BASE=python:3.11-slim-bookworm
FROM ${BASE}

# gst: the low-delay RTSP reader (reader: auto, the default, picks it for RTSP cameras).
ARG EXTRAS="gst"
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 SEGSTREAM_HOME=/var/cache/segstream

# CUDA bases ship no Python; slim Python bases already have it.
# Debian/Ubuntu package versions differ per base and security updates replace them: unpinned.
# hadolint ignore=DL3008
RUN if ! command -v python3 >/dev/null; then \
      apt-get update && apt-get install -y --no-install-recommends python3 python3-pip python3-venv python3-dev \
      && rm -rf /var/lib/apt/lists/*; fi \
 && python3 -m venv /opt/venv
# GStreamer (RTSP, H.264 via libav) for the gst reader, and what PyGObject builds against
# (it has no Linux wheels): the same list as scripts/install_system_deps.sh gst.
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends \
      gstreamer1.0-plugins-base gstreamer1.0-plugins-good gstreamer1.0-libav \
      gir1.2-gstreamer-1.0 gir1.2-gst-plugins-base-1.0 \
      libgirepository1.0-dev libcairo2-dev pkg-config gcc \
 && rm -rf /var/lib/apt/lists/*
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /app
COPY pyproject.toml README.md ./
COPY models ./models
COPY stream ./stream
COPY segstream ./segstream
COPY configs ./configs
# pip pinned (the version tested). "." is this checkout: its dependencies are declared (lower
# bounds, the versions tested) in pyproject.toml, which hadolint cannot read.
# hadolint ignore=DL3013
RUN pip install --upgrade "pip==26.3" && pip install ".${EXTRAS:+[$EXTRAS]}"

# Weights are not baked in: mount a cache or let the entrypoint fetch them on first start.
VOLUME /var/cache/segstream
EXPOSE 8080
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s \
  CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2)"]
ENTRYPOINT ["/bin/sh", "-c", "segstream fetch && exec segstream serve --config /app/configs/default.yaml --host 0.0.0.0 \"$@\"", "--"]
