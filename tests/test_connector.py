"""The connector options (output RMSNorm at the LLM's embedding scale, word-wide context), the CTC
pre-alignment onto the LLM's embeddings, and the listening diagnostics, on the tiny real model."""
import json

import pytest
import torch

from nemo_speechlm.data.conversations import cut_for_audio
from nemo_speechlm.evaluation.listening import CONDITIONS, listening_diagnostics, listening_table
from nemo_speechlm.models import SpeechLMModel
from nemo_speechlm.modules.adapters import FrameStackingAdapter
from nemo_speechlm.modules.perception import embedding_rms
from nemo_speechlm.inference import load_entry_audio
from nemo_speechlm.parts.connector_ctc import (connector_ctc_loss, connector_transcripts, embed_vocabulary, pretrain_connector_ctc,
                                               transcript_targets, transcript_vocabulary)
from tests.conftest import model_config, run_on_ranks, run_python

ADAPTER = "nemo_speechlm.modules.adapters.FrameStackingAdapter"


def adapter_cfg(**extra):
    return {"_target_": ADAPTER, "input_dim": "${..encoder.d_model}", "output_dim": 0, "stack": 2, "hidden_dim": 32, **extra}


@pytest.fixture(scope="module")
def model(assets):
    torch.manual_seed(0)
    cfg = model_config(assets["llm"])
    cfg.perception.modality_adapter = adapter_cfg(output_rms="auto", context_kernel=3)
    return SpeechLMModel(cfg)


def utterances(assets):
    lines = [json.loads(line) for line in assets["manifest"].read_text().splitlines()]
    return [(cut_for_audio(str(assets["manifest"].parent / e["audio_filepath"]), 0.0, e["duration"]), e["text"]) for e in lines]


def test_output_rms_auto_is_the_llm_embedding_scale_and_is_stored_as_a_number(model):
    expected = embedding_rms(model.llm)
    assert model.cfg.perception.modality_adapter.output_rms == pytest.approx(expected)
    with torch.no_grad():
        out = model.perception.modality_adapter(torch.randn(2, 32, 20) * 50, torch.tensor([20, 12]))[0]
    rms = out.transpose(1, 2).pow(2).mean(-1).sqrt()
    assert rms[0].tolist() == pytest.approx([expected] * rms.shape[1], rel=1e-3)  # whatever the input's scale


def test_context_kernel_sees_neighbours_but_never_padding():
    torch.manual_seed(0)
    adapter = FrameStackingAdapter(input_dim=4, output_dim=6, stack=2, hidden_dim=8, context_kernel=3).eval()
    x = torch.randn(1, 4, 12)
    base = adapter(x, torch.tensor([12]))[0]
    changed = x.clone()
    changed[:, :, 6:8] += 5.0 * torch.randn(4, 2)  # position 3 (not a constant shift: LayerNorm would remove it)
    out = adapter(changed, torch.tensor([12]))[0]
    moved = (out - base).abs().sum(1)[0] > 1e-6
    assert moved.tolist() == [False, False, True, True, True, False]  # positions 2-4: a 3-wide window
    # A shorter row padded with garbage gives the same outputs as the row alone.
    padded = torch.cat([x[:, :, :8], torch.randn(1, 4, 4) * 100], dim=2)
    alone = adapter(x[:, :, :8], torch.tensor([8]))[0]
    assert torch.allclose(adapter(padded, torch.tensor([8]))[0][:, :, :4], alone, atol=1e-5)


def test_ctc_loss_prefers_the_spoken_tokens(model):
    tokenizer = model.tokenizer.tokenizer
    vocabulary = transcript_vocabulary(tokenizer, ["hello world", "good morning"])
    embeddings = model.embed_tokens.weight.detach()
    blank = torch.zeros(1, embeddings.shape[1])
    ids = tokenizer("hello world", add_special_tokens=False).input_ids
    gap = torch.zeros(embeddings.shape[1])  # scores every class alike, so blank or repeat: CTC stays feasible
    exact = torch.stack([v for i in ids for v in (embeddings[i] * 10, gap)])  # the tokens' own embeddings, sharpened
    wrong = torch.stack([v for i in reversed(ids) for v in (embeddings[i] * 10, gap)])
    target = [transcript_targets(tokenizer, vocabulary, "hello world")]
    vocabulary_embeddings = embed_vocabulary(model, vocabulary)
    assert torch.equal(vocabulary_embeddings, embeddings[list(vocabulary)])  # in class order
    assert connector_ctc_loss([exact], target, vocabulary_embeddings, blank) < \
        connector_ctc_loss([wrong], target, vocabulary_embeddings, blank)


