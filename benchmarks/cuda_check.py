"""On a CUDA machine: train full / LoRA / QLoRA with the studio's trainer and report throughput
and peak device memory (torch.cuda.max_memory_allocated), and check the saved adapter reloads
in plain PEFT on the GPU with the same logits.

Hub access is not assumed: with --random-init the model's weights are drawn from its config
(throughput and memory do not depend on the values), so only config.json and the tokenizer
files need to travel.

    python benchmarks/cuda_check.py --model DIR [--random-init] [--steps 30] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from studio.config import RunConfig  # noqa: E402
from studio.runs.registry import RunRegistry  # noqa: E402
from studio.training import run_training  # noqa: E402

SAMPLE = ROOT / "studio" / "templates" / "samples" / "instructions.csv"


def with_random_weights(src: Path) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out = Path(tempfile.mkdtemp(prefix="random-model-"))
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src)).save_pretrained(out)
    AutoTokenizer.from_pretrained(src).save_pretrained(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--random-init", action="store_true")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--methods", default="lora,qlora,full")
    args = ap.parse_args()
    assert torch.cuda.is_available(), "this check needs a CUDA device"
    model = str(with_random_weights(Path(args.model)) if args.random_init else args.model)
    reg = RunRegistry(tempfile.mkdtemp(prefix="cuda-runs-"))
    print(f"device: {torch.cuda.get_device_name(0)}; torch {torch.__version__}")
    print(
        f"{'method':<7} {'state':<9} {'real tok/s':>11} {'s/step':>7} {'peak alloc MiB':>15} "
        f"{'peak reserved MiB':>18} {'final loss':>11}"
    )
    for method in args.methods.split(","):
        cfg = RunConfig.from_dict(
            {
                "model": model,
                "method": method,
                "data": {"path": str(SAMPLE), "max_length": 512},
                "training": {
                    "max_steps": args.steps,
                    "batch_size": args.batch_size,
                    "learning_rate": 2e-5 if method == "full" else 2e-4,
                },
            }
        )
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        run = reg.create(cfg)
        status = run_training(cfg, run).to_dict()
        train = [m.to_dict() for m in run.train_metrics()][1:]
        if status["state"] != "finished":
            print(f"{method:<7} {status['state']:<9} {status.get('message')}")
            print(run.log_path.read_text()[-3000:])
            continue
        tps = sum(m["tokens"] for m in train) / sum(m["tokens"] / m["tokens_per_s"] for m in train)
        step_s = statistics.median(m["tokens"] / m["tokens_per_s"] for m in train)
        print(
            f"{method:<7} {status['state']:<9} {tps:>11.0f} {step_s:>7.3f} "
            f"{max(m['cuda_peak_mib'] for m in train):>15.0f} {max(m['cuda_reserved_mib'] for m in train):>18.0f} "
            f"{status['final_loss']:>11.4f}"
        )
        if method != "full":
            check_reload(run, model)


def check_reload(run, model: str) -> None:
    """The adapter saved on the GPU reloads in plain PEFT and matches the playground's model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from studio.inference.playground import Playground

    ids = torch.tensor([[1, 5, 9, 14, 3, 7]], device="cuda")
    pg = Playground("cuda")
    pg.activate(run)
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model).to("cuda"), run.weights_dir()).eval()
    with torch.no_grad():
        diff = (pg.model(input_ids=ids).logits - plain(input_ids=ids).logits).abs().max().item()
    print(f"        reload in plain PEFT on cuda: max |logit diff| = {diff:.2e}")
    del pg, plain
    torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
