"""What the model will see: the rendered text of one row, marked trained, masked (prompt, not
trained on) or cut (beyond max length), token by token."""

from __future__ import annotations

from dataclasses import dataclass

from studio.data.render import Conversation, render_with_spans


@dataclass
class Segment:
    text: str
    trained: bool
    cut: bool


def token_segments(conv: Conversation, tokenizer, max_length: int) -> list[Segment]:
    """Runs of the rendered text whose tokens share a state, in order.

    Text is sliced from the rendered string by token offsets (not decoded token by token), so
    characters split across byte-level tokens stay whole.
    """
    text, spans = render_with_spans(conv, tokenizer)
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    starts = [s for s, _ in offsets]
    segments: list[Segment] = []
    for i, start in enumerate(starts):
        end = starts[i + 1] if i + 1 < len(starts) else len(text)
        if i == 0:
            start = 0
        if end <= start:
            continue
        state = (any(a <= starts[i] < b for a, b in spans), i >= max_length)
        if segments and (segments[-1].trained, segments[-1].cut) == state:
            segments[-1].text += text[start:end]
        else:
            segments.append(Segment(text[start:end], *state))
    return segments
