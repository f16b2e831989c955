"""The strong evaluation (the worst case of PGD-10, PGD-50 with restarts and AutoAttack)
against a gradient-masking model, and what rests on it: the sanity flags, DM's λ chosen
on validation, and claim 5."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from study.attacks import AttackError, members, parse_attack, step_dtype
from study.evaluate import evaluate as run_suite
from study.evaluate import failed, sanity_flags
from study.methods import STRONG_ATTACK, TABLE1_ATTACK

APGD_STRONG = STRONG_ATTACK + "[version=apgd]"  # the cheaper ensemble the demo runs


class Linear(nn.Module):
    """A linear classifier; ``scale`` multiplies its logits. At 1e4 softmax saturates, the
    cross-entropy's input gradient underflows to zero on every confidently right image, and
    PGD (which ascends cross-entropy) stands still: gradient masking. AutoAttack's
    APGD-T/FAB-T (scale-free losses) and Square (no gradients) still find the breaks."""

    def __init__(self, w: torch.Tensor, scale: float = 1.0):
        super().__init__()
        self.w, self.scale = nn.Parameter(w.clone()), scale

    def forward(self, x):
        return (x.flatten(1) @ self.w.T) * self.scale


def _rows_centred(w):
    return w - w.mean(1, keepdim=True)  # no class wins on the images' common grey


@pytest.fixture(scope="module")
def evaluated():
    """An honest model (labels are its own predictions) and a masked one (a slightly
    perturbed copy, logits x 1e4) on 64 images near grey, each under the paper's PGD-10
    and the strong evaluation at Table 1's eps."""
    g = torch.Generator().manual_seed(0)
    w0 = _rows_centred(torch.randn(10, 192, generator=g))
    x = (0.5 + 0.15 * torch.randn(64, 3, 8, 8, generator=g)).clamp(0, 1)
    honest = Linear(w0)
    with torch.no_grad():
        y = honest(x).argmax(1)
    masked = Linear(_rows_centred(w0 + 0.05 * torch.randn(10, 192, generator=g)), scale=1e4)
    suite = [parse_attack(a) for a in (TABLE1_ATTACK, STRONG_ATTACK, APGD_STRONG)]
    out = {}
    for name, model in (("honest", honest), ("masked", masked)):
        records = run_suite(model, [(x, y)], suite, fast_copy=False)
        out[name] = {r["attack"]: r for r in records if not r["probe"]}
        out[name]["flags"] = sanity_flags(records)
    return out


def test_the_strong_evaluation_is_an_attack_of_the_grammar():
    strong = parse_attack("strong_linf_0.5")
    assert strong.kind == "strong" and strong.name == "strong_linf_0.5" and strong.precision == "fp32"
    assert [m.name for m in members(strong)] == [
        "pgd10_linf_0.5",
        "pgd50_linf_0.5[restarts=5,random_start=True,rel_step=2.5]",
        "autoattack_linf_0.5",
    ]
    capped = parse_attack({"name": "strong_l2_0.25", "max_images": 100})
    assert capped.max_images == 100 and members(capped)[0].norm == "l2"
    with pytest.raises(AttackError, match="unknown option 'restarts'"):
        parse_attack({"name": "strong_linf_0.5", "restarts": 2})
    # a cheaper version names itself, so a table never shows it as the standard one
    cheap = parse_attack({"name": "strong_linf_0.5", "version": "apgd"})
    assert cheap.name == APGD_STRONG and parse_attack(APGD_STRONG) == cheap
    assert members(cheap)[-1].name == "autoattack_linf_0.5[version=apgd]"
    for bad in ({"name": "strong_linf_0.5", "version": "plus"}, {"name": "pgd10_linf_0.5", "version": "apgd"}):
        with pytest.raises(AttackError, match="version"):
            parse_attack(bad)
    # fp32 ascent by default, also on a CPU with bf16 units; bf16 is a switch
    for name in ("pgd10_linf_0.5", "fgsm_linf_2.0", "strong_linf_0.5"):
        assert step_dtype(parse_attack(name), torch.device("cpu"), early_stop=True) is None
    assert step_dtype(parse_attack({"name": "pgd10_linf_0.5", "precision": "bf16"}), torch.device("cpu"), True)


