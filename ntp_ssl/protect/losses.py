"""Non-transferable losses: pure functions of tensors.

Sign convention: every loss here is *minimised*. Terms that should grow on the
unauthorized (target) side enter with a minus sign and are clamped from above, so the
optimiser cannot win by blowing a single term up; a clamped term has zero gradient once
it exceeds its clamp.

Each composite loss returns ``(total, terms)`` where ``terms`` holds detached Python
floats of the unweighted, unclamped terms and of the total, ready for logging.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ntp_ssl.errors import ConfigError, NumericalError


def fisher_ratio(features: Tensor, labels: Tensor, *, normalize: bool = True, eps: float = 1e-8) -> Tensor:
    """Fisher discriminant ratio of a batch: ``S_B / (S_W + eps)``.

    With ``f_i`` L2-normalised (if ``normalize``), ``mu`` the mean of all ``f_i`` and
    ``mu_c`` the mean of class ``c``:
    ``S_B = sum_c n_c ||mu_c - mu||^2``,  ``S_W = sum_c sum_{i in c} ||f_i - mu_c||^2``.
    Only classes present in the batch count. Fewer than two classes present gives a
    zero that is still connected to ``features`` (its gradient is zero). When every
    class present has a single sample, ``S_W = 0`` and the ratio is ``S_B / eps``.
    """
    if features.dim() != 2 or labels.dim() != 1 or labels.shape[0] != features.shape[0]:
        raise ValueError(
            f"fisher_ratio wants features (N, D) and labels (N,), got {tuple(features.shape)} and {tuple(labels.shape)}"
        )
    f = F.normalize(features, dim=1) if normalize else features
    classes, inverse = torch.unique(labels, return_inverse=True)
    if classes.numel() < 2:
        return f.sum() * 0.0
    counts = torch.bincount(inverse, minlength=classes.numel()).to(f.dtype)
    class_means = torch.zeros(classes.numel(), f.shape[1], dtype=f.dtype, device=f.device).index_add(0, inverse, f)
    class_means = class_means / counts[:, None]
    mean = f.mean(dim=0)
    between = (counts * (class_means - mean).pow(2).sum(dim=1)).sum()
    within = (f - class_means[inverse]).pow(2).sum()
    return between / (within + eps)


def mmd_multi_kernel(
    x: Tensor,
    y: Tensor,
    *,
    kernel_mul: float = 2.0,
    kernel_num: int = 5,
    bandwidth: float | None = None,
) -> Tensor:
    """Biased squared MMD with a sum of Gaussian kernels.

    ``MMD^2 = mean K(x, x') + mean K(y, y') - 2 mean K(x, y)`` with
    ``K(a, b) = sum_{i=0}^{kernel_num-1} exp(-||a - b||^2 / (bw * kernel_mul^(i - kernel_num // 2)))``:
    the bandwidths are centred on ``bw``. ``bw`` is ``bandwidth`` if given, otherwise
    the mean squared distance between distinct points of the pooled sample (detached).
    ``x`` (N, D) and ``y`` (M, D) may differ in size.
    """
    if x.dim() != 2 or y.dim() != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"mmd wants x (N, D) and y (M, D), got {tuple(x.shape)} and {tuple(y.shape)}")
    if kernel_num < 1 or kernel_mul <= 0:
        raise ConfigError(f"MMD needs kernel_num >= 1 and kernel_mul > 0, got {kernel_num} and {kernel_mul}")
    pooled = torch.cat([x, y], dim=0)
    sq = pooled.pow(2).sum(dim=1)
    dist = (sq[:, None] + sq[None, :] - 2.0 * pooled @ pooled.T).clamp_min(0.0)
    n = pooled.shape[0]
    if bandwidth is None:
        bw = dist.detach().sum() / max(n * n - n, 1)
        bw = bw.clamp_min(torch.finfo(dist.dtype).tiny)
    else:
        if not bandwidth > 0:
            raise ConfigError(f"MMD bandwidth must be > 0 or None, got {bandwidth!r}")
        bw = torch.tensor(float(bandwidth), dtype=dist.dtype, device=dist.device)
    kernel = sum(torch.exp(-dist / (bw * kernel_mul ** (i - kernel_num // 2))) for i in range(kernel_num))
    nx = x.shape[0]
    k_xx, k_yy, k_xy = kernel[:nx, :nx], kernel[nx:, nx:], kernel[:nx, nx:]
    return k_xx.mean() + k_yy.mean() - 2.0 * k_xy.mean()


def _cross_entropies(source_logits: Tensor, source_labels: Tensor, target_logits: Tensor,
                     target_labels: Tensor) -> tuple[Tensor, Tensor]:
    return F.cross_entropy(source_logits, source_labels), F.cross_entropy(target_logits, target_labels)


def supervised_ntp_loss(source_logits: Tensor, source_labels: Tensor, target_logits: Tensor, target_labels: Tensor,
                        target_features: Tensor, *, alpha: float, ce_clamp: float,
                        w_fisher_labels: float) -> tuple[Tensor, dict[str, float]]:
    """The paper's loss: ``CE_S - alpha * min(CE_T, c) + lambda * FDR(f_T, y_T)`` (lambda = ``w_fisher_labels``).

    Terms: ``ce_source``, ``ce_target`` (unclamped), ``fisher_target``, ``total``.
    """
    ce_source, ce_target = _cross_entropies(source_logits, source_labels, target_logits, target_labels)
    fisher = fisher_ratio(target_features, target_labels)
    total = ce_source - alpha * ce_target.clamp(max=ce_clamp) + w_fisher_labels * fisher
    return total, _floats(ce_source=ce_source, ce_target=ce_target, fisher_target=fisher, total=total)


def ntl_loss(source_logits: Tensor, source_labels: Tensor, target_logits: Tensor, target_labels: Tensor,
             source_features: Tensor, target_features: Tensor, *, alpha: float, ce_clamp: float,
             mmd_clamp: float) -> tuple[Tensor, dict[str, float]]:
    """NTL-style loss: ``CE_S - alpha * min(CE_T, c1) * min(MMD^2(f_S, f_T), c2)``.

    Terms: ``ce_source``, ``ce_target``, ``mmd`` (unclamped), ``total``.
    """
    ce_source, ce_target = _cross_entropies(source_logits, source_labels, target_logits, target_labels)
    mmd = mmd_multi_kernel(source_features, target_features)
    total = ce_source - alpha * ce_target.clamp(max=ce_clamp) * mmd.clamp(max=mmd_clamp)
    return total, _floats(ce_source=ce_source, ce_target=ce_target, mmd=mmd, total=total)


def representation_ntp_loss(
    *,
    source_ssl: Tensor,
    target_ssl: Tensor | None,
    source_features: Tensor,
    target_features: Tensor,
    pseudo_labels: Tensor | None = None,
    target_labels: Tensor | None = None,
    w_source_ssl: float = 1.0,
    w_target_ssl: float = 1.0,
    target_ssl_clamp: float = 5.0,
    w_mmd: float = 1.0,
    mmd_clamp: float = 1.0,
    w_fisher_pseudo: float = 1.0,
    w_fisher_labels: float = 0.0,
    source_pseudo_labels: Tensor | None = None,
    w_fisher_source: float = 0.0,
    fisher_source_clamp: float = 1.0,
) -> tuple[Tensor, dict[str, float]]:
    """Label-free NT loss:
    ``w_s*SSL_S - w_t*min(SSL_T, c_t) - w_mmd*min(MMD^2(f_S, f_T), c_m) + w_fp*FDR(f_T, pseudo_T)
    + w_fl*FDR(f_T, y_T) - w_fs*min(FDR(f_S, pseudo_S), c_fs)``.

    ``source_ssl`` / ``target_ssl`` are the encoder's own SSL loss on source / target
    views. The last term is the source's counterweight to ``w_fp``: both Fisher terms act
    on the encoder features at the same scale, so the cluster structure the target loses
    is kept on the source (the SSL term alone, through the projection head, is too weak
    against a large ``w_fp``). A term whose weight is 0 or whose input is ``None`` is
    skipped (not computed, not reported). Terms: ``ssl_source``, ``ssl_target``, ``mmd``,
    ``fisher_pseudo``, ``fisher_labels``, ``fisher_source`` (unweighted, unclamped; those
    computed), ``total``.
    """
    total = source_ssl * w_source_ssl
    terms: dict[str, Tensor] = {"ssl_source": source_ssl}
    if w_target_ssl != 0 and target_ssl is not None:
        terms["ssl_target"] = target_ssl
        total = total - w_target_ssl * target_ssl.clamp(max=target_ssl_clamp)
    if w_mmd != 0:
        mmd = mmd_multi_kernel(source_features, target_features)
        terms["mmd"] = mmd
        total = total - w_mmd * mmd.clamp(max=mmd_clamp)
    if w_fisher_pseudo != 0 and pseudo_labels is not None:
        terms["fisher_pseudo"] = fisher_ratio(target_features, pseudo_labels)
        total = total + w_fisher_pseudo * terms["fisher_pseudo"]
    if w_fisher_labels != 0 and target_labels is not None:
        terms["fisher_labels"] = fisher_ratio(target_features, target_labels)
        total = total + w_fisher_labels * terms["fisher_labels"]
    if w_fisher_source != 0 and source_pseudo_labels is not None:
        terms["fisher_source"] = fisher_ratio(source_features, source_pseudo_labels)
        total = total - w_fisher_source * terms["fisher_source"].clamp(max=fisher_source_clamp)
    terms["total"] = total
    return total, _floats(**terms)


def kmeans_pseudo_labels(features: Tensor, k: int, *, seed: int = 0, niter: int = 20, nredo: int = 3) -> Tensor:
    """Cluster ids (int64, shape (N,), on ``features.device``) of spherical k-means on
    L2-normalised float32 features: k-means++ seeding, then faiss Lloyd iterations;
    ``nredo`` restarts (seeds ``seed, seed+1, ...``), the one of least within-cluster
    squared distance wins. Deterministic for a given seed."""
    import faiss  # local: faiss is heavy to import and only needed here

    if features.dim() != 2:
        raise ValueError(f"kmeans wants features (N, D), got {tuple(features.shape)}")
    n = features.shape[0]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
        raise ConfigError(f"k-means k must be an integer in [1, {n}] (the number of samples), got {k!r}")
    for name, value in (("niter", niter), ("nredo", nredo)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"k-means {name} must be an integer >= 1, got {value!r}")
    x = F.normalize(features.detach().float(), dim=1).cpu().numpy()
    if not np.isfinite(x).all():
        raise NumericalError("k-means got non-finite features (NaN or inf)")
    x = np.ascontiguousarray(x, dtype=np.float32)
    best_cost, best_assign = np.inf, None
    for r in range(nredo):
        kmeans = faiss.Kmeans(
            x.shape[1], k, niter=niter, seed=seed + r, spherical=True, verbose=False, min_points_per_centroid=1
        )
        kmeans.train(x, init_centroids=_kmeans_plus_plus(x, k, np.random.default_rng(seed + r)))
        _, assign = kmeans.index.search(x, 1)  # spherical: inner-product index, nearest = most similar
        cost = float(((x - kmeans.centroids[assign[:, 0]]).astype(np.float64) ** 2).sum())
        if cost < best_cost:
            best_cost, best_assign = cost, assign
    return torch.from_numpy(best_assign.reshape(-1).astype(np.int64)).to(features.device)


def _kmeans_plus_plus(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding: each next centre drawn with probability proportional to D(x)^2."""
    centres = [int(rng.integers(len(x)))]
    d2 = ((x - x[centres[0]]) ** 2).sum(axis=1).astype(np.float64)
    for _ in range(1, k):
        total = d2.sum()
        nxt = int(rng.choice(len(x), p=d2 / total)) if total > 0 else int(rng.integers(len(x)))
        centres.append(nxt)
        d2 = np.minimum(d2, ((x - x[nxt]) ** 2).sum(axis=1))
    return np.ascontiguousarray(x[centres], dtype=np.float32)


def _floats(**terms: Tensor) -> dict[str, float]:
    return {name: float(value.detach()) for name, value in terms.items()}


def feature_distillation(student: Tensor, teacher: Tensor) -> Tensor:
    """``mean_i (1 - cos(s_i, t_i))``: how far the features moved from where the frozen teacher
    (the unprotected encoder) put the same images; 0 when they point the same way. Cosine,
    not squared distance, so the term does not depend on the features' scale."""
    if student.shape != teacher.shape or student.dim() != 2:
        raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} features must be "
                         "the same (batch, dim) shape")
    return (1.0 - F.cosine_similarity(student, teacher.detach(), dim=1, eps=1e-8)).mean()


def relational_distillation(student: Tensor, teacher: Tensor) -> Tensor:
    """``mean_{i != j} (cos(s_i, s_j) - cos(t_i, t_j))^2``: how far the batch's pairwise geometry
    moved from the frozen teacher's. Weaker than :func:`feature_distillation` on purpose: the
    features may rotate or drift as a whole, only who is near whom (what kNN and a linear probe
    read) is held. Needs at least two samples."""
    if student.shape != teacher.shape or student.dim() != 2 or student.shape[0] < 2:
        raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} features must be "
                         "the same (batch >= 2, dim) shape")
    s, t = F.normalize(student, dim=1, eps=1e-8), F.normalize(teacher.detach(), dim=1, eps=1e-8)
    n = s.shape[0]
    off_diagonal = ~torch.eye(n, dtype=torch.bool, device=s.device)
    return (s @ s.T - t @ t.T)[off_diagonal].pow(2).mean()
