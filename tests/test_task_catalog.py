"""The MTBI task catalog: the shipped split rules hold, sampling never leaks held-out
prompts or tasks into training, and bad catalog files fail with clear errors."""
import re

import pytest

from nemo_speechlm.data.task_catalog import (
    EVALUATION_SPLITS,
    HELDOUT_TASK,
    SEEN_TASK_HELDOUT_PROMPT,
    SEEN_TASK_SEEN_PROMPT,
    TaskCatalog,
    TaskCatalogError,
    render_prompt,
)
from nemo_speechlm.data.task_checks import TASK_CHECKS, resolve_check

UTT_IDS = [f"utt{i:04d}" for i in range(300)]


@pytest.fixture(scope="module")
def catalog() -> TaskCatalog:
    return TaskCatalog.load()


# ---------------------------------------------------------------- shipped catalog
def test_shipped_catalog_size(catalog):
    assert len(catalog) >= 10
    assert len(catalog.heldout_tasks) >= 3
    for task in catalog:
        if [p.text for p in task.prompts_in("train")] == ["{input}"]:
            # spoken with no instruction (reply): nothing to paraphrase in training, only held out
            assert len(task.prompts_in("heldout")) >= 3, task.name
        else:
            assert len(task.prompts) >= 12, task.name
    assert "reply" in catalog.names


def test_shipped_split_rules(catalog):
    for task in catalog.training_tasks:
        assert task.prompts_in("train") and task.prompts_in("heldout"), task.name
    for task in catalog.heldout_tasks:
        assert not task.prompts_in("train"), task.name


def test_shipped_prompts_are_well_formed(catalog):
    all_texts = []
    for task in catalog:
        positions = set()
        for prompt in task.prompts:
            assert prompt.text.count("{input}") == 1, prompt.id
            start = prompt.text.startswith("{input}")
            end = prompt.text.rstrip().endswith("{input}")
            positions.add("start" if start else "end" if end else "middle")
            all_texts.append(" ".join(prompt.text.lower().split()))
        assert positions == {"start", "middle", "end"}, f"{task.name}: vary where {{input}} goes"
    assert len(all_texts) == len(set(all_texts)), "duplicate prompts"


def test_shipped_checks_resolve(catalog):
    for task in catalog:
        resolve_check(task.check)  # raises on an unknown name or bad parameters


def test_shipped_constrained_prompts_state_their_labels(catalog):
    for task in catalog:
        if task.check["name"] == "one_of":
            for prompt in task.prompts:
                assert all(label in prompt.text for label in task.check["labels"]), prompt.id
        if task.check["name"] == "yes_no":
            for prompt in task.prompts:
                assert re.search(r"\byes\b", prompt.text, re.I) and re.search(r"\bno\b", prompt.text, re.I), prompt.id


# --------------------------------------------------------------------- sampling
def test_training_prompts_are_train_prompts_of_train_tasks(catalog):
    prompts = catalog.training_prompts()
    assert prompts
    assert all(catalog.task(p.task).split == "train" and p.split == "train" for p in prompts)
    assert {catalog.evaluation_split(p) for p in prompts} == {SEEN_TASK_SEEN_PROMPT}


def test_sampling_never_returns_heldout_prompts_or_tasks(catalog):
    heldout_tasks = {t.name for t in catalog.heldout_tasks}
    seen = set()
    for utt_id in UTT_IDS:
        for prompt in catalog.sample_training_prompts(utt_id, tasks_per_utterance=4, prompts_per_task=2):
            assert prompt.task not in heldout_tasks and prompt.split == "train", prompt.id
            seen.add(prompt)
    # The sampler reaches the whole training pool, not a corner of it.
    assert seen == set(catalog.training_prompts())


def test_sampling_respects_counts(catalog):
    for utt in ("utt", "utt2", "utt3"):
        prompts = catalog.sample_training_prompts(utt, tasks_per_utterance=3, prompts_per_task=2)
        tasks = [p.task for p in prompts]
        assert len(set(tasks)) == 3
        # two prompts each, or all a task has (reply has one)
        assert all(tasks.count(t) == min(2, len(catalog.task(t).prompts_in("train"))) for t in set(tasks))
        assert len(set(prompts)) == len(prompts)
    n_train_tasks = len(catalog.training_tasks)
    assert len(catalog.sample_training_prompts("utt", n_train_tasks, 1)) == n_train_tasks
    with pytest.raises(ValueError, match="tasks_per_utterance"):
        catalog.sample_training_prompts("utt", n_train_tasks + 1, 1)
    with pytest.raises(ValueError, match="prompts_per_task"):
        catalog.sample_training_prompts("utt", 1, 100)


