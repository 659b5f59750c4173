"""Sequence packing plan (``nemo_speechlm.parts.packing``); the model-level equality is in test_mtbi.py."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

from nemo_speechlm.errors import ConfigError
from nemo_speechlm.parts.packing import check_llm_keeps_packed_sequences_apart, pack_rows


def _left_padded(lengths, width):
    return torch.stack([torch.arange(width) >= width - n for n in lengths])


def test_every_real_position_is_packed_once_with_positions_from_zero():
    lengths = [50, 48, 30, 29, 12, 7, 5, 40]
    mask = _left_padded(lengths, 52)
    source, position_ids = pack_rows(mask)
    real = source[source >= 0]
    assert sorted(real.tolist()) == mask.flatten().nonzero().squeeze(1).tolist()  # each once, none invented
    assert source.shape[0] == 3  # ceil(221 / (2 x 50)) rows instead of 8
    assert (source < 0).float().mean() < 0.1  # 8 rows of 52 were 47% padding
    for row, positions in zip(source, position_ids):
        for b, n in enumerate(lengths):
            taken = (row >= b * 52) & (row < (b + 1) * 52)
            if taken.any():  # a sequence lies in one row, in order, its positions counting from 0
                assert row[taken].tolist() == list(range(b * 52 + 52 - n, (b + 1) * 52))
                assert positions[taken].tolist() == list(range(n))


def test_right_padding_and_a_single_row_pack_too():
    source, position_ids = pack_rows(~_left_padded([3, 1], 4))  # right-padded rows: [1 real], [3 real]
    assert source.tolist() == [[4, 5, 6, 0]] and position_ids.tolist() == [[0, 1, 2, 0]]  # longest first
    source, _ = pack_rows(torch.ones(1, 5, dtype=torch.bool))
    assert source.tolist() == [[0, 1, 2, 3, 4]]


def test_packing_never_computes_more_positions_than_the_padded_batch():
    """Three near-equal sequences: 2 rows would hold 100 + 99 and 98 (394 positions); the plan keeps 3 rows of 100."""
    source, _ = pack_rows(_left_padded([100, 99, 98], 100))
    assert source.numel() <= 300


@pytest.mark.parametrize("mask", [[[1, 0, 1, 1]], [[0, 0, 0, 0], [1, 1, 1, 1]]])
def test_holes_or_empty_rows_are_refused(mask):
    with pytest.raises(ValueError, match="contiguous"):
        pack_rows(torch.tensor(mask, dtype=torch.bool))


def _tiny(config_class, model_class, **sizes):
    torch.manual_seed(0)
    return model_class(config_class(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, **sizes))


def test_an_llm_that_follows_restarting_positions_passes_the_packing_check():
    llm = _tiny(LlamaConfig, LlamaForCausalLM, intermediate_size=64, num_key_value_heads=4).train()
    llm.model.layers[0].eval()  # a frozen part in eval mode, as training_step leaves it
    state = torch.random.get_rng_state()
    check_llm_keeps_packed_sequences_apart(llm)
    assert torch.equal(torch.random.get_rng_state(), state)  # draws no random numbers
    assert llm.training and not llm.model.layers[0].training and llm.model.layers[1].training  # modes restored


def test_an_llm_whose_packed_sequences_see_each_other_is_refused():
    """OPT's positions and mask follow the attention mask, so restarting position_ids do not separate sequences."""
    llm = _tiny(OPTConfig, OPTForCausalLM, ffn_dim=64).train()
    with pytest.raises(ConfigError, match="OPTForCausalLM does not keep packed sequences apart") as error:
        check_llm_keeps_packed_sequences_apart(llm)
    assert error.value.fix == "set model.pack_sequences=false"
    assert llm.training


class _LlamaSeparatingOneRowOnly(LlamaForCausalLM):
    """As transformers' flash-attention path: restarting position_ids separate packed sequences in a batch of one
    row only; a batch of several rows is attended causally over each whole row."""

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        if input_ids is not None and input_ids.shape[0] > 1 and attention_mask is None:
            attention_mask = torch.ones_like(input_ids)  # no packed-sequence detection: one causal row
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs)


def test_an_llm_that_separates_packed_sequences_in_one_row_only_is_refused():
    """Training packs several rows; a check on one row passed such an LLM, whose packed examples then saw each other."""
    llm = _tiny(LlamaConfig, _LlamaSeparatingOneRowOnly, intermediate_size=64, num_key_value_heads=4)
    with pytest.raises(ConfigError, match="does not keep packed sequences apart"):
        check_llm_keeps_packed_sequences_apart(llm)


def test_a_left_padded_row_keeps_its_positions_without_packing():
    """Without packing (``pack_sequences=false``) the model's forward gave no positions: a GPT-2-style LLM with
    learned positions numbered them from the padding, and trained padded rows on shifted ones (OPT, which cannot
    pack, numbers them from the mask itself)."""
    from types import SimpleNamespace

    from transformers import GPT2Config, GPT2LMHeadModel

    from nemo_speechlm.models.speechlm_model import SpeechLMModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4)).eval()
    embeds = model.get_input_embeddings()(torch.tensor([[5, 6, 7, 8, 9]]))
    alone = model(inputs_embeds=embeds).logits
    padded = torch.cat([torch.zeros(1, 3, embeds.shape[-1]), embeds], 1)
    logits = SpeechLMModel.forward(SimpleNamespace(llm=model), padded, torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]]))
    torch.testing.assert_close(logits[:, 3:], alone, rtol=1e-5, atol=1e-5)
