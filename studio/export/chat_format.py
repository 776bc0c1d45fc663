"""A run's chat template as Ollama needs it: a Go TEMPLATE, stop tokens and the system prompt.

Ollama does not run Jinja; a Modelfile's TEMPLATE is a Go template. Rather than keep a table of
known templates, we read the run's own Jinja template as a *role format*: every message is
``prefix(role) + content + suffix(role)``, the conversation starts with fixed text (often BOS), and
the generation prompt is the assistant's prefix. The pieces are found by rendering marker
conversations, and the format is accepted only if it re-renders every probe conversation exactly
as the Jinja template does (``verify``). ChatML, Llama 3 and most "header per turn" templates are
such formats; templates that fold the system prompt into the first user turn (Mistral's
``[INST]``) are not, and the Modelfile then says so instead of guessing.

A template that injects a default system prompt when none is given (SmolLM2, Qwen2.5) is modelled
as that default: Ollama's ``SYSTEM`` line puts it back, so an Ollama chat renders the same text.
"""

from __future__ import annotations

from dataclasses import astuple, dataclass

# Message contents no template changes (no spaces to trim, no markup), each found once in the output.
MARKS = {
    "system": "SYSTEMMARK7",
    "user1": "USERMARK7A",
    "assistant1": "ASSISTANTMARK7A",
    "user2": "USERMARK7B",
    "assistant2": "ASSISTANTMARK7B",
}


@dataclass(frozen=True)
class RoleFormat:
    """How a conversation is rendered: ``begin + [system] + messages + [generation prompt]``."""

    begin: str
    system_prefix: str
    system_suffix: str
    user_prefix: str
    user_suffix: str
    assistant_prefix: str
    assistant_suffix: str
    generation_prompt: str
    default_system: str | None = None  # what the template writes when no system prompt is given

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        """The text the format gives; equals the Jinja template's output when ``verify`` passed."""
        system = next((m["content"] for m in messages if m["role"] == "system"), self.default_system)
        out = [self.begin]
        if system:
            out.append(self.system_prefix + system + self.system_suffix)
        for m in messages:
            if m["role"] == "user":
                out.append(self.user_prefix + m["content"] + self.user_suffix)
            elif m["role"] == "assistant":
                out.append(self.assistant_prefix + m["content"] + self.assistant_suffix)
        if add_generation_prompt:
            out.append(self.generation_prompt)
        return "".join(out)

    def go_template(self) -> str:
        """The same format as an Ollama (Go text/template) TEMPLATE. No ``{{-`` trimming: it would
        eat the newlines that are part of the format."""
        return (
            self.begin
            + "{{ if .System }}"
            + self.system_prefix
            + "{{ .System }}"
            + self.system_suffix
            + '{{ end }}{{ range .Messages }}{{ if eq .Role "user" }}'
            + self.user_prefix
            + "{{ .Content }}"
            + self.user_suffix
            + '{{ else if eq .Role "assistant" }}'
            + self.assistant_prefix
            + "{{ .Content }}"
            + self.assistant_suffix
            + "{{ end }}{{ end }}"
            + self.generation_prompt
        )


class NoRoleFormat(ValueError):
    """The template is not a role format; the message says how it differs."""


def _split(text: str, marks: list[str]) -> list[str]:
    """The text between the marks, in order; NoRoleFormat if a mark is missing or repeated."""
    pieces, rest = [], text
    for mark in marks:
        if rest.count(mark) != 1:
            raise NoRoleFormat(f"the template does not write each message once, in order ({mark!r})")
        before, rest = rest.split(mark)
        pieces.append(before)
    pieces.append(rest)
    return pieces


def _strip_suffix(text: str, suffix: str) -> str:
    if not text.endswith(suffix):
        raise NoRoleFormat("message pieces differ between turns")
    return text[: len(text) - len(suffix)] if suffix else text


def derive(render) -> RoleFormat:
    """Read the role format out of ``render(messages, add_generation_prompt) -> str`` (the
    tokenizer's ``apply_chat_template``). Raises NoRoleFormat when the template is not one."""
    m = MARKS
    full = [
        {"role": "system", "content": m["system"]},
        {"role": "user", "content": m["user1"]},
        {"role": "assistant", "content": m["assistant1"]},
        {"role": "user", "content": m["user2"]},
        {"role": "assistant", "content": m["assistant2"]},
    ]
    seg = _split(render(full, False), [x["content"] for x in full])
    # seg: begin+sys_prefix | sys_suffix+user_prefix | user_suffix+asst_prefix | asst_suffix+user_prefix
    #      | user_suffix+asst_prefix | asst_suffix
    if seg[2] != seg[4]:
        raise NoRoleFormat("the second turn is written differently from the first")
    assistant_suffix = seg[5]
    if not seg[3].startswith(assistant_suffix):
        raise NoRoleFormat("the end of an assistant turn is not followed by the next user turn")
    user_prefix = seg[3][len(assistant_suffix) :]
    system_suffix = _strip_suffix(seg[1], user_prefix)

    one_turn = full[:2]
    user_suffix = _split(render(one_turn, False), [m["system"], m["user1"]])[2]
    with_prompt = _split(render(one_turn, True), [m["system"], m["user1"]])[2]
    if not with_prompt.startswith(user_suffix) or not seg[2].startswith(user_suffix):
        raise NoRoleFormat("the generation prompt does not follow the user turn")
    generation_prompt = with_prompt[len(user_suffix) :]
    assistant_prefix = seg[2][len(user_suffix) :]

    # Without a system message: either plain ``begin`` or ``begin + a default system prompt``.
    before_user = _split(render([full[1]], False), [m["user1"]])[0]
    before_user = _strip_suffix(before_user, user_prefix)
    default_system = None
    if seg[0].startswith(before_user):
        begin, system_prefix = before_user, seg[0][len(before_user) :]
    elif before_user.startswith(seg[0]) and before_user.endswith(system_suffix):
        begin, system_prefix = "", seg[0]
        default_system = before_user[len(seg[0]) : len(before_user) - len(system_suffix)]
    else:
        raise NoRoleFormat("a conversation without a system prompt starts differently")
    return RoleFormat(
        begin,
        system_prefix,
        system_suffix,
        user_prefix,
        user_suffix,
        assistant_prefix,
        assistant_suffix,
        generation_prompt,
        default_system,
    )


