"""Data formats, loss masks, and the messages bad data files get."""
import json
import re
import time

import pytest

from conftest import make_tokenizer, write_jsonl
from frugal_loraga import Config, ConfigError
from frugal_loraga.data import (IGNORE, MAX_CHARS_PER_TOKEN, DataError, clip_record, detect_format, load_examples,
                                micro_batch, read_located, split_eval)


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
        assert detect_format(read_located(path)[0]) == fmt
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


def test_a_chat_that_opens_with_the_assistant_trains_on_its_turns_not_on_the_template_before(tmp_path):
    """The first turn has no prompt before it to render: its span starts at its content (not at the template's
    default system prompt, which the demo's adds)."""
    from transformers import AutoTokenizer
    from frugal_loraga.models import demo_model_dir
    demo = AutoTokenizer.from_pretrained(demo_model_dir())
    for opening in ("Hello, how can I help?", "You", "a"):  # also words of the template's own header
        path = write_jsonl(tmp_path / "c.jsonl", [{"messages": [
            {"role": "assistant", "content": opening}, {"role": "user", "content": "Say hi"},
            {"role": "assistant", "content": "Hi there"}]}])
        (example,), _ = load_examples(path, "chat", demo, 256)
        trained = response_text(demo, example)
        assert trained.startswith(f"{opening}<|im_end|>") and trained.endswith("Hi there<|im_end|>\n"), trained
        assert "Say hi" not in trained and "SmolLM" in demo.decode(example.input_ids)  # its system prompt, untrained


def test_a_column_mapping_reads_files_whose_columns_are_named_otherwise(tokenizer, tmp_path):
    ours = write_jsonl(tmp_path / "ours.jsonl", [{"instruction": "Add 2 and 3.", "output": "5"}])
    (tmp_path / "theirs.csv").write_text("question,answer\nAdd 2 and 3.,5\n")
    with pytest.raises(DataError, match=r"cannot tell the format from the columns \['answer', 'question'\]"):
        load_examples(tmp_path / "theirs.csv", "auto", tokenizer, 64)
    columns = Config(data="x", columns=" instruction = question, output=answer").column_map()
    assert columns == {"instruction": "question", "output": "answer"}
    theirs, report = load_examples(tmp_path / "theirs.csv", "auto", tokenizer, 64, columns)
    assert report.format == "alpaca" and theirs == load_examples(ours, "auto", tokenizer, 64)[0]
    with pytest.raises(DataError, match=r"theirs.csv line 2: no column reply to map \(it has \['answer', 'question'\]\)"):
        load_examples(tmp_path / "theirs.csv", "auto", tokenizer, 64, {"output": "reply"})


@pytest.mark.parametrize("columns", ["instruction", "question=instruction", "output=", "text=a,,bogus=b"])
def test_a_malformed_column_mapping_says_what_it_should_be(columns):
    with pytest.raises(ConfigError, match=r"columns: '.*' is not format_column=file_column, with format_column one "
                                          r"of instruction, .*\(e.g. instruction=question,output=answer\)"):
        Config(data="x", columns=columns)


