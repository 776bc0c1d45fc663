#!/usr/bin/env bash
# Prepare what benchmarks/gpu_suite.py needs on a device machine, whose image has no trl, datasets,
# bitsandbytes or liger-kernel and cannot reach a registry: the wheels (into .whl, about 46 MB) and the
# default model's tokenizer (into .gpu/tokenizer). Both folders are git-ignored; name them in the
# device call's `carry`. The command to run there is in benchmarks/gpu_suite.py's docstring.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
mkdir -p .whl .gpu
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl \
    trl==1.16.0 datasets==5.2.0 peft==0.21.2 bitsandbytes==0.50.2 liger-kernel==0.8.5 dill==0.4.1 multiprocess==0.70.19
"$PY" -c "
from studio import models
models.load_tokenizer('default').save_pretrained('.gpu/tokenizer')
"
du -sh .whl .gpu
