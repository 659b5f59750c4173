import pytest
import torch

from nemo_speechlm.parts.prompting import ChatTemplatePromptFormatter, encode_messages, resolve_prompt_formatter, tokenize_chat
from nemo_speechlm.parts.llm import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer(assets):
    return load_tokenizer(str(assets["llm"]), "<|audio|>")


def test_only_assistant_tokens_carry_loss_in_three_turns(tokenizer):
    hf = tokenizer.tokenizer
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "repeat <|audio|>"},
        {"role": "assistant", "content": "the cat sat"},
        {"role": "user", "content": "again"},
        {"role": "assistant", "content": "on the mat"},
        {"role": "user", "content": "thanks"},
        {"role": "assistant", "content": "please open the window"},
    ]
    out = tokenize_chat(hf, messages)
    ids, mask = out["input_ids"], out["mask"]
    assert hf.decode(ids) == hf.apply_chat_template(messages, tokenize=False)
    # the masked spans, decoded, are exactly the three answers with their end-of-turn marker
    spans, current = [], []
    for tok, m in zip(ids.tolist(), mask.tolist()):
        if m:
            current.append(tok)
        elif current:
            spans.append(hf.decode(current)); current = []
    if current:
        spans.append(hf.decode(current))
    # (not the newline ChatML writes after the marker: 5% of the demo's targets, one generation never reaches)
    assert spans == ["the cat sat<|im_end|>", "on the mat<|im_end|>", "please open the window<|im_end|>"]
    # the locator is one token, in a user turn, never a target
    loc = tokenizer.token_to_id("<|audio|>")
    assert (ids == loc).sum() == 1 and not mask[ids == loc].any()


def test_generation_prompt_ends_with_assistant_header(tokenizer):
    hf = tokenizer.tokenizer
    fmt = resolve_prompt_formatter(None, tokenizer)
    assert isinstance(fmt, ChatTemplatePromptFormatter)
    ids = encode_messages(fmt, [{"role": "user", "content": "hi"}])["context_ids"]
    assert hf.decode(ids).endswith("<|im_start|>assistant\n")


def test_a_training_dialog_splits_into_context_and_the_last_answer(tokenizer):
    hf = tokenizer.tokenizer
    fmt = resolve_prompt_formatter(None, tokenizer)
    out = encode_messages(fmt, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "the cat"},
                                {"role": "user", "content": "again"}, {"role": "assistant", "content": "on the mat"}])
    assert hf.decode(out["context_ids"]).endswith("again<|im_end|>\n<|im_start|>assistant\n")
    assert hf.decode(out["answer_ids"]) == "on the mat<|im_end|>\n"  # the template's newline, untrained, included
    assert torch.equal(torch.cat([out["context_ids"], out["answer_ids"]]), out["input_ids"])


def test_nemo_prompt_formatter_names_work(tokenizer):
    fmt = resolve_prompt_formatter("llama3", tokenizer)
    out = encode_messages(fmt, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "the cat"}])
    assert out["mask"].any() and not out["mask"].all()
    assert out["input_ids"].shape == out["mask"].shape


def test_a_system_prompt_takes_each_formats_own_system_role(tokenizer):
    """llama3 has a `system` role, llama2 only `system_and_user`, qwen neither (the system prompt starts its user turn,
    as for a chat template that refuses system turns): generation sent every NeMo format `system_and_user` (an
    AssertionError for all but llama2) and training `system`."""
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    for name, marker in (("llama3", "<|start_header_id|>system<|end_header_id|>"), ("llama2", "<<SYS>>")):
        ids = encode_messages(resolve_prompt_formatter(name, tokenizer), messages)["input_ids"]
        text = tokenizer.tokenizer.decode(ids)
        assert "Be brief." in text and marker in text, (name, text)
    qwen = resolve_prompt_formatter("qwen", tokenizer)
    assert torch.equal(encode_messages(qwen, messages)["input_ids"],
                       encode_messages(qwen, [{"role": "user", "content": "Be brief.\n\nhi"}])["input_ids"])


