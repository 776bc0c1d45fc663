"""The Studio service: dataset import and inspection as the Data tab drives them."""

from pathlib import Path

import pytest

import studio.service as service
from studio.data import DataError

pytestmark = pytest.mark.unit

SAMPLE = Path(__file__).resolve().parents[1] / "studio" / "templates" / "samples" / "instructions.csv"


def test_import_copies_by_hash_and_remapping_does_not_reread(runs_dir, tiny_model_dir, monkeypatch):
    reads = []
    real = service.read_table
    monkeypatch.setattr(service, "read_table", lambda p, *a, **k: (reads.append(p), real(p, *a, **k))[1])
    studio = service.Studio(runs_dir)
    path = studio.import_dataset(SAMPLE)
    assert Path(path).parent == (runs_dir / "datasets").resolve() and Path(path).read_bytes() == SAMPLE.read_bytes()
    model = str(tiny_model_dir)
    detected = studio.inspect_dataset(path, "", model, 128)
    mine = studio.inspect_dataset(path, "instruction=prompt,output=response", model, 128)
    assert detected.report.mapping.detected and not mine.report.mapping.detected
    assert len(reads) == 1  # one read for the import and both inspections
    assert "ANSWER" in "".join(s.text for s in mine.segments(0) if s.trained)


def test_unmappable_columns_still_give_a_view_and_unreadable_files_raise(runs_dir, tmp_path, tiny_model_dir):
    studio = service.Studio(runs_dir)
    odd = tmp_path / "odd.csv"
    odd.write_text("name,age\nann,3\n")
    view = studio.inspect_dataset(studio.import_dataset(odd), "", str(tiny_model_dir))
    assert view.report is None and "No usable columns" in view.problem and view.columns == ["name", "age"]
    bad = tmp_path / "bad.json"
    bad.write_text("[{")
    with pytest.raises(DataError, match="not valid JSON"):
        studio.import_dataset(bad)
    assert not any(p.name.endswith("bad.json") for p in (runs_dir / "datasets").iterdir())
