"""RULER-style synthetic long-context tasks, generated offline from a seed, and their exact-match checkers.

Tasks: ``passkey`` (a 5-digit pass key hidden in noise), ``niah_single`` (one key -> number needle),
``niah_multikey`` (several keys, one asked), ``niah_multivalue`` (one key with several values, all asked),
``variable_tracking`` (a chain of assignments ``VAR X = VAR Y`` from one number; name every variable).
A sample's prompt is filled with haystack sentences to about ``length`` tokens (chat template applied when
the tokenizer has one) and ends with an answer prefix, so the model only has to continue.
"""

from __future__ import annotations

import random
import re
import string
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import A2atsError
from .haystack import Haystack

TASKS: tuple[str, ...] = ("passkey", "niah_single", "niah_multikey", "niah_multivalue", "variable_tracking")
WORDS = (
    "apple", "river", "candle", "silver", "falcon", "garden", "marble", "violet", "thunder", "harbor",
    "copper", "meadow", "lantern", "orbit", "pepper", "saddle", "tiger", "velvet", "willow", "zephyr",
)


@dataclass
class TaskSample:
    """One prompt with its expected answers; ``score(output)`` is the share of answers found."""

    task: str
    length: int
    index: int
    prompt: str
    answers: list[str]
    max_new_tokens: int = 24
    meta: dict[str, Any] = field(default_factory=dict)

    def score(self, output: str) -> float:
        return score_answers(self.answers, output)


def _normalize(text: str) -> str:
    text = text.lower()
    text = re.sub(r"(?<=\d)[,_ ](?=\d{3}\b)", "", text)  # 12,345 / 12 345 -> 12345
    return text


def score_answers(answers: list[str], output: str) -> float:
    """Share of ``answers`` that occur in ``output`` as whole words (case-insensitive, digit grouping ignored)."""
    if not answers:
        return 0.0
    text = _normalize(output)
    found = 0
    for answer in answers:
        a = re.escape(_normalize(answer))
        if re.search(rf"(?<![0-9a-z]){a}(?![0-9a-z])", text):
            found += 1
    return found / len(answers)


def _number(rng: random.Random, digits: int = 7) -> str:
    return str(rng.randrange(10 ** (digits - 1), 10**digits))


def _key(rng: random.Random, value_kind: str) -> str:
    if value_kind == "uuid":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    return f"{rng.choice(WORDS)}-{rng.choice(WORDS)}"


def _value(rng: random.Random, value_kind: str) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4)) if value_kind == "uuid" else _number(rng)


def _format(tokenizer: Any, body: str, answer_prefix: str, chat: bool) -> str:
    if chat and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": body}], tokenize=False, add_generation_prompt=True)
        return text + answer_prefix
    return body + "\n" + answer_prefix


