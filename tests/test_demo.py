"""The README's main job, end to end (slow tier)."""
import pytest

from qat.app import demo


@pytest.mark.slow
def test_demo_quantized_accuracy_close_to_float(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'checkpoints').mkdir()
    rows = dict(demo.run(epochs=6, qat_epochs=1, out=lambda *a: None))
    float_acc = float(rows['float32'])
    assert float_acc > 90.0  # the digits are easy: a working pipeline learns them
    # 8-bit post-training quantization of a well-conditioned net loses almost nothing.
    assert float(rows['W8A8 per-channel, PTQ (simulated)']) >= float_acc - 1.0
    assert float(rows['W4A4 per-channel, QAT 1 epochs (simulated)']) >= float_acc - 2.0
