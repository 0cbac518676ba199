"""The NKD, CTKD, SDD, SimKD, FCFD and MLKD recipes carry the authors' published hyper-parameters, transcribed below
with the file of their repository each value comes from; each recipe builds its distiller on its pair."""
from pathlib import Path

import pytest
import torch

import blockkd
from blockkd import config, methods

ROOT = Path(__file__).resolve().parents[1] / "configs"

# shicaiwei123/SDD-CVPR2024. Scales: the --M of teacher_resnet32x4.sh, teacher_unpair.sh, teacher_vgg.sh,
# teacher_wrn.sh (CIFAR-100) and run.sh (ImageNet). Weights: mdistiller/engine/cfg.py defaults (KD: T 4,
# CE 0.1, KD 0.9; DKD: CE 1, alpha 1, beta 8, T 4, WARMUP 20), overridden by DKD.BETA 6.0 in
# configs/cifar100/sdd_{dkd,nkd}/vgg13_*.yaml and by configs/imagenet/{r34_r18,r50_mv2}/sdd_*.yaml
# (T 1, beta 0.5 / 2.0, WARMUP 1); SD-KD applies no warm-up (KD.py SDD_KD), SD-DKD's is --warm_up 20.
SD_KD = dict(divergence="kd", temperature=4.0, ce_weight=0.1, weight=0.9, warmup=0.0)
SD_DKD = dict(divergence="dkd", temperature=4.0, ce_weight=1.0, weight=1.0, alpha=1.0, beta=8.0, warmup=20.0)
SD_NKD = dict(divergence="nkd", temperature=4.0, ce_weight=1.0, weight=1.0, beta=8.0, warmup=20.0)
SDD = {
    "cifar100/resnet32x4_resnet8x4/sdd_kd": {**SD_KD, "scales": [1, 2]},
    "cifar100/resnet32x4_resnet8x4/sdd_nkd": {**SD_NKD, "scales": [1, 2]},
    **{f"cifar100/{pair}/sdd_{k}": {**base, "scales": [1, 2, 4]}
       for pair in ("resnet32x4_ShuffleV1", "resnet32x4_ShuffleV2", "wrn_40_2_ShuffleV1", "ResNet50_MobileNetV2")
       for k, base in (("kd", SD_KD), ("dkd", SD_DKD), ("nkd", SD_NKD))},
    "cifar100/vgg13_vgg8/sdd_kd": {**SD_KD, "scales": [1, 2]},
    "cifar100/vgg13_vgg8/sdd_dkd": {**SD_DKD, "scales": [1, 2], "beta": 6.0},
    "cifar100/vgg13_vgg8/sdd_nkd": {**SD_NKD, "scales": [1, 2], "beta": 6.0},
    "cifar100/vgg13_MobileNetV2/sdd_kd": {**SD_KD, "scales": [1, 2, 4]},
    "cifar100/vgg13_MobileNetV2/sdd_dkd": {**SD_DKD, "scales": [1, 2, 4], "beta": 6.0},
    "imagenet/resnet34_resnet18/sdd_dkd": {**SD_DKD, "temperature": 1.0, "beta": 0.5, "warmup": 1.0, "scales": [1, 2]},
    "imagenet/resnet50_mobilenet_v2/sdd_dkd": {**SD_DKD, "temperature": 1.0, "beta": 2.0, "warmup": 1.0,
                                               "scales": [1, 2, 4]},
    "imagenet/resnet50_mobilenet_v2/sdd_nkd": {**SD_NKD, "temperature": 1.0, "beta": 2.0, "warmup": 1.0,
                                               "scales": [1, 2, 4]},
}
# zhengli97/CTKD scripts/run_cifar_distill.sh (-r 0.1 -a 0.9, --t_start 1 --t_end 20 defaults of
# train_student.py, --decay_max 0 --decay_min -1 --decay_loops 10; its DKD line -r 1 -a 0 -b 1 --dkd_alpha 1
# --dkd_beta 2) and scripts/run_imagenet_distill.sh (-r 1 -a 1, --decay_loops 5); CTKD+LS:
# sunshangquan/logit-standardization-KD CTKD/scripts/run_cifar_distill.sh (-r 0.1 -a 9).
CURRICULUM = dict(mode="global", t_start=1.0, t_range=20.0, lambda_max=0.0, lambda_min=-1.0)
CTKD = {
    "cifar100/resnet56_resnet20/ctkd": {**CURRICULUM, "base": "kd", "ce_weight": 0.1, "kd_weight": 0.9,
                                        "curriculum_epochs": 10.0, "logit_standardization": False},
    "cifar100/resnet56_resnet20/ctkd_dkd": {**CURRICULUM, "base": "dkd", "ce_weight": 1.0, "kd_weight": 1.0,
                                            "dkd_alpha": 1.0, "dkd_beta": 2.0, "curriculum_epochs": 10.0},
    "cifar100/resnet56_resnet20/ctkd_ls": {**CURRICULUM, "base": "kd", "ce_weight": 0.1, "kd_weight": 9.0,
                                           "curriculum_epochs": 10.0, "logit_standardization": True},
    "imagenet/resnet34_resnet18/ctkd": {**CURRICULUM, "base": "kd", "ce_weight": 1.0, "kd_weight": 1.0,
                                        "curriculum_epochs": 5.0},
}
# yzd-v/cls_KD configs/distillers/imagenet/res34_distill_res18_img.py and res50_distill_mv1_img.py:
# NKDLoss temp 1.0, gamma 1.5; the student's own loss at weight 1 (mmcls' head loss).
NKD = {f"imagenet/{pair}/nkd": dict(temperature=1.0, gamma=1.5, ce_weight=1.0)
       for pair in ("resnet34_resnet18", "resnet50_mobilenetv1")}