def test_the_plain_chat_template_replaces_the_models_own(tmp_path):
    from transformers import AutoTokenizer
    from frugal_loraga.models import demo_model_dir
    demo = AutoTokenizer.from_pretrained(demo_model_dir())  # has a ChatML template of its own
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Say hi", "output": "Hi there"}])
    (own,), _ = load_examples(path, "auto", demo, 256)
    (plain,), _ = load_examples(path, "auto", demo, 256, template="plain")
    assert "<|im_start|>user" in demo.decode(own.input_ids)
    assert demo.decode(plain.input_ids).startswith("### User:\nSay hi\n\n### Assistant:\n")
    assert response_text(demo, plain) == "Hi there\n\n"


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
    (None, "missing.jsonl", "auto", "missing.jsonl does not exist; check the path"),
    ("", "empty.jsonl", "auto", "empty.jsonl holds no examples; add at least one record"),
    ("instruction,output\n", "header.csv", "auto", "header.csv holds no examples; add at least one record"),
    ("", "empty.csv", "auto", "empty.csv holds no examples"),
    ("prompt,completion\nQ1,A1,extra\n", "cells.csv", "auto",
     "cells.csv line 2: 3 cells, but the header has 2 columns; put quotes around cells that hold commas"),
    ('prompt,completion\nQ0,A0\n"Q1,A1\n', "quote.csv", "auto",
     r"quote.csv line 3: not valid CSV \(unexpected end of data\); check the quotes of the row that starts there"),
    ('{"data": [{"text": "a"}]}', "object.json", "auto",
     r"object.json: expected a JSON list of objects, but the file holds an object; put the records in a list"),
    ('{"text": "ok"}\n["a", "b"]\n', "array.jsonl", "auto",
     r"array.jsonl line 2: expected a JSON object \{...\}, got a list; put one record object on each line"),
    ('{"text": "ok"}\n{"text": broken\n', "bad.jsonl", "auto", r"bad.jsonl line 2: malformed JSON"),
    ('[1, 2]', "list.json", "auto", "expected a JSON list of objects"),
    ('{"text": "a", "n": %s}\n' % ("9" * 5001), "digits.jsonl", "auto",
     r"digits.jsonl line 1: unreadable JSON \(a number of more than 4300 digits\); fix or remove that line"),
    ("[" * 100_000 + "]" * 100_000, "deep.json", "auto",
     r"deep.json: unreadable JSON \(lists or objects nested too deeply\); fix it"),
    ('{"instruction": "i", "output": "\\ud800 alone"}\n', "half.jsonl", "auto",
     r"half.jsonl line 1: column 'output' holds '\\ud800', half of a UTF-16 pair with no other half"),
    ('{"question": "q", "answer": "a"}\n', "cols.jsonl", "auto",
     r"cols.jsonl: cannot tell the format from the columns \['answer', 'question'\]"),
    ('{"instruction": "i", "output": "o"}\n{"instruction": "i"}\n', "miss.jsonl", "alpaca",
     "miss.jsonl line 2: missing column output"),
    ("a,b\n1,2\n", "data.parquet", "auto", "unsupported file type '.parquet'"),
    (b"\xff\xfe\x00bad", "bin.jsonl", "auto", r"cannot read .*bin.jsonl as UTF-8 text \(byte 0 is not UTF-8\); save "),
    ("caf\xe9".encode("latin-1"), "latin.csv", "auto", r"latin.csv as UTF-8 text \(byte 3 .*save the file as UTF-8"),
    ('{"instruction": "%s", "output": "x"}\n' % ("long " * 80), "cut.jsonl", "auto",
     "cut.jsonl: no usable examples: every response was cut off by max_length=64 or empty; raise max_length"),
    ('{"text": ""}\n', "blank.jsonl", "auto", "blank.jsonl: no usable examples: no record has a response to train on"),
    ('{"messages": [{"role": "user", "content": "hi"}]}\n', "asks.jsonl", "auto",
     "asks.jsonl: no usable examples: no record has a response to train on: an assistant turn of a chat"),
    ('{"messages": []}\n', "none.jsonl", "auto",
     r"none.jsonl line 1: column 'messages' is an empty list; a chat needs at least one \{"),
])
def test_bad_data_files_get_clear_messages(tokenizer, tmp_path, content, name, fmt, message):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(DataError, match=message):
        load_examples(path, fmt, tokenizer, 64)


def test_a_directory_is_named_as_one(tokenizer, tmp_path):
    with pytest.raises(DataError, match=re.escape(f"data path {tmp_path} is a directory, not a file; give a .jsonl, "
                                                  ".json, .csv or .txt file")):
        load_examples(tmp_path, "auto", tokenizer, 64)


def test_csv_with_a_byte_order_mark_loads_as_alpaca(tokenizer, tmp_path):
    path = tmp_path / "excel.csv"
    path.write_bytes("instruction,output\r\nAdd 2 and 3.,5\r\n".encode("utf-8-sig"))
    assert read_located(path)[0] == [{"instruction": "Add 2 and 3.", "output": "5"}]
    (example,), report = load_examples(path, "auto", tokenizer, 64)
    assert report.format == "alpaca" and "5" in response_text(tokenizer, example)


def test_csv_cells_keep_their_quoted_newlines_and_commas(tmp_path):
    path = tmp_path / "multi.csv"
    path.write_text('prompt,completion\n"Line one\nline two, still",A1\nQ2,"x\n\ny"\n', encoding="utf-8")
    assert read_located(path)[0] == [{"prompt": "Line one\nline two, still", "completion": "A1"},
                                  {"prompt": "Q2", "completion": "x\n\ny"}]


