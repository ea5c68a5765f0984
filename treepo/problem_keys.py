"""Problem keys: one string per problem, shared by every wording of it, so that evaluation can leave out the
eval items whose problem is also a training problem (`actors.evaluate.held_out`).

- reasoning-gym entry whose metadata `expression` is what its question asks for (basic_arithmetic,
  chain_sum; not countdown, whose `expression` is one solution): `name:` + the canonical form of the
  expression, read with `ast` (never evaluated). Parentheses that change nothing vanish with the parse;
  unary plus is dropped and unary minus folded (into an integer literal: `-(-3)`, `- -3` -> `3`; twice over
  anything: cancelled); `a - b` is read as `a + (-b)`; `+` and `*` chains are flattened and their operands
  sorted (by their canonical text); `/`, `//`, `%` and `**` keep their operand order. Written prefix-style:
  `3 + -5`, `-5 + 3`, `(3) + (-5)` and `3 - 5` are all `basic_arithmetic:+(-5,3)`, `-(2 * 7)` is
  `neg(*(2,7))`. An expression that does not parse into integers and these operators takes the next rule.
- any other reasoning-gym entry: `name:` + normalised question + `=` + normalised answer.
- jsonl / parquet row: its `problem_id` field if it has one, else the normalised question.
Normalised text: lower case, whitespace runs collapsed to one space, trailing `.,;:!?` and spaces stripped.
"""

from __future__ import annotations

import ast
from typing import Any

OPERATORS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.FloorDiv: "//", ast.Mod: "%",
             ast.Pow: "**"}
COMMUTATIVE = ("+", "*")


def normalise(text: str) -> str:
    return " ".join(text.lower().split()).rstrip(".,;:!? ")


def _canonical(node: ast.expr) -> tuple:
    """The expression as nested tuples: ("int", v), ("neg", x), (op, operands...) with + and * flattened and
    sorted."""
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return ("int", node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.UAdd):
        return _canonical(node.operand)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return _negate(_canonical(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in OPERATORS:
        op, left, right = OPERATORS[type(node.op)], _canonical(node.left), _canonical(node.right)
        if op == "-":
            op, right = "+", _negate(right)
        if op not in COMMUTATIVE:
            return (op, left, right)
        operands = [x for side in (left, right) for x in (side[1:] if side[0] == op else [side])]
        return (op, *sorted(operands, key=_render))
    raise ValueError(f"not an integer expression: {ast.dump(node)}")


def _negate(x: tuple) -> tuple:
    if x[0] == "int":
        return ("int", -x[1])
    if x[0] == "neg":
        return x[1]
    return ("neg", x)


def _render(x: tuple) -> str:
    return str(x[1]) if x[0] == "int" else f"{x[0]}({','.join(_render(y) for y in x[1:])})"


def expression_key(expression: str) -> str:
    """The canonical form of an integer expression (see the module docstring); SyntaxError or ValueError if it
    is not one."""
    return _render(_canonical(ast.parse(expression.strip(), mode="eval").body))


def reasoning_gym_key(name: str, entry: dict[str, Any]) -> str:
    """The key of a reasoning-gym entry of generator `name`."""
    expression = entry.get("metadata", {}).get("expression")
    if isinstance(expression, str) and expression in entry["question"]:
        try:
            return f"{name}:{expression_key(expression)}"
        except (SyntaxError, ValueError):  # not an integer expression: keyed by its text below
            pass
    return f"{name}:{normalise(entry['question'])}={normalise(str(entry['answer']))}"


def file_key(record: dict[str, Any]) -> str:
    """The key of a jsonl / parquet row."""
    return str(record["problem_id"]) if "problem_id" in record else normalise(str(record["prompt"]))