# ... and deit-s3_distill_deit-t_img.py, the ViT pair: gamma 1.0 on the class-token logits.
NKD["imagenet/deit_small_deit_tiny/nkd"] = dict(temperature=1.0, gamma=1.0, ce_weight=1.0)
# DefangChen/SimKD README (resnet32x4 -> resnet8x4: --distill simkd -c 0 -d 0 -b 1; train_student.py -f 2).
SIMKD = {"cifar100/resnet32x4_resnet8x4/simkd": dict(feat_weight=1.0, factor=2, ce_weight=0.0)}
# LiuDongyang6/FCFD classification/experiments/cifar/<student>-<teacher>.yaml (T, weight_l2, the mixture's
# kl_student weight; label 1 and KL 1 on the student everywhere), cifar/main.py (--extra_paths 2, --extra_type bi,
# L2 warm-up 20 epochs); experiments/IN/*.yaml with IN/main.py (warm-up 5 epochs).
FCFD_BASE = dict(ce_weight=1.0, kd_weight=1.0, mixed_weight=1.0, l2_warmup=20.0, paths="bi", extra_paths=2)
FCFD = {f"cifar100/{pair}/fcfd": {**FCFD_BASE, "temperature": tau, "l2_weight": l2, **extra}
        for pair, tau, l2, extra in [
            ("resnet32x4_resnet8x4", 4.0, 5.0, {}), ("resnet32x4_ShuffleV1", 8.0, 5.0, {}),
            ("resnet32x4_ShuffleV2", 8.0, 5.0, {}), ("wrn_40_2_ShuffleV1", 4.0, 5.0, {}),
            ("ResNet50_MobileNetV2", 8.0, 5.0, {}), ("vgg13_MobileNetV2", 4.0, 5.0, {}),
            ("resnet56_resnet20", 4.0, 0.02, {}), ("vgg13_vgg8", 4.0, 5.0, {}),
            ("wrn_40_2_wrn_16_2", 4.0, 5.0, {"mixed_weight": 0.2}), ("wrn_40_2_wrn_40_1", 4.0, 5.0, {})]}
FCFD |= {f"imagenet/{pair}/fcfd": {**FCFD_BASE, "temperature": 1.0, "l2_weight": l2, "l2_warmup": 5.0}
         for pair, l2 in [("resnet34_resnet18", 0.02), ("resnet50_mobilenetv1", 5.0)]}
# Jin-Ying/Multi-Level-Logit-Distillation: configs/cifar100/ours/<pair>.yaml (TRAINER ours, no KD section: the
# mdistiller/engine/cfg.py defaults KD.TEMPERATURE 4, CE_WEIGHT 0.1, KD_WEIGHT 0.9; SOLVER.LR 0.025, or 0.01 for
# MobileNet/ShuffleNet students), configs/imagenet/{r34_r18,r50_mv2}/kd_ours.yaml (T 1, CE 0.5, KD 0.5, lr 0.1 /
# 0.2); KD_ours.py: the temperatures KD.TEMPERATURE, 3, 5, 2, 6, the strong view's instance term at the first
# three. MLKD+LS: sunshangquan/logit-standardization-KD README (--base-temp 2 --kd-weight 9) and
# configs/cifar100/mlkd/resnet32x4_resnet8x4.yaml (lr 0.025, 480 epochs).
MLKD_CIFAR = dict(temperatures=[4.0, 3.0, 5.0, 2.0, 6.0], strong_view_temperatures=3, ce_weight=0.1, kd_weight=0.9,
                  logit_standardization=False)
