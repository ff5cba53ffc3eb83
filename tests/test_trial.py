"""tutorial/trial.py, the contrastive-loss trials (tutorial/experiments.md): their statistics, the second reading of
the loss, the routing measures, the reduced runs of both designs, and the pre-registered decision rules."""
import contextlib
import io
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT

sys.path.insert(0, str(ROOT / "tutorial"))

import controlled  # noqa: E402  (tutorial/controlled.py)
import trial  # noqa: E402  (tutorial/trial.py)


def test_paired_difference_interval_and_verdicts():
    a, b = [1.0, 2.0, 3.0, 4.0], [1.5, 2.4, 3.6, 4.5]  # a - b = -0.5, -0.4, -0.6, -0.5
    mean, lo, hi, verdict = controlled.paired_difference(a, b)
    half = 3.182 * torch.tensor([-0.5, -0.4, -0.6, -0.5]).std().item() / 2  # t(3 degrees of freedom) * sd / sqrt(4)
    assert mean == pytest.approx(-0.5) and lo == pytest.approx(-0.5 - half) and hi == pytest.approx(-0.5 + half)
    assert verdict == "better"  # lower is better (a loss)
    assert controlled.paired_difference(b, a)[3] == "worse"
    assert controlled.paired_difference([1.0, 2.0, 3.0], [1.1, 1.9, 3.05])[3] == "no difference"


def test_same_token_contrastive_matches_a_loop_and_leaves_the_router_alone():
    torch.manual_seed(0)
    s = controlled.Setup(d=16, experts=4, r=2, top_k=2)
    model = controlled.build(controlled.make_task(s, 0), s, "moelora_sametoken", seed=0)
    layer = model.proj
    x = torch.randn(10, 16)
    model.train()
    model(x)  # B = 0 at the start: every cosine is 0, and the loss log(N - 1)
    assert controlled.same_token_contrastive(layer, x, 0.5).item() == pytest.approx(torch.log(torch.tensor(3.0)).item())
    with torch.no_grad():
        layer.lora_B.normal_()
    model(x)
    loss = controlled.same_token_contrastive(layer, x, 0.5)
    z = torch.einsum("eor,ner->neo", layer.lora_B, (x @ layer.lora_A.reshape(8, 16).T).view(10, 4, 2))  # [n, N, d]
    expected = []
    for t in range(10):
        chosen = layer.last_top_idx[t].tolist()
        for a in chosen:
            others = [e for e in range(4) if e != a]
            cos = torch.stack([F.cosine_similarity(z[t, a], z[t, e], dim=0) for e in others]) / 0.5
            p = [e for e in chosen if e != a][0]
            expected.append(torch.logsumexp(cos, 0) - cos[others.index(p)])
    assert loss.item() == pytest.approx(torch.stack(expected).mean().item(), rel=1e-5)
    loss.backward()
    assert layer.router.weight.grad is None and layer.lora_B.grad.abs().sum() > 0


def test_routing_measure_helpers():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(500, 6, generator=g)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g))
    assert controlled.linear_cka(a, 3 * a @ q) == pytest.approx(1.0, abs=1e-5)  # rotation and scale do not count
    assert controlled.linear_cka(a, torch.randn(500, 6, generator=g)) < 0.1
    w = torch.randn(8, 16, generator=g)
    for fresh in controlled.same_scale_random_routers(w, 3, seed=0):
        assert fresh.norm().item() == pytest.approx(w.norm().item()) and not torch.allclose(fresh, w)
    gap, entropy = controlled.decisiveness(torch.tensor([[3.0, 1.0, 0.5, 0.0]]), k=2)
    assert gap == pytest.approx(0.5) and 0 < entropy < torch.log(torch.tensor(4.0)).item()
    assert controlled.decisiveness(torch.tensor([[3.0, 1.0, 0.5, 0.0]]), k=1)[0] == pytest.approx(2.0)  # top-1
    # the rank-1 teacher reads x along its centre: within a cluster its outputs point one way
    s = controlled.Setup(clusters=8, teacher_rank=1, teacher_aligned=True, sep=3.0)
    task = controlled.make_task(s, 1)
    x, c, y = controlled.sample(task, 2000, torch.Generator().manual_seed(0))
    assert controlled.within_cosine(y - x @ task["W0"].T, c) > 0.95
    assert controlled.floor_single(task, 32) > 0.3  # and still no single update fits every cluster


