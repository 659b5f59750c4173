#!/usr/bin/env bash
# Wheels for the GPU device machine (no network there): downloads into .whl/ exactly the Python
# packages that machine lacks for benchmarks/gpu_check.sh (NeMo 3.0.0 [asr], lhotse, hydra, omegaconf,
# librosa, soundfile, jiwer, wandb, ...), as cp312 manylinux x86_64 wheels. Run it here (network, .venv):
#     bash benchmarks/device_wheels.sh          # idempotent: wheels already in .whl/ are kept
# A GPU session then calls the device tool's `run` with carry [".whl"] and a command starting:
#     python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit; bash benchmarks/gpu_check.sh ...
# (gpu_check.sh runs $PYTHON, else `python`, else `python3`: there /opt/torch/.venv/bin/python3, the one with
# torch.) A cheap first check in the same command:
#     python3 -c "import nemo_speechlm, nemo.collections.speechlm2, nemo.collections.asr, lightning; print(lightning.__version__)"
#
# How the list is made: the transitive Requires-Dist closure of nemo_speechlm's install_requires (no
# extras) as installed in .venv (importlib.metadata; the venv's versions), markers evaluated for
# Linux x86_64 CPython 3.12, minus what the device image already has (DEVICE below, from the device
# notes' package list of 2026-11-17; their requirements are the image's business, so the walk stops
# there). Exception: lightning. nemo_toolkit 3.0.0 pins lightning<=2.4.0 and our setup.py <2.5, so
# lightning 2.4.0 is carried and shadows the image's (2.6.x?) through PYTHONPATH; its pytorch-lightning
# requirement is the image's 2.6.6, as in .venv. (With lightning 2.6.6 instead, `import nemo_speechlm` fails:
# nv_one_logger's Trainer subclass trips overrides' signature check on save_checkpoint.) Dev-only extras (pytest, ctranslate2) are never walked.
# Pure-Python packages that PyPI has only as sdists (antlr4-python3-runtime 4.9.3, docopt, rouge-score)
# are built here into py3-none-any wheels. Wheels in .whl/ that are not on the list are removed, so
# there is one version of each package. At the end: a check that every carried wheel's Requires-Dist is
# carried or on the device (versions checked where known), the sizes, and the 64 MiB budget.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
mkdir -p .whl
grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude

exec "$PY" - <<'EOF'
import importlib.metadata as md
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name as canon, parse_wheel_filename
from packaging.version import Version

WHL = Path(".whl")
ENV = dict(python_version="3.12", python_full_version="3.12.3", sys_platform="linux", platform_system="Linux",
           platform_machine="x86_64", platform_release="", implementation_name="cpython",
           platform_python_implementation="CPython", os_name="posix")
PLATFORM = ["--python-version", "3.12", "--implementation", "cp", "--platform", "manylinux_2_28_x86_64",
            "--platform", "manylinux_2_27_x86_64", "--platform", "manylinux_2_24_x86_64",
            "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64",
            "--platform", "manylinux1_x86_64"]
# The device image's packages (/work/.library/device/KINDS.md, "Python packages already there").
DEVICE = set(map(canon, """absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs
botorch build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings
cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub
humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping
jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown
markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch
mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti
nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver
nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13
nvidia-nvtx onnx onnx-ir onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix
orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client propcache
protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest
pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex
requests rich sacrebleu safetensors scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece
sentence-transformers setuptools shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard
tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio
torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope triton typer typing-extensions
typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp""".split()))
# Versions seen there (the device notes' pip list); others are unknown and only checked by name.
DEVICE_VERSIONS = {canon(k): v for k, v in dict(
    accelerate="1.15.0", huggingface_hub="1.33.0", numpy="2.5.2", onnx="1.23.1", pytorch_lightning="2.6.6",
    safetensors="0.8.0", sentencepiece="0.2.2", tokenizers="0.23.2", torch="2.11.0", torchaudio="2.11.0",
    torchmetrics="1.9.0", torchvision="0.26.0", transformers="5.17.0", triton="3.6.0", onnxruntime="1.30.0").items()}
FORCE = {"lightning": "2.4.0"}  # carried although the image has one: nemo_toolkit 3.0.0 needs <=2.4.0


def requirements(dist_requires, extras):
    """Requirements that apply on the device for these extras (the "" extra = the plain ones)."""
    for r in dist_requires or []:
        req = Requirement(r)
        if req.marker is None or any(req.marker.evaluate({**ENV, "extra": e}) for e in extras | {""}):
            yield req


