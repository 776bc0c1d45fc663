"""A tab's settings declared once, by RunConfig dotted name: components made from the config's
fields (type, default, docstring help), values read and updates written by name."""

from __future__ import annotations

from typing import Any, Callable

import gradio as gr

from studio.config import field_help, leaf_fields

FIELD_TYPES = {name: (ftype, default) for name, ftype, default in leaf_fields()}


class Form:
    """The tab's settings by RunConfig dotted name. ``add`` makes a component of the field's type
    with its default and docstring help; adding a setting to the page is one ``add`` line."""

    def __init__(self):
        self.fields: dict[str, gr.Component] = {}

    def add(self, name: str, label: str, component: Callable | None = None, **kwargs) -> gr.Component:
        ftype, default = FIELD_TYPES[name]
        kwargs = {"label": label, "info": field_help(name), **kwargs}
        if component is not None:
            made = component(value=default, **kwargs)
        elif ftype is bool:
            made = gr.Checkbox(default, **kwargs)
        elif ftype in (int, float):
            made = gr.Number(value=default, **({"precision": 0} if ftype is int else {}), **kwargs)
        else:
            made = gr.Textbox(value=default, **kwargs)
        self.fields[name] = made
        return made

    @property
    def components(self) -> list[gr.Component]:
        return list(self.fields.values())

    def values(self, data: dict) -> dict[str, Any]:
        """The form's values by name, from an event's ``{component: value}``."""
        return {name: data[comp] for name, comp in self.fields.items()}

    def updates(self, changes: dict[str, Any]) -> dict[gr.Component, Any]:
        """``{component: value}`` for the settings in ``changes`` that the form shows."""
        return {self.fields[name]: value for name, value in changes.items() if name in self.fields}
