from nemo_speechlm.models.speechlm_model import SpeechLMModel

__all__ = ["SpeechLMModel"]
