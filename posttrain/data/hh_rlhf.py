"""Anthropic HH-RLHF dialogues (one string per side) -> conversations.

HH-RLHF stores each side of a pair as one string, turns marked ``"\\n\\nHuman:"`` and
``"\\n\\nAssistant:"``. ``to_messages`` splits it into ``{role, content}`` turns; the preference
loader then takes the leading turns both sides share as the prompt (in nearly every row, all but
the last assistant turn) and the rest as the two responses. A string that is not a well-formed
dialogue (text before the first marker, two turns of one role in a row, a last turn that is not
the assistant's) raises a `UserError` whose reason is ``malformed HH-RLHF dialogue``, so
``data.on_bad_row: drop`` counts it; identical and empty responses are the pair renderer's to
count (``on_bad_pair: drop``).
"""

from __future__ import annotations

import re

from posttrain.errors import UserError, problem
from posttrain.types import Message, RowSource

HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"
_TURN = re.compile(r"\n\n(Human|Assistant):")
_ROLES = {"Human": "user", "Assistant": "assistant"}
MALFORMED = "malformed HH-RLHF dialogue"


def is_dialogue(value: object) -> bool:
    """Whether a field holds an HH-RLHF style dialogue string."""
    return isinstance(value, str) and value.lstrip(" ").startswith(HUMAN) and ASSISTANT in value


def to_messages(text: str, source: RowSource, field: str) -> list[Message]:
    """The dialogue's turns, each stripped of the space after its marker."""
    parts = _TURN.split(text)
    where = f"{source} field {field!r}"
    if parts[0].strip():
        raise UserError(problem(where, f"{MALFORMED}: text before the first Human turn",
                                "start the dialogue with '\\n\\nHuman:' or drop the row"))
    messages: list[Message] = []
    for marker, content in zip(parts[1::2], parts[2::2]):
        role = _ROLES[marker]
        if messages and messages[-1]["role"] == role:
            raise UserError(problem(where, f"{MALFORMED}: two {marker} turns in a row",
                                    "merge the turns or drop the row (data.on_bad_row: drop)"))
        messages.append(Message(role=role, content=content.strip()))
    if not messages or messages[-1]["role"] != "assistant":
        raise UserError(problem(where, f"{MALFORMED}: the last turn is not the Assistant's",
                                "end the dialogue with an Assistant turn or drop the row"))
    return messages
