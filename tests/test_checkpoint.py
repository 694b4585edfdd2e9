"""Checkpoints: safetensors + JSON with a hash; nothing is ever unpickled."""

from __future__ import annotations

import json
import pickle
import re

import pytest
import torch

from ntp_ssl.shared.checkpoint import (
    flatten_state,
    load_checkpoint,
    load_encoder,
    load_training_state,
    meta_digest,
    save_checkpoint,
    save_training_state,
    unflatten_state,
)
from ntp_ssl.encoders import build_encoder
from ntp_ssl.errors import CheckpointError


def _encoder_checkpoint(tmp_path, backbone="small_cnn"):
    encoder = build_encoder(backbone, image_size=16)
    tensors = {f"encoder.{k}": v for k, v in encoder.state_dict().items()}
    return save_checkpoint(tmp_path / "encoder", tensors, {"backbone": backbone, "image_size": 16, "channels": 3}), encoder


def test_round_trip_and_metadata(tmp_path):
    path, encoder = _encoder_checkpoint(tmp_path)
    loaded, meta, masks, _ = load_encoder(path)
    assert meta["backbone"] == "small_cnn" and len(meta["sha256"]) == 64 and masks == {}
    for (name, a), (_, b) in zip(encoder.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name


def test_a_changed_file_is_refused(tmp_path):
    path, _ = _encoder_checkpoint(tmp_path)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_checkpoint(path)


def test_weights_without_metadata_are_an_unfinished_write(tmp_path):
    path, _ = _encoder_checkpoint(tmp_path)
    path.with_suffix(".json").unlink()
    with pytest.raises(CheckpointError, match="incomplete"):
        load_checkpoint(path)


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.safetensors")


def test_checkpoint_of_another_backbone_is_refused(tmp_path):
    path, _ = _encoder_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="holds a 'small_cnn' encoder"):
        load_encoder(path, expect_backbone="resnet18")
    meta = json.loads(path.with_suffix(".json").read_text())
    meta["backbone"] = "vgg11_bn"  # weights of one backbone claimed for another (a crafted, self-consistent file)
    meta["meta_sha256"] = meta_digest(meta)
    path.with_suffix(".json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="does not fit a 'vgg11_bn' encoder"):
        load_encoder(path)


class _Exploit:
    def __reduce__(self):
        import os

        return (os.system, ("touch PWNED_BY_PICKLE",))


# the crafted file is a bare pickle (protocol 4, not torch's 2): torch's weights-only
# unpickler warns about the protocol before it refuses the file, which is what is tested
@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
def test_malicious_pickle_runs_no_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    with open(path, "wb") as handle:
        pickle.dump({"weight": _Exploit()}, handle)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert "refusing to load" in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "PWNED_BY_PICKLE").exists()
    torch.save({"w": _Exploit()}, tmp_path / "evil2.pth")  # the torch zip format, too
    with pytest.raises(CheckpointError, match="refusing to load") as info:
        load_checkpoint(tmp_path / "evil2.pth")
    assert not (tmp_path / "PWNED_BY_PICKLE").exists()
    # the refusal names what the file needs and never advises unpickling it unrestricted
    assert "global posix.system" in str(info.value) or "global os.system" in str(info.value)
    assert "weights_only" not in str(info.value) and "False" not in str(info.value)


def test_plain_legacy_state_dict_loads_with_weights_only(tmp_path):
    torch.save({"w": torch.ones(3)}, tmp_path / "plain.pt")
    tensors, meta = load_checkpoint(tmp_path / "plain.pt")
    assert torch.equal(tensors["w"], torch.ones(3)) and meta["format_version"] == 0


def test_nested_training_state_round_trips(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 3, "history": [{"loss": 0.5}],
             "pair": (1, 2), "rng": torch.get_rng_state()}
    tensors, tree = flatten_state(state)
    back = unflatten_state(tensors, json.loads(json.dumps(tree)))
    assert back["epoch"] == 3 and back["pair"] == (1, 2) and back["history"] == [{"loss": 0.5}]
    assert torch.equal(back["rng"], state["rng"])
    save_training_state(tmp_path / "last", state, {"stage": "test"})
    loaded, _ = load_training_state(tmp_path / "last.safetensors")
    opt2 = torch.optim.Adam(torch.nn.Linear(3, 2).parameters())
    opt2.load_state_dict(loaded["optimizer"])
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def test_atomic_write_leaves_the_old_file_when_writing_fails(tmp_path):
    from ntp_ssl.io import atomic_write_with

    target = tmp_path / "results.csv"
    target.write_text("old")

    def broken_writer(tmp):
        tmp.write_text("half")
        raise RuntimeError("crash in the middle")

    with pytest.raises(RuntimeError):
        atomic_write_with(target, broken_writer)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["results.csv"]


