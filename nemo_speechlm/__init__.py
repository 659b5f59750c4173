"""nemo_speechlm: give text LLMs speech ability with NeMo encoders and Hugging Face LLMs.

Importing the package makes our classes instantiable by NeMo (target allow-list) and
registers our prompt formatter and lhotse data types with NeMo's registries.
"""
import logging
from pathlib import Path

# NeMo's import sets up NVIDIA's OneLogger telemetry, disabled by default, and its logger warns about
# that on every command ("No exporters were provided ..."): two lines of noise above every CLI's
# output and above its one-line error. Quieted to errors unless the user configured that logger.
if logging.getLogger("nv_one_logger").level == logging.NOTSET:
    logging.getLogger("nv_one_logger").setLevel(logging.ERROR)

from nemo.core.classes.common import ALLOWED_EXACT_CLASS_TARGETS, ALLOWED_TARGET_PREFIXES

# The shipped Hydra configs (recipes and the encoder/adapter/llm groups) and the MTBI task catalog.
CONF_DIR = Path(__file__).resolve().parent / "conf"

# NeMo refuses to instantiate `target`/`_target_` paths outside its allow-list
# (UnsafeTargetError), which would break `restore_from` of our own classes.
if "nemo_speechlm." not in ALLOWED_TARGET_PREFIXES:
    ALLOWED_TARGET_PREFIXES.append("nemo_speechlm.")
# Classes under an allowed prefix must also have a safe base (nn.Module, ...); callbacks are listed by name.
ALLOWED_EXACT_CLASS_TARGETS.add("nemo_speechlm.parts.preemption.ExitAfterStep")

from nemo_speechlm.parts import offline_models as _offline_models  # noqa: E402,F401  (config resolvers)
from nemo_speechlm.parts import prompting as _prompting  # noqa: E402,F401  (registers the chat-template formatter)
from nemo_speechlm.data import conversations as _conversations  # noqa: E402,F401  (registers data types)
from nemo_speechlm.data import behaviors as _behaviors  # noqa: E402,F401  (registers mtbi_behaviors)
from nemo_speechlm.data import joint_sft as _joint_sft  # noqa: E402,F401  (registers the joint_* SFT types)

__version__ = "0.1.0"
