"""The CUDA path: the same math on a GPU as on the CPU, and the real command end to end on one.

Every test here is skipped where no CUDA device is visible (CI and the 2-core development
machine have none). On a machine with a GPU:

    python -m pytest -q tests/test_cuda.py

The math is compared in float64, where a GPU and a CPU agree to round-off; masks, cluster
ids and kNN votes must be identical, since they are choices, not sums. The end-to-end tests
run the real command (`python -m ntp_ssl.cli`, so they also work where the package's
console script is not on PATH) with `trainer.device=cuda` on tiny data.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import TINY_DATA, run_cli
from ntp_ssl.protect.losses import (
    fisher_ratio,
    kmeans_pseudo_labels,
    mmd_multi_kernel,
    ntl_loss,
    representation_ntp_loss,
    supervised_ntp_loss,
)
from ntp_ssl.protect.projections import random_masks_per_layer, topk_masks_per_layer
from ntp_ssl.shared.knn import knn_accuracy
from ntp_ssl.shared.masking import MaskedOptimizer
from ntp_ssl.shared.train import resolve_device

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CUDA = torch.device("cuda")
MODULE = [sys.executable, "-m", "ntp_ssl.cli"]


def batch(seed: int, n: int = 48, dim: int = 16, num_classes: int = 5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=g, dtype=torch.float64), torch.randint(0, num_classes, (n,), generator=g)


def on_both_devices(fn, *tensors: torch.Tensor):
    """``fn`` and the gradients of its first output w.r.t. the float tensors, on CPU and on CUDA."""
    results = []
    for device in ("cpu", CUDA):
        args = [t.detach().to(device).requires_grad_(t.is_floating_point()) for t in tensors]
        out = fn(*args)
        value = out[0] if isinstance(out, tuple) else out
        grads = torch.autograd.grad(value, [a for a in args if a.requires_grad])
        results.append((value.detach().cpu(), [g.cpu() for g in grads]))
    return results


def assert_close_on_both(fn, *tensors: torch.Tensor) -> None:
    (cpu_value, cpu_grads), (gpu_value, gpu_grads) = on_both_devices(fn, *tensors)
    torch.testing.assert_close(gpu_value, cpu_value, rtol=1e-9, atol=1e-12)
    for gpu_grad, cpu_grad in zip(gpu_grads, cpu_grads):
        torch.testing.assert_close(gpu_grad, cpu_grad, rtol=1e-8, atol=1e-11)


def test_auto_picks_the_gpu():
    assert resolve_device("auto").type == "cuda"


def test_fisher_ratio_and_mmd_match_the_cpu():
    features, labels = batch(0)
    other, _ = batch(1, n=40)
    assert_close_on_both(lambda f, y: fisher_ratio(f, y), features, labels)
    assert_close_on_both(lambda x, y: mmd_multi_kernel(x, y), features, other)


def test_the_three_nt_losses_match_the_cpu():
    source_logits, source_labels = batch(2, dim=5)
    target_logits, target_labels = batch(3, dim=5)
    source_features, pseudo_source = batch(4)
    target_features, pseudo_target = batch(5)

    assert_close_on_both(
        lambda sl, sy, tl, ty, tf: supervised_ntp_loss(sl, sy, tl, ty, tf, alpha=0.1, ce_clamp=10.0,
                                                       w_fisher_labels=1.0),
        source_logits, source_labels, target_logits, target_labels, target_features)
    assert_close_on_both(
        lambda sl, sy, tl, ty, sf, tf: ntl_loss(sl, sy, tl, ty, sf, tf, alpha=0.1, ce_clamp=10.0, mmd_clamp=1.0),
        source_logits, source_labels, target_logits, target_labels, source_features, target_features)

    def label_free(sf, tf, pt, ps):
        ssl = sf.pow(2).mean()  # stands in for the SSL losses: a function of the features
        return representation_ntp_loss(source_ssl=ssl, target_ssl=tf.pow(2).mean(), source_features=sf,
                                       target_features=tf, pseudo_labels=pt, source_pseudo_labels=ps,
                                       w_fisher_source=1.0)

    assert_close_on_both(label_free, source_features, target_features, pseudo_target, pseudo_source)


def test_masks_are_the_same_on_the_gpu():
    g = torch.Generator().manual_seed(6)
    weights = {"conv.weight": torch.randn(16, 3, 3, 3, generator=g), "fc.weight": torch.randn(10, 64, generator=g)}
    on_gpu = {name: w.to(CUDA) for name, w in weights.items()}
    for make in (lambda w: topk_masks_per_layer(w, 0.9), lambda w: random_masks_per_layer(w, 0.9),
                 lambda w: random_masks_per_layer(w, 0.9, seed=3)):
        cpu_masks, gpu_masks = make(weights), make(on_gpu)
        for name in weights:
            assert gpu_masks[name].device.type == "cuda"
            assert torch.equal(gpu_masks[name].cpu(), cpu_masks[name]), name


def test_kmeans_pseudo_labels_are_the_same_on_the_gpu():
    features, _ = batch(7, n=200, dim=8)
    features = features.float()
    cpu_labels = kmeans_pseudo_labels(features, 5, seed=0)
    gpu_labels = kmeans_pseudo_labels(features.to(CUDA), 5, seed=0)
    assert gpu_labels.device.type == "cuda"
    assert torch.equal(gpu_labels.cpu(), cpu_labels)


def test_knn_accuracy_is_the_same_on_the_gpu():
    bank, bank_labels = batch(8, n=300, dim=12)
    query, query_labels = batch(9, n=100, dim=12)
    bank, query = F.normalize(bank.float(), dim=1), F.normalize(query.float(), dim=1)
    on_cpu = knn_accuracy(bank, bank_labels, query, query_labels, num_classes=5, ks=(1, 20))
    on_gpu = knn_accuracy(bank.to(CUDA), bank_labels.to(CUDA), query.to(CUDA), query_labels.to(CUDA),
                          num_classes=5, ks=(1, 20))
    assert on_gpu == on_cpu


def test_masked_adam_keeps_pruned_weights_and_moments_zero_on_the_gpu():
    g = torch.Generator().manual_seed(10)
    layer = torch.nn.Linear(32, 8).to(CUDA)
    mask = (torch.rand(8, 32, generator=g) > 0.7).to(CUDA)
    optimizer = MaskedOptimizer(torch.optim.Adam(layer.parameters(), lr=1e-2), {"weight": layer.weight},
                                {"weight": mask})
    x = torch.randn(64, 32, generator=g).to(CUDA)
    for _ in range(5):
        optimizer.zero_grad()
        layer(x).pow(2).mean().backward()
        optimizer.step()
    assert torch.all(layer.weight[~mask] == 0)
    assert torch.any(layer.weight[mask] != 0)
    state = optimizer.optimizer.state[layer.weight]
    assert torch.all(state["exp_avg"][~mask] == 0) and torch.all(state["exp_avg_sq"][~mask] == 0)


# ------------------------------------------------------------------ the real command on a GPU

TINY_PROTECT = [*TINY_DATA, "trainer.device=cuda", "pretrain.optim.epochs=1", "pretrain.optim.batch_size=64",
                "pretrain.method.hidden_dim=64", "pretrain.method.projection_dim=32", "trainer.projector=false",
                "data.targets=[optdigits,mnistm]", "admm.iterations=2", "admm.steps_per_iteration=3",
                "admm.retrain_steps=3", "admm.batch_size=32", "sweep.fractions=[0.1,1.0]", "sweep.min_steps=5",
                "sweep.max_steps=10", "sweep.seeds=[0]"]


def protect_on_gpu(tmp_path: Path, cache_dir: Path, run_name: str) -> Path:
    result = run_cli(["protect", *TINY_PROTECT, f"run_name={run_name}"], cwd=tmp_path, cache=cache_dir,
                     command=MODULE)
    assert result.returncode == 0, result.stderr[-4000:]
    return tmp_path / "runs" / "protect" / run_name


@pytest.mark.slow
def test_protect_runs_on_the_gpu_and_repeats_bit_for_bit(tmp_path, cache_dir):
    """Same seed, same config, same machine, on a GPU too: the stage asks for deterministic
    algorithms on CUDA, so two runs give the same weights and the same sweep."""
    from conftest import assert_same_tensors
    from ntp_ssl.shared.checkpoint import load_checkpoint

    first = protect_on_gpu(tmp_path, cache_dir, "gpu-a")
    second = protect_on_gpu(tmp_path, cache_dir, "gpu-b")
    tensors, _ = load_checkpoint(first / "protected.safetensors")  # written from the GPU, read on the CPU
    assert all(t.device.type == "cpu" for t in tensors.values())
    assert_same_tensors(first / "protected.safetensors", second / "protected.safetensors")
    rows_a = json.loads((first / "summary.json").read_text())
    rows_b = json.loads((second / "summary.json").read_text())
    assert rows_a["summary"] == rows_b["summary"]
    assert rows_a["source_accuracy"] == rows_b["source_accuracy"]


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["32", "bf16-mixed"])
def test_pretrain_runs_on_the_gpu(tmp_path, cache_dir, precision):
    from conftest import TINY_PRETRAIN
    from ntp_ssl.shared.checkpoint import load_checkpoint

    result = run_cli(["pretrain", *TINY_DATA, *TINY_PRETRAIN, "trainer.device=cuda", f"trainer.precision={precision}",
                      "run_name=gpu-pretrain"], cwd=tmp_path, cache=cache_dir, command=MODULE)
    assert result.returncode == 0, result.stderr[-4000:]
    run_dir = tmp_path / "runs" / "pretrain" / "gpu-pretrain"
    tensors, meta = load_checkpoint(run_dir / "encoder.safetensors")
    assert tensors and all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point())
