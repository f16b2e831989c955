"""The sanity flags: each one must be able to fail, and on a real model the suite's
evaluation must pass them (or show why not)."""

from study.attacks import parse_attack
from study.evaluate import eps0_probe, evaluate, failed, plan, sanity_flags


def _rec(name, robust, correct=None, **extra):
    """A stored evaluation record, as evaluate() writes it."""
    from dataclasses import asdict

    a = parse_attack(name) if isinstance(name, str) else parse_attack(dict(name))
    correct = correct or "1" * len(robust)
    n = len(robust)
    rec = {
        "attack": a.name,
        "images": n,
        "AOI": 100 * correct.count("1") / n,
        "AAI": 100 * robust.count("1") / n,
        "DR": 0.0,
        "max_delta": a.eps_pixels,
        "eps_pixels": a.eps_pixels,
        "in_range": True,
        "vanishing_gradients": 0,
        "notes": [],
        "seconds": 0.0,
        "correct": correct,
        "robust": robust,
        "spec": asdict(a),
        "probe": False,
    }
    rec.update(extra)
    return rec


def _names(flags):
    return {(f.name, f.attack) for f in failed(flags)}


def test_consistent_records_pass_every_flag():
    recs = [
        _rec("pgd10_linf_0.5", "1110"),
        _rec("pgd10_linf_2.0", "1100"),
        _rec("fgsm_linf_0.5", "1110"),
        _rec("fgsm_linf_2.0", "1110"),
        _rec("autoattack_linf_0.5", "1100"),
        _rec({"name": "pgd10_linf_0.5", "eps": 0}, "1111", probe=True),
    ]
    flags = sanity_flags(recs)
    assert not failed(flags)
    names = {f.name for f in flags}
    assert names == {
        "in_ball",
        "in_range",
        "aai_le_aoi",
        "no_vanishing_gradients",
        "autoattack_checks",
        "eps0_aai_eq_aoi",
        "monotone_eps",
        "pgd_le_fgsm",
        "autoattack_le_pgd",
    }


def test_each_flag_can_fail():
    recs = [
        _rec("pgd10_linf_0.5", "1100", max_delta=0.01),  # outside its ball
        _rec("pgd10_linf_2.0", "1110", in_range=False),  # AAI rose with eps; out of [0,1]
        _rec("fgsm_linf_2.0", "1000", vanishing_gradients=3),  # FGSM beat PGD; masking
        _rec("autoattack_linf_2.0", "1111", notes=["it seems to be a randomized defense!"]),
        _rec({"name": "pgd10_linf_0.5", "eps": 0}, "0111", probe=True),
    ]
    got = _names(sanity_flags(recs))
    assert ("in_ball", "pgd10_linf_0.5") in got
    assert ("in_range", "pgd10_linf_2.0") in got
    assert ("monotone_eps", "pgd10_linf_2.0 vs pgd10_linf_0.5") in got
    assert ("pgd_le_fgsm", "pgd10_linf_2.0 vs fgsm_linf_2.0") in got
    assert ("no_vanishing_gradients", "fgsm_linf_2.0") in got
    assert ("autoattack_le_pgd", "autoattack_linf_2.0 vs pgd10_linf_2.0") in got
    assert ("autoattack_checks", "autoattack_linf_2.0") in got
    assert ("eps0_aai_eq_aoi", "pgd10_linf_0.0") in got
    assert failed(sanity_flags(recs), "fgsm_linf_2.0")  # flags are found by the attack they concern


def test_comparisons_use_the_common_images_only():
    # AutoAttack on the first 2 images only: compared with PGD on those 2, not on all 4
    recs = [_rec("pgd10_linf_0.5", "0111"), _rec("autoattack_linf_0.5", "01")]
    assert not failed(sanity_flags(recs))
    recs = [_rec("pgd10_linf_0.5", "0011"), _rec("autoattack_linf_0.5", "01")]
    assert _names(sanity_flags(recs)) == {("autoattack_le_pgd", "autoattack_linf_0.5 vs pgd10_linf_0.5")}


def test_probe_and_plan():
    suite = [parse_attack(n) for n in ("autoattack_linf_0.5", "fgsm_linf_2.0", "pgd10_linf_0.5")]
    assert eps0_probe(suite).name == "fgsm_linf_0.0"
    runs = plan(suite, 1000, 0)
    assert [r[2] for r in runs] == [False, False, False, True] and runs[-1][1] == 32
    assert len({r[3] for r in runs}) == 4 and plan(suite, 1000, 1)[0][3] != runs[0][3]


def test_evaluate_on_a_trained_model_keeps_results_and_reuses_them(trained):
    model, batches = trained
    suite = [parse_attack(n) for n in ("pgd10_linf_0.5", "pgd10_linf_2.0", "fgsm_linf_2.0")]
    seen, cache = [], {}
    recs = evaluate(model, batches, suite, max_images=64, cache=cache, on_result=lambda k, r: seen.append(k))
    assert len(recs) == 4 and len(seen) == 4 and recs[-1]["probe"]
    assert all(r["images"] == 64 and len(r["robust"]) == 64 for r in recs[:-1])
    assert recs[-1]["images"] == 32  # the eps = 0 check: EPS0_IMAGES
    flags = sanity_flags(recs)
    for name in ("in_ball", "in_range", "aai_le_aoi", "eps0_aai_eq_aoi", "monotone_eps"):
        assert all(f.passed for f in flags if f.name == name), [f for f in flags if f.name == name]
    seen.clear()
    again = evaluate(None, batches, suite, max_images=64, cache=cache, on_result=lambda k, r: seen.append(k))
    assert again == recs and seen == []  # all from the cache: no model needed


def test_attack_names_with_options_become_valid_mlflow_metric_keys():
    import re

    from study.attacks import parse_attack
    from study.tracking import metric_key

    name = parse_attack({"name": "pgd10_linf_0.5", "loss": "cw", "rel_step": 2.5}).name
    assert name == "pgd10_linf_0.5[rel_step=2.5,loss=cw]"
    assert metric_key(name) == "pgd10_linf_0.5:rel_step-2.5:loss-cw"
    assert re.fullmatch(r"[\w\-. :/]+", f"AAI/{metric_key(name)}")  # what MLflow accepts
    assert metric_key("fgsm_linf_2.0") == "fgsm_linf_2.0"
