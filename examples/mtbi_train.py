"""Train an MTBI speech LLM on behaviors (see docs/mtbi.md, "MTBI end to end").

    python examples/mtbi_train.py \
        data.train_ds.input_cfg.0.manifest_filepath=behaviors.jsonl \
        encoder=whisper_small llm=qwen2_5_1_5b_instruct trainer.max_steps=20000
"""
from nemo_speechlm.models import MTBIModel
from nemo_speechlm.parts.cli import hydra_command
from nemo_speechlm.recipe import train


@hydra_command(config_path="../nemo_speechlm/conf", config_name="mtbi")
def main(cfg) -> None:
    train(cfg, MTBIModel)


if __name__ == "__main__":
    main()
