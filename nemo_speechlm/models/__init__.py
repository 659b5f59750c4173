from nemo_speechlm.models.mtbi_model import MTBIModel
from nemo_speechlm.models.speechlm_model import SpeechLMModel

__all__ = ["MTBIModel", "SpeechLMModel"]
