import json
import os
import signal
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# Tests import what they share with the benchmarks from benchmarks/ (one copy), and their own helpers from helpers.py.
sys.path.insert(0, str(ROOT / "benchmarks"))

# Two cores in CI: one intra-op thread per test process keeps timings predictable.
torch.set_num_threads(int(os.environ.get("BLOCKKD_TEST_THREADS", "1")))
# A suite started in the background of a non-interactive shell (`cmd &`, nohup) inherits SIGINT ignored, and
# the Ctrl-C fault tests (tests/faults/test_resources.py) would then never see their SIGINT: restore Python's
# handler, which the runs they start inherit as the default disposition.
signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def fresh_data_home(tmp_path_factory):
    """$BLOCKKD_DATA (where trained tokenizers are cached) a fresh folder for one test module."""
    old = os.environ.get("BLOCKKD_DATA")
    os.environ["BLOCKKD_DATA"] = str(tmp_path_factory.mktemp("data"))
    yield
    if old is None:
        os.environ.pop("BLOCKKD_DATA", None)
    else:
        os.environ["BLOCKKD_DATA"] = old


@pytest.fixture
def baseline_sweeps():
    """The baselines' weight sweeps recorded in results/tuning-baselines.json, as benchmarks/tune.py reads them
    (method -> key, weights tried, the chosen one): what their Fashion-MNIST recipes must carry."""
    import tune

    return tune.weight_sweeps(json.loads((ROOT / "results" / "tuning-baselines.json").read_text())["variants"])
