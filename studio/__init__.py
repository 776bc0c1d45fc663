"""Finetune Studio: no-code fine-tuning of language models (core library; no gradio here).

The flow of a run, and the module that owns each step (ARCHITECTURE.md maps every module):

    cfg = config.RunConfig.from_yaml("run.yaml")          # one typed config: UI form, CLI flags, YAML
    data.prepare(cfg.data, tokenizer, seed)               # load -> detect columns -> validate -> tokens
    planning.planner.plan_for_config(cfg, hardware.detect())  # memory.py estimates; fits / tight / no
    training.run_training(cfg, runs.registry.RunRegistry().create(cfg))
                                                          # recipe.py: setup -> checks -> train -> finish
    inference.playground.Playground().activate(run)       # base + adapters by name, at the run's precision
    evaluation.heldout.evaluate(playground, run)          # base vs adapter on the held-out rows
    export.zips.export_zip(run)                           # adapter zip; export_merged for a merged model

Imports point one way, down the layers: config and formatting; models, data, planning and runs;
training; inference; serving; evaluation; export; service.py (the one object the entry points
call); the entry points cli.py, launch.py and ui/ (gradio, the only package that imports it).
tests/test_layering.py keeps it so.
"""

__version__ = "0.1.0"
