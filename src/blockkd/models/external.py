"""Models from torchvision, timm and Hugging Face by prefixed name: ``torchvision.resnet18``,
``timm.mobilenetv3_small_050``, ``hf.bert-base-uncased``, ``hf-config.path/to/config.json``.

Why prefixes resolved on demand rather than registered names: torchvision has ~80 classification models
and timm over a thousand; listing them would drown the zoo, and importing either library costs seconds,
so a library is only imported when one of its names is used. Pretrained torchvision weights are named
``torchvision://DEFAULT`` (or any tag of the model's weights enum, e.g. ``torchvision://IMAGENET1K_V1``);
pretrained timm weights ``timm://DEFAULT`` (timm's default tag of the architecture) or ``timm://TAG`` (e.g.
``timm://fb_in1k`` for ``timm.deit_small_patch16_224.fb_in1k``), fetched by timm from the Hugging Face hub.

Hugging Face text classifiers (``AutoModelForSequenceClassification``, ``num_labels`` = the data's classes):
``hf.<hub id or local folder>`` loads the pretrained weights with ``from_pretrained`` (offline: a local folder,
e.g. one written by ``save_pretrained`` or ``hf download``); ``hf-config.<config.json or folder>``
builds a randomly initialised model from a configuration alone (tests, small models trained from scratch).
They take text, not images: ``in_channels`` is ignored.

Offline (``HF_HUB_OFFLINE=1``, or no TCP connection to the hub within two seconds: :func:`hub_offline`) the hub
is not asked at all: only the local cache is read, and a missing model is one line at once, not after the
hub client's 30-50 s of retries.
"""
from __future__ import annotations

import contextlib
import difflib
import logging
import os
import socket
import threading
from pathlib import Path
from urllib.parse import urlsplit
from urllib.request import getproxies

import torch
import torch.nn as nn

from ..errors import BlockKDError
from ..registry import UnknownNameError

LOG = logging.getLogger("blockkd.engine.models")  # under the run's logger: its lines reach train.log and the console
FAMILIES = ("torchvision", "timm", "hf", "hf-config")
TEXT_FAMILIES = ("hf", "hf-config")
NLP_INSTALL = "pip install 'blockkd[nlp]'"
WEIGHTS_SCHEME = "torchvision://"
TIMM_SCHEME = "timm://"


RESERVED_KWARGS = ("num_classes", "in_chans", "in_channels", "pretrained", "weights")  # blockkd sets these
HUB_PROBE_TIMEOUT = 2.0  # seconds: a reachable hub answers a TCP connect far sooner