@pytest.mark.slow
def test_c8_quick_runs_resumes_and_decides(tmp_path, capsys):
    summary = trial.main(["--design", "c8", "--quick", "--trial_dir", str(tmp_path), "--jobs", "2"])
    out = capsys.readouterr().out
    extra = sum(arms["moe_supcon"] != trial.at_cl0_lr({"moe_cl0": {"setting": arms["moe_cl0"]}}, 0.1, 0.1)
                for arms in summary["picked"].values())  # the exploratory runs at the old default weight 0.1
    # every run prints its command: per cell 14 tuning runs (1 seed) and 5 arms x 2 reported seeds
    assert out.count("python tutorial/trial.py --design c8 --cell") == 2 * (3 * 2 + 2 * 4) + 2 * 2 * 5 + 2 * extra
    assert set(summary["verdicts"]) == {"moe_supcon", "moe_sametoken"}
    for verdict in summary["verdicts"].values():
        assert all(v.split(" (")[0] in ("supported", "partly", "not supported", "contradicted") for v in verdict.values())
    for cell, arms in summary["picked"].items():
        assert arms["moe_supcon"][1] in trial.DESIGNS["c8"].quick_grid["weight"] and arms["lora"][1] == 0.0
    frozen = trial.load_runs(tmp_path, "rank1_sep3_bal0", "moe_frozen", summary["picked"]["rank1_sep3_bal0"]["moe_frozen"], [1, 2])
    for r in frozen:  # the control's router never moved: trained and "put back to step 0" are the same router
        m = r["measures"]
        assert m["nmi"] == m["nmi_init"] and m["relevance"] == m["relevance_init"] and m["consistent_ckpt"] == 1.0
    supcon = trial.load_runs(tmp_path, "rank1_sep3_bal0", "moe_supcon", summary["picked"]["rank1_sep3_bal0"]["moe_supcon"], [1, 2])
    assert all(len(r["grad_ratio"]) == 1 and r["grad_ratio"][0] > 0 for r in supcon)  # measured at step 20 of 40
    # the first trial's results are where they always were: one folder per cell, one file per run
    assert (tmp_path / "rank1_sep3_bal0" / "lora_lr0.01_w0_tau0.1_s1001.json").exists()
    assert "### Verdicts" in (tmp_path / "report.md").read_text()
    trial.main(["--design", "c8", "--quick", "--trial_dir", str(tmp_path)])  # everything is there: nothing runs again
    assert "--cell" not in capsys.readouterr().out.split("### Tuned settings")[0]


# ---------------------------------------------------------------------------------------------------
# the second design, n16: 16 experts of rank 2

@pytest.fixture(scope="module")
def n16(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("n16")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):  # run commands are printed by this process, not by the workers
        summary = trial.main(["--design", "n16", "--quick", "--trial_dir", str(out_dir), "--jobs", "2"])
    return {"summary": summary, "out": printed.getvalue(), "dir": out_dir}


def test_n16_quick_runs_every_arm_and_resumes(n16, capsys):
    # per cell: 6 tuned arms x 2 lrs (weight and tau have one value each) on 1 tuning seed; then 7 arms x 2 seeds
    assert n16["out"].count("python tutorial/trial.py --design n16 --cell") == 2 * 6 * 2 + 2 * 7 * 2
    summary = n16["summary"]
    assert set(summary["picked"]) == {"rank1_sep3_bal0", "rank1_sep2_bal0.01"}
    assert set(summary["picked"]["rank1_sep3_bal0"]) == set(trial.DESIGNS["n16"].arms)
    report = (n16["dir"] / "report.md").read_text()
    for heading in ("### Tuned settings", "### Paired differences", "### Mechanism", "### Measures", "### Verdicts"):
        assert heading in report
    assert "moe_switch1 - moe_cl0" in report and "For the defaults: " in report
    assert set(summary["verdicts"]) == {"moe_supcon", "moe_sametoken", "moe_fixed"}
    assert summary["consequence"] == trial.consequence_n16(summary["verdicts"])
    trial.main(["--design", "n16", "--quick", "--trial_dir", str(n16["dir"])])  # all there: nothing runs again
    assert "--cell" not in capsys.readouterr().out.split("### Tuned settings")[0]


