"""kept.jsonl is read line by line; every bad line is named by file:line before anything trains."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trainmedic.heal.data import from_records, read_kept
from trainmedic.heal.errors import HealError


def write(tmp_path: Path, *lines: str) -> Path:
    path = tmp_path / "kept.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


GOOD = json.dumps({"prompt": "Q: x?\nA:", "completion": " yes"})


def test_prompt_completion_lines_are_read_with_their_line_numbers(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD, "", json.dumps({"prompt": "p", "completion": "c", "score": 0.9}))
    examples = read_kept(path)
    assert [e.line for e in examples] == [1, 3]
    assert examples[1].prompt == "p" and examples[1].completion == "c" and not examples[1].is_chat


def test_chat_messages_split_into_prompt_and_the_last_assistant_message(tmp_path: Path) -> None:
    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi?"},
        {"role": "assistant", "content": "Hello."},
    ]
    (ex,) = read_kept(write(tmp_path, json.dumps({"messages": chat})))
    assert ex.is_chat
    assert ex.prompt == chat[:2] and ex.completion == chat[2:]


def test_malformed_json_names_file_and_line_and_counts_the_other_bad_lines(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD, GOOD, '{"prompt": "p", "completion": ', GOOD, "[1, 2]")
    with pytest.raises(HealError) as err:
        read_kept(path)
    message = str(err.value)
    assert message.startswith(f"{path}:3: not valid JSON")
    assert "1 more bad line(s): 5" in message


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        ({"prompt": "p"}, "missing key(s) 'completion'"),
        ({"completion": "c"}, "missing key(s) 'prompt'"),
        ({"text": "t"}, "keys found: text"),
        ({"prompt": "p", "completion": "   "}, "empty 'completion'"),
        ({"prompt": "p", "completion": 3}, "both be strings"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "must be the assistant's completion"),
        ({"messages": [{"role": "assistant", "content": ""}]}, "empty assistant completion"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ({"messages": "hi"}, "must be a list of messages"),
        ({"prompt": [], "completion": []}, "empty 'completion'"),
    ],
)
def test_each_kind_of_bad_line_is_a_clear_error_at_its_line(
    tmp_path: Path, record: object, expected: str
) -> None:
    path = write(tmp_path, GOOD, json.dumps(record))
    with pytest.raises(HealError) as err:
        read_kept(path)
    assert str(err.value).startswith(f"{path}:2: ")
    assert expected in str(err.value)


def test_a_missing_file_or_a_directory_is_named(tmp_path: Path) -> None:
    with pytest.raises(HealError, match="no such file"):
        read_kept(tmp_path / "nope.jsonl")
    with pytest.raises(HealError, match="is a directory"):
        read_kept(tmp_path)


def test_in_memory_records_name_the_index_of_a_bad_one() -> None:
    assert len(from_records([{"prompt": "p", "completion": "c"}])) == 1
    with pytest.raises(HealError, match=r"^data\[1\]: missing key"):
        from_records([{"prompt": "p", "completion": "c"}, {"prompt": "p"}])


def test_reading_data_and_the_heal_api_do_not_import_torch() -> None:
    import subprocess
    import sys

    code = (
        "import sys; import trainmedic.heal, trainmedic.heal.round, trainmedic.heal.render, trainmedic.cli; "
        "from trainmedic.heal.data import read_kept; "
        "bad = [m for m in ('torch', 'transformers', 'peft') if m in sys.modules]; "
        "sys.exit(f'imported {bad}' if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
