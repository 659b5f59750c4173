"""A template grammar of spoken assistant requests: the demo's learnable closed domain.

The grammar (``nemo_speechlm/resources/assistant_requests.yaml``) has intents, each with a few
phrasings whose ``{slot}`` fields draw from shared word lists. Words recur across thousands of
possible sentences, so a connector trained on a few hundred utterances meets every held-out word
in training, and held-out sentences test unseen *combinations* rather than unseen words.
"""
from __future__ import annotations

import math
import random
import re
from collections import Counter
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import yaml

__all__ = ["RequestGrammar", "RequestSplit", "words_of"]

_FIELD = re.compile(r"\{([a-z_]+)(?:\.(\d+))?\}")


def words_of(sentence: str) -> list[str]:
    """Lower-case words without punctuation (apostrophes kept): the unit of vocabulary coverage."""
    return re.findall(r"[a-z']+", sentence.lower())


@dataclass(frozen=True)
class RequestSplit:
    """Training and held-out sentences; every held-out word occurs ``min_word_count``+ times in training."""

    train: list[str]
    heldout: list[str]
    min_heldout_word_count: int  # the rarest held-out word's count in training

    def coverage_line(self) -> str:
        return (f"{len(self.train)} training / {len(self.heldout)} held-out sentences (unseen combinations); "
                f"every held-out word occurs >= {self.min_heldout_word_count} times in training")


class RequestGrammar:
    """Intents -> phrasings with slots; ``size()`` counts the distinct sentences, ``sample`` draws them."""

    def __init__(self, slots: dict[str, list[str]], intents: dict[str, list[str]], source: str = "<dict>") -> None:
        for intent, templates in intents.items():
            for template in templates:
                for name, _ in _FIELD.findall(template):
                    if name not in slots:
                        raise ValueError(f"{source}: intent {intent!r} template {template!r} uses unknown slot {name!r}")
        self.slots, self.intents, self.source = slots, intents, source

    @classmethod
    def load(cls, path: str | Path | None = None) -> "RequestGrammar":
        """The shipped grammar, or a YAML file with the same ``slots``/``intents`` layout."""
        if path is None:
            text = resources.files("nemo_speechlm").joinpath("resources", "assistant_requests.yaml").read_text("utf-8")
            source = "assistant_requests.yaml"
        else:
            text, source = Path(path).read_text(encoding="utf-8"), str(path)
        data = yaml.safe_load(text)
        if not isinstance(data, dict) or not {"slots", "intents"} <= data.keys():
            raise ValueError(f"{source}: a grammar needs top-level 'slots' and 'intents' mappings")
        return cls({k: [str(v) for v in vs] for k, vs in data["slots"].items()}, data["intents"], source)

    def vocabulary(self) -> set[str]:
        words = set()
        for templates in self.intents.values():
            for template in templates:
                words.update(words_of(_FIELD.sub(" ", template)))
        for name in {n for ts in self.intents.values() for t in ts for n, _ in _FIELD.findall(t)}:
            for value in self.slots[name]:
                words.update(words_of(value))
        return words

    def _template_size(self, template: str) -> int:
        """Distinct fillings: repeated uses of one slot (``{x}``, ``{x.2}``) take distinct values."""
        uses = Counter(name for name, _ in _FIELD.findall(template))
        return math.prod(math.perm(len(self.slots[name]), k) for name, k in uses.items())

    def size(self) -> int:
        return sum(self._template_size(t) for ts in self.intents.values() for t in ts)

    def fill(self, template: str, rng: random.Random) -> str:
        chosen: dict[tuple[str, str], str] = {}
        for name, index in _FIELD.findall(template):
            taken = {v for (n, _), v in chosen.items() if n == name}
            chosen[(name, index)] = rng.choice([v for v in self.slots[name] if v not in taken])
        return _FIELD.sub(lambda m: chosen[(m.group(1), m.group(2) or "")], template)

    def sample(self, rng: random.Random) -> str:
        """Intent uniformly, then a phrasing, then slot values: every intent is equally common."""
        templates = self.intents[rng.choice(sorted(self.intents))]
        return self.fill(rng.choice(templates), rng)

    def split(self, num_train: int, num_heldout: int, seed: int = 0, min_word_count: int = 5) -> RequestSplit:
        """Distinct training sentences, then held-out sentences that are new combinations of words
        each seen at least ``min_word_count`` times in training."""
        if num_train + num_heldout > self.size() // 2:
            raise ValueError(f"{num_train}+{num_heldout} sentences is too many for a grammar of {self.size()}")
        rng = random.Random(seed)
        train: dict[str, None] = {}
        while len(train) < num_train:
            train.setdefault(self.sample(rng), None)
        counts = Counter(w for s in train for w in words_of(s))
        heldout: dict[str, None] = {}
        intents = sorted(self.intents)
        attempts = 0
        while len(heldout) < num_heldout:
            attempts += 1
            if attempts > 200 * num_heldout:
                raise ValueError(f"found only {len(heldout)} held-out sentences whose words all occur "
                                 f">= {min_word_count} times in {num_train} training sentences; train on more")
            # Held-out sentences cycle through the intents so every intent is tested.
            intent = intents[(len(heldout) + attempts // 50) % len(intents)]  # move on after 50 misses
            sentence = self.fill(rng.choice(self.intents[intent]), rng)
            if sentence in train or sentence in heldout:
                continue
            if min(counts[w] for w in words_of(sentence)) >= min_word_count:
                heldout[sentence] = None
        rarest = min(counts[w] for s in heldout for w in words_of(s)) if heldout else 0
        return RequestSplit(list(train), list(heldout), rarest)
