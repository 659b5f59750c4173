"""Batched decoding that drops finished rows: the same answers as one at a time and as transformers' greedy
``generate``, a shared prompt prefix computed once, per-row caps, end tokens, stop strings;
``SpeechLMModel.respond`` batched vs one by one."""
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from nemo_speechlm.models import SpeechLMModel
from nemo_speechlm.parts.decoding import _shared_prefix_length, cut_at_stop, decode, length_sorted_batches, sampler
from tests.conftest import model_config

TEXTS = ["the cat sat on the mat", "hello", "please open the window now and then close it again", "what time is it"]


@pytest.fixture(scope="module")
def llm(assets):
    return AutoModelForCausalLM.from_pretrained(assets["llm"]).eval(), AutoTokenizer.from_pretrained(assets["llm"])


def left_padded(tokenizer, texts):
    rows = [tokenizer(t)["input_ids"] for t in texts]
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, row in enumerate(rows):
        ids[r, width - len(row):] = torch.tensor(row)
        mask[r, width - len(row):] = 1
    return ids, mask


def hf_greedy(model, tokenizer, text, n):
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


def test_batched_rows_equal_hf_greedy_one_at_a_time(llm):
    model, tokenizer = llm
    ids, mask = left_padded(tokenizer, TEXTS)
    rows = decode(model, ids, mask, 10, end_ids=[])
    assert [r.tokens for r in rows] == [hf_greedy(model, tokenizer, t, 10) for t in TEXTS]
    assert not any(r.finished for r in rows)
    # embeddings in place of ids give the same answers (the path speech takes)
    assert decode(model, model.get_input_embeddings()(ids), mask, 10, end_ids=[]) == rows


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_sliding_window_llms_answer_in_a_batch_as_alone(llm, family):
    """Sharing the rows' common prefix pads between it and each row's own tokens; a sliding-window mask counts
    those slots as distance, so batched answers differed from the first token on (Mistral, Gemma 2, Qwen2 with
    use_sliding_window). Such LLMs decode without the shared prefix."""
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    _, tokenizer = llm
    sizes = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, sliding_window=6)
    torch.manual_seed(0)
    model = (MistralForCausalLM(MistralConfig(**sizes)) if family == "mistral" else
             Qwen2ForCausalLM(Qwen2Config(**sizes, use_sliding_window=True, max_window_layers=0))).eval()
    texts = ["the cat sat on the mat please open the window now and then close it again my brother",
             "the cat sat on the mat please open it", "the cat sat on the mat please open tea"]
    ids, mask = left_padded(tokenizer, texts)
    assert _shared_prefix_length(ids, mask) > 6  # more than a window apart once padded
    assert [r.tokens for r in decode(model, ids, mask, 8, end_ids=[])] == [hf_greedy(model, tokenizer, t, 8) for t in texts]


def test_a_prefix_shared_by_all_rows_is_computed_once_with_the_same_answers(llm):
    model, tokenizer = llm
    texts = ["the cat sat on the mat", "the cat sat", "the cat sat on the window and looked out"]
    ids, mask = left_padded(tokenizer, texts)
    assert _shared_prefix_length(ids, mask) == len(tokenizer("the cat sat")["input_ids"]) - 1
    embeds = model.get_input_embeddings()(ids)
    assert _shared_prefix_length(embeds, mask) == _shared_prefix_length(ids, mask)
    expected = [hf_greedy(model, tokenizer, t, 8) for t in texts]
    assert [r.tokens for r in decode(model, ids, mask, 8, end_ids=[])] == expected
    assert [r.tokens for r in decode(model, embeds, mask, 8, end_ids=[])] == expected


def test_rows_leave_at_their_cap_end_token_or_stop_string(llm):
    """Rows 0 and 1 leave early (cap 2; an end token); the rows still running must not notice."""
    model, tokenizer = llm
    ids, mask = left_padded(tokenizer, TEXTS)
    reference = [hf_greedy(model, tokenizer, t, 10) for t in TEXTS]
    end = reference[1][3]
    assert all(end not in row[:10] for i, row in enumerate(reference) if i != 1) and end not in reference[1][:3]
    rows = decode(model, ids, mask, [2, 10, 10, 7], end_ids=[end])
    assert [r.tokens for r in rows] == [reference[0][:2], reference[1][:3], reference[2], reference[3][:7]]
    assert [r.finished for r in rows] == [False, True, False, False]

    stop = tokenizer.decode(reference[2][4:6])
    assert stop.strip() and stop not in tokenizer.decode(reference[2][:5])
    stopped = decode(model, ids, mask, 10, end_ids=[], stop_strings=[stop], tokenizer=tokenizer)[2]
    assert stopped.finished and stopped.tokens == reference[2][:6]
    assert cut_at_stop(tokenizer.decode(stopped.tokens), [stop]) == tokenizer.decode(reference[2][:4])


def test_sampling_is_seeded_and_near_greedy_when_cold(llm):
    model, tokenizer = llm
    ids, mask = left_padded(tokenizer, TEXTS)
    greedy = decode(model, ids, mask, 6, end_ids=[])
    assert decode(model, ids, mask, 6, end_ids=[], sample=sampler(temperature=1e-4)) == greedy
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        runs.append(decode(model, ids, mask, 6, end_ids=[], sample=sampler(temperature=1.5, top_p=0.9)))
    assert runs[0] == runs[1] != greedy


def test_length_sorted_batches_cover_every_item_once_longest_first():
    batches = length_sorted_batches([3, 9, 1, 7, 5], 2)
    assert batches == [[1, 3], [4, 0], [2]]
    with pytest.raises(ValueError):
        length_sorted_batches([1], 0)


def test_respond_batched_equals_one_at_a_time_with_speech_text_and_mixed_caps(assets):
    torch.manual_seed(0)
    model = SpeechLMModel(model_config(assets["llm"]))
    wavs = [str(p) for p in sorted((assets["root"] / "data" / "wav").glob("*.wav"))[:4]]
    audios = [wavs[0], None, wavs[1], [wavs[2], wavs[3]], None]
    prompts = ["Repeat: <|audio|>", "hello there, how are you today?", "what is said in <|audio|> ?",
               "compare <|audio|> and <|audio|>", "hi"]
    caps = [6, 3, 8, 5, 6]
    batched = model.respond(audios, prompts, batch_size=5, max_new_tokens=caps)
    single = [model.respond([a], [p], batch_size=1, max_new_tokens=c)[0] for a, p, c in zip(audios, prompts, caps)]
    assert batched == single
    assert all(batched)


def test_a_stop_string_that_is_a_special_token_ends_the_row(llm, assets):
    """Answers are decoded without special tokens, so a stop string such as ``<|im_end|>`` never matched as text
    and the row ran to its cap; it ends the row as an end token does."""
    model, tokenizer = llm
    ids, mask = left_padded(tokenizer, TEXTS)
    reference = hf_greedy(model, tokenizer, TEXTS[2], 10)
    special = AutoTokenizer.from_pretrained(assets["llm"])  # the fixture's tokenizer stays as it is
    stop = special.convert_ids_to_tokens(reference[4])
    special.add_special_tokens({"additional_special_tokens": [stop]})
    assert reference[4] not in reference[:4]
    stopped = decode(model, ids, mask, 10, end_ids=[], stop_strings=[stop], tokenizer=special)[2]
    assert stopped.finished and stopped.tokens == reference[:4]
