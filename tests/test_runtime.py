"""kdfast.runtime: bf16 is used only where it runs natively, and asking for it elsewhere warns before the work."""
import warnings

import pytest
import torch

from kdfast import runtime
from kdfast.audit import presets
from kdfast.models import inference_context


def test_bf16_is_native_on_cpu_follows_onednn():
    assert runtime.bf16_is_native("cpu") == bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    assert runtime.bf16_is_native("meta") is False


@pytest.mark.parametrize("native", [True, False])
def test_default_preset_uses_bf16_only_where_native(monkeypatch, native):
    monkeypatch.setattr(presets, "bf16_is_native", lambda device: native)
    cfg = presets.default()
    assert cfg.teacher.bf16 is native
    assert cfg.students.distill["bf16"] is native
    assert cfg.attacks.autocast is native


def test_asking_for_emulated_bf16_warns(monkeypatch):
    monkeypatch.setattr(runtime, "bf16_is_native", lambda device: False)
    with pytest.warns(UserWarning, match="emulated"):
        with inference_context(torch.device("cpu"), autocast=True):
            pass
    monkeypatch.setattr(runtime, "bf16_is_native", lambda device: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with inference_context(torch.device("cpu"), autocast=True):
            pass


def test_distill_bf16_on_an_emulating_cpu_warns_and_keeps_the_choice(monkeypatch):
    from kdfast.distill.config import DistillConfig
    from kdfast.distill.loop import _amp_dtype
    monkeypatch.setattr(runtime, "bf16_is_native", lambda device: False)
    with pytest.warns(UserWarning, match="DistillConfig.bf16"):
        assert _amp_dtype(DistillConfig(bf16=True), torch.device("cpu")) is torch.bfloat16
    assert _amp_dtype(DistillConfig(), torch.device("cpu")) is None


@pytest.mark.parametrize("native", [True, False])
def test_nf4_computes_in_bf16_only_where_native(monkeypatch, native):
    from kdfast import models
    monkeypatch.setattr(models, "bf16_is_native", lambda device: native)
    expected = torch.bfloat16 if native else torch.float32
    assert models.bnb_config("nf4", "cpu").bnb_4bit_compute_dtype == expected