# ---------------------------------------------------------------- the list, from .venv's metadata
carry, on_device, needed_by = {}, set(), {}
todo = [(req, "nemo_speechlm") for req in requirements(md.distribution("nemo_speechlm").requires, set())]
walked = {}  # name -> extras already walked
while todo:
    req, parent = todo.pop()
    n = canon(req.name)
    needed_by.setdefault(n, set()).add(parent)
    if n in DEVICE and n not in FORCE:
        on_device.add(n)
        continue
    dist = md.distribution(req.name)
    carry[n] = FORCE.get(n, dist.version)
    new = set(req.extras) - walked.get(n, set()) if n in walked else set(req.extras) | {""}
    if not new:
        continue
    walked[n] = walked.get(n, set()) | new
    for sub in dist.requires or []:
        sreq = Requirement(sub)
        if sreq.marker is None:
            if "" in new:
                todo.append((sreq, n))
        elif any(sreq.marker.evaluate({**ENV, "extra": e}) for e in new):
            todo.append((sreq, n))
carry.pop("nemo-speechlm", None)


# ---------------------------------------------------------------- download (skip what is there)
def wheels():
    out = {}
    for f in sorted(WHL.glob("*.whl")):
        name, ver, _, _ = parse_wheel_filename(f.name)
        out.setdefault(canon(name), []).append((str(ver), f))
    return out


have = wheels()
for n, files in have.items():  # stale versions and packages no longer on the list
    for ver, f in files:
        if carry.get(n) is None or Version(ver) != Version(carry[n]):
            print(f"removing {f.name} (not on the list)")
            f.unlink()
have = wheels()
pip = [sys.executable, "-m", "pip"]
for n, ver in sorted(carry.items()):
    if n in have:
        continue
    spec = f"{n}=={ver}"
    got = subprocess.run([*pip, "download", "-q", "--no-deps", "--only-binary=:all:", *PLATFORM, "-d", str(WHL), spec],
                         capture_output=True, text=True)
    if got.returncode != 0:  # no wheel on PyPI: build one from the sdist, accepted only if pure Python
        with tempfile.TemporaryDirectory() as tmp:
            built = subprocess.run([*pip, "wheel", "-q", "--no-deps", "--no-binary", n, "-w", tmp, spec],
                                   capture_output=True, text=True)
            made = list(Path(tmp).glob("*.whl"))
            if built.returncode != 0 or len(made) != 1 or not made[0].name.endswith("-none-any.whl"):
                sys.exit(f"device_wheels: no cp312 manylinux wheel for {spec}, nor a pure-Python build:\n"
                         f"{got.stderr[-2000:]}\n{built.stderr[-2000:]}")
            os.replace(made[0], WHL / made[0].name)
            print(f"built {made[0].name} from the sdist (pure Python)")
    else:
        print(f"downloaded {spec}")
have = wheels()

# ---------------------------------------------------------------- checks
problems = []
for n, files in have.items():
    if len(files) > 1:
        problems.append(f"two versions of {n}: {[f.name for _, f in files]}")
missing = set(carry) - set(have)
problems += [f"not downloaded: {n}=={carry[n]}" for n in sorted(missing)]
carried_versions = {n: Version(files[0][0]) for n, files in have.items()}
for n, files in sorted(have.items()):
    with zipfile.ZipFile(files[0][1]) as z:
        meta = next(p for p in z.namelist() if p.endswith(".dist-info/METADATA"))
        text = z.read(meta).decode()
    reqs = [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Requires-Dist:")]
    for req in requirements(reqs, set()):
        r = canon(req.name)
        ver = carried_versions.get(r) or (Version(DEVICE_VERSIONS[r]) if r in DEVICE_VERSIONS else None)
        if r not in carried_versions and r not in DEVICE:
            problems.append(f"{n} needs {req}: neither carried nor on the device")
        elif ver is not None and req.specifier and not req.specifier.contains(ver, prereleases=True):
            where = "carried" if r in carried_versions else "device"
            problems.append(f"{n} needs {req}, but the {where} version is {ver}")

tracked = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         capture_output=True, check=True).stdout.split(b"\0")
tree = sum(os.path.getsize(p) for p in tracked if p and os.path.isfile(p))
total = sum(f.stat().st_size for files in have.values() for _, f in files)
print(f"\n{'package':<46} {'version':<12} {'bytes':>10}  file")
for n, files in sorted(have.items(), key=lambda kv: -kv[1][0][1].stat().st_size):
    ver, f = files[0]
    print(f"{n:<46} {ver:<12} {f.stat().st_size:>10}  {f.name}")
print(f"\n{len(have)} wheels, {total / 2**20:.1f} MiB in .whl/ ({total} bytes); the git tree that travels "
      f"(tracked + untracked, not ignored) {tree / 2**20:.1f} MiB; together {(total + tree) / 2**20:.1f} of 64 MiB")
print(f"packages the device has, as needed by these: {', '.join(sorted(on_device))}")
for p in problems:
    print("WARNING:", p)
sys.exit(1 if (total + tree) > 64 * 2**20 or missing else 0)
EOF
