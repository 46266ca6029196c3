"""gpt2/throughput.py: the device peaks MFU divides by (the model's FLOPs per token are tested
against FlopCounterMode in test_pretrain.py, through the script's logged MFU)."""

import pytest

from gpt2.throughput import mfu, peak_flops


@pytest.mark.parametrize(
    "name, peak",
    [
        ("NVIDIA H100 80GB HBM3", 989.4e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H200", 989.4e12),
        ("NVIDIA GH200 480GB", 989.4e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA L4", 121e12),
        ("NVIDIA L40S", 362.05e12),
        ("NVIDIA A10G", None),
        ("NVIDIA GeForce GTX 1080", None),
        ("cpu", None),
    ],
)
def test_peak_flops_by_gpu_name(name, peak):
    assert peak_flops(name) == peak
    assert (mfu(1000.0, 1e9, peak_flops(name)) is None) == (peak is None)


def test_window_weights_loss_by_tokens_and_leaves_out_paused_time(monkeypatch):
    """The logged loss is the window's NLL over its tokens (never a mean of step means), a skipped
    update counts as a step without its loss, and time inside paused() (evaluation, saving) is not
    a training step's."""
    import gpt2.throughput as throughput

    clock = iter([0.0, 0.0, 5.0, 10.0, 10.0])  # start; paused from 0 to 5 s; closed at 10 s (and restarted)
    monkeypatch.setattr(throughput.time, "perf_counter", lambda: next(clock))
    window = throughput.ThroughputWindow()
    window.add(2.0, tokens=100)
    window.add(float("nan"), tokens=50, applied=False)
    window.add(5.0, tokens=300)
    with window.paused():
        pass
    loss, steps_per_s = window.close()
    assert loss == pytest.approx((2.0 * 100 + 5.0 * 300) / 400)
    assert steps_per_s == pytest.approx(3 / 5.0)
    assert window.steps == 0 and window.tokens == 0  # the next window starts empty