def test_a_template_that_refuses_system_turns_gets_the_system_prompt_in_the_first_user_turn(assets):
    """Gemma's template raises "System role not supported": a system prompt (or a text SFT line's `system`) stopped
    training at the first batch holding one. Its model card puts such instructions at the start of the user turn."""
    from transformers import AutoTokenizer

    from tests.tiny_assets import CHATML_TEMPLATE

    hf = AutoTokenizer.from_pretrained(assets["llm"])
    hf.chat_template = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
                        "{% endif %}" + CHATML_TEMPLATE)
    with_system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                   {"role": "assistant", "content": "hello"}]
    folded = [{"role": "user", "content": "Be brief.\n\nhi"}, {"role": "assistant", "content": "hello"}]
    got, expected = tokenize_chat(hf, with_system), tokenize_chat(hf, folded)
    assert got["input_ids"].tolist() == expected["input_ids"].tolist() and got["mask"].tolist() == expected["mask"].tolist()
    hf.chat_template = CHATML_TEMPLATE  # a template with a system role keeps its system turn
    assert "<|im_start|>system" in hf.decode(tokenize_chat(hf, with_system)["input_ids"])


def test_bad_messages_are_rejected(tokenizer):
    hf = tokenizer.tokenizer
    with pytest.raises(ValueError, match="role 'robot'"):
        tokenize_chat(hf, [{"role": "robot", "content": "x"}])
    with pytest.raises(ValueError, match="empty"):
        tokenize_chat(hf, [{"role": "user", "content": "x"}, {"role": "assistant", "content": " "}])



def test_an_end_of_turn_token_in_the_text_is_reported(tokenizer, caplog):
    """Its turn ends there (an answer's targets stop at it), which nothing said; found only at tokenization, hours
    into a run, it is reported rather than raised (raised, it stopped the run, and no skip_invalid could skip it)."""
    with caplog.at_level("WARNING"):
        out = tokenize_chat(tokenizer.tokenizer, [{"role": "user", "content": "x"},
                                                  {"role": "assistant", "content": "It writes <|im_end|> here."}])
    assert out["mask"].any()
    assert any("assistant text contains the chat template's end-of-turn token '<|im_end|>'" in r.message
               for r in caplog.records)


def test_non_incremental_template_is_refused(tokenizer):
    hf = tokenizer.tokenizer
    original = hf.chat_template
    # a template that renders the number of messages first cannot be masked incrementally
    hf.chat_template = "{{ messages|length }}" + original
    try:
        with pytest.raises(ValueError, match="incrementally"):
            tokenize_chat(hf, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])
    finally:
        hf.chat_template = original


def test_pad_token_is_distinct_from_eos(tokenizer):
    hf = tokenizer.tokenizer
    assert hf.pad_token_id is not None and hf.pad_token_id != hf.eos_token_id


def _recipe(recipe: str, *overrides: str):
    """A shipped recipe config with ``overrides`` (composed, not resolved)."""
    from hydra import compose, initialize_config_dir

    import nemo_speechlm

    with initialize_config_dir(config_dir=str(nemo_speechlm.CONF_DIR), version_base=None):
        return compose(recipe, overrides=list(overrides))


@pytest.mark.parametrize("recipe, overrides, given, recorded", [
    ("speechlm", ["data.train_ds.input_cfg.0.system_prompt='Be brief.'"], None, "Be brief."),
    ("mtbi", ["data.train_ds.input_cfg.0.system_prompt='Be brief.'"], "Be brief.", "Be brief."),
    ("speechlm", [], None, None),
    ("speechlm", [], "Say yes.", "Say yes."),  # given in the model config, the data has none: kept
    # joint SFT: only its text SFT conversations have a system prompt; speech is answered without one
    ("joint_sft", ["data.train_ds.text.input_cfg.0.system_prompt='Be brief.'"], None, None),
])
def test_training_records_the_speech_datas_system_prompt(recipe, overrides, given, recorded):
    from nemo_speechlm.data.datamodule import record_system_prompt

    cfg = _recipe(recipe, *overrides, f"model.system_prompt={given!r}" if given else "model.system_prompt=null")
    assert record_system_prompt(cfg) == recorded
    assert cfg.model.system_prompt == recorded


def test_speech_inputs_under_two_system_prompts_record_none_and_a_conflict_is_an_error(caplog):
    from nemo_speechlm.data.datamodule import record_system_prompt
    from nemo_speechlm.errors import ConfigError

    two = _recipe("joint_sft", "+data.train_ds.audio.input_cfg.2.system_prompt='Be brief.'")
    with caplog.at_level("WARNING", logger="nemo_logger"):
        assert record_system_prompt(two) is None
    assert "train under 2 system prompts (['Be brief.', None])" in caplog.text
    assert two.model.system_prompt is None
    conflict = _recipe("speechlm", "data.train_ds.input_cfg.0.system_prompt='Be brief.'", "model.system_prompt='Say yes.'")
    with pytest.raises(ConfigError, match="model.system_prompt is 'Say yes.' but the speech data trains under 'Be brief.'"):
        record_system_prompt(conflict)
