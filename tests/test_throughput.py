"""FLOPs per token, the peak used for MFU, and presets that need a prepared corpus."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from spheretorch.models import TransformerConfig, build_model
from spheretorch.train import UserError, get_preset
from spheretorch.train.throughput import PEAK_ENV, flops_per_token, peak_flops, throughput


@pytest.mark.parametrize("name", ["gpt", "ngpt", "geonorm"])
def test_flops_per_token_is_6n_plus_attention(name: str) -> None:
    v, t, layers, d = 50, 16, 2, 32
    model = build_model(
        name, TransformerConfig(vocab_size=v, seq_len=t, n_layer=layers, n_head=2, d_model=d)
    )
    # Matrix-product weights: qkv, out projection and the SwiGLU MLP per layer, and the head.
    n = layers * (3 * d * d + d * d + 2 * 4 * d * d + 4 * d * d) + v * d
    assert flops_per_token(model, layers, t, d) == 6 * n + 12 * layers * t * d


def test_peak_and_throughput(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PEAK_ENV, raising=False)
    assert peak_flops(torch.device("cpu"), torch.float32) == (None, "peak of cpu unknown")
    assert throughput(1000, 2.0, 6_000_000, None) == {
        "tokens_per_s": 500.0,
        "tflops_per_s": 0.003,
        "mfu": None,
    }
    monkeypatch.setenv(PEAK_ENV, "0.01")
    peak, source = peak_flops(torch.device("cpu"), torch.float32)
    assert peak == 1e10 and source == f"${PEAK_ENV}"
    assert throughput(1000, 2.0, 6_000_000, peak)["mfu"] == 0.3


def test_corpus_presets_refuse_text(tmp_path: Path) -> None:
    for name in ("gpu-medium", "cpu-bpe"):
        preset = get_preset(name)
        with pytest.raises(UserError, match=f"preset {name} trains on a prepared corpus, not the"):
            preset.check_data(None)
        with pytest.raises(UserError, match=r"not the text file x\.txt: make one with `"):
            preset.check_data("x.txt")
        preset.check_data(tmp_path)
    get_preset("cpu-small").check_data(None)
