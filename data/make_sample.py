"""Writes data/sample.jsonl: arithmetic word problems in alpaca format (instruction / input / output).
Run: python data/make_sample.py  (deterministic)."""
import json
import random
from pathlib import Path

NAMES = ["Ada", "Ben", "Chen", "Dara", "Eli", "Fatima", "Gus", "Hana", "Ivan", "June"]
ITEMS = ["apples", "books", "coins", "stamps", "marbles", "pencils", "shells", "cards"]


def problem(rng: random.Random) -> dict:
    name, other = rng.sample(NAMES, 2)
    item = rng.choice(ITEMS)
    a, b = rng.randint(2, 60), rng.randint(2, 40)
    kind = rng.choice(["buy", "give", "times"])
    if kind == "buy":
        question, answer = f"{name} has {a} {item} and buys {b} more. How many {item} does {name} have now?", a + b
        working = f"{a} + {b} = {answer}"
    elif kind == "give":
        a = a + b
        question, answer = f"{name} has {a} {item} and gives {b} to {other}. How many {item} are left?", a - b
        working = f"{a} - {b} = {answer}"
    else:
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        question, answer = f"{name} has {a} boxes with {b} {item} in each. How many {item} in total?", a * b
        working = f"{a} * {b} = {answer}"
    return {"instruction": "Solve the word problem. Show the calculation, then give the answer.",
            "input": question, "output": f"{working}. The answer is {answer}."}


if __name__ == "__main__":
    rng = random.Random(0)
    rows = [problem(rng) for _ in range(400)]
    out = Path(__file__).with_name("sample.jsonl")
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {len(rows)} rows to {out}")