def test_a_task_with_fewer_train_prompts_gives_all_it_has(tmp_path):
    """A task trained on one wording (the bare utterance) beside tasks with many: ``prompts_per_task`` 2 takes
    both of the others' and the one of it, instead of refusing every count above 1."""
    path = write_catalog(tmp_path, """  respond:
    split: train
    description: Reply to the utterance.
    check: differs_from_input
    prompts:
      - {text: "{input}", split: train}
      - {text: "Reply to this: {input}", split: heldout}
  summarize:
    split: train
    description: Summarize.
    check: one_sentence
    prompts:
      - {text: "Summarize: {input}", split: train}
      - {text: "Sum up: {input}", split: train}
      - {text: "Give the gist: {input}", split: heldout}
""")
    catalog = TaskCatalog.load(path)
    prompts = catalog.sample_training_prompts("utt", tasks_per_utterance=2, prompts_per_task=2)
    assert sorted(p.text for p in prompts) == ["Sum up: {input}", "Summarize: {input}", "{input}"]
    with pytest.raises(ValueError, match=r"prompts_per_task must be in 1\.\.2"):
        catalog.sample_training_prompts("utt", 2, 3)


def test_sampling_is_deterministic_per_utterance_and_seed(catalog):
    first = [catalog.sample_training_prompts(u, 3, 2) for u in UTT_IDS[:50]]
    again = [TaskCatalog.load().sample_training_prompts(u, 3, 2) for u in UTT_IDS[:50]]
    assert first == again
    other_seed = [catalog.sample_training_prompts(u, 3, 2, seed=1) for u in UTT_IDS[:50]]
    assert first != other_seed
    assert len({tuple(p.id for p in ps) for ps in first}) > 1  # varies across utterances


# ------------------------------------------------------------------- evaluation
def test_evaluation_split_mapping(catalog):
    train_task = catalog.training_tasks[0]
    heldout_task = catalog.heldout_tasks[0]
    assert catalog.evaluation_split(train_task.prompts_in("train")[0]) == SEEN_TASK_SEEN_PROMPT
    assert catalog.evaluation_split(train_task.prompts_in("heldout")[0]) == SEEN_TASK_HELDOUT_PROMPT
    assert catalog.evaluation_split(heldout_task.prompts[0]) == HELDOUT_TASK


def test_evaluation_prompts_cover_every_prompt_once(catalog):
    by_split = {s: catalog.evaluation_prompts(s) for s in EVALUATION_SPLITS}
    assert all(catalog.evaluation_split(p) == s for s, ps in by_split.items() for p in ps)
    every = [p for ps in by_split.values() for p in ps]
    assert sorted(p.id for p in every) == sorted(p.id for t in catalog for p in t.prompts)
    assert {p.task for p in by_split[HELDOUT_TASK]} == {t.name for t in catalog.heldout_tasks}


def test_evaluation_prompts_per_task_is_capped_and_deterministic(catalog):
    capped = catalog.evaluation_prompts(HELDOUT_TASK, prompts_per_task=2, seed=3)
    assert len(capped) == 2 * len(catalog.heldout_tasks)
    assert capped == catalog.evaluation_prompts(HELDOUT_TASK, prompts_per_task=2, seed=3)
    with pytest.raises(ValueError, match="seen_task_heldout_prompt"):
        catalog.evaluation_prompts("heldout_prompts")


def test_render_prompt_keeps_braces_in_the_input(catalog):
    prompt = catalog.task("summarize").prompts[0]
    assert prompt.render("a {weird} transcript") == prompt.text.replace("{input}", "a {weird} transcript")
    assert render_prompt("Say: {input}!", "hi") == "Say: hi!"
    with pytest.raises(ValueError, match="exactly once"):
        render_prompt("no placeholder", "hi")


# ------------------------------------------------------------------ task lookup
def test_unknown_task_name_lists_known_tasks(catalog):
    for error in (KeyError, ValueError):
        with pytest.raises(error) as info:
            catalog.task("summarise")
        assert "summarise" in str(info.value) and "summarize" in str(info.value)


def test_select_subset(catalog):
    subset = catalog.select(["translate_de", "summarize"])
    assert subset.names == ["summarize", "translate_de"]  # file order
    assert {p.task for p in subset.training_prompts()} == {"summarize"}
    with pytest.raises(KeyError, match="no_such_task"):
        catalog.select(["summarize", "no_such_task"])


# ------------------------------------------------------------------- bad files
GOOD_TASK = """\
  summarize:
    split: train
    description: One-sentence summary.
    check: one_sentence
    prompts:
      - {text: "Summarize: {input}", split: train}
      - {text: "{input} In one sentence, please.", split: heldout}
"""


def write_catalog(tmp_path, tasks_yaml: str, header: str = "tasks:\n"):
    path = tmp_path / "tasks.yaml"
    path.write_text(header + tasks_yaml)
    return path