def test_n16_fixed_arm_takes_moe_cl0s_lr_and_is_not_tuned(n16):
    for cell, arms in n16["summary"]["picked"].items():
        lr = arms["moe_cl0"][0]
        for r in trial.load_runs(n16["dir"], cell, "moe_fixed", (lr, 0.1, 0.5), [1, 2]):
            assert (r["lr"], r["weight"], r["tau"]) == (lr, 0.1, 0.5) and "measures" in r
        assert not list((n16["dir"] / cell).glob("moe_fixed_*_s1001.json"))  # no tuning runs
        assert arms["moe_supcon"][1:] == (0.1, 0.5)  # the quick grid: one weight, one tau


def test_reported_settings_of_a_cell():
    picked = {arm: {"setting": (3e-2, 1.0, 0.5) if arm in trial.READINGS else (3e-3, 0.0, 0.1)}
              for arm in ("lora", "moe_frozen", "moe_supcon", "moe_sametoken", "moe_switch1")}
    picked["moe_cl0"] = {"setting": (1e-2, 0.0, 0.1)}
    n16 = trial.reported_settings(trial.DESIGNS["n16"], picked)
    assert n16["moe_fixed"] == (1e-2, 0.1, 0.5)  # moe_cl0's lr, whatever the tuned reading picked
    assert n16["moe_supcon"] == (3e-2, 1.0, 0.5) and n16["moe_switch1"] == (3e-3, 0.0, 0.1)
    c8 = trial.reported_settings(trial.DESIGNS["c8"], picked)
    assert list(c8) == ["lora", "moe_cl0", "moe_frozen", "moe_supcon", "moe_sametoken"] and c8["moe_supcon"] == (3e-2, 1.0, 0.5)


def test_n16_switch1_is_top1_with_switchs_gate_and_its_router_learns(n16):
    design, cell = trial.DESIGNS["n16"], "rank1_sep3_bal0"
    s, variant = trial.arm_setup(design, cell, "moe_switch1", (1e-2, 0.0, 0.1), quick=True)
    task = controlled.make_task(s, 1)
    model = controlled.build(task, s, variant, seed=1)
    layer = model.proj
    assert (layer.config.num_experts, layer.config.r, layer.config.top_k, layer.config.gate) == (16, 2, 1, "switch")
    assert layer.config.contrastive_weight == 0.0
    cl0 = trial.arm_setup(design, cell, "moe_cl0", (1e-2, 0.0, 0.1), quick=True)[0]
    assert (cl0.top_k, cl0.gate) == (2, "mixtral")  # the override stays with its arm
    with torch.no_grad():
        layer.lora_B.normal_()  # at init B = 0: no expert output, so no gradient to anything but B
    x, _, y = controlled.sample(task, 64, torch.Generator().manual_seed(0))
    model.train()
    F.mse_loss(model(x), y).backward()  # the task loss alone
    assert layer.router.weight.grad.abs().sum() > 0
    # and in the trial's runs the router moved: its trained and its step-0 weights route differently
    runs = trial.load_runs(n16["dir"], cell, "moe_switch1", n16["summary"]["picked"][cell]["moe_switch1"], [1, 2])
    for r in runs:
        m = r["measures"]
        assert m["mse"] != m["mse_init"] and m["gap"] > 0 and 0.0 <= m["consistent_ckpt"] <= 1.0


