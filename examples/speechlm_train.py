"""Plain speech SFT (speech in, transcript/answer out): the baseline MTBI and joint SFT are compared with.

    python examples/speechlm_train.py \
        data.train_ds.input_cfg.0.manifest_filepath=train.jsonl \
        'data.validation_ds={input_cfg: [{type: speechlm_manifest, manifest_filepath: dev.jsonl, prompt: "Repeat exactly what is said in the audio: <|audio|>"}], batch_size: 8}' \
        encoder=canary_1b_flash llm=qwen2_5_1_5b_instruct

(A validation input takes its own ``prompt``: it does not inherit the training input's.)
"""
from nemo_speechlm.models import SpeechLMModel
from nemo_speechlm.parts.cli import hydra_command
from nemo_speechlm.recipe import train


@hydra_command(config_path="../nemo_speechlm/conf", config_name="speechlm")
def main(cfg) -> None:
    train(cfg, SpeechLMModel)


if __name__ == "__main__":
    main()
