"""The non-transferable objective ``L_NT`` on a paired source/target batch, one option per loss.

- ``ssl``: w_s SSL_S - w_t min(SSL_T, c_t) - w_mmd min(MMD, c_m) + w_fp FDR(f_T, k-means_T) + w_fl FDR(f_T, y_T)
  - w_fs min(FDR(f_S, k-means_S), c_fs)
- ``supervised``: CE_S - alpha min(CE_T, c) + w_fl FDR(f_T, y_T)   (the paper's)
- ``ntl``: CE_S - alpha min(CE_T, c) min(MMD, c_m)
- ``none``: the source term alone (plain pruning, the magnitude-pruning baseline)

With ``source_only`` set (masked retraining under ``admm.retrain_loss=source``) every loss
keeps its source term (and the distillations, feature and relational) alone.

The math lives in :mod:`ntp_ssl.protect.losses`; this module feeds it batches, heads and
pseudo-labels.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from ntp_ssl.data import Domain, ImageArrayDataset
from ntp_ssl.errors import ConfigError
from ntp_ssl.protect.losses import (
    feature_distillation,
    fisher_ratio,
    kmeans_pseudo_labels,
    ntl_loss,
    relational_distillation,
    representation_ntp_loss,
    supervised_ntp_loss,
)
from ntp_ssl.shared.features import TrainFeatures
from ntp_ssl.shared.masking import apply_masks_, mask_gradients_
from ntp_ssl.shared.train import classifier_accuracy, fit_classifier


class IndexedViews(Dataset):
    """(views, index): labels and pseudo-labels are looked up by index, so they can change."""

    def __init__(self, base: ImageArrayDataset):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        return self.base[i][0], i


class NonTransferableObjective:
    """``L_NT`` of the configured loss on a paired batch, with each term reported."""

    source_only = False  # True: the source terms alone (admm.retrain_loss=source, masked retraining)

    def __init__(self, loss: Any, method: nn.Module, source: Domain, targets: list[Domain], *, device):
        self.cfg = loss
        self.kind = loss.kind
        self.method = method
        self.device = device
        self.has_ssl_head = hasattr(method, "projection_head")
        # the encoder's train features, shared with the kNN monitor (ProtectionRun.knn): the
        # monitor after one ADMM iteration and the pseudo-labels before the next see the same weights
        self.train_features = TrainFeatures(method.encoder, device=device)
        self.source_labels = torch.tensor(source.train_labels, dtype=torch.long)
        self.target_labels = [torch.tensor(t.train_labels, dtype=torch.long) for t in targets]
        self.pseudo_labels: list[torch.Tensor] = [torch.zeros(len(t.train_labels), dtype=torch.long) for t in targets]
        self.source_pseudo_labels = torch.zeros(len(source.train_labels), dtype=torch.long)
        if self.kind == "ssl" and not self.has_ssl_head:
            raise ConfigError("loss=ssl needs an encoder with an SSL projection head (simclr or moco); this "
                              "checkpoint is supervised: use loss=supervised, ntl or none")
        feature_dim = method.encoder.feature_dim
        # A supervised checkpoint brings its trained classifier as the source head; otherwise a fresh one is fitted.
        self.source_head_is_trained = hasattr(method, "classifier")
        self.source_head = method.classifier if self.source_head_is_trained else nn.Linear(feature_dim,
                                                                                           source.num_classes)
        self.target_heads = nn.ModuleList(nn.Linear(feature_dim, t.num_classes) for t in targets)
        self.source_head.to(device)
        self.target_heads.to(device)
        self.needs_heads = self.kind in ("supervised", "ntl")
        # the classification path (_with_heads) trains its source head with the encoder: the
        # heads' losses, and loss=none on a checkpoint without an SSL head (its own classifier)
        self.trains_source_head = self.needs_heads or (self.kind == "none" and not self.has_ssl_head)
        # The teacher: a frozen copy of the encoder as it is now, before any protection step
        # (the objective is built before a resume loads the protected state).
        self.w_distill = float(getattr(loss, "w_source_distill", 0.0))
        self.w_relational = float(getattr(loss, "w_source_relational", 0.0))
        self.teacher = None
        self._source_features: torch.Tensor | None = None  # this step's source features, for the distillation
        self.w_sim = float(getattr(loss, "w_sim_attack", 0.0))
        self._last_target: tuple[torch.Tensor, torch.Tensor, int] | None = None  # (x, labels, classes) of this step
        if self.w_distill > 0 or self.w_relational > 0:
            self.teacher = copy.deepcopy(method.encoder).to(device).eval()
            for p in self.teacher.parameters():
                p.requires_grad_(False)

    def trainable_heads(self) -> list[nn.Parameter]:
        """The source head learns with the encoder wherever the loss uses it (it is part of the source
        task); target heads stay fixed."""
        return list(self.source_head.parameters()) if self.trains_source_head else []

    def fit_heads(self, source: Domain, targets: list[Domain], *, seed: int) -> dict[str, float]:
        """Fit the source head (unless the checkpoint has one) and the fixed target heads on frozen features."""
        if not self.needs_heads:
            return {}
        steps = max(1, self.cfg.head_steps)
        scores = {}
        pairs = [] if self.source_head_is_trained else [(self.source_head, source, "source")]
        pairs += [(head, t, t.name) for head, t in zip(self.target_heads, targets)]
        for head, domain, name in pairs:
            y = torch.tensor(domain.train_labels, dtype=torch.long)
            features = self.train_features.of(domain)
            fit_classifier(nn.Identity(), head, features, y, steps=steps, batch_size=256, lr=1e-2,
                           train_encoder=False, seed=seed, device=self.device, stage="protect head fit")
            scores[f"head_train_accuracy/{name}"] = classifier_accuracy(nn.Identity(), head, features, y,
                                                                       device=self.device)
        for p in self.target_heads.parameters():
            p.requires_grad_(False)  # the paper's target head stays fixed during pruning
        return scores

    def refresh_pseudo_labels(self, source: Domain, targets: list[Domain], *, seed: int) -> None:
        """k-means pseudo-labels of the current encoder's features, for the Fisher terms that use them."""
        if self.kind != "ssl":
            return

        def cluster(domain: Domain) -> torch.Tensor:
            return kmeans_pseudo_labels(self.train_features.of(domain), self.cfg.pseudo_clusters, seed=seed).cpu()

        if self.cfg.w_fisher_pseudo > 0 or self.w_sim > 0:  # the simulated attacker fits them too
            self.pseudo_labels = [cluster(domain) for domain in targets]
        if self.cfg.w_fisher_source > 0:
            self.source_pseudo_labels = cluster(source)

    def simulated_attack_(self, masks: dict[str, torch.Tensor], *, step: int) -> dict[str, float]:
        """Add ``w_sim`` times the first-order gradient of a simulated fine-tune to the encoder's
        ``.grad`` (call after the step's backward); returns the penalty per mode.

        Per mode (``masked``: the current ``masks`` kept; ``dense``: none), a copy of the
        encoder and a fresh linear head take ``sim_inner_steps`` SGD steps on the first half of
        this step's target batch; the penalty, on the other half, is (``sim_penalty``)
        ``uniform``: the adapted model's cross-entropy to the uniform distribution minus its
        minimum ``ln C`` (>= 0, 0 when the adapted model still predicts nothing), or
        ``fisher``: the Fisher ratio of the adapted encoder's features under the inner labels
        (>= 0, 0 when no head could separate them linearly). Its gradient with respect to the adapted
        weights is applied to the current ones (first order, as in FOMAML: no second
        derivatives), so the encoder moves towards weights from which fine-tuning learns little.
        """
        if (self.w_sim <= 0 or self.source_only or self._last_target is None
                or step % self.cfg.sim_every != 0):
            return {}
        x, labels, classes = self._last_target
        half = len(x) // 2
        if half < 2:
            return {}
        encoder, c = self.method.encoder, self.cfg
        penalties = {}
        for mode in c.sim_modes:
            adapted = copy.deepcopy(encoder)
            with torch.random.fork_rng(devices=[]):  # the global RNG is the protection's, untouched
                torch.manual_seed(step)
                head = nn.Linear(encoder.feature_dim, classes).to(self.device)
            named = dict(adapted.named_parameters())
            keep = masks if mode == "masked" else {}
            apply_masks_(named, keep)
            inner = torch.optim.SGD([*adapted.parameters(), *head.parameters()], lr=c.sim_inner_lr, momentum=0.9)
            for _ in range(c.sim_inner_steps):
                loss = nn.functional.cross_entropy(head(adapted(x[:half])), labels[:half])
                inner.zero_grad(set_to_none=True)
                loss.backward()
                mask_gradients_(named, keep)
                inner.step()
            inner.zero_grad(set_to_none=True)
            if c.sim_penalty == "fisher":
                penalty = fisher_ratio(adapted(x[half:]), labels[half:])
            else:
                log_probs = nn.functional.log_softmax(head(adapted(x[half:])), dim=1)
                penalty = -log_probs.mean(dim=1).mean() - math.log(classes)  # CE to uniform - ln C
            penalty.backward()
            # the copy saw W only through W * M (masked mode), so the first-order gradient
            # with respect to W is M * grad: nothing at the pruned positions
            mask_gradients_(named, keep)
            for name, param in encoder.named_parameters():
                grad = named[name].grad
                if grad is None:
                    continue
                scaled = grad * (self.w_sim / len(c.sim_modes))
                param.grad = scaled if param.grad is None else param.grad + scaled
            penalties[f"sim_{mode}"] = penalty.item()
        return penalties

    def _ssl(self, fa: torch.Tensor, fb: torch.Tensor) -> torch.Tensor:
        head = self.method.projection_head
        criterion = getattr(self.method, "in_batch_criterion", None) or self.method.criterion
        return criterion(head(fa), head(fb))

    def __call__(self, source_batch, target_batch, target_index: int) -> tuple[torch.Tensor, dict[str, float]]:
        (sa, sb), s_idx = source_batch
        (ta, tb), t_idx = target_batch
        dev = self.device
        sa, sb, ta, tb = sa.to(dev), sb.to(dev), ta.to(dev), tb.to(dev)
        self._source_features = None
        if self.w_sim > 0:
            labels = (self.target_labels[target_index] if self.kind == "supervised"
                      else self.pseudo_labels[target_index])[t_idx].to(dev)
            classes = self.target_heads[target_index].out_features if self.kind == "supervised" else self.cfg.pseudo_clusters
            self._last_target = (ta, labels, classes)
        if self.has_ssl_head and self.kind in ("ssl", "none"):
            total, terms = self._label_free(sa, sb, ta, tb, s_idx, t_idx, target_index)
        else:
            total, terms = self._with_heads(sa, ta, s_idx, t_idx, target_index)
        if self.teacher is not None and self._source_features is not None:
            with torch.no_grad():
                taught = self.teacher(sa)
            if self.w_distill > 0:
                # + w_sd mean(1 - cos(f_S, teacher(x_S))): the source features stay where they were
                distill = feature_distillation(self._source_features, taught)
                total = total + self.w_distill * distill
                terms = {**terms, "distill_source": distill.item()}
            if self.w_relational > 0:
                # + w_sr mean_{i != j} (cos(f_i, f_j) - cos(t_i, t_j))^2: the source's geometry stays
                relational = relational_distillation(self._source_features, taught)
                total = total + self.w_relational * relational
                terms = {**terms, "relational_source": relational.item()}
            terms = {**terms, "total": total.item()}
        return total, terms

    def _label_free(self, sa, sb, ta, tb, s_idx, t_idx, target_index: int):
        """The SSL source term, and for ``ssl`` the representation-level target terms."""
        encoder, c, dev = self.method.encoder, self.cfg, self.device
        fs_a, fs_b = encoder(torch.cat([sa, sb])).chunk(2)
        self._source_features = fs_a
        ssl_source = self._ssl(fs_a, fs_b)
        if self.kind == "none" or self.source_only:
            return ssl_source, {"ssl_source": ssl_source.item(), "total": ssl_source.item()}
        need_target_pair = c.w_target_ssl > 0
        ft_a = encoder(torch.cat([ta, tb])) if need_target_pair else encoder(ta)
        ft_a, ft_b = ft_a.chunk(2) if need_target_pair else (ft_a, None)
        return representation_ntp_loss(
            source_ssl=ssl_source, target_ssl=self._ssl(ft_a, ft_b) if need_target_pair else None,
            source_features=fs_a, target_features=ft_a,
            pseudo_labels=self.pseudo_labels[target_index][t_idx].to(dev) if c.w_fisher_pseudo > 0 else None,
            target_labels=self.target_labels[target_index][t_idx].to(dev) if c.w_fisher_labels > 0 else None,
            w_source_ssl=c.w_source_ssl, w_target_ssl=c.w_target_ssl, target_ssl_clamp=c.target_ssl_clamp,
            w_mmd=c.w_mmd, mmd_clamp=c.mmd_clamp, w_fisher_pseudo=c.w_fisher_pseudo,
            w_fisher_labels=c.w_fisher_labels,
            source_pseudo_labels=self.source_pseudo_labels[s_idx].to(dev) if c.w_fisher_source > 0 else None,
            w_fisher_source=c.w_fisher_source, fisher_source_clamp=c.fisher_source_clamp)

    def _with_heads(self, sa, ta, s_idx, t_idx, target_index: int):
        """The classification losses: source cross-entropy, and the target terms of ``supervised`` / ``ntl``."""
        encoder, c, dev = self.method.encoder, self.cfg, self.device
        fs = encoder(sa)
        self._source_features = fs
        ys = self.source_labels[s_idx].to(dev)
        source_logits = self.source_head(fs)
        if self.kind == "none" or self.source_only:  # the source task of the heads' losses is classification
            ce = nn.functional.cross_entropy(source_logits, ys)
            return ce, {"ce_source": ce.item(), "total": ce.item()}
        ft = encoder(ta)
        yt = self.target_labels[target_index][t_idx].to(dev)
        target_logits = self.target_heads[target_index](ft)
        if self.kind == "supervised":
            return supervised_ntp_loss(source_logits, ys, target_logits, yt, ft, alpha=c.alpha, ce_clamp=c.ce_clamp,
                                       w_fisher_labels=c.w_fisher_labels)
        return ntl_loss(source_logits, ys, target_logits, yt, fs, ft, alpha=c.alpha, ce_clamp=c.ce_clamp,
                        mmd_clamp=c.mmd_clamp)