def test_a_masked_model_resists_pgd10_but_not_the_worst_case(evaluated):
    masked, honest = evaluated["masked"], evaluated["honest"]
    pgd, worst = masked[TABLE1_ATTACK], masked[STRONG_ATTACK]
    assert pgd["AAI"] == pgd["AOI"] > 95  # PGD-10 breaks nothing: its gradients vanished
    assert worst["AAI"] < pgd["AAI"] - 25  # the stronger members break what PGD-10 could not
    tally = {m["attack"].split("_")[0]: m for m in worst["members"]}
    assert tally["pgd10"]["broke"] == 0 and tally["autoattack"]["broke"] > 0
    bad = {f.name for f in failed(masked["flags"])}
    assert {"no_vanishing_gradients", "pgd_near_worst"} <= bad
    near = next(f for f in masked["flags"] if f.name == "pgd_near_worst")
    assert f"worst case {worst['AAI']:.2f}" in near.detail and "autoattack_linf_0.5 broke" in near.detail
    # AutoAttack's APGD-DLR is scale-free too: the cheaper ensemble also sees through the masking
    cheap = masked[APGD_STRONG]
    assert cheap["AAI"] < pgd["AAI"] - 25 and cheap["members"][-1]["broke"] > 0
    # the honest model: no masking, PGD-10 within a few points of the worst case
    assert not {f.name for f in failed(honest["flags"])}
    assert honest[STRONG_ATTACK]["AAI"] <= honest[TABLE1_ATTACK]["AAI"]
    # the worst case on each image: robust only where every member failed
    for who in (masked, honest):
        w, p = who[STRONG_ATTACK]["robust"], who[TABLE1_ATTACK]["robust"]
        assert all(a <= b for a, b in zip(w, p))


def test_lambda_is_chosen_under_the_strong_evaluation(evaluated):
    """Two λ of DM: the masked model is the most robust under PGD-10, the honest one under
    the strong evaluation, which is what chooses."""
    from study import results

    def row(stage, lam, who, attack):
        rec = evaluated[who][attack]
        return {
            "dataset": "alphabet",
            "backbone": "resnet18",
            "method": "dm_stage12",
            "seed": 0,
            "lam": lam,
            "val_acc": rec["AOI"],
            "val_AAI": rec["AAI"],
            "stage": stage,
        }

    def chosen(attack):
        rows = [row("masked", 1.0, "masked", attack), row("honest", 10.0, "honest", attack)]
        results.select(rows)
        return {r["stage"] for r in rows if r["chosen"]}

    assert chosen(TABLE1_ATTACK) == {"masked"}  # what selection under the paper's attack would do
    assert chosen(STRONG_ATTACK) == {"honest"}
    # a record's validation AAI counts only when the strong evaluation measured it
    record = {"AOI": 90.0, "val_AAI": 80.0, "history": [{"val_acc": 90.0}]}
    cfg = type("Cfg", (), {"name": "j"})()
    model = {"dataset": "alphabet", "backbone": "resnet18", "method": "scratch", "stage": "s"}
    for attack, expect in ((TABLE1_ATTACK, None), (STRONG_ATTACK, 80.0)):
        rows, _ = results.model_rows(cfg, dict(model), {**record, "val_attack": attack}, [], [])
        assert rows[0]["val_AAI"] == expect


def test_claim5_rests_on_the_worst_case_and_a_flagged_model_gates_it(evaluated):
    """DM is the masked model, its rival AT@stage-2 the honest one: under PGD-10 DM wins
    beyond doubt, which one seed and a weaker attack make at most "suggests"; judged on the
    worst case, which the job ran, it does not win. With the sanity flags the evaluation
    raised on the masked model in the rows, the verdict is inconclusive and names them."""
    import pandas as pd

    from study import claims

    def frame(attacks, flags=False, full=False):
        rows, masks = [], {}
        models = (("dm_stage12", "masked"), ("at_stage2", "honest")) + ((("full", "honest"),) if full else ())
        for method, who in models:
            base = {"job": "j", "dataset": "alphabet", "backbone": "resnet18", "source_data": "fashion_mnist"}
            base |= {"method": method, "seed": 0, "stage": f"{who}-{method}", "selected": True, "chosen": True}
            masks[f"{who}-{method}"] = masks.setdefault(who, {})
            # the full fine-tune (for DM's AOI) meets only the paper's attack, as in the demo
            for attack in [TABLE1_ATTACK] if method == "full" else attacks:
                rec = evaluated[who][attack]
                bad = [f.name for f in failed(evaluated[who]["flags"], attack)] if flags else []
                rows.append(
                    {**base, "attack": attack, "AOI": rec["AOI"], "AAI": rec["AAI"], "DR": rec["DR"]}
                    | {"flags": "; ".join(bad) or "ok"}
                )
                masks[who][attack] = {"correct": rec["correct"], "robust": rec["robust"]}
        return pd.DataFrame(rows), masks

    df, masks = frame([TABLE1_ATTACK])
    weak = claims.by_id(claims.judge(df, {}, masks), "5")
    assert weak["verdict"] == "suggests" and weak["datasets"][0]["attack"] == TABLE1_ATTACK
    assert "pgd10_linf_0.5 only (no strong evaluation)" in weak["detail"]
    df, masks = frame([TABLE1_ATTACK, STRONG_ATTACK])
    strong = claims.by_id(claims.judge(df, {}, masks), "5")
    unit = strong["datasets"][0]
    assert unit["attack"] == STRONG_ATTACK and "under the strong evaluation (worst case of PGD-10" in strong["detail"]
    assert strong["verdict"] not in ("agree", "suggests") and unit["hi"] < 5 < weak["datasets"][0]["lo"]
    df, masks = frame([TABLE1_ATTACK, APGD_STRONG], full=True)
    cheaper = claims.by_id(claims.judge(df, {}, masks), "5")
    assert cheaper["datasets"][0]["attack"] == APGD_STRONG and cheaper["verdict"] not in ("agree", "suggests")
    assert (
        "(worst case of PGD-10, PGD-50 × 5 restarts, AutoAttack's APGD-CE and APGD-DLR) on 64 images of its one seed"
        in cheaper["detail"]
    )
    df, masks = frame([TABLE1_ATTACK, APGD_STRONG, STRONG_ATTACK])
    assert claims.by_id(claims.judge(df, {}, masks), "5")["datasets"][0]["attack"] == STRONG_ATTACK
    df, masks = frame([TABLE1_ATTACK], flags=True)
    gated = claims.by_id(claims.judge(df, {}, masks), "5")
    assert gated["verdict"] == "inconclusive" and "DM@stage-1&2 seed 0: no_vanishing_gradients" in gated["detail"]


