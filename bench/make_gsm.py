"""Writes bench/data/gsm_train.jsonl and gsm_test.jsonl: GSM8K-style problems with worked answers ending "#### N",
from reasoning-gym's gsm_symbolic generator (Apache-2.0; pip install reasoning-gym==0.1.19, for this script only).
Train and test come from different seeds, and the test set's templates are held out: every HELD_OUT_EVERY-th
template never appears in training, so the test asks for the method on problems whose wording the run has not seen.
Run: python bench/make_gsm.py  (deterministic)."""
import json
from pathlib import Path

import reasoning_gym

HELD_OUT_EVERY = 6  # templates 0, 6, 12, ... only in the test set
OUT = Path(__file__).with_name("data")


def rows(seed: int, size: int, held_out: bool) -> list[dict]:
    """`size` alpaca rows (instruction: the question; output: the worked answer ending "#### N") from the held-out
    templates, or from the others."""
    dataset = reasoning_gym.create_dataset("gsm_symbolic", size=size * HELD_OUT_EVERY * 2, seed=seed)
    picked = []
    for index in range(len(dataset)):
        template = dataset.task_indices[index]
        if (template % HELD_OUT_EVERY == 0) != held_out:
            continue
        item = dataset[index]
        answer = item["metadata"]["answer_cot"].strip()
        if "####" not in answer:
            answer += f"\n#### {item['answer']}"
        picked.append({"instruction": item["question"], "input": "", "output": answer, "template": template})
        if len(picked) == size:
            break
    return picked


if __name__ == "__main__":
    OUT.mkdir(exist_ok=True)
    for name, seed, size, held_out in (("gsm_train", 1, 1500, False), ("gsm_test", 2, 256, True)):
        found = rows(seed, size, held_out)
        (OUT / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in found))
        print(f"wrote {len(found)} rows to {OUT / name}.jsonl ({len({r['template'] for r in found})} templates)")
