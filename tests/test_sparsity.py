"""Sparsity report against a hand count on a tiny model."""

import pytest
import torch
from torch import nn

from ntp_ssl.errors import ConfigError
from ntp_ssl.protect.sparsity import format_sparsity_table, sparsity_report


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 2)
        self.fc = nn.Linear(3, 2)
        with torch.no_grad():
            w = torch.ones(3, 2, 2, 2)
            w[0] = 0  # output channel 0 dead: 8 zeros
            w[:, 1] = 0  # input channel 1 dead: 4 more zeros (out 1, 2)
            w[1, 0, 0, 0] = 0  # one more zero
            self.conv.weight.copy_(w)  # 24 entries, 7 nonzero
            self.conv.bias.copy_(torch.tensor([0.0, 1.0, 2.0]))  # 2 nonzero
            self.fc.weight.copy_(torch.tensor([[1.0, 0.0, 2.0], [0.0, 0.0, 3.0]]))  # 3 nonzero, input 1 dead
            self.fc.bias.copy_(torch.tensor([1.0, -1.0]))  # 2 nonzero
        self.register_buffer("counter", torch.zeros(5))  # buffers do not count


def masks_for(model):
    return {
        "conv.weight": model.conv.weight.detach() != 0,
        "fc.weight": torch.tensor([[True, True, True], [False, False, True]]),  # 4 kept, 3 actually nonzero
    }


def test_report_matches_hand_count():
    model = Tiny()
    report = sparsity_report(model, masks_for(model))
    conv, fc = report["tensors"]["conv.weight"], report["tensors"]["fc.weight"]
    assert conv == {
        "shape": [3, 2, 2, 2], "numel": 24, "nonzeros": 7, "sparsity": pytest.approx(17 / 24), "mask_kept": 7,
        "zero_output_channels": 1, "zero_input_channels": 1,
    }
    assert fc == {
        "shape": [2, 3], "numel": 6, "nonzeros": 3, "sparsity": pytest.approx(0.5), "mask_kept": 4,
        "zero_output_channels": 0, "zero_input_channels": 1,
    }
    assert report["prunable"] == {"numel": 30, "nonzeros": 10, "sparsity": pytest.approx(20 / 30)}
    assert report["model"] == {"numel": 35, "nonzeros": 14, "sparsity": pytest.approx(21 / 35)}
    assert "files" not in report


def test_report_one_dim_tensors_and_files():
    model = Tiny()
    report = sparsity_report(model, {"conv.bias": torch.ones(3, dtype=torch.bool)}, dense_bytes=4000, saved_bytes=1000)
    bias = report["tensors"]["conv.bias"]
    assert bias["nonzeros"] == 2 and bias["zero_output_channels"] is None and bias["zero_input_channels"] is None
    assert report["files"] == {"dense_bytes": 4000, "saved_bytes": 1000, "ratio": 0.25}


def test_report_rejects_unknown_names():
    with pytest.raises(ConfigError, match="'head.weight'"):
        sparsity_report(Tiny(), {"head.weight": torch.ones(2, dtype=torch.bool)})


def test_format_table_is_aligned_with_totals():
    model = Tiny()
    report = sparsity_report(model, masks_for(model), dense_bytes=2048, saved_bytes=512)
    table = format_sparsity_table(report)
    lines = table.splitlines()
    assert lines[0].split()[:2] == ["tensor", "shape"]
    conv_line = next(l for l in lines if l.startswith("conv.weight"))
    fc_line = next(l for l in lines if l.startswith("fc.weight"))
    assert conv_line.split() == ["conv.weight", "3x2x2x2", "24", "7", "70.83%", "1", "1"]
    assert len(conv_line) == len(fc_line) == len(lines[0])  # right-aligned columns end together
    assert lines[0].index("nonzeros") + len("nonzeros") == conv_line.index(" 7 ") + 2
    total = next(l for l in lines if l.startswith("total (prunable)"))
    assert total.split()[2:] == ["30", "10", "66.67%"]
    assert any(l.startswith("total (all params)") and "35" in l for l in lines)
    assert lines[-1] == "files: dense bytes: 2.0 KiB, saved bytes: 512 B, ratio: 0.250"
