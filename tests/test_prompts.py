"""Tests of prompt loading, the MiniLLM / BD template and the splits."""

from __future__ import annotations

import json
import os

import pytest

from tokenrl.tasks.prompts import (
    PromptExample,
    format_prompt,
    load_jsonl_prompts,
    load_prompt_list,
    split_examples,
)

DATA_FILE = os.path.join(os.path.dirname(__file__), "..", "data", "smollm2_prompts.jsonl")


def write_lines(path, lines: list[str]) -> str:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def test_load_jsonl_fields_and_blank_lines(tmp_path):
    path = write_lines(tmp_path / "p.jsonl", [
        json.dumps({"instruction": "Add 2 and 3.", "response": "5"}),
        "",
        json.dumps({"instruction": "Summarise.", "context": "Some text.", "response": ""}),
    ])
    assert load_jsonl_prompts(path) == [
        PromptExample("Add 2 and 3.", "", "5"),
        PromptExample("Summarise.", "Some text.", None),
    ]


def test_load_jsonl_custom_field_names(tmp_path):
    path = write_lines(tmp_path / "p.jsonl", [json.dumps({"prompt": "Hi", "input": "x", "output": "y"})])
    examples = load_jsonl_prompts(path, instruction_field="prompt", context_field="input", response_field="output")
    assert examples == [PromptExample("Hi", "x", "y")]


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ('{"instruction": "ok"', "not valid JSON"),
        ('{"context": "no instruction"}', "missing or empty 'instruction'"),
        ('{"instruction": 3}', "must be a string"),
        ('{"instruction": "ok", "response": ["a"]}', "must be a string"),
        ('["instruction"]', "expected a JSON object"),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path, bad_line, message):
    path = write_lines(tmp_path / "bad.jsonl", [json.dumps({"instruction": "fine"}), "", bad_line])
    with pytest.raises(ValueError, match=rf"bad\.jsonl:3: .*{message}"):
        load_jsonl_prompts(path)


def test_load_prompt_list_text_and_json(tmp_path):
    text = write_lines(tmp_path / "p.txt", ["Say hi.", "", "  Count to three. "])
    as_json = tmp_path / "p.json"
    as_json.write_text(json.dumps(["Say hi.", "Count to three."]))
    expected = [PromptExample("Say hi."), PromptExample("Count to three.")]
    assert load_prompt_list(text) == expected
    assert load_prompt_list(str(as_json)) == expected


def test_format_prompt_with_and_without_input():
    header = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    assert format_prompt(PromptExample("Summarise.", "A text.")) == (
        f"{header}\n\n### Instruction:\nSummarise.\n\n### Input:\nA text.\n\n### Response:\n"
    )
    assert format_prompt(PromptExample("Say hi.")) == f"{header}\n\n### Instruction:\nSay hi.\n\n### Response:\n"
    assert format_prompt(PromptExample("Q", "C"), template="{instruction}|{input}") == "Q|C"


def test_format_prompt_chat_template():
    class ChatTokenizer:
        chat_template = "set"

        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            assert not tokenize and add_generation_prompt
            return "<user>" + messages[0]["content"] + "<assistant>"

    assert format_prompt(PromptExample("Q", "C"), tokenizer=ChatTokenizer(), use_chat_template=True) == "<user>Q\n\nC<assistant>"
    with pytest.raises(ValueError, match="chat_template"):
        format_prompt(PromptExample("Q"), use_chat_template=True)


def test_split_deterministic_disjoint_and_order_free():
    examples = [PromptExample(f"instruction {i}") for i in range(200)]
    train, val, test = split_examples(examples, 0.1, 0.2, seed=3)
    assert (len(train), len(val), len(test)) == (140, 20, 40)
    assert set(train).isdisjoint(val) and set(train).isdisjoint(test) and set(val).isdisjoint(test)
    assert set(train) | set(val) | set(test) == set(examples)
    assert split_examples(examples, 0.1, 0.2, seed=3) == (train, val, test)
    shuffled = split_examples(examples[::-1], 0.1, 0.2, seed=3)
    assert [set(part) for part in shuffled] == [set(train), set(val), set(test)]
    assert set(split_examples(examples, 0.1, 0.2, seed=4)[2]) != set(test)
    with pytest.raises(ValueError):
        split_examples(examples, 0.6, 0.6)


def test_shipped_prompt_file():
    examples = load_jsonl_prompts(DATA_FILE)
    assert len(examples) >= 300
    assert len({(e.instruction, e.context) for e in examples}) == len(examples)
    assert sum(e.response is not None for e in examples) >= 200
    assert os.path.getsize(DATA_FILE) < 300_000