MLKD_IMAGENET = {**MLKD_CIFAR, "temperatures": [1.0, 3.0, 5.0, 2.0, 6.0], "ce_weight": 0.5, "kd_weight": 0.5}
MLKD_LR = {**{f"cifar100/{p}/mlkd": 0.025 for p in ("resnet32x4_resnet8x4", "resnet110_resnet32", "resnet56_resnet20",
                                                    "vgg13_vgg8", "wrn_40_2_wrn_16_2", "wrn_40_2_wrn_40_1")},
           **{f"cifar100/{p}/mlkd": 0.01 for p in ("ResNet50_MobileNetV2", "resnet32x4_ShuffleV1",
                                                   "resnet32x4_ShuffleV2", "vgg13_MobileNetV2", "wrn_40_2_ShuffleV1")},
           "cifar100/resnet32x4_resnet8x4/mlkd_ls": 0.025, "imagenet/resnet34_resnet18/mlkd": 0.1,
           "imagenet/resnet50_mobilenet_v2/mlkd": 0.2, "imagenet/resnet50_mobilenetv1/mlkd": 0.2}
MLKD = {k: (MLKD_IMAGENET if k.startswith("imagenet") else MLKD_CIFAR) for k in MLKD_LR}
MLKD["cifar100/resnet32x4_resnet8x4/mlkd_ls"] = {**MLKD_CIFAR, "temperatures": [2.0, 3.0, 5.0, 2.0, 6.0],
                                                 "kd_weight": 9.0, "logit_standardization": True}
RECIPES = {**{k: ("simkd", v) for k, v in SIMKD.items()}, **{k: ("mlkd", v) for k, v in MLKD.items()},
           **{k: ("fcfd", v) for k, v in FCFD.items()},
           **{k: ("sdd", v) for k, v in SDD.items()}, **{k: ("ctkd", v) for k, v in CTKD.items()},
           **{k: ("nkd", v) for k, v in NKD.items()}}


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_recipe_values_are_the_authors(recipe):
    method, expected = RECIPES[recipe]
    cfg = config.load(ROOT / f"{recipe}.yaml")
    assert cfg["method"]["name"] == method
    options = methods.defaults(method) | dict(cfg["method"]["options"])
    assert {k: options[k] for k in expected} == expected


@pytest.mark.parametrize("recipe", sorted({r.rsplit("/", 1)[0] for r in SDD if r.startswith("cifar100")}))
def test_sdd_recipes_build_on_their_pairs(recipe):
    cfg = config.load(ROOT / f"{recipe}/sdd_kd.yaml")
    s = blockkd.models.create(cfg["model"]["name"], num_classes=100)
    t = blockkd.models.create(cfg["teacher"]["name"], num_classes=100)
    d = methods.create("sdd", s, t, **cfg["method"]["options"]).train()
    _, losses = d(torch.randn(2, 3, 32, 32), torch.tensor([0, 1]), epoch=1.0)
    assert torch.isfinite(sum(losses.values()))


@pytest.mark.parametrize("recipe", sorted(MLKD_LR))
def test_mlkd_recipes_use_the_authors_schedule(recipe):
    cfg = config.load(ROOT / f"{recipe}.yaml")
    assert cfg["optim"]["lr"] == MLKD_LR[recipe]
    base = (64, 480 if recipe.endswith("_ls") else 240) if recipe.startswith("cifar100") else (512, 100)
    assert (cfg["data"]["batch_size"], cfg["train"]["epochs"]) == base


def test_fashion_mnist_recipes_exist_for_every_new_method():
    for method in ("nkd", "wttm", "ctkd", "sdd", "simkd", "fcfd", "mlkd"):
        cfg = config.load(ROOT / f"fashion_mnist/{method}.yaml")
        assert cfg["method"]["name"] == method
        methods.parse_options(method, cfg["method"]["options"])
