from nemo_speechlm.models.joint_sft_model import JointSFTModel
from nemo_speechlm.models.mtbi_model import MTBIModel
from nemo_speechlm.models.speechlm_model import SpeechLMModel

__all__ = ["JointSFTModel", "MTBIModel", "SpeechLMModel"]