PROBES = [
    ([("user", "Hi there.")], True),
    ([("system", "Be brief.\nVery brief."), ("user", "Name a colour.")], True),
    ([("user", "What is 2+3?"), ("assistant", "5."), ("user", "And 4+4?")], True),
    ([("system", "You answer in French."), ("user", "Hello"), ("assistant", "Bonjour\n\n!")], False),
    ([("user", "Line one\nline two"), ("assistant", "Yes."), ("user", "Again"), ("assistant", "Yes.")], False),
]


def verify(fmt: RoleFormat, render) -> None:
    """NoRoleFormat unless ``fmt`` renders every probe conversation exactly as ``render`` does."""
    for turns, prompt in PROBES:
        messages = [{"role": r, "content": c} for r, c in turns]
        want, got = render(messages, prompt), fmt.render(messages, prompt)
        if want != got:
            raise NoRoleFormat(f"re-rendering a probe conversation gives {got!r} instead of {want!r}")


def role_format(tokenizer) -> RoleFormat:
    """The tokenizer's chat template as a verified RoleFormat, or NoRoleFormat saying why not."""

    def render(messages, add_generation_prompt):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    try:
        fmt = derive(render)
        verify(fmt, render)
    except NoRoleFormat:
        raise
    except Exception as exc:  # noqa: BLE001 - a template may raise on a probe (e.g. its own role-order rules)
        raise NoRoleFormat(f"the template cannot render a probe conversation ({exc})") from None
    return fmt


def stop_strings(fmt: RoleFormat | None, tokenizer) -> list[str]:
    """Strings that end an assistant turn: the special tokens of the assistant suffix (for ChatML,
    ``<|im_end|>``) and the EOS token."""
    special = set(tokenizer.all_special_tokens) | {
        t.content for t in tokenizer.added_tokens_decoder.values() if t.special
    }
    stops: list[str] = []
    if fmt is not None:
        pieces = tokenizer.convert_ids_to_tokens(tokenizer(fmt.assistant_suffix, add_special_tokens=False)["input_ids"])
        stops += [p for p in pieces if p in special]
        if not stops and fmt.assistant_suffix.strip():
            stops.append(fmt.assistant_suffix.strip())
    if tokenizer.eos_token and tokenizer.eos_token not in stops:
        stops.append(tokenizer.eos_token)
    return stops


def modelfile(
    gguf_name: str,
    fmt: RoleFormat | None,
    why_not: str | None,
    stops: list[str],
    system: str | None,
    params: dict[str, float],
    plain_text: bool = False,
) -> str:
    """An Ollama Modelfile for the GGUF next to it. ``fmt`` None: no verified chat format
    (``why_not`` says why); ``plain_text``: the run trained on raw text, so prompts go in as written."""
    lines = [f"FROM ./{gguf_name}", ""]
    template = fmt.go_template() if fmt is not None else None
    if fmt is not None and any("{{" in piece or "}}" in piece for piece in astuple(fmt) if piece):
        template, why_not = None, "the template's own text contains {{ or }}, which a Go template cannot hold"
    if template is not None and ('"""' in template or '"""' in (system or "")):
        template, why_not = None, 'the template contains """, which a Modelfile cannot quote'
    if template is not None:
        lines += [
            "# The chat template this run was trained with, as a Go template (checked against the",
            "# training template on probe conversations before export).",
            f'TEMPLATE """{template}"""',
            "",
        ]
    elif plain_text:
        lines += [
            "# This run trained on plain text: the prompt is passed through as written.",
            'TEMPLATE """{{ .Prompt }}"""',
            "",
        ]
    else:
        lines += [
            "# No TEMPLATE: this run's chat template has no Ollama equivalent that could be checked",
            f"# ({why_not}). Ollama will pick a template itself, which may not match training; prompt",
            "# llama.cpp with the template stored in the GGUF (tokenizer.chat_template) instead.",
            "",
        ]
    if system and template is not None:
        lines += [f'SYSTEM """{system}"""', ""]
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    lines += [f"PARAMETER {k} {v}" for k, v in params.items()]
    return "\n".join(lines) + "\n"