def load_error(path) -> str:
    with pytest.raises(TaskCatalogError) as info:
        TaskCatalog.load(path)
    return str(info.value)


def test_small_valid_catalog_loads(tmp_path):
    catalog = TaskCatalog.load(write_catalog(tmp_path, GOOD_TASK))
    assert catalog.names == ["summarize"]
    task = catalog.task("summarize")
    assert task.check == {"name": "one_sentence"} and task.ground_truth is None and task.max_new_tokens is None


def test_unknown_key_names_file_line_task_and_key(tmp_path):
    path = write_catalog(tmp_path, GOOD_TASK.replace("    check:", "    chek: x\n    check:"))
    msg = load_error(path)
    assert f"{path}:3" in msg and "task 'summarize'" in msg and "chek" in msg


def test_unknown_top_level_key(tmp_path):
    assert "taks" in load_error(write_catalog(tmp_path, GOOD_TASK, header="taks: 1\ntasks:\n"))


def test_bad_task_split(tmp_path):
    msg = load_error(write_catalog(tmp_path, GOOD_TASK.replace("split: train\n    desc", "split: dev\n    desc")))
    assert "field 'split'" in msg and "'dev'" in msg


def test_bad_prompt_split(tmp_path):
    msg = load_error(write_catalog(tmp_path, GOOD_TASK.replace("split: heldout}", "split: test}")))
    assert "prompts[1].split" in msg and "'test'" in msg


@pytest.mark.parametrize(
    "text, problem",
    [
        ("Summarize this.", "exactly once"),
        ("Summarize {input} and {input}.", "exactly once"),
        ("Summarize {text}: {input}", "braces"),
        ("Summarize: {input", "exactly once"),
        ("summarize:   {INPUT}", "exactly once"),
    ],
)
def test_bad_placeholder(tmp_path, text, problem):
    msg = load_error(write_catalog(tmp_path, GOOD_TASK.replace("Summarize: {input}", text)))
    assert "prompts[0].text" in msg and problem in msg


def test_duplicate_prompt(tmp_path):
    task = GOOD_TASK + '      - {text: "summarize:   {input}", split: train}\n'
    msg = load_error(write_catalog(tmp_path, task))
    assert "prompts[2].text" in msg and "duplicate of prompts[0]" in msg


def test_duplicate_task_name(tmp_path):
    assert "duplicate key 'summarize'" in load_error(write_catalog(tmp_path, GOOD_TASK + GOOD_TASK))


def test_train_task_needs_heldout_and_train_prompts(tmp_path):
    no_heldout = GOOD_TASK.replace("split: heldout}", "split: train}")
    assert "at least one heldout prompt" in load_error(write_catalog(tmp_path, no_heldout))
    no_train = GOOD_TASK.replace("split: train}", "split: heldout}")
    assert "at least one train prompt" in load_error(write_catalog(tmp_path, no_train))


def test_heldout_task_with_train_prompt(tmp_path):
    task = GOOD_TASK.replace("split: train\n    desc", "split: heldout\n    desc")
    msg = load_error(write_catalog(tmp_path, task))
    assert "heldout task" in msg and "marked train" in msg


def test_bad_ground_truth_metric(tmp_path):
    task = GOOD_TASK.replace("    prompts:", "    ground_truth: {field: text, metric: accuracy}\n    prompts:")
    msg = load_error(write_catalog(tmp_path, task))
    assert "ground_truth.metric" in msg and "wer" in msg and "accuracy" in msg


def test_bad_max_new_tokens(tmp_path):
    task = GOOD_TASK.replace("    prompts:", "    max_new_tokens: 0\n    prompts:")
    assert "max_new_tokens" in load_error(write_catalog(tmp_path, task))


def test_not_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("tasks: [unclosed\n")
    assert str(bad) in load_error(bad) and "not valid YAML" in load_error(bad)
    assert "cannot read" in load_error(tmp_path / "missing.yaml")


def test_unknown_check_name_lists_known_checks(tmp_path):
    msg = load_error(write_catalog(tmp_path, GOOD_TASK.replace("check: one_sentence", "check: one_sentense")))
    assert "field 'check'" in msg and "one_sentense" in msg
    assert all(name in msg for name in TASK_CHECKS)


def test_bad_check_parameters(tmp_path):
    task = GOOD_TASK.replace("check: one_sentence", "check: {name: short, max_wordz: 5}")
    msg = load_error(write_catalog(tmp_path, task))
    assert "field 'check'" in msg and "max_wordz" in msg


def test_check_with_parameters_loads(tmp_path):
    task = GOOD_TASK.replace("check: one_sentence", "check: {name: one_of, labels: [positive, negative]}")
    check = TaskCatalog.load(write_catalog(tmp_path, task)).task("summarize").check
    assert check == {"name": "one_of", "labels": ["positive", "negative"]}