def test_pre_alignment_lowers_the_ctc_loss_and_trains_only_the_adapter(assets):
    torch.manual_seed(0)
    cfg = model_config(assets["llm"])
    cfg.perception.modality_adapter = adapter_cfg(output_rms="auto")
    model = SpeechLMModel(cfg)
    frozen = {n: p.clone() for n, p in model.named_parameters() if not n.startswith("perception.modality_adapter")}
    # 60 steps: the random tiny encoder runs in eval mode (its BatchNorm on untrained running statistics)
    result = pretrain_connector_ctc(model, utterances(assets), steps=60, lr=2e-2, batch_size=8)
    assert result["final_loss"] < 0.95 * result["first_loss"], result
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


def test_pre_alignment_does_not_depend_on_the_randomness_used_before_it(assets):
    """SpecAugment draws from torch's generator: stage 1 seeds its own (forked) one, so the aligned connector
    is the same whatever ran before it (the demo's stage 1 changed with the behaviors' size before)."""
    aligned = []
    for earlier_draws in (0, 1000):
        torch.manual_seed(0)
        cfg = model_config(assets["llm"])
        cfg.perception.modality_adapter = adapter_cfg(output_rms="auto", spec_augment={"time_masks": 2, "time_width": 3})
        model = SpeechLMModel(cfg)
        torch.rand(earlier_draws)
        after_earlier = torch.get_rng_state()
        pretrain_connector_ctc(model, utterances(assets), steps=4, lr=2e-2, batch_size=4, seed=3)
        assert torch.equal(torch.get_rng_state(), after_earlier)  # the caller's generator is left as it was
        aligned.append(model.perception.modality_adapter.state_dict())
    assert all(torch.equal(aligned[0][k], aligned[1][k]) for k in aligned[0])


@pytest.mark.slow
def test_training_script_runs_the_pre_alignment(assets, tmp_path):
    from tests.test_training import run_train_script

    log = run_train_script(assets, tmp_path, ["connector_pretraining.steps=3", "model.perception.modality_adapter.output_rms=auto"])
    assert "Connector pre-alignment: {'steps': 3" in log


def test_listening_diagnostics_table_and_conditions(model, assets, tmp_path):
    prompt = "Repeat: <|audio|>"
    results = listening_diagnostics(model, assets["manifest"], prompt, train_manifest=assets["manifest"],
                                    num_utterances=3, max_new_tokens=4, out_dir=tmp_path)
    assert set(results) == set(CONDITIONS) - {"connector_ctc"} and all(r["n"] == 3 for r in results.values())
    texts = [json.loads(line)["text"] for line in assets["manifest"].read_text().splitlines()][:3]
    assert [e["reference"] for e in results["speech"]["examples"]] == texts
    table = (tmp_path / "listening.md").read_text()
    assert table == listening_table(results) + "\n" and table.count("\n") == len(CONDITIONS) + 1
    with pytest.raises(ValueError, match="exactly one audio locator"):
        listening_diagnostics(model, assets["manifest"], "no locator", num_utterances=1)
    with pytest.raises(ValueError, match="at least 2 utterances"):  # shuffled audio would replay the utterance itself
        listening_diagnostics(model, assets["manifest"], prompt, num_utterances=1)


def test_listening_cli_prints_the_table(model, assets, tmp_path):
    nemo = tmp_path / "m.nemo"
    model.save_to(str(nemo))
    out = run_python(
        "import sys; sys.argv = ['evaluate.py', 'listening', '--model', %r, '--manifest', %r, '--num-utterances', '2',"
        " '--max-new-tokens', '3', '--out-dir', %r, '--prompt', 'Repeat: <|audio|>']\n"
        "import runpy; runpy.run_path(%r, run_name='__main__')\n"
        % (str(nemo), str(assets["manifest"]), str(tmp_path / "eval"), str(__import__("tests.conftest").conftest.REPO / "examples" / "evaluate.py"))
    )
    assert "| zero_audio | 2 |" in out and "| shuffled_audio | 2 |" in out
    assert (tmp_path / "eval" / "listening.json").is_file()


def test_recurrent_context_never_reads_padding_and_spec_augment_acts_only_in_training():
    torch.manual_seed(0)
    adapter = FrameStackingAdapter(input_dim=4, output_dim=6, stack=2, hidden_dim=8, rnn_layers=1, rnn_dim=6,
                                   spec_augment={"freq_masks": 1, "freq_width": 2, "time_masks": 1, "time_width": 3}).eval()
    x = torch.randn(1, 4, 12)
    alone = adapter(x[:, :, :8], torch.tensor([8]))[0]
    padded = torch.cat([x[:, :, :8], torch.randn(1, 4, 4) * 100], dim=2)
    assert torch.allclose(adapter(padded, torch.tensor([8]))[0][:, :, :4], alone, atol=1e-5)
    changed = x.clone()
    changed[:, :, 10:12] += 5.0 * torch.randn(4, 2)  # the last position: a bidirectional GRU carries it to the first
    assert not torch.allclose(adapter(changed, torch.tensor([12]))[0][:, :, 0], adapter(x, torch.tensor([12]))[0][:, :, 0])
    assert torch.equal(adapter(x, torch.tensor([12]))[0], adapter(x, torch.tensor([12]))[0])  # eval: no masks
    adapter.train()
    torch.manual_seed(1)
    masked = [adapter(x, torch.tensor([12]))[0] for _ in range(3)]
    assert not all(torch.allclose(m, masked[0]) for m in masked[1:])


