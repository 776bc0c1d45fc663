"""Finetune Studio: no-code fine-tuning of language models (core library; no gradio here).

The flow of a run, and the module that owns each step:

    cfg = config.RunConfig.from_yaml("run.yaml")      # one typed config: UI form, CLI flags, YAML
    data.prepare(cfg.data, tokenizer, seed)           # load -> detect columns -> validate -> tokens
    planner.plan_for_config(cfg, hardware.detect())   # memory.py estimates; fits / tight / no
    training.run_training(cfg, runs.RunRegistry().create(cfg))
                                                      # recipe.py: setup -> checks -> train -> finish
    playground.Playground().activate(run)             # base + adapters by name, at the run's precision
    evaluation.evaluate(playground, run)              # base vs adapter on the held-out rows
    export.export_zip(run)                            # adapter zip; export_merged for a merged model

Entry points sit on top and nothing in the core imports them: cli.py (`finetune-studio`), and
ui/ (gradio, the only package that imports it; ui/server.py starts the page). service.py is the
one object the UI talks to. Shared leaves: precision.py (what `auto` means; one precision per
run), models.py (resolve and load a model), files.py (atomic writes, JSON reads), records.py
(the typed status and metrics a run writes), formatting.py (sizes, durations, cells, slugs).
"""

__version__ = "0.1.0"