def test_n16_verdict_rules_on_hand_made_differences():
    cells = ["c1", "c2", "c3", "c4"]
    names = [f"{a} - {b}" for a, b in trial.N16_COMPARISONS]
    names += [f"{arm} - moe_cl0: {key}" for arm in trial.MECHANISM_ARMS for key in ("relevance", "cka")]

    def verdicts(set_verdicts=None):  # {name: verdict per cell}; every other difference "no difference"
        diffs = {(c, n): (0.0, -1.0, 1.0, "no difference") for c in cells for n in names}
        for name, per_cell in (set_verdicts or {}).items():
            for c, v in zip(cells, per_cell):
                diffs[(c, name)] = (0.0, -1.0, 1.0, v)
        out = trial.verdicts_n16(diffs, cells)
        return out, trial.consequence_n16(out)

    first = lambda text: text.split(" (")[0]
    closed = "the readings are closed here: the default stays 0"
    v, consequence = verdicts()
    assert all(first(t) == "not supported" for arm in v.values() for t in arm.values()) and consequence == closed
    assert set(v["moe_fixed"]) == {"H1", "mechanism"} and set(v["moe_supcon"]) == {"H1", "mechanism", "H3"}
    # H1: better in 2 of 4 cells
    v, consequence = verdicts({"moe_supcon - moe_cl0": ["better", "better", "no difference", "worse"]})
    assert first(v["moe_supcon"]["H1"]) == "supported" and "better in 2, worse in 1 of 4" in v["moe_supcon"]["H1"]
    assert consequence == "rerun the language-model tier with 16 x rank 2 before any default changes"
    v, consequence = verdicts({"moe_fixed - moe_cl0": ["no difference", "better", "better", "no difference"]})
    assert first(v["moe_fixed"]["H1"]) == "supported" and consequence.startswith("rerun the language-model tier")
    v, consequence = verdicts({"moe_sametoken - moe_cl0": ["better"] * 4})  # CoMoE's reading: not the project's default
    assert first(v["moe_sametoken"]["H1"]) == "supported" and consequence == closed
    v, consequence = verdicts({"moe_supcon - moe_cl0": ["worse", "worse", "better", "no difference"]})
    assert first(v["moe_supcon"]["H1"]) == "contradicted"
    assert consequence == closed + "; the docs say that the loss costs loss at 16 experts too"
    v, _ = verdicts({"moe_supcon - moe_cl0": ["worse", "better", "no difference", "no difference"]})
    assert first(v["moe_supcon"]["H1"]) == "not supported"
    # H3: the same rule on the difference from LoRA
    v, _ = verdicts({"moe_sametoken - lora": ["better", "better", "better", "no difference"]})
    assert first(v["moe_sametoken"]["H3"]) == "supported" and first(v["moe_sametoken"]["H1"]) == "not supported"
    # the mechanism: relevance higher ("worse" for a loss: interval above 0) AND CKA lower, in the same cells
    v, consequence = verdicts({"moe_fixed - moe_cl0: relevance": ["worse", "worse", "no difference", "no difference"],
                               "moe_fixed - moe_cl0: cka": ["no difference", "no difference", "better", "better"]})
    assert first(v["moe_fixed"]["mechanism"]) == "not supported" and consequence == closed  # each half, other cells
    assert "both in 0 of 4 cells; causal relevance higher in 2, CKA lower in 2" in v["moe_fixed"]["mechanism"]
    v, consequence = verdicts({"moe_fixed - moe_cl0: relevance": ["worse", "worse", "no difference", "better"],
                               "moe_fixed - moe_cl0: cka": ["better", "better", "worse", "better"]})
    assert first(v["moe_fixed"]["mechanism"]) == "supported"
    mechanism_only = ("the default weight stays 0; the docs say what the loss does (less redundant experts, more "
                      "relevant routers) and that it buys no loss")
    assert consequence == mechanism_only
    v, consequence = verdicts({"moe_fixed - moe_cl0: relevance": ["worse", "worse", "no difference", "no difference"],
                               "moe_fixed - moe_cl0: cka": ["better", "better", "no difference", "no difference"],
                               "moe_fixed - moe_cl0": ["worse", "worse", "no difference", "no difference"]})
    assert consequence == mechanism_only + "; the docs say that the loss costs loss at 16 experts too"
    v, consequence = verdicts({"moe_supcon - moe_cl0: relevance": ["worse", "worse", "worse", "worse"],
                               "moe_supcon - moe_cl0: cka": ["better", "better", "better", "better"],
                               "moe_supcon - moe_cl0": ["better", "better", "no difference", "no difference"]})
    assert first(v["moe_supcon"]["mechanism"]) == "supported" and consequence.startswith("rerun")  # H1 comes first
    v, consequence = verdicts({"moe_sametoken - moe_cl0: relevance": ["worse"] * 4,
                               "moe_sametoken - moe_cl0: cka": ["better"] * 4})
    assert first(v["moe_sametoken"]["mechanism"]) == "supported" and consequence == closed
    # lower relevance is not the mechanism, however low CKA goes
    v, _ = verdicts({"moe_supcon - moe_cl0: relevance": ["better"] * 4, "moe_supcon - moe_cl0: cka": ["better"] * 4})
    assert first(v["moe_supcon"]["mechanism"]) == "not supported"