def test_ctc_readout_collapses_to_the_spoken_tokens_embeddings():
    from nemo_speechlm.modules.ctc_readout import CTCReadout

    torch.manual_seed(0)
    embeddings = torch.nn.functional.normalize(torch.randn(20, 16), dim=1)
    table = torch.nn.Embedding.from_pretrained(embeddings)
    readout = CTCReadout(16)
    readout.set_vocabulary([3, 7, 11])
    read = lambda outputs: readout([outputs], table)[0]  # noqa: E731 - one utterance
    with torch.no_grad():
        readout.blank.copy_(torch.nn.functional.normalize(torch.randn(1, 16), dim=1))
    blank, a, b = readout.blank[0].detach(), embeddings[3], embeddings[7]
    sharp = lambda *vs: torch.stack([v * 50 for v in vs])  # noqa: E731 - near one-hot posteriors
    # "a a _ b b _ b _" -> a, b, b (a repeat across a blank is a new token, as in CTC)
    out = read(sharp(a, a, blank, b, b, blank, b, blank))
    assert torch.allclose(out[1:-1], torch.stack([a, b, b]), atol=1e-3)
    assert torch.equal(out[0], readout.boundaries[0]) and torch.equal(out[-1], readout.boundaries[1])
    assert readout.greedy_token_ids(sharp(a, a, blank, b, b, blank, b, blank), readout.vocabulary_embeddings(table)) == [3, 7, 7]
    # Silence (all blank) still gives one position, so a prompt never loses its speech span.
    assert read(sharp(blank, blank, blank)).shape == (3, 16)
    # The gated residual starts closed and opens with training.
    with torch.no_grad():
        readout.residual_gate.fill_(0.5)
    assert torch.allclose(read(sharp(a))[1], a + 0.5 * a * 50, atol=1e-3)
    # Another model's vocabulary size loads (the table is resized).
    other = CTCReadout(16)
    other.load_state_dict(readout.state_dict())
    assert other.token_ids.tolist() == [3, 7, 11] and other.ready
    # A read-out saved when the gate was a scalar loads too.
    older = CTCReadout(16)
    older.load_state_dict({**readout.state_dict(), "residual_gate": torch.tensor(0.5)})
    assert older.residual_gate.tolist() == [0.5]


def test_ctc_readout_model_needs_pre_alignment_then_reads_fewer_positions(assets):
    torch.manual_seed(0)
    cfg = model_config(assets["llm"])
    cfg.perception.modality_adapter = adapter_cfg(output_rms="auto", rnn_layers=1, rnn_dim=16)
    cfg.ctc_readout = True
    model = SpeechLMModel(cfg)
    features = [torch.randn(30, model.cfg.perception.modality_adapter.input_dim)]
    with pytest.raises(RuntimeError, match="connector_pretraining"):
        model.adapt(features)
    pretrain_connector_ctc(model, utterances(assets), steps=30, lr=1e-2, batch_size=8)
    assert model.ctc_readout.ready and "ctc_readout.token_ids" in model.state_dict()
    raw, read = model.adapt(features, readout=False)[0], model.adapt(features)[0]
    assert raw.shape[0] == 15 and 3 <= read.shape[0] <= raw.shape[0] + 2
    # What the connector alone hears: one greedy CTC transcript per clip, made of training-transcript tokens.
    lines = [json.loads(line) for line in assets["manifest"].read_text().splitlines()][:2]
    audio = [load_entry_audio({**e, "audio_filepath": str(assets["manifest"].parent / e["audio_filepath"])}, model.sampling_rate)
             for e in lines]
    heard = connector_transcripts(model, audio)
    ids = model.ctc_readout.greedy_token_ids(raw, model.ctc_readout.vocabulary_embeddings(model.embed_tokens))
    assert len(heard) == 2 and all(isinstance(t, str) for t in heard)
    assert set(ids) <= set(model.ctc_readout.token_ids.tolist()) and len(ids) in (read.shape[0] - 2, 0)  # 0: all blank
    quote = model.tokenizer.tokenizer(' "', add_special_tokens=False).input_ids[-1]
    assert torch.equal(read[0], model.embed_tokens.weight[quote])  # the boundaries start as quotation marks