def test_a_csv_cell_longer_than_the_csv_module_default_loads(tokenizer, tmp_path):
    path = tmp_path / "long.csv"
    path.write_text("text\n" + "word " * 40_000 + "\n", encoding="utf-8")
    examples, report = load_examples(path, "auto", tokenizer, 64)
    assert len(examples) == 1 and report.truncated == 1


def test_jsonl_strings_keep_unicode_line_separators(tokenizer, tmp_path):
    output = "one\u2028two\u2029three\u0085four"
    path = tmp_path / "separators.jsonl"
    path.write_text(json.dumps({"instruction": "Join.", "output": output}, ensure_ascii=False) + "\r\n"
                    + json.dumps({"instruction": "Again.", "output": "x"}) + "\n", encoding="utf-8")
    assert "\u2028" in path.read_text(encoding="utf-8")  # written raw, not escaped
    records = read_located(path)[0]
    assert len(records) == 2 and records[0]["output"] == output
    assert len(load_examples(path, "auto", tokenizer, 128)[0]) == 2


SHAPE = re.escape('{"role": ..., "content": ...}')


@pytest.mark.parametrize("rows,fmt,message", [
    ([{"instruction": 5, "output": "x"}], "auto",
     r"t.jsonl line 1: column 'instruction' holds a number \(int\), not text; every instruction must be a string"),
    ([{"text": "ok"}, {"text": "ok"}, {"text": 1.5}], "auto",
     r"t.jsonl line 3: column 'text' holds a number \(float\), not text; every text must be a string"),
    ([{"instruction": "i", "input": ["a"], "output": "o"}], "auto", "line 1: column 'input' holds a list, not text"),
    ([{"instruction": "i", "output": None}], "auto", "line 1: column 'output' holds null, not text"),
    ([{"prompt": "p", "completion": True}], "auto", "line 1: column 'completion' holds a boolean, not text"),
    ([{"text": {"a": 1}}], "auto", "line 1: column 'text' holds an object, not text"),
    ([{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": 20}]}], "auto",
     r"t.jsonl line 1: message 2's content holds a number \(int\), not text; every message's content must be a string"),
    ([{"messages": [{"role": None, "content": "q"}]}], "auto", "message 1's role holds null, not text"),
    ([{"messages": "hello"}], "auto",
     f"t.jsonl line 1: column 'messages' holds text, not a list; messages must be a list of {SHAPE} objects"),
    ([{"messages": ["hello"]}], "auto", f"t.jsonl line 1: message 1 is text, not a {SHAPE} object"),
    ([{"messages": [{"content": "hi"}]}], "auto",
     "t.jsonl line 1: message 1 has no 'role'; every message needs a role and a content"),
])
def test_non_text_values_name_the_file_line_column_and_type(tokenizer, tmp_path, rows, fmt, message):
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    with pytest.raises(DataError, match=message):
        load_examples(path, fmt, tokenizer, 64)


def test_json_records_are_numbered_and_jsonl_records_get_their_line(tokenizer, tmp_path):
    (tmp_path / "d.json").write_text('[{"instruction": "i", "output": "o"}, {"instruction": "i", "output": 3}]')
    with pytest.raises(DataError, match=r"d.json record 2: column 'output' holds a number \(int\)"):
        load_examples(tmp_path / "d.json", "auto", tokenizer, 64)
    (tmp_path / "d.jsonl").write_text('{"text": "a"}\n\n\n{"text": 7}\n')
    with pytest.raises(DataError, match="d.jsonl line 4: column 'text'"):
        load_examples(tmp_path / "d.jsonl", "auto", tokenizer, 64)


def test_alpaca_input_may_be_absent_empty_or_null(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "inputs.jsonl", [{"instruction": "a", "output": "b"},
                                                   {"instruction": "a", "input": "", "output": "b"},
                                                   {"instruction": "a", "input": None, "output": "b"}])
    assert len(load_examples(path, "auto", tokenizer, 64)[0]) == 3


def test_a_chat_template_that_refuses_the_messages_gives_a_data_error(tmp_path):
    strict = make_tokenizer()
    strict.chat_template = "{{ raise_exception('Conversation roles must alternate user/assistant') }}"
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "a"},
                                                            {"role": "user", "content": "b"}]}])
    with pytest.raises(DataError, match=r"c.jsonl line 1: the tokenizer's chat template refused the messages "
                                        r"\(Conversation roles must alternate user/assistant\); fix their roles"):
        load_examples(path, "chat", strict, 64)