def _n_tokens(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _assemble(
    tokenizer: Any,
    haystack: Haystack,
    rng: random.Random,
    length: int,
    needles: list[str],
    intro: str,
    question: str,
    answer_prefix: str,
    chat: bool,
) -> str:
    """Fill noise to ``length`` tokens in total and insert each needle at a random depth between sentences."""
    shell = _format(tokenizer, f"{intro}\n\n{question}", answer_prefix, chat)
    room = length - _n_tokens(tokenizer, shell) - sum(_n_tokens(tokenizer, " " + n) for n in needles) - 4
    if room < 0:
        raise A2atsError(f"context length {length} is too short for this task's question and needles")
    sentences = haystack.fill(room, offset=rng.randrange(len(haystack.sentences)))
    depths = sorted(rng.randrange(len(sentences) + 1) for _ in needles)
    for shift, (depth, needle) in enumerate(zip(depths, needles, strict=True)):
        sentences.insert(depth + shift, needle)
    body = f"{intro}\n\n{' '.join(sentences)}\n\n{question}"
    return _format(tokenizer, body, answer_prefix, chat)


def passkey(tokenizer: Any, haystack: Haystack, rng: random.Random, length: int, chat: bool = True) -> dict:
    key = _number(rng, 5)
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    prompt = _assemble(
        tokenizer, haystack, rng, length, [needle],
        "There is an important pass key hidden inside a lot of irrelevant text. Find it and memorize it.",
        "What is the pass key?", "The pass key is:", chat,
    )
    return {"prompt": prompt, "answers": [key], "max_new_tokens": 12}


def _niah(tokenizer, haystack, rng, length, chat, n_keys: int, n_values: int, value_kind: str) -> dict:
    keys = []
    while len(keys) < n_keys:
        k = _key(rng, "words")
        if k not in keys:
            keys.append(k)
    values = {k: [_value(rng, value_kind) for _ in range(n_values if i == 0 else 1)] for i, k in enumerate(keys)}
    needles = [f"One of the special magic numbers for {k} is: {v}." for k in keys for v in values[k]]
    rng.shuffle(needles)
    asked = keys[0]
    what = "numbers" if n_values > 1 else "number"
    prompt = _assemble(
        tokenizer, haystack, rng, length, needles,
        "Some special magic numbers are hidden inside the following text. Make sure to memorize them.",
        f"What {'are all the' if n_values > 1 else 'is the'} special magic {what} for {asked} mentioned in the text?",
        f"The special magic {what} for {asked} mentioned in the text {'are' if n_values > 1 else 'is'}:", chat,
    )
    per_value = 40 if value_kind == "uuid" else 12
    return {"prompt": prompt, "answers": values[asked], "max_new_tokens": per_value * n_values + 4,
            "meta": {"keys": keys}}


def niah_single(tokenizer, haystack, rng, length, chat=True) -> dict:
    return _niah(tokenizer, haystack, rng, length, chat, 1, 1, "number")


def niah_multikey(tokenizer, haystack, rng, length, chat=True) -> dict:
    return _niah(tokenizer, haystack, rng, length, chat, 4, 1, "uuid")


def niah_multivalue(tokenizer, haystack, rng, length, chat=True) -> dict:
    return _niah(tokenizer, haystack, rng, length, chat, 1, 4, "number")


def variable_tracking(tokenizer, haystack, rng, length, chat=True, hops: int = 4) -> dict:
    value = _number(rng, 5)
    names: list[str] = []
    while len(names) < hops + 1:
        name = "".join(rng.choice(string.ascii_uppercase) for _ in range(5))
        if name not in names:
            names.append(name)
    chain = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i]} = VAR {names[i - 1]}." for i in range(1, len(names))]
    prompt = _assemble(
        tokenizer, haystack, rng, length, chain,
        "Memorize and track the chain(s) of variable assignment hidden in the following text.",
        f"Question: Find all variables that are assigned the value {value} in the text above.",
        f"Answer: According to the chain(s) of variable assignment in the text above, {len(names)} variables "
        f"are assigned the value {value}, they are:", chat,
    )
    return {"prompt": prompt, "answers": names, "max_new_tokens": 8 * len(names) + 4}


GENERATORS: dict[str, Callable[..., dict]] = {
    "passkey": passkey,
    "niah_single": niah_single,
    "niah_multikey": niah_multikey,
    "niah_multivalue": niah_multivalue,
    "variable_tracking": variable_tracking,
}


def sample_seed(seed: int, task: str, length: int, index: int) -> int:
    """A stable per-sample seed (independent of which other tasks or lengths are run)."""
    return (seed * 1_000_003 + TASKS.index(task) * 10_007 + length * 31 + index) % (2**63)


def make_sample(
    task: str, tokenizer: Any, haystack: Haystack, length: int, index: int, seed: int = 0, chat: bool = True
) -> TaskSample:
    """The ``index``-th sample of ``task`` at ``length`` tokens, deterministic in ``seed``."""
    if task not in GENERATORS:
        raise A2atsError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    rng = random.Random(sample_seed(seed, task, length, index))
    spec = GENERATORS[task](tokenizer, haystack, rng, length, chat=chat)
    return TaskSample(task=task, length=length, index=index, prompt=spec["prompt"], answers=spec["answers"],
                      max_new_tokens=spec["max_new_tokens"], meta=spec.get("meta", {}))


def parse_tasks(spec: str) -> list[str]:
    """``"all"`` or a comma list of task names (``niah`` expands to the three NIAH variants)."""
    if spec.strip() in ("all", ""):
        return list(TASKS)
    out: list[str] = []
    for name in (s.strip() for s in spec.split(",") if s.strip()):
        expanded = [t for t in TASKS if t.startswith("niah_")] if name == "niah" else [name]
        for t in expanded:
            if t not in TASKS:
                raise A2atsError(f"unknown task {t!r}; choose from {', '.join(TASKS)} (or niah, all)")
            if t not in out:
                out.append(t)
    return out
