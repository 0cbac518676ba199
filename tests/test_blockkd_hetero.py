"""Block-KD across architecture families (issue 35): a stepping-stone must not out-pull the student.

The cause of the collapse found on a ResNet -> MobileNetV2 pair (docs/blockkd.md, "Across architecture
families"): the two families share two resolutions, so there are two blocks, and the deepest stone reads the
student's last map (1280 channels, 2x2) through a connector ending in BN. BN makes the stone blind to that
feature's scale, so its gradient into the student grows as the feature shrinks, while the student's own head
has no such factor: with a confident teacher its pull was tens of times the student's own terms', and
training it moved the student by the stone's gradient alone. These tests measure that share directly
(``diagnostics``: each part's gradient norm in the student's parameters, the parts summing to the step's
gradient), not an accuracy.
"""
import pytest
import torch

from blockkd import methods
from blockkd.models import create


def pair(shrink: float):
    """resnet8 (a confident teacher: its logits scaled up) -> MobileNetV2, whose last feature map is scaled
    by ``shrink`` (its last BN's affine parameters; ReLU after it keeps the map a scaled copy), as the
    student's last features shrank during the collapsed run."""
    teacher, student = create("resnet8", 10, 1).eval(), create("MobileNetV2", 10, 1)
    with torch.no_grad():
        teacher.fc.weight.mul_(10)
        student.conv2[1].weight.mul_(shrink)
        student.conv2[1].bias.mul_(shrink)
    return methods.create("blockkd", student, teacher, input_shape=(1, 28, 28)).train()


@pytest.mark.parametrize("shrink", [1.0, 0.1])
def test_no_stone_pulls_the_student_harder_than_its_own_terms_across_families(shrink):
    d = pair(shrink)
    assert d.num_blocks == 2  # resolutions shared by a ResNet and MobileNetV2 at 28 px: 14x14 and the end
    x, y = torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))
    norms = d.diagnostics(x, y, epoch=1.0)
    own = norms["grad_norm_student"]
    # Unbounded (main before this test), the deepest stone pulled 47x (shrink 1) and 460x (shrink 0.1) the student's own
    # terms here; bounded at its block by the rest of the objective, each stone stays near 1x in the parameters.
    for name, v in norms.items():
        assert v <= 2.0 * own, (name, norms)


def test_the_bound_keeps_each_stone_s_direction_and_leaves_a_weak_stone_alone():
    """The bound only rescales: the deepest stone's gradient is the unbounded one times a factor in (0, 1],
    and a stone that pulls less than the rest is left as it is."""
    d = pair(1.0)
    x, y = torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))
    bounded = d.part_gradients(x, y, epoch=1.0)
    free = methods.create("blockkd", d.student, d.teacher, input_shape=(1, 28, 28), stone_grad_cap=None)
    free.connectors.load_state_dict(d.connectors.state_dict())
    free.train()
    unbounded = free.part_gradients(x, y, epoch=1.0)
    flat = {k: torch.cat([g.flatten() for g in v]) for k, v in bounded.items()}
    raw = {k: torch.cat([g.flatten() for g in v]) for k, v in unbounded.items()}
    factor = flat["stone2"].norm() / raw["stone2"].norm()
    assert 0 < factor < 0.1
    assert torch.allclose(flat["stone2"], factor * raw["stone2"], rtol=1e-3, atol=1e-6)
    assert torch.allclose(flat["student"], raw["student"], rtol=1e-4, atol=1e-7)
