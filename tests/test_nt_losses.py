"""Non-transferable losses against slow per-sample references."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from ntp_ssl.errors import ConfigError, NumericalError
from ntp_ssl.protect.losses import (
    feature_distillation,
    fisher_ratio,
    kmeans_pseudo_labels,
    mmd_multi_kernel,
    ntl_loss,
    relational_distillation,
    representation_ntp_loss,
    supervised_ntp_loss,
)

F64 = torch.float64


# ------------------------------------------------------------------ slow references


def ref_fisher(features, labels, normalize=True, eps=1e-8):
    rows = [list(map(float, f)) for f in features]
    if normalize:
        rows = [[v / max(math.sqrt(sum(u * u for u in r)), 1e-12) for v in r] for r in rows]
    labels = [int(v) for v in labels]
    dim = len(rows[0])

    def mean(rs):
        return [sum(r[d] for r in rs) / len(rs) for d in range(dim)]

    def sqdist(a, b):
        return sum((u - v) ** 2 for u, v in zip(a, b))

    mu = mean(rows)
    s_b = s_w = 0.0
    for c in sorted(set(labels)):
        members = [r for r, l in zip(rows, labels) if l == c]
        mu_c = mean(members)
        s_b += len(members) * sqdist(mu_c, mu)
        s_w += sum(sqdist(r, mu_c) for r in members)
    return s_b / (s_w + eps)


def ref_mmd(x, y, kernel_mul=2.0, kernel_num=5, bandwidth=None):
    pts = [list(map(float, r)) for r in torch.cat([x, y])]
    n = len(pts)

    def d2(a, b):
        return sum((u - v) ** 2 for u, v in zip(a, b))

    if bandwidth is None:
        bandwidth = sum(d2(a, b) for a, b in itertools.permutations(pts, 2)) / (n * n - n)

    def k(a, b):
        return sum(math.exp(-d2(a, b) / (bandwidth * kernel_mul ** (i - kernel_num // 2))) for i in range(kernel_num))

    xs, ys = pts[: len(x)], pts[len(x) :]

    def avg(A, B):
        return sum(k(a, b) for a in A for b in B) / (len(A) * len(B))

    return avg(xs, xs) + avg(ys, ys) - 2 * avg(xs, ys)


# ---------------------------------------------------------------------------- FDR


@pytest.mark.parametrize("normalize", [True, False])
def test_fisher_matches_reference(normalize):
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(30, 6, generator=g, dtype=F64)
    labels = torch.randint(0, 4, (30,), generator=g)
    got = fisher_ratio(feats, labels, normalize=normalize)
    assert got.item() == pytest.approx(ref_fisher(feats, labels, normalize), rel=1e-10)


def test_fisher_with_missing_classes_is_ratio_over_present_classes():
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(20, 5, generator=g, dtype=F64)
    labels = torch.tensor([0, 2, 7] * 6 + [2, 7])  # classes 1, 3-6, 8, 9 absent
    got = fisher_ratio(feats, labels)
    assert torch.isfinite(got)
    assert got.item() == pytest.approx(ref_fisher(feats, labels), rel=1e-10)
    relabelled = torch.tensor([{0: 0, 2: 1, 7: 2}[int(v)] for v in labels])
    assert got.item() == pytest.approx(fisher_ratio(feats, relabelled).item(), rel=1e-12)


def test_fisher_single_class_is_a_differentiable_zero():
    feats = torch.randn(8, 4, requires_grad=True)
    got = fisher_ratio(feats, torch.full((8,), 3))
    assert got.item() == 0.0
    got.backward()
    assert torch.equal(feats.grad, torch.zeros_like(feats))


def test_fisher_gradient_flows_and_separation_raises_it():
    g = torch.Generator().manual_seed(2)
    labels = torch.arange(4).repeat(8)
    centers = torch.randn(4, 6, generator=g)
    noise = torch.randn(32, 6, generator=g)
    mixed = fisher_ratio(noise + 0.1 * centers[labels], labels)
    separated = fisher_ratio(noise + 5.0 * centers[labels], labels)
    assert separated > 10 * mixed
    feats = (noise + centers[labels]).requires_grad_()
    fisher_ratio(feats, labels).backward()
    assert torch.isfinite(feats.grad).all() and feats.grad.abs().sum() > 0


# ---------------------------------------------------------------------------- MMD


def test_mmd_matches_reference():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 3, generator=g, dtype=F64)
    y = torch.randn(5, 3, generator=g, dtype=F64) + 0.5
    assert mmd_multi_kernel(x, y).item() == pytest.approx(ref_mmd(x, y), rel=1e-9)
    assert mmd_multi_kernel(x, y, kernel_mul=3.0, kernel_num=3, bandwidth=2.0).item() == pytest.approx(
        ref_mmd(x, y, 3.0, 3, 2.0), rel=1e-9
    )


def test_mmd_zero_for_identical_samples():
    x = torch.randn(32, 16)
    assert abs(mmd_multi_kernel(x, x.clone()).item()) < 1e-5
    same = torch.ones(4, 3)
    assert mmd_multi_kernel(same, same).item() == 0.0  # zero bandwidth guarded, no NaN


@pytest.mark.parametrize("bandwidth", [None, 4.0])
def test_mmd_grows_monotonically_with_mean_shift(bandwidth):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 8, generator=g, dtype=F64)
    y0 = torch.randn(64, 8, generator=g, dtype=F64)
    direction = F.normalize(torch.ones(8, dtype=F64), dim=0)
    values = [mmd_multi_kernel(x, y0 + s * direction, bandwidth=bandwidth).item() for s in (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)]
    assert all(a < b for a, b in zip(values, values[1:])), values


def test_mmd_gradient_flows():
    x = torch.randn(10, 4, requires_grad=True)
    y = torch.randn(12, 4) + 1.0
    mmd_multi_kernel(x, y).backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


# --------------------------------------------------------------- composite losses


def batch(seed=0, n=16, k=5, d=8):
    g = torch.Generator().manual_seed(seed)
    return dict(
        source_logits=torch.randn(n, k, generator=g, dtype=F64, requires_grad=True),
        source_labels=torch.randint(0, k, (n,), generator=g),
        target_logits=torch.randn(n, k, generator=g, dtype=F64, requires_grad=True),
        target_labels=torch.randint(0, k, (n,), generator=g),
        source_features=torch.randn(n, d, generator=g, dtype=F64, requires_grad=True),
        target_features=torch.randn(n, d, generator=g, dtype=F64, requires_grad=True),
    )


def test_supervised_ntp_loss_terms_and_gradients():
    b = batch()
    total, terms = supervised_ntp_loss(
        b["source_logits"], b["source_labels"], b["target_logits"], b["target_labels"], b["target_features"],
        alpha=0.5, ce_clamp=10.0, w_fisher_labels=3.0,
    )
    ce_s = F.cross_entropy(b["source_logits"], b["source_labels"]).item()
    ce_t = F.cross_entropy(b["target_logits"], b["target_labels"]).item()
    fdr = ref_fisher(b["target_features"].detach(), b["target_labels"])
    assert terms["ce_source"] == pytest.approx(ce_s)
    assert terms["ce_target"] == pytest.approx(ce_t)
    assert terms["fisher_target"] == pytest.approx(fdr)
    assert total.item() == pytest.approx(ce_s - 0.5 * ce_t + 3.0 * fdr)
    assert terms["total"] == pytest.approx(total.item())
    total.backward()
    for key in ("source_logits", "target_logits", "target_features"):
        assert b[key].grad is not None and b[key].grad.abs().sum() > 0


def test_supervised_ntp_loss_clamps_target_ce():
    b = batch()
    wrong = torch.full_like(b["target_logits"], -30.0)
    wrong[torch.arange(16), (b["target_labels"] + 1) % 5] = 30.0  # confidently wrong: CE ~ 60
    logits = wrong.detach().requires_grad_()
    total, terms = supervised_ntp_loss(
        b["source_logits"], b["source_labels"], logits, b["target_labels"], b["target_features"], alpha=1.0, ce_clamp=2.0, w_fisher_labels=0.0
    )
    assert terms["ce_target"] > 50
    assert total.item() == pytest.approx(terms["ce_source"] - 2.0)
    total.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits.grad))  # beyond the clamp: no push


def test_ntl_loss_terms_and_clamps():
    b = batch(1)
    total, terms = ntl_loss(
        b["source_logits"], b["source_labels"], b["target_logits"], b["target_labels"],
        b["source_features"], b["target_features"], alpha=0.3, ce_clamp=100.0, mmd_clamp=100.0,
    )
    ce_s = F.cross_entropy(b["source_logits"], b["source_labels"]).item()
    ce_t = F.cross_entropy(b["target_logits"], b["target_labels"]).item()
    mmd = ref_mmd(b["source_features"].detach(), b["target_features"].detach())
    assert terms["mmd"] == pytest.approx(mmd, rel=1e-9)
    assert total.item() == pytest.approx(ce_s - 0.3 * ce_t * mmd)
    total.backward()
    assert b["target_features"].grad.abs().sum() > 0 and b["target_logits"].grad.abs().sum() > 0

    clamped, terms = ntl_loss(
        b["source_logits"], b["source_labels"], b["target_logits"], b["target_labels"],
        b["source_features"], b["target_features"], alpha=0.3, ce_clamp=0.1, mmd_clamp=1e-4,
    )
    assert terms["ce_target"] > 0.1 and terms["mmd"] > 1e-4
    assert clamped.item() == pytest.approx(ce_s - 0.3 * 0.1 * 1e-4)


def test_representation_loss_all_terms():
    b = batch(2)
    g = torch.Generator().manual_seed(5)
    src_ssl = torch.tensor(2.0, dtype=F64, requires_grad=True)
    tgt_ssl = torch.tensor(7.0, dtype=F64, requires_grad=True)
    pseudo = torch.randint(0, 3, (16,), generator=g)
    total, terms = representation_ntp_loss(
        source_ssl=src_ssl, target_ssl=tgt_ssl,
        source_features=b["source_features"], target_features=b["target_features"],
        pseudo_labels=pseudo, target_labels=b["target_labels"],
        w_source_ssl=1.5, w_target_ssl=0.5, target_ssl_clamp=5.0, w_mmd=2.0, mmd_clamp=10.0,
        w_fisher_pseudo=3.0, w_fisher_labels=4.0,
    )
    mmd = ref_mmd(b["source_features"].detach(), b["target_features"].detach())
    fp = ref_fisher(b["target_features"].detach(), pseudo)
    fl = ref_fisher(b["target_features"].detach(), b["target_labels"])
    expected = 1.5 * 2.0 - 0.5 * 5.0 - 2.0 * mmd + 3.0 * fp + 4.0 * fl  # target SSL clamped at 5
    assert total.item() == pytest.approx(expected, rel=1e-9)
    assert terms == pytest.approx(
        {"ssl_source": 2.0, "ssl_target": 7.0, "mmd": mmd, "fisher_pseudo": fp, "fisher_labels": fl, "total": expected}, rel=1e-9
    )
    total.backward()
    assert src_ssl.grad.item() == pytest.approx(1.5)
    assert tgt_ssl.grad.item() == 0.0  # clamped
    assert b["target_features"].grad.abs().sum() > 0 and b["source_features"].grad.abs().sum() > 0


def test_representation_loss_skips_zero_weight_and_missing_terms(monkeypatch):
    import ntp_ssl.protect.losses as losses

    calls = []
    monkeypatch.setattr(losses, "mmd_multi_kernel", lambda *a, **k: calls.append("mmd"))
    monkeypatch.setattr(losses, "fisher_ratio", lambda *a, **k: calls.append("fisher"))
    b = batch(3)
    src_ssl = torch.tensor(1.25, requires_grad=True)
    total, terms = representation_ntp_loss(
        source_ssl=src_ssl, target_ssl=None,
        source_features=b["source_features"], target_features=b["target_features"],
        pseudo_labels=None, target_labels=b["target_labels"], w_mmd=0.0, w_fisher_labels=0.0,
    )
    assert calls == []
    assert terms == {"ssl_source": 1.25, "total": 1.25}
    total.backward()
    assert src_ssl.grad.item() == 1.0


def test_representation_loss_clamps_mmd():
    b = batch(4)
    far = b["target_features"].detach() + 50.0
    total, terms = representation_ntp_loss(
        source_ssl=torch.tensor(0.0), target_ssl=torch.tensor(1.0),
        source_features=b["source_features"], target_features=far,
        w_target_ssl=1.0, w_mmd=1.0, mmd_clamp=0.5, w_fisher_pseudo=0.0,
    )
    assert terms["mmd"] > 0.5
    assert total.item() == pytest.approx(-1.0 - 0.5)


# ------------------------------------------------------------------------ k-means


def clusters(seed=0, per=40, k=3, d=8):
    g = torch.Generator().manual_seed(seed)
    centers = F.normalize(torch.randn(k, d, generator=g), dim=1) * 10
    labels = torch.arange(k).repeat_interleave(per)
    feats = centers[labels] + 0.3 * torch.randn(k * per, d, generator=g)
    perm = torch.randperm(k * per, generator=g)
    return feats[perm], labels[perm]


@pytest.mark.parametrize("seed", range(4))
def test_kmeans_recovers_well_separated_clusters_up_to_permutation(seed):
    feats, truth = clusters(seed, k=4)
    pred = kmeans_pseudo_labels(feats, 4, seed=seed)
    assert pred.dtype == torch.int64 and pred.shape == truth.shape
    mapping = {}
    for t, p in zip(truth.tolist(), pred.tolist()):
        assert mapping.setdefault(t, p) == p
    assert len(set(mapping.values())) == 4


def test_kmeans_is_deterministic_for_a_seed():
    feats, _ = clusters(1, per=30, k=5, d=16)
    feats = feats + 3.0 * torch.randn(feats.shape, generator=torch.Generator().manual_seed(9))  # overlapping clusters
    a = kmeans_pseudo_labels(feats, 5, seed=7)
    b = kmeans_pseudo_labels(feats, 5, seed=7)
    assert torch.equal(a, b)


@pytest.mark.parametrize("k", [0, 200, 2.5, True])
def test_kmeans_bad_k_raises_config_error(k):
    feats, _ = clusters()
    with pytest.raises(ConfigError, match="k-means k"):
        kmeans_pseudo_labels(feats, k)


def test_kmeans_bad_iterations_and_nan():
    feats, _ = clusters()
    with pytest.raises(ConfigError, match="nredo"):
        kmeans_pseudo_labels(feats, 3, nredo=0)
    feats[0, 0] = float("nan")
    with pytest.raises(NumericalError):
        kmeans_pseudo_labels(feats, 3)


def test_representation_loss_source_fisher_term_is_clamped_and_rewarded():
    b = batch(6)
    g = torch.Generator().manual_seed(6)
    source_pseudo = torch.randint(0, 3, (16,), generator=g)
    fs = ref_fisher(b["source_features"].detach(), source_pseudo)
    kwargs = dict(source_ssl=torch.tensor(1.0, dtype=F64), target_ssl=None, source_features=b["source_features"],
                  target_features=b["target_features"], w_mmd=0.0, w_fisher_pseudo=0.0,
                  source_pseudo_labels=source_pseudo, w_fisher_source=2.0)
    total, terms = representation_ntp_loss(**kwargs, fisher_source_clamp=fs + 1.0)
    assert terms["fisher_source"] == pytest.approx(fs, rel=1e-9)
    assert total.item() == pytest.approx(1.0 - 2.0 * fs, rel=1e-9)  # higher source FDR = lower loss
    total.backward()
    assert b["source_features"].grad.abs().sum() > 0
    b["source_features"].grad = None
    clamped, _ = representation_ntp_loss(**kwargs, fisher_source_clamp=fs / 2)
    assert clamped.item() == pytest.approx(1.0 - 2.0 * fs / 2, rel=1e-9)
    clamped.backward()
    assert b["source_features"].grad is None or b["source_features"].grad.abs().sum() == 0
    unused, terms = representation_ntp_loss(**{**kwargs, "source_pseudo_labels": None})
    assert "fisher_source" not in terms and unused.item() == pytest.approx(1.0)


def test_feature_distillation_matches_a_plain_loop():
    torch.manual_seed(0)
    student, teacher = torch.randn(6, 5, requires_grad=True), torch.randn(6, 5)
    value = feature_distillation(student, teacher)
    plain = student.detach()  # the reference reads values only
    reference = sum(1 - float(plain[i] @ teacher[i]) / (float(plain[i].norm()) * float(teacher[i].norm()))
                    for i in range(6)) / 6
    assert value.item() == pytest.approx(reference, rel=1e-5)
    value.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert feature_distillation(teacher * 3.0, teacher).item() == pytest.approx(0.0, abs=1e-6)  # scale-free
    assert feature_distillation(-teacher, teacher).item() == pytest.approx(2.0, abs=1e-6)
    with pytest.raises(ValueError, match="same"):
        feature_distillation(student[:3], teacher)


def test_relational_distillation_matches_a_plain_loop():
    torch.manual_seed(0)
    student, teacher = torch.randn(5, 4, dtype=F64, requires_grad=True), torch.randn(5, 4, dtype=F64)

    def cos(u, v):
        return float(u @ v) / (float(u.norm()) * float(v.norm()))

    pairs = [(i, j) for i in range(5) for j in range(5) if i != j]
    s = student.detach()
    reference = sum((cos(s[i], s[j]) - cos(teacher[i], teacher[j])) ** 2 for i, j in pairs) / len(pairs)
    value = relational_distillation(student, teacher)
    assert value.item() == pytest.approx(reference, rel=1e-9)
    value.backward()
    assert student.grad.abs().sum() > 0 and teacher.grad is None
    # the geometry only: a rotation and a rescaling of the teacher's features cost nothing,
    # while feature distillation charges the rotation
    rotation, _ = torch.linalg.qr(torch.randn(4, 4, dtype=F64))
    moved = 2.5 * teacher @ rotation
    assert relational_distillation(moved, teacher).item() == pytest.approx(0.0, abs=1e-12)
    assert feature_distillation(moved, teacher).item() > 0.1
    with pytest.raises(ValueError, match="batch >= 2"):
        relational_distillation(student[:1], teacher[:1])


def _simulator(w_sim=2.0, lr=0.0, modes=("dense",), inner_steps=2, penalty="uniform"):
    from types import SimpleNamespace

    from ntp_ssl.encoders import build_encoder
    from ntp_ssl.protect.objective import NonTransferableObjective

    torch.manual_seed(0)
    objective = object.__new__(NonTransferableObjective)  # only what the simulator reads
    objective.method = SimpleNamespace(encoder=build_encoder("small_cnn", image_size=16))
    objective.cfg = SimpleNamespace(sim_every=1, sim_inner_steps=inner_steps, sim_inner_lr=lr, sim_modes=list(modes),
                                    sim_penalty=penalty)
    objective.device, objective.w_sim = torch.device("cpu"), w_sim
    x, labels = torch.randn(8, 3, 16, 16), torch.arange(8) % 4
    objective._last_target = (x, labels, 4)
    return objective, x


def test_simulated_attack_gradient_matches_a_direct_computation():
    """With a zero inner learning rate the adapted model is the current one, so the added
    gradient is w * d/dW [CE(head(f(x_out)), uniform) - ln C] with the step's seeded head."""
    import copy

    objective, x = _simulator()
    encoder = objective.method.encoder
    reference = copy.deepcopy(encoder)
    state = torch.random.get_rng_state()
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    penalties = objective.simulated_attack_({}, step=3)
    assert torch.equal(state, torch.random.get_rng_state())  # the protection's RNG is untouched
    assert all(torch.equal(before[k], v) for k, v in encoder.state_dict().items())  # weights and BN stats too
    torch.manual_seed(3)
    head = torch.nn.Linear(encoder.feature_dim, 4)
    log_probs = F.log_softmax(head(reference(x[4:])), dim=1)
    penalty = -log_probs.mean(dim=1).mean() - math.log(4)
    penalty.backward()
    assert penalties["sim_dense"] == pytest.approx(penalty.item(), rel=1e-5) and penalties["sim_dense"] >= 0
    for (name, p), (_, q) in zip(encoder.named_parameters(), reference.named_parameters()):
        assert torch.allclose(p.grad, 2.0 * q.grad, atol=1e-6), name


