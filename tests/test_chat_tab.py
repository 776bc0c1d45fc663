"""The Chat tab's handlers, called without a browser: picking a run loads its adapter, Send streams
base and adapter answers into the two chatbots, Regenerate reads the same named inputs and
replaces the last answer, Evaluate fills its table. The unit tests need no trained model; the
rest chat with the session's trained tiny run (tests/conftest.py)."""

import functools

import gradio as gr
import pytest

from studio.service import Studio
from studio.ui import chat_tab

QUESTION = "what is 3 plus 4"


def _build(studio):
    with gr.Blocks() as demo:
        tab = chat_tab.build_chat_tab(studio)
    return demo, tab


@pytest.fixture
def empty(tmp_path):
    """The tab on a Studio with no runs."""
    studio = Studio(tmp_path / "runs")
    return studio, _build(studio)[1]


@pytest.fixture(scope="module")
def chat(trained_tiny_run):
    studio = Studio(trained_tiny_run.path.parent)
    return studio, _build(studio)[1], trained_tiny_run


def _inputs(tab, **values):
    """Send's {component: value}: every chat input at its default, then ``values`` by field name."""
    data = {comp: comp.value for comp in tab.chat_inputs}
    data |= {tab.base: [], tab.adapted: [], tab.system: ""}
    return data | {getattr(tab, name): value for name, value in values.items()}


def _reply(history) -> str:
    assert history[-1]["role"] == "assistant"
    return history[-1]["content"]


@pytest.mark.unit
def test_send_and_regenerate_read_the_same_named_inputs(tmp_path):
    demo, tab = _build(Studio(tmp_path / "runs"))
    by_handler = {
        fn.fn.func.__name__: fn
        for fn in demo.fns.values()
        if isinstance(fn.fn, functools.partial) and fn.fn.func in (chat_tab.respond, chat_tab.regenerate_last)
    }
    send, regenerate = by_handler["respond"], by_handler["regenerate_last"]
    assert {c._id for c in send.inputs} == {c._id for c in regenerate.inputs} == {c._id for c in tab.chat_inputs}
    assert send.inputs_as_dict and regenerate.inputs_as_dict  # read by name, never by position
    assert [c._id for c in regenerate.outputs] == [tab.base._id, tab.adapted._id]  # the message box is left alone


@pytest.mark.unit
def test_nothing_is_sent_without_a_message_a_run_or_valid_settings(empty):
    studio, tab = empty
    assert list(chat_tab.respond(studio, tab, _inputs(tab, message="  ", run="some-run"))) == []
    with pytest.warns(UserWarning, match="Pick a trained run first"):
        assert list(chat_tab.respond(studio, tab, _inputs(tab, message=QUESTION, run=None))) == []
    with pytest.warns(UserWarning, match="Repetition penalty must be between 1"):
        assert list(chat_tab.respond(studio, tab, _inputs(tab, message=QUESTION, run="r", repetition_penalty=9))) == []
    with pytest.warns(UserWarning, match="Nothing to regenerate yet"):
        assert list(chat_tab.regenerate_last(studio, tab, _inputs(tab, run="some-run"))) == []
    assert chat_tab.cleared(tab) == {tab.base: [], tab.adapted: []}


@pytest.mark.unit
def test_picking_nothing_or_an_unknown_run_says_so_and_evaluate_needs_a_run(empty):
    studio, tab = empty
    assert chat_tab.pick(studio, tab, None) == {
        tab.run_status: chat_tab.PICK_A_RUN,
        tab.eval_table: None,
        tab.eval_notes: "",
    }
    out = chat_tab.pick(studio, tab, "no-such-run")
    assert out[tab.run_status].startswith("**Can't load this adapter.**") and "Traceback" not in out[tab.run_status]
    with pytest.warns(UserWarning, match="Pick a trained run first"):
        out = chat_tab.run_evaluation(studio, tab, {tab.run: None, tab.eval_samples: 3})
    assert out == {tab.eval_table: gr.skip(), tab.eval_notes: gr.skip()}
    out = chat_tab.run_evaluation(studio, tab, {tab.run: "no-such-run", tab.eval_samples: 3})
    assert out[tab.eval_notes].startswith("**Can't evaluate.**") and out[tab.eval_table] == gr.skip()


def test_picking_the_run_loads_its_adapter_and_shows_its_losses(chat):
    studio, tab, run = chat
    assert run.id in [value for _, value in tab.run.choices]
    assert run.id in [value for _, value in chat_tab.refreshed_choices(studio).choices]
    out = chat_tab.pick(studio, tab, run.id)
    assert f"Adapted pane: `{run.id}`" in out[tab.run_status] and "adapter disabled" in out[tab.run_status]
    assert [row[0] for row in out[tab.eval_table]] == ["base", "adapter"]  # losses recorded in training


def test_respond_streams_base_and_adapter_answers_into_the_two_chatbots(chat):
    studio, tab, run = chat
    outs = list(chat_tab.respond(studio, tab, _inputs(tab, message=f"  {QUESTION} ", run=run.id, max_new=8)))
    assert len(outs) >= 2 and all(set(o) == {tab.message, tab.base, tab.adapted} for o in outs)
    assert all(o[tab.message] == "" for o in outs)  # the message box empties at once
    assert _reply(outs[0][tab.base]) == "" and _reply(outs[0][tab.adapted]) == ""  # both panes open empty
    last = outs[-1]
    for pane in (tab.base, tab.adapted):
        assert [m["role"] for m in last[pane]] == ["user", "assistant"]
        assert last[pane][0]["content"] == QUESTION
    assert _reply(last[tab.adapted]) and _reply(last[tab.base]) != _reply(last[tab.adapted])


def test_regenerate_reuses_the_same_inputs_and_replaces_the_last_answer(chat):
    studio, tab, run = chat
    data = _inputs(tab, message=QUESTION, run=run.id, max_new=8)
    sent = list(chat_tab.respond(studio, tab, data))[-1]
    # Send's inputs as the page holds them after the first answer (a new message half typed).
    again = data | {tab.message: "half typed", tab.base: sent[tab.base], tab.adapted: sent[tab.adapted]}
    outs = list(chat_tab.regenerate_last(studio, tab, again))
    assert outs and all(set(o) == {tab.base, tab.adapted} for o in outs)  # the typed message is kept
    last = outs[-1]
    for pane in (tab.base, tab.adapted):  # the last exchange replaced, not appended; greedy: the same answer
        assert [m["role"] for m in last[pane]] == ["user", "assistant"] and last[pane][0]["content"] == QUESTION
        assert _reply(last[pane]) == _reply(sent[pane])


def test_evaluate_fills_its_table_and_answers_held_out_prompts(chat):
    studio, tab, run = chat
    out = chat_tab.run_evaluation(
        studio, tab, {tab.run: run.id, tab.eval_samples: 1}, progress=lambda *args, **kwargs: None
    )
    rows = out[tab.eval_table]
    assert [r[0] for r in rows] == ["base", "adapter"] and all(r[1] > 0 and r[2] > 1 for r in rows)
    assert out[tab.eval_notes].startswith("Scored 4 held-out rows") and "Held-out prompt 1" in out[tab.eval_notes]
    assert run.evaluation()["rows"] == 4  # stored with the run: picking it again shows the same
    assert chat_tab.pick(studio, tab, run.id)[tab.eval_table] == rows
