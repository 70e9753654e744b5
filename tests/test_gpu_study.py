"""benchmarks/gpu_study.py's smoke (``--device cpu --quick``): the one-call GPU study at toy
sizes, end to end (corpus from the installed packages' sources, probe, compare, report)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_study.py"


def _module():
    spec = importlib.util.spec_from_file_location("gpu_study", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gpu_study_quick_on_cpu(tmp_path: Path) -> None:
    gs = _module()
    out = tmp_path / "study"
    assert (
        gs.main(["--device", "cpu", "--quick", "--out", str(out), "--studies", "models,optims"])
        == 0
    )
    meta = json.loads((out / "corpus" / "meta.json").read_text())
    assert meta["tokenizer"]["kind"] == "byte" and meta["tokens"]["train"] > 100_000
    data = json.loads((out / "gpu_study.json").read_text())
    res = data["results"]
    assert set(res) == {"gpt", "ngpt", "geonorm"}
    for r in res.values():
        assert {"final_val_loss", "steps_to_target", "ms_per_step", "lr"} <= set(r)
        assert {"tokens_to_target", "wall_s_to_target", "budget_speedup"} <= set(r)
        assert r["budget_fractions"] == [0.5, 1.0] and r["seq_len"] == 32
    report = (out / "gpu_study.md").read_text()
    assert "tokens to target" in report and "wall-clock to target" in report
    assert (out / "compare" / "loss_curves.png").stat().st_size > 1000
    # the optimizer study: nGPT with each of the six recipes, AdamW's loss the target
    optims = data["optim_results"]
    assert list(optims) == [f"ngpt+{o}" for o in gs.OPTIMS.split(",")]
    for r in optims.values():
        assert r["baseline"] == "ngpt+adamw" and r["model"] == "ngpt"
        assert {"final_val_loss_ci", "steps_to_target_ci", "budget_speedup"} <= set(r)
    assert [r["optim"] for r in optims.values()] == gs.OPTIMS.split(",")
    assert "## ngpt with 6 optimizers" in report and "ngpt+sphere_muon" in report
    assert set(data["info"]["optims"]) == {"steps", "options", "probe_ms_per_step", "wall_s"}
    assert data["info"]["optims"]["options"] == {"n_layer": 1}  # the study's own depth
    assert all(r["n_params"] < res["ngpt"]["n_params"] for r in optims.values())  # 1 layer, not 2


def test_gpu_study_one_study_and_bad_studies(tmp_path: Path) -> None:
    gs = _module()
    out = tmp_path / "study"
    assert gs.main(["--device", "cpu", "--quick", "--out", str(out)]) == 0  # models alone
    data = json.loads((out / "gpu_study.json").read_text())
    assert "optim_results" not in data and not (out / "optims").exists()
    with pytest.raises(SystemExit):
        gs.main(["--device", "cpu", "--quick", "--out", str(out), "--studies", "models,adam"])


def test_plan_steps_fits_the_time_budget() -> None:
    gs = _module()
    ms = {"gpt": 30.0, "ngpt": 40.0, "geonorm": 35.0}
    s = gs.plan_steps(ms, 330.0, 2, 50, 200, 4000)
    assert s % 50 == 0 and 200 <= s <= 4000
    per_step = sum(ms.values()) / 1000 * (5 * 0.2 + 2 * 1.75) * 1.15
    assert s * per_step <= 330.0 < (s + 50) * per_step
    assert gs.plan_steps(ms, 1.0, 2, 50, 200, 4000) == 200


def test_source_files_cap_and_order(tmp_path: Path) -> None:
    gs = _module()
    for i in range(20):
        (tmp_path / f"m{i}.py").write_text("x = 1\n" * (i + 1))
    (tmp_path / "notes.txt").write_text("not python")
    files = gs.source_files([tmp_path], max_bytes=60)
    assert files and all(f.suffix == ".py" for f in files)
    assert sum(f.stat().st_size for f in files) <= 60
    assert files == gs.source_files([tmp_path], max_bytes=60)  # a fixed shuffle
    with pytest.raises(SystemExit):
        gs.main(["--device", "cuda", "--bogus"])
