"""The release file: sparse, smaller than dense, and loadable with torch and safetensors alone."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from ntp_ssl.encoders import build_encoder
from ntp_ssl.protect.projections import project_topk_per_layer
from ntp_ssl.release import load_release, load_release_state_dict, pack_bits, save_release, unpack_bits
from ntp_ssl.shared.checkpoint import load_encoder, save_checkpoint


def test_bits_pack_and_unpack_like_a_plain_loop():
    torch.manual_seed(0)
    for numel in (1, 7, 8, 9, 64, 1000):
        mask = torch.rand(numel) > 0.5
        packed = pack_bits(mask)
        expected = [sum(int(mask[8 * k + i]) << i for i in range(8) if 8 * k + i < numel)
                    for k in range((numel + 7) // 8)]
        assert packed.tolist() == expected and packed.dtype == torch.uint8
        assert torch.equal(unpack_bits(packed, numel), mask)


def _pruned(backbone: str, sparsity: float, image_size: int = 16):
    torch.manual_seed(0)
    encoder = build_encoder(backbone, image_size=image_size)
    for module in encoder.modules():  # batch-norm statistics that are not the defaults
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 1.5)
    weights = {k: p for k, p in encoder.named_parameters() if p.dim() == 4}
    projected = project_topk_per_layer({k: p.detach() for k, p in weights.items()}, sparsity)
    masks = {k: v != 0 for k, v in projected.items()}
    with torch.no_grad():
        for k, p in weights.items():
            p.mul_(masks[k])
    return encoder.eval(), masks


@pytest.mark.parametrize("backbone", ["small_cnn", "vgg11_bn"])
def test_the_release_loader_gives_the_features_of_the_projects_own_loader(tmp_path, backbone):
    encoder, masks = _pruned(backbone, 0.9)
    tensors = {**{f"encoder.{k}": v for k, v in encoder.state_dict().items()},
               **{f"mask.{k}": m.to(torch.uint8) for k, m in masks.items()}}
    checkpoint = save_checkpoint(tmp_path / "protected", tensors, {"backbone": backbone, "image_size": 16,
                                                                   "channels": 3})
    release = save_release(tmp_path / "protected.release.safetensors", encoder, masks, backbone=backbone)
    ours, _, _, _ = load_encoder(checkpoint)
    theirs = load_release(release)
    assert type(theirs).__module__ == "ntp_ssl.release" and not theirs.training
    x = torch.randn(5, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(ours.eval()(x), theirs(x))
    state, header = load_release_state_dict(release)
    assert header["backbone"] == backbone
    for name, mask in masks.items():
        assert torch.equal(state[name] != 0, mask & (encoder.state_dict()[name] != 0))


def test_a_resnet_release_gives_its_state_dict(tmp_path):
    encoder, masks = _pruned("resnet18", 0.9)
    release = save_release(tmp_path / "r.release.safetensors", encoder, masks, backbone="resnet18")
    state, _ = load_release_state_dict(release)
    assert all(torch.equal(state[k], v) for k, v in encoder.state_dict().items())
    with pytest.raises(ValueError, match="not sequential; use load_release_state_dict"):
        load_release(release)


def test_the_release_file_is_smaller_than_dense(tmp_path):
    dense_bytes = None
    sizes = {}
    for sparsity in (0.5, 0.9, 0.99):
        encoder, masks = _pruned("small_cnn", sparsity, image_size=32)
        dense = tmp_path / "dense.safetensors"
        save_checkpoint(dense, {k: v for k, v in encoder.state_dict().items()}, {})
        dense_bytes = dense.stat().st_size
        sizes[sparsity] = save_release(tmp_path / f"{sparsity}.safetensors", encoder, masks,
                                       backbone="small_cnn").stat().st_size
    assert sizes[0.5] < 0.6 * dense_bytes and sizes[0.9] < 0.2 * dense_bytes and sizes[0.99] < 0.06 * dense_bytes


def test_the_release_module_imports_only_torch_and_safetensors():
    import ntp_ssl.release as release

    tree = ast.parse(Path(release.__file__).read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported <= {"__future__", "json", "pathlib", "torch", "safetensors"}, imported


def test_a_file_that_is_not_a_release_is_refused(tmp_path):
    path = save_checkpoint(tmp_path / "plain", {"w": torch.zeros(2)}, {})
    with pytest.raises(ValueError, match="is not an ntp-ssl release file"):
        load_release(path)
