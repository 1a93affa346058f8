"""Data formats, loss masks, and the messages bad data files get."""
import pytest

from conftest import make_tokenizer, write_jsonl
from frugal_loraga.data import (IGNORE, DataError, detect_format, load_examples, micro_batch, read_records,
                                split_eval)


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def response_text(tokenizer, example):
    return tokenizer.decode([i for i, label in zip(example.input_ids, example.labels) if label != IGNORE])


def test_formats_are_detected_and_only_responses_carry_loss(tokenizer, tmp_path):
    chat = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Add 2 and 3."},
                         {"role": "assistant", "content": "5"}, {"role": "user", "content": "Times 4?"},
                         {"role": "assistant", "content": "20"}]}
    cases = {
        "alpaca": ({"instruction": "Add the numbers.", "input": "2 and 3", "output": "The answer is 5."},
                   "The answer is 5."),
        "chat": (chat, ["5", "20"]),
        "prompt_completion": ({"prompt": "Capital of France:", "completion": " Paris"}, " Paris</s>"),
        "text": ({"text": "A plain sentence."}, "A plain sentence.</s>"),
    }
    for fmt, (row, expected) in cases.items():
        path = write_jsonl(tmp_path / f"{fmt}.jsonl", [row])
        assert detect_format(read_records(path)) == fmt
        (example,), report = load_examples(path, "auto", tokenizer, 256)
        assert report.format == fmt and report.examples == 1
        text = response_text(tokenizer, example)
        for part in (expected if isinstance(expected, list) else [expected]):
            assert part in text
        assert "Add" not in text and "Capital" not in text and "Be brief" not in text


def test_chat_template_of_the_demo_tokenizer_masks_user_turns(tmp_path):
    from transformers import AutoTokenizer
    from frugal_loraga.models import demo_model_dir
    demo = AutoTokenizer.from_pretrained(demo_model_dir())
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "Say hi"},
                                                            {"role": "assistant", "content": "Hi there"}]}])
    (example,), _ = load_examples(path, "chat", demo, 256)
    assert response_text(demo, example).strip() == "Hi there<|im_end|>"


def test_csv_json_and_txt_files_load(tokenizer, tmp_path):
    (tmp_path / "d.csv").write_text("prompt,completion\nQ1,A1\nQ2,A2\n")
    (tmp_path / "d.json").write_text('[{"text": "one"}, {"text": "two"}]')
    (tmp_path / "d.txt").write_text("First paragraph.\n\nSecond one.\n\n\nThird.")
    assert len(load_examples(tmp_path / "d.csv", "auto", tokenizer, 64)[0]) == 2
    assert len(load_examples(tmp_path / "d.json", "auto", tokenizer, 64)[0]) == 2
    assert len(load_examples(tmp_path / "d.txt", "text", tokenizer, 64)[0]) == 3


def test_long_texts_are_truncated_and_counted(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "long.jsonl", [{"text": "word " * 200}, {"text": "short"}])
    examples, report = load_examples(path, "auto", tokenizer, 32)
    assert report.truncated == 1 and max(len(e.input_ids) for e in examples) == 32
    assert "1 truncated to max_length" in report.summary()


@pytest.mark.parametrize("content,name,fmt,message", [
    (None, "missing.jsonl", "auto", "missing.jsonl does not exist"),
    ("", "empty.jsonl", "auto", "empty.jsonl holds no examples"),
    ('{"text": "ok"}\n{"text": broken\n', "bad.jsonl", "auto", r"bad.jsonl line 2: malformed JSON"),
    ('[1, 2]', "list.json", "auto", "expected a JSON list of objects"),
    ('{"question": "q", "answer": "a"}\n', "cols.jsonl", "auto", r"cannot tell the format from the columns \['answer', 'question'\]"),
    ('{"instruction": "i", "output": "o"}\n{"instruction": "i"}\n', "miss.jsonl", "alpaca", "record 2: missing column output"),
    ("a,b\n1,2\n", "data.parquet", "auto", "unsupported file type '.parquet'"),
    (b"\xff\xfe\x00bad", "bin.jsonl", "auto", "cannot read .* as UTF-8"),
    ('{"instruction": "%s", "output": "x"}\n' % ("long " * 80), "cut.jsonl", "auto", "no usable examples.*raise max_length"),
])
def test_bad_data_files_get_clear_messages(tokenizer, tmp_path, content, name, fmt, message):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(DataError, match=message):
        load_examples(path, fmt, tokenizer, 64)


def test_split_and_batches_are_seeded_and_cover_the_data():
    examples = list(range(10))
    train, held_out = split_eval(examples, 0.2, seed=1)
    assert len(held_out) == 2 and sorted(train + held_out) == examples
    assert split_eval(examples, 0.2, seed=1) == (train, held_out)
    epoch = [x for i in range(4) for x in micro_batch(train, 2, seed=3, index=i)]
    assert sorted(epoch) == sorted(train)
    assert micro_batch(train, 2, seed=3, index=7) == micro_batch(train, 2, seed=3, index=7)
