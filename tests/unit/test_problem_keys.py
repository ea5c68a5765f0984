"""Problem keys: every wording of one arithmetic problem shares a key and different problems do not; other
generators and files are keyed by their normalised text; the training source's problem-space warning."""

import json

from protocol.config.prompts import PromptsConfig
from treepo.problem_keys import expression_key, file_key, normalise, reasoning_gym_key
from treepo.prompts import problem_space_warning, raw_rows


def arithmetic(expression: str, question: str | None = None) -> dict:
    return {"question": question or f"Calculate {expression}.", "answer": "0",
            "metadata": {"source_dataset": "basic_arithmetic", "expression": expression}}


def test_wordings_of_one_expression_share_a_key():
    assert {expression_key(e) for e in ("3 + -5", "-5 + 3", "(3) + (-5)", "3 - 5", "3 + (-(5))")} == {"+(-5,3)"}
    assert expression_key("5 - 3") == "+(-3,5)" != expression_key("3 - 5")
    assert expression_key("3 * 5") == "*(3,5)" != expression_key("3 + 5") == "+(3,5)"
    assert expression_key("-(-3)") == expression_key("- -3") == expression_key("+3") == "3"
    # chains flatten whatever the parentheses; unary minus twice over an expression cancels, once it stays
    assert expression_key("1 + (2 + 3)") == expression_key("(3 + 1) + 2") == "+(1,2,3)"
    assert expression_key("( -( -( 2 + -6 ) ) )") == "+(-6,2)" and expression_key("-(7 * 2)") == "neg(*(2,7))"
    # the order of a non-commutative operator is kept; subtraction inside a product stays a sum
    assert expression_key("8 / 2") == "/(8,2)" != expression_key("2 / 8")
    assert expression_key("2 * (5 - 1)") == "*(+(-1,5),2)"
    assert reasoning_gym_key("basic_arithmetic", arithmetic("3 - 5")) == "basic_arithmetic:+(-5,3)"
    assert (reasoning_gym_key("basic_arithmetic", arithmetic("-5 + 3", "What is -5 + 3?"))
            == reasoning_gym_key("basic_arithmetic", arithmetic("3 + -5")))


def test_text_keys_when_the_expression_is_not_the_question():
    # not an integer expression: the normalised question and answer
    assert (reasoning_gym_key("basic_arithmetic", arithmetic("x + 1", "Calculate  X + 1 ."))
            == "basic_arithmetic:calculate x + 1=0")
    # countdown's expression is one solution, not the problem
    entry = {"question": "Calculate 12 using all of these numbers: 3, 4.", "answer": "3*4",
             "metadata": {"expression": "3*4"}}
    assert reasoning_gym_key("countdown", entry) == "countdown:calculate 12 using all of these numbers: 3, 4=3*4"
    assert reasoning_gym_key("gsm_symbolic", {"question": "How many?\n", "answer": 7}) == "gsm_symbolic:how many=7"
    assert normalise("  What  is\n 1+1 ?! ") == "what is 1+1"
    assert file_key({"prompt": "What is 1+1?", "problem_id": 17}) == "17"
    assert file_key({"prompt": " What is  1+1 ?"}) == file_key({"prompt": "what is 1+1"}) == "what is 1+1"


def test_rows_carry_keys(tmp_path):
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "What is 1+1?", "answer": "2"}, {"prompt": "what is  1+1", "answer": "2"},
        {"prompt": "Half of 1?", "answer": "0.5", "problem_id": "half"}]) + "\n")
    cfg = PromptsConfig(source="jsonl", path=str(tmp_path / "p.jsonl"))
    rows = raw_rows(cfg)
    assert [r["key"] for r in rows] == ["what is 1+1", "what is 1+1", "half"]
    assert problem_space_warning(cfg, rows) == f"prompts: the 3 rows of {tmp_path / 'p.jsonl'} hold 2 distinct problems"
    assert problem_space_warning(cfg, rows[1:]) is None


def test_problem_space_warning_names_the_generator_arguments():
    one_digit = {"basic_arithmetic": {"min_terms": 2, "max_terms": 2, "max_digits": 1, "operators": ["+"],
                                      "allow_parentheses": False, "allow_negation": False}}
    cfg = PromptsConfig(dataset_args=one_digit, size=30)
    rows = raw_rows(cfg)
    # "a + b" with a, b in 0..10: the unordered pairs drawn
    problems = len({tuple(sorted(map(int, r["entry"]["metadata"]["expression"].split(" + ")))) for r in rows})
    assert problems == len({r["key"] for r in rows}) == 24
    assert problem_space_warning(cfg, rows) == (
        "prompts: 30 generated basic_arithmetic items hold 24 distinct problems; the problem space of "
        "dataset_args.basic_arithmetic {min_terms: 2, max_terms: 2, max_digits: 1, operators: ['+'], "
        "allow_parentheses: False, allow_negation: False} is not much larger than prompts.size (training covers "
        "much of it, little is left to hold out)")  # 24 < 0.9 x 30
    wide = PromptsConfig(datasets=["basic_arithmetic", "chain_sum"], size=30)
    assert problem_space_warning(wide, raw_rows(wide)) is None  # default arguments: 30 problems each
