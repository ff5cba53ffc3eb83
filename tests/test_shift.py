"""tutorial/shift.py, reduced: the language-model experiment runs end to end, and a second call reuses the runs."""
import json
import sys

import pytest

from conftest import ROOT, shared_path

sys.path.insert(0, str(ROOT / "tutorial"))
import shift  # noqa: E402


@pytest.mark.slow
def test_shift_experiment_quick(tmp_path, capsys):
    argv = ["--quick", "--out_dir", str(tmp_path), "--contenders", "lora,moelora_warm", "--jobs", "2",
            "--model", str(shared_path("models/stories260K-hf")), "--data_dir", str(shared_path("data"))]
    shift.main(argv)
    out = capsys.readouterr().out
    assert out.count("start ") == 3 and "| moelora_warm |" in out
    rows = json.loads((tmp_path / "summary.json").read_text())
    assert rows.keys() == {"base", "lora", "moelora_warm"}
    base, lora, warm = rows["base"][0], rows["lora"][0], rows["moelora_warm"][0]
    assert set(shift.BENCHMARKS) <= base.keys()  # the whole family is graded
    assert lora["gsm8k_loss"] < base["gsm8k_loss"]  # two steps at lr 3e-3 already move it
    assert warm["mi_initial"] >= 0 and warm["h_task"] > 2  # routing per task, with its step-0 control
    assert 0 < warm["contrastive_last"] < 0.01  # step 2 of a 75-step warm-up: 2/75 of a loss below 0.4
    assert "--contrastive_warmup 75" in (tmp_path / "moelora_warm_s1" / "command.txt").read_text()
    shift.main(argv)  # every run has its results: nothing runs again
    assert "start " not in capsys.readouterr().out


def test_shift_refuses_an_unknown_contender():
    with pytest.raises(SystemExit):
        shift.parse_args(["--contenders", "lora,mystery"])


@pytest.mark.slow
def test_trial_quick(tmp_path, capsys):
    # the contrastive-loss trial's language-model tier, reduced: each run stops after step 1, keeps that adapter
    # and resumes to step 2; then its measures (a)-(e) against the routers as initialised
    argv = ["--trial", "--quick", "--out_dir", str(tmp_path), "--cl_weight", "0.01", "--cl_tau", "0.1",
            "--model", str(shared_path("models/stories260K-hf")), "--data_dir", str(shared_path("data"))]
    summary = shift.main(argv)
    out = capsys.readouterr().out
    assert out.count("start ") == 6 and out.count("--resume") == 3  # 3 arms, each in two phases
    assert set(summary["verdicts"]) == {"H1", "H2", "H3"} and summary["picked"] == {a: 3e-3 for a in shift.TRIAL_ARMS}
    run = tmp_path / "trial" / "moe_cl_lr0.003_s4"
    commands = (run / "command.txt").read_text().splitlines()
    assert "--stop_after 1" in commands[0] and commands[1].endswith("--resume")
    assert "--contrastive_weight 0.01 --contrastive_temperature 0.1" in commands[0]
    assert (run / "adapter_step1.safetensors").exists()
    row = summary["rows"]["moe_cl"][0]
    # the measures' own answer loss is train.py's, from the saved adapter: the loading and the cutoff agree
    assert row["answer_loss"] == pytest.approx(row["gsm8k_loss"], abs=1e-4)
    for key in ("relevance", "nmi", "mi_bits", "gap", "entropy", "consistent_dropout"):
        assert key in row and key + "_init" in row
    assert 0 <= row["consistent_ckpt"] <= 1 and 0 <= row["nmi"] <= 1 and "cka" in row
    assert "validation_loss" in summary["rows"]["lora"][0] and "nmi" not in summary["rows"]["lora"][0]
    shift.main(argv)  # every run has its results and measures: nothing runs again
    assert "start " not in capsys.readouterr().out
