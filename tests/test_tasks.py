"""Long-context task generators are deterministic under a seed and their checkers score exactly."""

from __future__ import annotations

import pytest

from a2ats_tools.errors import A2atsError
from a2ats_tools.evaluation.haystack import Haystack
from a2ats_tools.evaluation.tasks import TASKS, make_sample, parse_tasks, score_answers


@pytest.fixture(scope="module")
def noise(tokenizer):
    return Haystack.noise(tokenizer)


@pytest.mark.parametrize("task", TASKS)
def test_generator_is_deterministic_and_fits_length(task, tokenizer, noise):
    a = make_sample(task, tokenizer, noise, 400, 0, seed=3)
    b = make_sample(task, tokenizer, noise, 400, 0, seed=3)
    c = make_sample(task, tokenizer, noise, 400, 0, seed=4)
    assert a.prompt == b.prompt and a.answers == b.answers
    assert (c.prompt, c.answers) != (a.prompt, a.answers)
    n = len(tokenizer(a.prompt, add_special_tokens=False)["input_ids"])
    assert 300 <= n <= 400
    for answer in a.answers:  # every answer is actually in the haystack
        assert answer in a.prompt
    assert a.score(" ".join(a.answers)) == 1.0
    assert a.score("I do not know 00000") == 0.0


def test_passkey_checker_handles_formatting():
    assert score_answers(["12345"], " 12345.") == 1.0
    assert score_answers(["12345"], "The pass key is 12,345!") == 1.0
    assert score_answers(["12345"], "123456") == 0.0  # a longer number is not the answer
    assert score_answers(["12345"], "1234") == 0.0
    assert score_answers(["ABCDE", "FGHIJ"], "abcde, FGHIJ") == 1.0
    assert score_answers(["ABCDE", "FGHIJ"], "ABCDE and XYZ") == 0.5
    assert score_answers([], "anything") == 0.0


def test_multikey_asks_one_of_several_keys(tokenizer, noise):
    s = make_sample("niah_multikey", tokenizer, noise, 600, 1, seed=0)
    assert len(s.meta["keys"]) == 4 and len(s.answers) == 1
    assert s.prompt.count("special magic numbers for") == 4  # one needle per key
    assert all(k in s.prompt for k in s.meta["keys"])


def test_sample_independent_of_other_tasks(tokenizer, noise):
    assert make_sample("passkey", tokenizer, noise, 300, 2).prompt == make_sample("passkey", tokenizer, noise, 300, 2).prompt
    assert make_sample("passkey", tokenizer, noise, 300, 2).answers != make_sample("passkey", tokenizer, noise, 300, 3).answers


def test_parse_tasks_and_errors(tokenizer, noise):
    assert parse_tasks("all") == list(TASKS)
    assert parse_tasks("passkey,niah") == ["passkey", "niah_single", "niah_multikey", "niah_multivalue"]
    with pytest.raises(A2atsError):
        parse_tasks("bogus")
    with pytest.raises(A2atsError):
        make_sample("passkey", tokenizer, noise, 20, 0)


def test_haystack_from_file(tmp_path, tokenizer):
    f = tmp_path / "h.txt"
    f.write_text("Alpha beta gamma. Delta epsilon!\n\nZeta eta theta?")
    h = Haystack.from_file(f, tokenizer)
    assert h.sentences == ["Alpha beta gamma.", "Delta epsilon!", "Zeta eta theta?"]
    assert sum(h.lengths[i % 3] for i in range(len(h.fill(50)))) <= 50
    with pytest.raises(A2atsError):
        Haystack.from_file(tmp_path / "missing.txt", tokenizer)


def test_the_pydoc_haystack_is_real_text_and_a_bad_name_is_refused(tokenizer):
    from a2ats_tools.errors import DataError

    hay = Haystack.named("pydoc", tokenizer)
    assert len(set(hay.sentences)) > 1000  # Python's documentation, not a few repeated sentences
    s = make_sample("niah_single", tokenizer, hay, 600, 0, seed=0)
    assert s.answers[0] in s.prompt and "The grass is green" not in s.prompt
    assert Haystack.named(None, tokenizer).sentences == Haystack.noise(tokenizer).sentences
    with pytest.raises(DataError, match="neither noise nor pydoc nor an existing file"):
        Haystack.check("no-such-file.txt")
