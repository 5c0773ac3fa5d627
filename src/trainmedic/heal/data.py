"""Reading the kept examples of a heal round: `kept.jsonl`, validated line by line, without torch.

One JSON object per line, in one of the shapes TRL reads:

- `{"prompt": "...", "completion": "..."}`: plain text;
- `{"prompt": [messages], "completion": [messages]}`: conversational prompt and completion;
- `{"messages": [...]}`: a chat whose last message, from the assistant, is the completion.

Other keys (scores, ids) are ignored, so a filter's output can be fed as is. Every bad line is
an error that names `file:line` before anything is trained: a line the round cannot read is a
bug upstream, and silently dropping it would make the round train on something else.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainmedic.heal.errors import HealError

Message = dict[str, str]
ROLES = frozenset({"system", "user", "assistant", "tool"})
SHOWN_BAD_LINES = 10  # more than this many bad lines: list the first ones and the count


@dataclass(frozen=True)
class Example:
    """One kept example; `prompt`/`completion` are both text or both lists of chat messages."""

    line: int
    prompt: str | list[Message]
    completion: str | list[Message]

    @property
    def is_chat(self) -> bool:
        return isinstance(self.completion, list)


def read_kept(path: str | Path) -> list[Example]:
    """Every example of `path`; raises `HealError` naming each bad line (the first ones shown)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise HealError("no such file", path=path) from None
    except IsADirectoryError:
        raise HealError("is a directory; expected a .jsonl file of kept examples", path=path) from None
    except UnicodeDecodeError as exc:
        raise HealError(f"not UTF-8 text ({exc.reason} at byte {exc.start})", path=path) from None
    except OSError as exc:
        raise HealError(f"cannot be read: {exc.strerror or exc}", path=path) from None
    examples: list[Example] = []
    bad: list[tuple[int, str]] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            examples.append(parse_line(raw, number))
        except HealError as exc:
            bad.append((number, exc.message))
    if bad:
        first_line, first_message = bad[0]
        more = ""
        if len(bad) > 1:
            shown = ", ".join(str(n) for n, _ in bad[1 : 1 + SHOWN_BAD_LINES])
            tail = ", ..." if len(bad) > 1 + SHOWN_BAD_LINES else ""
            more = f" ({len(bad) - 1} more bad line(s): {shown}{tail})"
        raise HealError(first_message + more, path=path, line=first_line)
    return examples


def parse_line(raw: str, line: int) -> Example:
    """One line of kept.jsonl as an `Example`; `HealError` (without the path) says what is wrong."""
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise HealError(f"not valid JSON ({exc.msg} at column {exc.colno})") from None
    return parse_record(obj, line)


def from_records(records: Sequence[Mapping[str, Any]], source: str = "data") -> list[Example]:
    """Examples from in-memory records shaped like kept.jsonl lines; errors name `source[i]`."""
    out = []
    for i, record in enumerate(records):
        try:
            out.append(parse_record(record, i + 1))
        except HealError as exc:
            raise HealError(exc.message, path=f"{source}[{i}]") from None
    return out


def parse_record(obj: Any, line: int) -> Example:
    """One decoded record as an `Example` (see the module docstring for the shapes accepted)."""
    if not isinstance(obj, Mapping):
        raise HealError(f"expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        return _from_messages(obj["messages"], line)
    missing = [k for k in ("prompt", "completion") if k not in obj]
    if missing:
        found = ", ".join(sorted(obj)) or "none"
        raise HealError(
            f"missing key(s) {', '.join(repr(k) for k in missing)}: each line needs 'prompt' and "
            f"'completion' (or chat 'messages'); keys found: {found}"
        )
    prompt, completion = obj["prompt"], obj["completion"]
    if isinstance(prompt, str) and isinstance(completion, str):
        if not completion.strip():
            raise HealError("empty 'completion': there is nothing to learn from this line")
        return Example(line, prompt, completion)
    if isinstance(prompt, list) and isinstance(completion, list):
        p, c = _messages(prompt, "prompt"), _messages(completion, "completion")
        if not c or not any(m["content"].strip() for m in c):
            raise HealError("empty 'completion': there is nothing to learn from this line")
        return Example(line, p, c)
    raise HealError(
        "'prompt' and 'completion' must both be strings or both lists of chat messages, "
        f"got {type(prompt).__name__} and {type(completion).__name__}"
    )


def _from_messages(value: Any, line: int) -> Example:
    messages = _messages(value, "messages")
    if not messages:
        raise HealError("'messages' is empty")
    last = messages[-1]
    if last["role"] != "assistant":
        raise HealError(f"the last message is from {last['role']!r}; it must be the assistant's completion")
    if not last["content"].strip():
        raise HealError("empty assistant completion: there is nothing to learn from this line")
    return Example(line, messages[:-1], [last])


def _messages(value: Any, key: str) -> list[Message]:
    if not isinstance(value, list):
        raise HealError(f"{key!r} must be a list of messages, got {type(value).__name__}")
    out = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise HealError(f"{key}[{i}] must be an object with 'role' and 'content'")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise HealError(f"{key}[{i}].role must be one of {sorted(ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise HealError(f"{key}[{i}].content must be a string, got {type(content).__name__}")
        out.append({"role": role, "content": content})
    return out