class RecordingTokenizer:
    """A tokenizer that notes the length of every text it is called on."""

    def __init__(self, inner):
        self.inner, self.lengths = inner, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, text, **kwargs):
        self.lengths.append(len(text))
        return self.inner(text, **kwargs)


def test_a_huge_record_is_cut_before_it_is_tokenized(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "huge.jsonl", [{"text": "word " * 1_000_000}])  # one 5 MB line
    recording = RecordingTokenizer(tokenizer)
    started = time.monotonic()
    (example,), report = load_examples(path, "auto", recording, 64)
    assert time.monotonic() - started < 20  # a guard only: it takes well under a second
    assert len(example.input_ids) == 64 and report.truncated == 1
    assert recording.lengths and max(recording.lengths) <= 64 * MAX_CHARS_PER_TOKEN


def test_clipping_keeps_the_first_characters_in_render_order_and_says_when_it_cut():
    limit = 4 * MAX_CHARS_PER_TOKEN
    record = {"instruction": "i" * (limit - 10), "input": "", "output": "o" * 100}
    clipped, cut = clip_record(record, "alpaca", 4)
    assert cut and clipped == {"instruction": "i" * (limit - 10), "input": "", "output": "o" * 10}
    assert clip_record({"text": "t" * limit}, "text", 4) == ({"text": "t" * limit}, False)
    chat = {"messages": [{"role": "user", "content": "u" * (limit - 1)}, {"role": "assistant", "content": "a"}]}
    clipped, cut = clip_record(chat, "chat", 4)
    assert not cut and clipped == chat
    clipped, cut = clip_record({"messages": chat["messages"] * 3}, "chat", 4)
    assert cut and len(clipped["messages"]) == 4 and clipped["messages"][2]["content"] == ""


def test_split_and_batches_are_seeded_and_cover_the_data():
    examples = list(range(10))
    train, held_out = split_eval(examples, 0.2, seed=1)
    assert len(held_out) == 2 and sorted(train + held_out) == examples
    assert split_eval(examples, 0.2, seed=1) == (train, held_out)
    epoch = [x for i in range(4) for x in micro_batch(train, 2, seed=3, index=i)]
    assert sorted(epoch) == sorted(train)
    assert micro_batch(train, 2, seed=3, index=7) == micro_batch(train, 2, seed=3, index=7)


def test_sharegpt_conversations_load_as_the_same_chat(tokenizer, tmp_path):
    turns = [("system", "Be brief."), ("human", "Add 2 and 3."), ("gpt", "5"), ("human", "And 4?"), ("gpt", "9")]
    sharegpt = write_jsonl(tmp_path / "s.jsonl", [{"conversations": [{"from": f, "value": v} for f, v in turns]}])
    roles = {"system": "system", "human": "user", "gpt": "assistant"}
    chat = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": roles[f], "content": v} for f, v in turns]}])
    assert detect_format(read_located(sharegpt)[0]) == "sharegpt"
    ours, report = load_examples(sharegpt, "auto", tokenizer, 256)
    theirs, _ = load_examples(chat, "chat", tokenizer, 256)
    assert (ours[0].input_ids, ours[0].labels) == (theirs[0].input_ids, theirs[0].labels)
    assert report.examples == 1


@pytest.mark.parametrize("record,message", [
    ({"conversations": "hi"}, r"s.jsonl line 1: column 'conversations' holds text, not a list; ShareGPT conversations "
                              r"are a list of \{\"from\": ..., \"value\": ...\} objects"),
    ({"conversations": [{"from": "human"}]}, r"s.jsonl line 1: turn 1 is not a \{\"from\": ..., \"value\": ...\} object"),
    ({"conversations": [{"from": "bot", "value": "x"}]}, r"turn 1 is from 'bot'; ShareGPT turns are from system, "
                                                         r"human, user, gpt, assistant, model"),
    ({"conversations": [{"from": "human", "value": 3}]}, r"message 1's content holds a number \(int\), not text"),
])
def test_bad_sharegpt_records_get_clear_messages(tokenizer, tmp_path, record, message):
    path = write_jsonl(tmp_path / "s.jsonl", [record])
    with pytest.raises(DataError, match=message):
        load_examples(path, "sharegpt", tokenizer, 64)
    with pytest.raises(DataError, match="missing column conversations needed by the sharegpt format"):
        load_examples(write_jsonl(tmp_path / "m.jsonl", [{"text": "x"}]), "sharegpt", tokenizer, 64)
