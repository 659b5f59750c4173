# Base: a NeMo Framework container that carries NeMo 3.0 (torch preinstalled, which must not be
# replaced: setup.py does not list torch). The tag below could not be checked from the
# development machines; confirm with `docker run <image> pip show nemo_toolkit` (3.0.x) and
# override with --build-arg NEMO_IMAGE=... if needed.
# This file cannot be built on the development machines (no Docker engine); every RUN step
# is a command that CI also runs (`make test` with NEMO_CONTAINER=1 runs the same installs).
ARG NEMO_IMAGE=nvcr.io/nvidia/nemo:26.02
FROM ${NEMO_IMAGE}

RUN apt-get update && apt-get install -y --no-install-recommends espeak-ng make && rm -rf /var/lib/apt/lists/*

WORKDIR /workspace/nemo_speechlm
COPY . .
RUN make setup NEMO_CONTAINER=1

# The image's check: the offline CPU/GPU test suite.
CMD ["make", "test", "NEMO_CONTAINER=1"]
