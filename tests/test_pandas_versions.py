"""Data intake and a short run under the locked pandas and under pandas 3.0.6, whose pyarrow
string columns run `.str` regexes in RE2 (Python-only escapes such as `\\uXXXX` are refused there).

pandas 3.0.6 lives in its own folder put first on PYTHONPATH (numpy, pyarrow and the rest come
from the venv); `make install` fills it, and this module does too when it is missing."""

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.process

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "studio" / "templates" / "samples" / "instructions.csv"
PANDAS_30 = "3.0.6"

# Rows 2-5 are garbled the usual ways (UTF-8 read as Windows-1252/Latin-1, or replaced); row 6 is
# honest Portuguese and French whose "Ã" is followed by a letter, not a continuation byte.
MOJIBAKE_CSV = (
    "prompt,completion\n"
    + "\n".join(
        [
            "what is 1 plus 1,answer 2",
            "CafÃ© menu,fine",
            "is it fine,itâ€™s fine",
            "a broken \ufffd character,ok",
            "price 5Â\u00a0euros,ok",
            "NÃO é café,naïve résumé",
        ]
        + [f"what is {i} plus 2,answer {i + 2}" for i in range(10)]
    )
    + "\n"
)
MOJIBAKE_ROWS = [2, 3, 4, 5]

SCRIPT = """
import json, sys
import pandas
from studio.cli import main
from studio.data import detect_format, read_table, validate

moji, sample, model, runs = sys.argv[1:]
table = read_table(moji)
found = {f.code: f.rows for f in validate(table, detect_format(table.df)).findings}
result = {"pandas": pandas.__version__, "mojibake": found.get("mojibake")}
result["validate"] = main(["validate", sample])
result["train"] = main(["train", "--data", sample, "--model", model, "--max-steps", "2", "--max-length", "256",
                        "--memory-check", "false", "--eval-fraction", "0", "--runs-dir", runs])
print("RESULT " + json.dumps(result))
"""


def _pandas_30_dir() -> Path:
    """The folder holding pandas 3.0.6 (installed on first use; pip's cache makes that quick)."""
    target = Path(sys.prefix) / "pandas-3.0"  # next to the venv's own packages, as `make install` does
    if not (target / f"pandas-{PANDAS_30}.dist-info").is_dir():
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "-q",
                "--no-deps",
                "--upgrade",
                "--target",
                str(target),
                f"pandas=={PANDAS_30}",
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        if proc.returncode != 0:
            pytest.fail(
                f"Could not install pandas {PANDAS_30} into {target} (`make install` does this): {proc.stderr[-2000:]}"
            )
    return target


@pytest.mark.parametrize("pandas_version", ["locked", PANDAS_30])
def test_data_intake_and_training(pandas_version, tiny_model_dir, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)
    expected = importlib.metadata.version("pandas")
    if pandas_version != "locked":
        env["PYTHONPATH"] = str(_pandas_30_dir())
        expected = pandas_version
    moji = tmp_path / "mojibake.csv"
    moji.write_text(MOJIBAKE_CSV, encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(moji), str(SAMPLE), str(tiny_model_dir), str(tmp_path / "runs")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT ", 1)[1])
    assert result["pandas"] == expected
    assert result["mojibake"] == MOJIBAKE_ROWS, result
    assert result["validate"] == 0 and "OK: training can proceed." in proc.stdout, proc.stdout[-2000:]
    assert result["train"] == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Finished 2 steps" in proc.stdout
