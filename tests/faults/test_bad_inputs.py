"""Guarantee 4 (command line): every bad input ends ``blockkd train`` with exit status 2 and ONE
``error:`` line on stderr that names the problem (no traceback); ``--debug`` shows the traceback."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import safetensors.torch

from blockkd import models
from faultlib import one_error_line, write_recipe

NO_RANDOM = "teacher.allow_random=false"

# name -> (arguments after ``blockkd train``, regex the error line must match)
CASES = {
    "unknown-model": (["ok.yaml", "model.name=resnet9"],
                      r"unknown model 'resnet9' \(model\.name in override 'model\.name=resnet9' \(on ok\.yaml\)\); "
                      r"did you mean 'resnet8'\?"),
    "unknown-method": (["ok.yaml", "method.name=blockdk"], r"unknown method 'blockdk' .*did you mean 'blockkd'\?"),
    "mistyped-key": (["ok.yaml", "optim.lrr=0.1"],
                     r"unknown key 'optim\.lrr' in override 'optim\.lrr=0\.1' \(on ok\.yaml\); "
                     r"did you mean 'optim\.lr'\?"),
    "mistyped-key-in-file": (["typo.yaml"],
                             r"unknown key 'train\.epoch' in typo\.yaml; did you mean 'train\.epochs'\?"),
    "unknown-option": (["ok.yaml", "method.options.temp=2"], r"did you mean 'method\.options\.temperature'\?"),
    "wrong-type": (["ok.yaml", "train.epochs=two"], r"invalid train\.epochs=two .*expected an integer >= 1"),
    "out-of-range": (["ok.yaml", "optim.lr=-1"], r"invalid optim\.lr=-1 .*expected a number > 0"),
    "invalid-yaml": (["broken.yaml"], r"invalid YAML in broken\.yaml, line 2, column \d+: "),
    "missing-recipe": (["nope.yaml"], r"recipe file not found: nope\.yaml"),
    "missing-dataset": (["ok.yaml", "data.name=imagefolder", "data.root=nowhere"],
                        r"image folder not found: nowhere/train .*set data\.root"),
    "missing-teacher": (["ok.yaml", "teacher.checkpoint=missing.pth", NO_RANDOM],
                        r"teacher checkpoint missing\.pth does not exist"),
    "teacher-architecture-keys": (["ok.yaml", "teacher.checkpoint=resnet8.safetensors", NO_RANDOM],
                                  r"teacher checkpoint resnet8\.safetensors does not fit resnet14: "
                                  r"missing \['layer1\.1\.conv1\.weight'.*\(wrong teacher\.name\?\)"),
    "teacher-architecture-shapes": (["ok.yaml", "teacher.checkpoint=resnet8x4.safetensors", NO_RANDOM],
                                    r"teacher checkpoint resnet8x4\.safetensors does not fit resnet14: bn1\.bias has "
                                    r"shape \(32,\), resnet14 expects \(16,\) \(wrong teacher\.name\?\)"),
    "class-count": (["ok.yaml", "teacher.checkpoint=resnet14-100.safetensors", NO_RANDOM],
                    r"teacher checkpoint resnet14-100\.safetensors is for 100 classes and 3 input channels, but "
                    r"the data \(synthetic\) has 10 classes and 3 channels"),
    "input-channels": (["ok.yaml", "teacher.checkpoint=resnet14.safetensors", "data.channels=1", NO_RANDOM],
                       r"is for 10 classes and 3 input channels, but the data \(synthetic\) has 10 classes and 1 "),
    "blocks-unmatchable": (["ok.yaml", "method.options.num_blocks=9"],
                           r"cannot bring student CifarResNet .* to the same number of blocks: n=9 exceeds"),
    "output-not-writable": (["ok.yaml", "output.dir=a-file/sub"],
                            r"run folder a-file/sub/output-not-writable is not writable \(Not a directory\)"),
    "run-exists": (["ok.yaml", "output.name=done"],
                   r"run folder runs/done exists; pass --resume to continue or --overwrite to replace it"),
    "overwrite-foreign-folder": (["ok.yaml", "output.name=notes", "--overwrite"],
                                 r"runs/notes does not look like a blockkd run folder; refusing to delete it"),
}
# The published recipe with a bad method option: refused while the recipe is read, before any data, model or
# teacher is touched (data.root points nowhere and the recipe's teacher run does not exist here: reading
# either would end in another error). The line names the key, the override, the recipe and the closest value.
FM = str(Path(__file__).resolve().parents[2] / "configs/fashion_mnist/blockkd.yaml")
ON_FM = r" \(on .*configs/fashion_mnist/blockkd\.yaml\)"
CASES |= {
    "option-choice": ([FM, "method.options.connector=conv9x9", "data.root=nowhere"],
                      r"^error: invalid method\.options\.connector=conv9x9 "
                      r"in override 'method\.options\.connector=conv9x9'"
                      + ON_FM + r": expected one of conv1x1_bn, conv3x3_bn, .* for method 'blockkd'; did you mean "
                      r"'conv\dx\d_bn'\?$"),
    "option-type": ([FM, "method.options.num_blocks=three", "data.root=nowhere"],
                    r"^error: invalid method\.options\.num_blocks=three in override .*" + ON_FM
                    + r": expected an integer >= 1 or null for method 'blockkd'$"),
    # an option that lost its measurements and was removed: one line naming it
    "option-removed": ([FM, "method.options.stones_every=4", "data.root=nowhere"],
                       r"^error: method\.options\.stones_every was removed in blockkd 0\.2 \(below KD, round 12: see "
                       r"docs/blockkd\.md\); delete it from override 'method\.options\.stones_every=4'" + ON_FM + "$"),
    "option-range": ([FM, "method.options.temperature=-1", "data.root=nowhere"],
                     r"invalid method\.options\.temperature=-1 .*" + ON_FM
                     + r": expected a number > 0 for method 'blockkd'"),
    # known only once both networks are split: still one line naming the key and where it was set
    "option-known-later": (["ok.yaml", "method.name=blockkd", "method.options.whole_batch_stones=9"],
                           r"^error: invalid method\.options\.whole_batch_stones in override "
                           r"'method\.options\.whole_batch_stones=9' \(on ok\.yaml\): whole_batch_stones must be "
                           r"between 0 and the number of stones \(3\), got 9$"),
}
DEBUG = {"debug-config": ["ok.yaml", "optim.lrr=0.1", "--debug"],
         "debug-engine": ["ok.yaml", "method.options.num_blocks=9", "--debug"]}


@pytest.fixture(scope="module")
def results(tmp_path_factory, commands):
    cwd = tmp_path_factory.mktemp("bad")
    write_recipe(cwd / "ok.yaml")
    (cwd / "typo.yaml").write_text("base: ok.yaml\ntrain: {epoch: 3}\n")
    (cwd / "broken.yaml").write_text("model: {name: resnet8\ntrain: {epochs: 2}\n")
    (cwd / "a-file").write_text("")
    for name, classes in (("resnet8", 10), ("resnet8x4", 10), ("resnet14", 10), ("resnet14", 100)):
        suffix = "" if classes == 10 else f"-{classes}"
        safetensors.torch.save_file(models.create(name, num_classes=classes).state_dict(),
                                    str(cwd / f"{name}{suffix}.safetensors"))
    (cwd / "runs" / "done").mkdir(parents=True)
    (cwd / "runs" / "done" / "metrics.jsonl").write_text("{}\n")  # a run that made progress
    (cwd / "runs" / "notes").mkdir()
    (cwd / "runs" / "notes" / "notes.txt").write_text("not a run")
    # each in a run folder of its own (they run side by side), unless the case is about the run folder
    jobs = {name: (["train", *args, *([] if "output.name" in str(args) else [f"output.name={name}"])], cwd)
            for name, (args, _) in CASES.items()}
    jobs |= {name: (["train", *args], cwd) for name, args in DEBUG.items()}
    return cwd, commands.run_many(jobs)


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_clear_line(results, name):
    cwd, out = results
    line = one_error_line(out[name])
    assert re.search(CASES[name][1], line), line
    assert out[name].stdout == ""  # nothing was started
    assert (cwd / "runs" / "notes" / "notes.txt").exists() and (cwd / "a-file").is_file()


@pytest.mark.parametrize("name", list(DEBUG))
def test_debug_shows_the_traceback(results, name):
    _, out = results
    proc = out[name]
    assert proc.returncode != 0 and "Traceback (most recent call last)" in proc.stderr
    assert re.search(r"BlockKDError: (unknown key 'optim\.lrr'|invalid method\.options\.num_blocks in override "
                     r"'method\.options\.num_blocks=9' \(on ok\.yaml\): cannot)", proc.stderr)