def test_simulated_attack_fisher_penalty_matches_a_direct_computation():
    """sim_penalty=fisher: with a zero inner learning rate the added gradient is
    w * d/dW FDR(f(x_out), labels_out), the Fisher ratio of the step's held-out half."""
    import copy

    objective, x = _simulator(penalty="fisher")
    encoder = objective.method.encoder
    reference = copy.deepcopy(encoder)
    penalties = objective.simulated_attack_({}, step=3)
    labels = objective._last_target[1]
    penalty = fisher_ratio(reference(x[4:]), labels[4:])
    penalty.backward()
    assert penalties["sim_dense"] == pytest.approx(ref_fisher(reference(x[4:]).detach(), labels[4:]), rel=1e-4)
    assert penalties["sim_dense"] == pytest.approx(penalty.item(), rel=1e-5) and penalties["sim_dense"] > 0
    for (name, p), (_, q) in zip(encoder.named_parameters(), reference.named_parameters()):
        assert torch.allclose(p.grad, 2.0 * q.grad, atol=1e-6), name


def test_simulated_attack_runs_each_mode_and_skips_off_steps():
    objective, _ = _simulator(lr=0.1, modes=("masked", "dense"))
    encoder = objective.method.encoder
    masks = {k: torch.rand_like(p) > 0.5 for k, p in encoder.named_parameters() if p.dim() == 4}
    objective.cfg.sim_every = 2
    assert objective.simulated_attack_(masks, step=1) == {}  # not a simulation step
    penalties = objective.simulated_attack_(masks, step=2)
    assert set(penalties) == {"sim_masked", "sim_dense"} and all(v >= 0 for v in penalties.values())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in encoder.parameters() if p.dim() == 4)


def test_simulated_attack_masked_gradient_is_zero_where_the_mask_prunes():
    """Masked mode: the adapted copy depends on W only through W * M, so the first-order
    gradient added to W is M * d penalty / d(W * M): zero at every pruned position, and at
    the kept ones that of the masked model computed directly (zero inner learning rate)."""
    import copy

    objective, x = _simulator(modes=("masked",))
    encoder = objective.method.encoder
    masks = {k: torch.rand_like(p) > 0.5 for k, p in encoder.named_parameters() if p.dim() == 4}
    reference = copy.deepcopy(encoder)
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if name in masks:
                p.mul_(masks[name])
    objective.simulated_attack_(masks, step=3)
    torch.manual_seed(3)
    head = torch.nn.Linear(encoder.feature_dim, 4)
    penalty = -F.log_softmax(head(reference(x[4:])), dim=1).mean(dim=1).mean() - math.log(4)
    penalty.backward()
    for (name, p), (_, q) in zip(encoder.named_parameters(), reference.named_parameters()):
        expected = 2.0 * q.grad * masks[name] if name in masks else 2.0 * q.grad
        assert torch.allclose(p.grad, expected, atol=1e-6), name
        if name in masks:
            assert torch.all(p.grad[~masks[name]] == 0), name
