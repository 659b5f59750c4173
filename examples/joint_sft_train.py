"""Train a joint speech-text SFT model (VoiceTextBlender) on a blend of four data types.

    python examples/joint_sft_train.py \
        data.train_ds.audio.input_cfg.0.manifest_filepath=asr.jsonl \
        data.train_ds.audio.input_cfg.1.manifest_filepath=ast.jsonl \
        data.train_ds.audio.input_cfg.2.manifest_filepath=sqa.jsonl \
        data.train_ds.audio.input_cfg.3.manifest_filepath=mixed_modal.jsonl \
        data.train_ds.text.input_cfg.0.manifest_filepath=text_sft.jsonl \
        trainer.devices=8
"""
from nemo_speechlm.models import JointSFTModel
from nemo_speechlm.parts.cli import hydra_command
from nemo_speechlm.recipe import train


@hydra_command(config_path="../nemo_speechlm/conf", config_name="joint_sft")
def main(cfg) -> None:
    train(cfg, JointSFTModel)


if __name__ == "__main__":
    main()
