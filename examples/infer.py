"""Answer prompts about audio with a speech LLM .nemo; see nemo_speechlm/inference.py (also `speechlm-infer`)."""
from nemo_speechlm.inference import main

if __name__ == "__main__":
    main()