def test_only_regular_files_of_bounded_size_are_opened(tmp_path, monkeypatch):
    import os

    from ntp_ssl.shared import checkpoint

    path, _ = _encoder_checkpoint(tmp_path)
    to_zero = tmp_path / "zero.safetensors"  # hashing it would never end
    to_zero.symlink_to("/dev/zero")
    to_zero.with_suffix(".json").write_text(path.with_suffix(".json").read_text())
    with pytest.raises(CheckpointError, match="is not a regular file"):
        load_checkpoint(to_zero)
    fifo = tmp_path / "fifo.safetensors"  # opening it would wait for a writer forever
    os.mkfifo(fifo)
    fifo.with_suffix(".json").write_text(path.with_suffix(".json").read_text())
    with pytest.raises(CheckpointError, match="is not a regular file"):
        load_checkpoint(fifo)
    os.mkfifo(tmp_path / "legacy.pt")
    with pytest.raises(CheckpointError, match="is not a regular file"):
        load_checkpoint(tmp_path / "legacy.pt")
    monkeypatch.setattr(checkpoint, "MAX_CHECKPOINT_BYTES", 100)
    with pytest.raises(CheckpointError, match=r"bytes, over the 100 bytes accepted"):
        load_checkpoint(path)


@pytest.mark.parametrize("value", [2.0, 0.5, -1.0, float("nan")])
def test_a_mask_of_anything_but_zeros_and_ones_is_refused(tmp_path, value):
    encoder = build_encoder("small_cnn", image_size=16)
    name, weight = next((k, p) for k, p in encoder.named_parameters() if p.dim() == 4)
    mask = torch.ones_like(weight)
    mask.view(-1)[3] = value
    tensors = {**{f"encoder.{k}": v for k, v in encoder.state_dict().items()}, f"mask.{name}": mask}
    path = save_checkpoint(tmp_path / "masked", tensors, {"backbone": "small_cnn", "image_size": 16, "channels": 3})
    with pytest.raises(CheckpointError, match=f"mask '{name}' holds"):
        load_encoder(path)
    mask.view(-1)[3] = 0.0  # zeros and ones (any dtype) are a mask
    path = save_checkpoint(tmp_path / "masked", {**tensors, f"mask.{name}": mask},
                           {"backbone": "small_cnn", "image_size": 16, "channels": 3})
    _, _, masks, _ = load_encoder(path)
    assert masks[name].dtype == torch.bool and int((~masks[name]).sum()) == 1
    path = save_checkpoint(tmp_path / "masked", {**tensors, f"mask.{name}": mask[:1]},
                           {"backbone": "small_cnn", "image_size": 16, "channels": 3})
    with pytest.raises(CheckpointError, match="has shape"):
        load_encoder(path)


@pytest.mark.parametrize("value", ["32", 1e20, -3, True, None])
def test_badly_typed_metadata_is_a_one_line_error(tmp_path, value):
    path, _ = _encoder_checkpoint(tmp_path)
    meta = json.loads(path.with_suffix(".json").read_text())
    meta["image_size"] = value
    meta["meta_sha256"] = meta_digest(meta)
    path.with_suffix(".json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=re.escape(f"metadata image_size={value!r} is not a positive integer")):
        load_encoder(path)


def test_an_edited_metadata_file_is_refused_like_an_edited_tensor(tmp_path):
    path, _ = _encoder_checkpoint(tmp_path)
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["meta_sha256"] == meta_digest(meta)
    for key, value in (("image_size", 32), ("epoch", 1_000_000), ("backbone", "resnet18")):
        edited = {**meta, key: value}
        path.with_suffix(".json").write_text(json.dumps(edited))
        with pytest.raises(CheckpointError, match="does not match its meta_sha256; it was edited or damaged"):
            load_checkpoint(path)
    legacy = {k: v for k, v in meta.items() if k != "meta_sha256"}  # written before the digest existed
    path.with_suffix(".json").write_text(json.dumps(legacy))
    assert load_checkpoint(path)[1]["backbone"] == "small_cnn"


def test_a_damaged_finished_checkpoint_is_set_aside_not_trusted(tmp_path):
    from ntp_ssl.shared.checkpoint import verified_or_set_aside

    path, _ = _encoder_checkpoint(tmp_path)
    assert verified_or_set_aside(path)["backbone"] == "small_cnn"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # truncated
    assert verified_or_set_aside(path, set_aside=False) is None and path.exists()
    assert verified_or_set_aside(path) is None
    assert not path.exists() and not path.with_suffix(".json").exists()
    kept = sorted(p.name.split(".damaged-")[0] for p in tmp_path.glob("*.damaged-*"))
    assert kept == ["encoder.json", "encoder.safetensors"]  # nothing lost


@pytest.mark.parametrize("change", [{"num_classes": "ten"}, {"method": 3}, {"method_config": {"hidden_dim": "wide"}},
                                    {"method_config": {"hidden_dim": 10**30}}])
def test_badly_typed_method_metadata_is_a_one_line_error(tmp_path, change):
    from ntp_ssl.pretrain.methods import build_method, export_state, load_method

    encoder = build_encoder("small_cnn", image_size=16)
    method = build_method("simclr", encoder, num_classes=10)
    meta = {"backbone": "small_cnn", "image_size": 16, "channels": 3, "method": "simclr", "num_classes": 10,
            "method_config": {}}
    path = save_checkpoint(tmp_path / "enc", export_state(method), {**meta, **change})
    with pytest.raises(CheckpointError) as info:  # were tracebacks
        load_method(path, "cpu")
    assert "\n" not in str(info.value) and str(path) in str(info.value)