def hub_offline(timeout: float = HUB_PROBE_TIMEOUT) -> bool:
    """Whether the Hugging Face hub is out of reach: ``HF_HUB_OFFLINE``/``TRANSFORMERS_OFFLINE`` set, or no TCP
    connection to its host (``HF_ENDPOINT``; through ``https_proxy`` when one is set) within ``timeout`` s.
    The probe runs in a thread so that a hanging name lookup is bounded too."""
    if any(os.environ.get(k, "").strip().upper() in ("1", "ON", "YES", "TRUE") for k in
           ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return True
    url = urlsplit(getproxies().get("https") or os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = url.hostname, url.port or (80 if url.scheme == "http" else 443)
    reached: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            reached.append(True)
        except (OSError, UnicodeError):
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return not reached


def hf_download_advice(repo: str, folder: str) -> str:
    """What to run on a connected machine (the hub client's ``hf`` command) and what to name afterwards."""
    return f"on a machine with internet access run `hf download {repo} --local-dir {folder}` and copy {folder} here"


@contextlib.contextmanager
def _hub_offline_mode(offline: bool):
    """The hub client in offline mode while inside (cache only, no retries), when ``offline``."""
    if not offline:
        yield
        return
    from huggingface_hub import constants

    old = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = old


def family(name: str) -> str | None:
    """``"torchvision"``, ``"timm"``, ``"hf"`` or ``"hf-config"`` for a prefixed name, else None."""
    prefix, dot, rest = name.partition(".")
    return prefix if dot and rest and prefix in FAMILIES else None


def _timm():
    try:
        import timm
    except ImportError:
        raise BlockKDError("timm models need the timm package: pip install 'blockkd[timm]'") from None
    return timm


def transformers_module():
    """The ``transformers`` package, or a one-line error saying how to install it."""
    try:
        import transformers
    except ImportError:
        raise BlockKDError(f"Hugging Face models and text data need the transformers package: {NLP_INSTALL}") from None
    return transformers


def _config_path(base: str):
    """The configuration file of ``hf-config.<base>`` (a config.json, or a folder holding one)."""
    path = Path(base).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise UnknownNameError(f"unknown model 'hf-config.{base}': {path} is not a Hugging Face config.json "
                               f"(hf-config.<config.json or folder> builds a model from its configuration)")
    return path


def _available(fam: str) -> list[str]:
    if fam == "torchvision":
        import torchvision.models as tvm

        return tvm.list_models(module=tvm)  # classification models only
    return _timm().list_models()


def check(name: str) -> None:
    """Raise ``UnknownNameError`` (with the closest name of that library) unless ``name`` exists."""
    fam = family(name)
    assert fam is not None, name
    base = name.partition(".")[2]
    if fam in TEXT_FAMILIES:  # a hub id cannot be checked offline, a relative config path depends on the
        transformers_module()  # working directory: from_pretrained / the config file is checked when built
        return
    choices = _available(fam)
    if base in choices:
        return
    hint = difflib.get_close_matches(base, choices, n=1, cutoff=0.5)
    tip = (f"; did you mean '{fam}.{hint[0]}'?" if hint else
           "; see torchvision.models.list_models()" if fam == "torchvision" else "; see timm.list_models()")
    raise UnknownNameError(f"unknown model {name!r}{tip}")


def _replace_first_conv(model: nn.Module, in_channels: int) -> nn.Module:
    """torchvision models are built for RGB; a new first conv (fresh weights) takes ``in_channels``."""
    path, conv = next(((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)), (None, None))
    if conv is None or conv.groups != 1:
        raise BlockKDError(f"cannot adapt {type(model).__name__} to {in_channels} input channels: its first "
                           f"layer is not a plain Conv2d")
    model.set_submodule(path, nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                                        conv.dilation, bias=conv.bias is not None, padding_mode=conv.padding_mode))
    return model


def _create_hf(fam: str, base: str, num_classes: int) -> nn.Module:
    t = transformers_module()
    if fam == "hf-config":
        path = _config_path(base)
        try:
            config = t.AutoConfig.from_pretrained(str(path))
            config.num_labels = num_classes
            return t.AutoModelForSequenceClassification.from_config(config)
        except (OSError, ValueError, KeyError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise BlockKDError(f"cannot build hf-config.{base} from {path}: {first}") from None
    folder = Path(base).expanduser()
    if folder.is_dir():  # a local folder: nothing to ask the hub
        return _from_pretrained(t, base, str(folder), num_classes, offline=False)
    if base.startswith((".", "/", "~")) or base.count("/") > 1 or "\\" in base:  # a path, not a hub id
        raise BlockKDError(f"cannot load the Hugging Face model hf.{base}: "
                           f"the folder {folder.absolute()} does not exist")
    return _from_pretrained(t, base, base, num_classes, offline=hub_offline())


@contextlib.contextmanager
def _quiet_transformers(t):
    """transformers' own load report (a table of every missing and unused tensor, each time a model is built)
    and its progress bar off while inside: :func:`_report_loading` says the same in one line."""
    tl = t.utils.logging
    level, bar = tl.get_verbosity(), tl.is_progress_bar_enabled()
    tl.set_verbosity_error()
    tl.disable_progress_bar()
    try:
        yield
    finally:
        tl.set_verbosity(level)
        if bar:
            tl.enable_progress_bar()


def _modules(keys: list[str], most: int = 4) -> str:
    """The modules that hold ``keys`` (``classifier.weight`` -> ``classifier``), the first ``most`` of them."""
    names = sorted({k.rpartition(".")[0] or k for k in keys})
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def _report_loading(name: str, info: dict, model: nn.Module) -> None:
    """One line for what ``from_pretrained`` did not load as is. A new head (and pooler, which MLM checkpoints
    lack) is what fine-tuning expects: an info line. A new tensor inside the pretrained body means the folder
    is not the model it claims to be: a warning, which shows outside a run too."""
    parts = [f"{what} {_modules(info[key])} ({len(info[key])} tensors)"
             for key, what in (("missing_keys", "newly initialised:"), ("unexpected_keys", "unused:"))
             if info.get(key)]
    body = getattr(model, "base_model_prefix", "") + "."
    in_body = [k for k in info.get("missing_keys") or [] if k.startswith(body) and ".pooler." not in k]
    if parts:
        LOG.log(logging.WARNING if in_body else logging.INFO, f"{name}: " + "; ".join(parts))


def _from_pretrained(t, base: str, source: str, num_classes: int, *, offline: bool) -> nn.Module:
    """``from_pretrained(source)``; offline, from the local cache only (no hub retries)."""
    try:
        with _hub_offline_mode(offline), _quiet_transformers(t):
            model, info = t.AutoModelForSequenceClassification.from_pretrained(
                source, num_labels=num_classes, local_files_only=offline, output_loading_info=True)
        _report_loading(f"hf.{base}", info, model)
        return model
    except (OSError, ValueError, EnvironmentError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        leaf = base.rstrip("/").split("/")[-1]
        if source != base or Path(base).expanduser().exists():
            raise BlockKDError(f"cannot load the Hugging Face model hf.{base} ({first})") from None
        if offline:
            raise BlockKDError(f"cannot load the Hugging Face model hf.{base}: no folder {Path(base).absolute()} "
                               f"exists and the hub is out of reach (offline), with no copy in its cache; "
                               f"{hf_download_advice(base, 'models/' + leaf)}, then name the folder: "
                               f"hf.models/{leaf}") from None
        raise BlockKDError(f"cannot load the Hugging Face model {base!r} ({first}); if it is a folder, "
                           f"{Path(base).absolute()} does not exist; offline, "
                           f"{hf_download_advice(base, 'models/' + leaf)} and name the folder: hf.models/{leaf}"
                           ) from None


def create_causal_lm(name: str) -> nn.Module:
    """``hf.<hub id or folder>`` (pretrained, ``AutoModelForCausalLM.from_pretrained``; offline, the hub's cache
    only, as for the classifiers) or ``hf-config.<config>`` (randomly initialised) as a causal language model,
    for next-token data (``blockkd.data.lm``)."""
    fam = family(name)
    if fam not in TEXT_FAMILIES:
        raise BlockKDError(f"{name!r} is not a Hugging Face model: language-model data needs hf.<id or folder> or "
                           f"hf-config.<config.json> (a *ForCausalLM)")
    t = transformers_module()
    base = name.partition(".")[2]
    if fam == "hf-config":
        path = _config_path(base)
        try:
            return t.AutoModelForCausalLM.from_config(t.AutoConfig.from_pretrained(str(path)))
        except (OSError, ValueError, KeyError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise BlockKDError(f"cannot build hf-config.{base} from {path} as a causal LM: {first}") from None
    folder = Path(base).expanduser()
    if not folder.is_dir() and (base.startswith((".", "/", "~")) or base.count("/") > 1 or "\\" in base):
        raise BlockKDError(f"cannot load the Hugging Face model hf.{base}: "
                           f"the folder {folder.absolute()} does not exist")
    offline = not folder.is_dir() and hub_offline()
    try:
        with _hub_offline_mode(offline), _quiet_transformers(t):
            model, info = t.AutoModelForCausalLM.from_pretrained(str(folder) if folder.is_dir() else base,
                                                                 local_files_only=offline, output_loading_info=True)
        _report_loading(f"hf.{base}", info, model)
        return model
    except (OSError, ValueError, EnvironmentError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        leaf = base.rstrip("/").split("/")[-1]
        advice = "" if folder.is_dir() else (f"; offline, {hf_download_advice(base, 'models/' + leaf)} and name the "
                                             f"folder: hf.models/{leaf}")
        raise BlockKDError(f"cannot load the causal LM hf.{base} ({first}){advice}") from None


def create(name: str, num_classes: int, in_channels: int | None, **kwargs) -> nn.Module:
    """A torchvision or timm model (randomly initialised), or a Hugging Face text classifier.

    torchvision: ``get_model(name, weights=None, num_classes=..., **kwargs)``; for ``in_channels != 3`` the first
    conv is replaced by a freshly initialised one (pretrained RGB weights then no longer fit it).
    timm: ``create_model(name, pretrained=False, num_classes=..., in_chans=..., **kwargs)``. A keyword the
    constructor refuses is one line naming it (``model.kwargs``).
    """
    check(name)
    fam, base = name.split(".", 1)
    if fam in TEXT_FAMILIES:
        return _create_hf(fam, base, num_classes)
    for reserved in RESERVED_KWARGS:
        if reserved in kwargs:
            raise BlockKDError(f"model.kwargs.{reserved} is set by blockkd from the data and the checkpoint keys; "
                               f"remove it")
    try:
        if fam == "torchvision":
            import torchvision.models as tvm

            model = tvm.get_model(base, weights=None, num_classes=num_classes, **kwargs)
            return model if in_channels == 3 else _replace_first_conv(model, in_channels)
        return _timm().create_model(base, pretrained=False, num_classes=num_classes, in_chans=in_channels, **kwargs)
    except Exception as e:  # TypeError, AssertionError, RuntimeError ...: with kwargs, most likely theirs
        if not kwargs:
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BlockKDError(f"cannot build {name} with the constructor arguments {kwargs} ({type(e).__name__}: "
                           f"{first})") from None


def torchvision_state_dict(name: str, spec: str) -> dict[str, torch.Tensor]:
    """The weights ``spec`` = ``torchvision://TAG`` of the torchvision model ``name`` (downloaded or cached).

    Offline, the one-line error gives the URL to fetch on a connected machine and the path to pass instead.
    """
    tag = spec[len(WEIGHTS_SCHEME):] or "DEFAULT"
    if family(name) != "torchvision":
        raise BlockKDError(f"{spec} names torchvision weights, but the model is {name!r}, not a torchvision.* model")
    import torchvision.models as tvm

    check(name)
    enum = tvm.get_model_weights(name.split(".", 1)[1])
    if tag not in enum.__members__:
        raise BlockKDError(f"{name} has no weights {tag!r}; choose from {', '.join(enum.__members__)}")
    weights = enum[tag]
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    except Exception as e:  # URLError, OSError, hash mismatch, ...: no connection or a broken download
        file = weights.url.rsplit("/", 1)[-1]
        raise BlockKDError(f"cannot download the {name} weights {weights} ({type(e).__name__}: {e}); on a machine "
                           f"with internet access download {weights.url} and pass its path instead of {spec}, "
                           f"e.g. teacher.checkpoint=checkpoints/imagenet/{file}") from None


def timm_state_dict(name: str, spec: str) -> dict[str, torch.Tensor]:
    """The weights ``spec`` = ``timm://TAG`` of the timm model ``name``: ``timm.create_model(<name>.<TAG>,
    pretrained=True)``'s state dict (downloaded from the Hugging Face hub, or read from its cache).

    ``TAG`` ``DEFAULT`` (or empty) is timm's default tag for the architecture. Offline, the one-line error
    names the hub file to fetch on a connected machine and the path to pass instead.
    """
    tag = spec[len(TIMM_SCHEME):]
    tag = "" if tag in ("", "DEFAULT") else tag
    if family(name) != "timm":
        raise BlockKDError(f"{spec} names timm weights, but the model is {name!r}, not a timm.* model")
    timm = _timm()
    check(name)
    base = name.split(".", 1)[1]
    arch = f"{base}.{tag}" if tag else base
    try:
        pretrained = timm.models.get_pretrained_cfg(arch)
    except RuntimeError:  # an unknown tag of a known architecture
        pretrained = None
    if pretrained is None:
        tags = [t.split(".", 1)[1] for t in timm.list_pretrained(f"{base}.*")]
        raise BlockKDError(f"{name} has no pretrained weights {tag!r}; choose from DEFAULT"
                           + "".join(f", {t}" for t in tags))
    hub = pretrained.hf_hub_id
    offline = hub_offline() if hub else False
    try:
        with _hub_offline_mode(offline):
            return timm.create_model(arch, pretrained=True).state_dict()
    except Exception as e:  # no connection, no cache, a broken download ...
        where = (f"run `hf download {hub} model.safetensors --local-dir checkpoints/imagenet/{base}` or download "
                 f"https://huggingface.co/{hub}/resolve/main/model.safetensors" if hub
                 else f"download {pretrained.url}" if pretrained.url else "get its weights")
        first = "the hub is out of reach (offline) and its cache has no copy" if offline else \
            (str(e).strip().splitlines()[0] if str(e).strip() else "")
        raise BlockKDError(f"cannot load the timm weights {arch} ({type(e).__name__}: {first}); on a machine "
                           f"with internet access {where} and pass its path instead of {spec}, "
                           f"e.g. teacher.checkpoint=checkpoints/imagenet/{base}/model.safetensors") from None