def test_freeze_connector_trains_only_the_readout_gate_and_boundaries_through_the_llm(assets, tmp_path):
    from omegaconf import OmegaConf

    from nemo_speechlm.recipe import pre_align_connector

    lines = [json.loads(line) for line in assets["manifest"].read_text().splitlines()]
    manifest = tmp_path / "train.json"
    manifest.write_text("".join(json.dumps({**e, "audio_filepath": str(assets["manifest"].parent / e["audio_filepath"])}) + "\n"
                                for e in lines))
    pre = OmegaConf.create({"steps": 10, "lr": 1e-2, "batch_size": 8, "manifest_filepath": str(manifest), "freeze_connector": True})
    cfg = model_config(assets["llm"], freeze_params=[r"^llm\..+$", r"^perception\.encoder\..+$"])  # as mtbi.yaml
    cfg.perception.modality_adapter = adapter_cfg(output_rms="auto", rnn_layers=1, rnn_dim=16)
    cfg.ctc_readout = True
    expected = {"ctc_readout.residual_gate", "ctc_readout.boundaries"}
    for resuming in (False, True):  # resuming: no pre-alignment (the checkpoint has it), the same parameters train
        torch.manual_seed(0)
        model = SpeechLMModel(cfg)
        pre_align_connector(pre, model, None, None, resuming=resuming)
        assert model.ctc_readout.ready != resuming
        optimizer = model.configure_optimizers()  # what Lightning trains
        optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
        trained = {id(p) for group in optimizer.param_groups for p in group["params"]}
        assert {n for n, p in model.named_parameters() if id(p) in trained} == expected
    cfg.ctc_readout = False
    with pytest.raises(ValueError, match="ctc_readout"):
        pre_align_connector(pre, SpeechLMModel(cfg), None, None, resuming=False)


@pytest.mark.parametrize("batch_size", [3, 1])  # 3: shares of 2 and 1 utterances; 1: rank 1's share is empty
def test_pre_alignment_split_across_two_ranks_is_the_one_process_step(model, assets, tmp_path, batch_size):
    """With a process group (several devices), each rank computes its share of every batch and the gradients
    are summed over the ranks (2 gloo processes): the aligned connector is one process's, up to summation order."""
    def pre_align(rank: int) -> tuple:
        result = pretrain_connector_ctc(model, utterances(assets), steps=4, lr=2e-2, batch_size=batch_size, seed=3)
        return result, {k: v.clone() for k, v in model.perception.modality_adapter.state_dict().items()}

    one_result, one = run_on_ranks(pre_align, 1, tmp_path)[0]
    for result, got in run_on_ranks(pre_align, 2, tmp_path).values():
        assert result["first_loss"] == pytest.approx(one_result["first_loss"], rel=1e-5)  # the whole batch's loss
        for key in one:
            torch.testing.assert_close(got[key], one[key], atol=1e-5, rtol=1e-4, msg=lambda m, key=key: f"{key}: {m}")
    before = model.perception.modality_adapter.state_dict()  # the parent's model, untouched by the forked runs
    assert any(not torch.equal(one[k], before[k]) for k in one)


def test_pre_alignment_encodes_as_inference_does(assets):
    """Without a feature cache stage 1 runs the encoder itself: in eval mode, so the Conformer's BatchNorm uses
    (and keeps) its running statistics, and an utterance's features do not depend on the rest of the batch."""
    torch.manual_seed(0)
    cfg = model_config(assets["llm"])
    cfg.perception.modality_adapter = adapter_cfg()
    model = SpeechLMModel(cfg)
    before = {n: b.clone() for n, b in model.perception.encoder.named_buffers() if "running" in n}
    assert before
    pretrain_connector_ctc(model, utterances(assets), steps=2, lr=2e-2, batch_size=4)
    assert all(torch.equal(b, before[n]) for n, b in model.perception.encoder.named_buffers() if n in before)


def test_listening_diagnostics_answer_under_the_recorded_system_prompt_unless_told(model, assets, monkeypatch):
    """``evaluate.py listening`` asks every condition under the system prompt the model trained under; ``--system-prompt
    ''`` asks without one."""
    from omegaconf import open_dict

    asked = []
    encode = type(model).encode_prompt
    monkeypatch.setattr(type(model), "encode_prompt",
                        lambda self, prompt, system_prompt=None: asked.append(system_prompt) or encode(self, prompt, system_prompt))
    with open_dict(model.cfg):
        model.cfg.system_prompt = "Be brief."
    try:
        for given, want in [(None, "Be brief."), ("", None)]:
            asked.clear()
            listening_diagnostics(model, assets["manifest"], "Repeat: <|audio|>", num_utterances=2, max_new_tokens=2,
                                  system_prompt=given)
            assert asked and set(asked) == {want}
    finally:
        with open_dict(model.cfg):
            model.cfg.system_prompt = None