def test_study_plan_counts_the_strong_evaluation_and_the_validation_that_chooses_lambda():
    import pytest

    from study import config, plan

    assert parse_attack(STRONG_ATTACK).steps_at_most() == 10 + 50 * 5 + 1000
    assert parse_attack(STRONG_ATTACK + "[version=apgd]").steps_at_most() == 10 + 50 * 5 + 200
    raw = {
        "name": "p",
        "datasets": {"alphabet": {"params": {"train_per_class": 10, "test_per_class": 4}}},
        "pretrain": {"backbones": ["resnet18"], "weights": "imagenet"},
        "finetune": {"datasets": ["alphabet"], "methods": ["full"], "train": {"epochs": 3}, "val_fraction": 0.1},
        "eval": {"attacks": ["pgd10_linf_0.5"]},
    }
    unit = {"train": 1.0, "attack": 0.5, "infer": 0.25, "batch": 8}

    def seconds(**changes):
        job = {**raw, **{k: {**raw[k], **v} for k, v in changes.items()}}
        table = {"device": "gpu", "costs": {"resnet18@32": unit}}
        return plan.estimate(config.parse(job), table, shares=plan.EVERY_STEP)["seconds"]  # every image, every step

    base = seconds()
    with_strong = seconds(eval={"attacks": ["pgd10_linf_0.5", {"name": STRONG_ATTACK, "max_images": 50}]})
    assert with_strong - base == pytest.approx(50 * (1260 * 0.5 + 2 * 0.25))
    # DM's λ: its validation images (26 of 260, capped at 20) under the strong evaluation
    dm = {"methods": ["dm_stage12"], "space": {"lam": [1.0, 2.0]}, "val_attack_images": 20}
    pre = {"weights": {"standard": "imagenet", "pgd3_linf_4.0": "imagenet"}}
    with_dm = seconds(finetune=dm, pretrain=pre)
    without = seconds(finetune={**dm, "val_attack_images": 1}, pretrain=pre)
    assert with_dm - without == pytest.approx(2 * 19 * 1260 * 0.5)  # two trials, one per λ
    one = {**dm, "space": {"lam": [1.0]}}  # one λ: nothing to choose, no validation attack
    assert seconds(finetune=one, pretrain=pre) == seconds(finetune={**one, "val_attack_images": 1}, pretrain=pre)


def test_every_item_of_a_suite_is_an_evaluation_item():
    """Attacks, the strong evaluation and corruptions answer the same questions: their name,
    their gradient passes and host work for `study plan`, and a run on a model's images."""
    from study import config
    from study.items import Item

    raw = {
        "name": "p",
        "datasets": {"alphabet": {"params": {"train_per_class": 10, "test_per_class": 4}}},
        "pretrain": {"backbones": ["resnet18"], "weights": "imagenet"},
        "finetune": {"datasets": ["alphabet"], "methods": ["full"]},
        "eval": {"attacks": ["pgd10_linf_0.5", STRONG_ATTACK], "corruptions": {"names": ["fog"], "severities": [3]}},
    }
    suite = config.parse(raw, check_paths=False).eval.suite("full", "alphabet")
    assert [i.name for i in suite] == ["pgd10_linf_0.5", STRONG_ATTACK, "corruption_fog_3"]
    assert all(isinstance(i, Item) for i in suite)
    every = {"correct": 1.0, "survive": 1.0}
    assert [i.passes(every) for i in suite] == [10, 10 + 50 * 5 + 1000, 0]
    assert suite[0].host_seconds(32) == 0 < suite[2].host_seconds(32)
