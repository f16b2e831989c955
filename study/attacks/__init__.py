"""The one attack engine: FGSM and PGD under L-inf or L2, in [0, 1] pixel space.

Names follow the paper: ``pgd10_linf_0.5`` is PGD with 10 steps at eps = 0.5/255,
``fgsm_linf_2.0`` one signed-gradient step at 2/255, ``autoattack_linf_0.5`` the
standard AutoAttack (the original implementation, PyPI ``pyautoattack``); L2 eps is in
[0, 1]-pixel L2 norm (``pgd10_l2_3.0``). ``strong_linf_0.5`` is the strong evaluation:
the worst case of the paper's PGD-10, PGD-50 from a random start with 5 restarts and the
standard AutoAttack, each run on the images the ones before it left unbroken (cheapest
first), so an image counts as robust only when it survives all three;
``strong_linf_0.5[version=apgd]`` runs AutoAttack's APGD-CE and APGD-DLR in its place.
PGD's step size defaults to the paper's 1.25 * eps / steps, starting from the clean
image as in the iterative attack of Kurakin et al. (2017) that the paper cites for
PGD-10. Why no random start by default: with one, the paper's step travels 1.25 eps in
all, so a coordinate that starts near -eps cannot reach +eps, so PGD-10 can lose to FGSM
at the same eps (the ``pgd_le_fgsm`` sanity flag, docs/guide/attacks.md). ``random_start:
true`` gives Madry's PGD.

Gradients are taken with respect to the input only (``torch.autograd.grad``), so no
parameter ever accumulates a gradient. For evaluation (``early_stop=True``) a sample
counts as broken as soon as *any* iterate -- the random start included -- is
misclassified, and from then on it costs no compute; adversarial training calls the
same engine with ``early_stop=False`` and gets the last iterate of every sample.

Mixed precision (``precision``: ``fp32``, the default, | ``bf16`` | ``auto``): an
evaluation may take its ascent steps in bfloat16, which halves the cost of a step where
the hardware has bf16 units (CUDA, or a CPU with AVX512-BF16/AMX), while keeping every
verdict in fp32:
bf16 logits only *propose* that a sample broke, and the sample counts as broken only
when an fp32 forward pass of that very iterate confirms it; otherwise it stays in the
attack. The last iterate of every sample is judged in fp32 alone. So AAI is never
lowered by rounding -- at worst bf16 misses a break at a middle iterate that fp32 would
have seen there. It is not the default: at a small eps one bf16 step moves only part of
the input's coordinates (the rounding of x + step), so the search itself is weaker and
AAI can only come out higher (``benchmarks/attack_precision.py`` measures the gap).
``auto`` means bf16 for evaluation where it is fast, fp32 otherwise; adversarial
training (``early_stop=False``) uses fp32 unless ``bf16`` is asked for.
"""

from study.attacks.engine import VANISHING, Outcome, ascend, attack_loss, margin_loss, pgd, step_dtype
from study.attacks.grammar import (
    LINF_MAX,
    LOSSES,
    NAMED,
    PRECISIONS,
    TRANSFER_KINDS,
    VERSIONS,
    Attack,
    AttackError,
    Transfer,
    members,
    parse_attack,
    title,
)
from study.attacks.lipschitz import local_lipschitz, steepest_neighbour, steepness
from study.attacks.run import evaluation_record, perturb, robust_accuracy

__all__ = [
    "TRANSFER_KINDS",
    "Transfer",
    "LINF_MAX",
    "LOSSES",
    "NAMED",
    "PRECISIONS",
    "VANISHING",
    "VERSIONS",
    "Attack",
    "AttackError",
    "Outcome",
    "ascend",
    "attack_loss",
    "evaluation_record",
    "local_lipschitz",
    "margin_loss",
    "members",
    "parse_attack",
    "perturb",
    "pgd",
    "robust_accuracy",
    "steepest_neighbour",
    "steepness",
    "step_dtype",
    "title",
]
