"""Offline, a Hugging Face hub name fails at once (one line, today's `hf download` advice) instead of after
the hub client's retries; a local folder that does not exist is named as such. The network is never used:
offline is forced (HF_HUB_OFFLINE, or a probe to a closed local port)."""
from __future__ import annotations

import socket
import time

import pytest

from blockkd import models
from blockkd.errors import BlockKDError
from blockkd.models import external

pytest.importorskip("transformers")


def one_line(excinfo) -> str:
    text = str(excinfo.value)
    assert "\n" not in text
    return text


@pytest.fixture
def closed_port() -> int:
    """A local port nobody listens on: a connect there is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_offline_is_detected_from_the_environment_or_the_probe(monkeypatch, closed_port):
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port}")
    start = time.perf_counter()
    assert external.hub_offline()
    assert time.perf_counter() - start < 3
    with socket.socket() as server:  # something listening: reachable
        server.bind(("127.0.0.1", 0))
        server.listen()
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        assert not external.hub_offline()
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        assert external.hub_offline()


@pytest.mark.parametrize("forced", ["env", "probe"])
def test_hub_model_offline_fails_at_once_in_one_line(monkeypatch, tmp_path, closed_port, forced):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # an empty cache
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-home" / "hub"))
    if forced == "env":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
            monkeypatch.delenv(key, raising=False)
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port}")  # the probe finds no hub there
    start = time.perf_counter()
    with pytest.raises(BlockKDError) as e:
        models.create("hf.bert-base-uncased", num_classes=2, in_channels=None)
    assert time.perf_counter() - start < 5
    text = one_line(e)
    assert "hub is out of reach (offline)" in text
    assert "`hf download bert-base-uncased --local-dir models/bert-base-uncased`" in text
    assert "hf.models/bert-base-uncased" in text and "huggingface-cli" not in text


def test_missing_local_folder_says_it_does_not_exist(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name in (f"hf.{tmp_path}/missing_folder", "hf../models/missing", "hf.some/missing/folder"):
        start = time.perf_counter()
        with pytest.raises(BlockKDError, match="the folder .*missing.* does not exist") as e:
            models.create(name, num_classes=2, in_channels=None)
        assert time.perf_counter() - start < 5
        one_line(e)
    # "org/name" may be a hub id or a relative folder: offline, the line says both
    with pytest.raises(BlockKDError, match=r"hf.some/missing_folder: no folder /\S*some/missing_folder exists and "
                                           r"the hub is out of reach") as e:
        models.create("hf.some/missing_folder", num_classes=2, in_channels=None)


def test_timm_weights_offline_fail_at_once(monkeypatch, tmp_path):
    pytest.importorskip("timm")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(BlockKDError, match=r"cannot load the timm weights resnet18 .*out of reach \(offline\)"
                                           r".*`hf download timm/resnet18.a1_in1k model.safetensors --local-dir "
                                           r"checkpoints/imagenet/resnet18`") as e:
        models.timm_state_dict("timm.resnet18", "timm://DEFAULT")
    assert time.perf_counter() - start < 5
    one_line(e)
