import pytest
import torch
import torch.nn.functional as F

from distributed.models import MODELS, build_model


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("num_classes", [2, 10])
def test_output_shape(name: str, num_classes: int) -> None:
    model = build_model(name, num_classes).eval()
    assert model(torch.randn(5, 1, 28, 28)).shape == (5, num_classes)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_can_overfit_one_batch(name: str) -> None:
    """The notebook's sanity check: a working network drives one batch's loss to ~0."""
    torch.manual_seed(0)
    x, y = torch.randn(32, 1, 28, 28), torch.arange(32) % 10
    model = build_model(name, 10)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(300):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        loss = F.cross_entropy(model(x), y).item()
    assert loss < 0.05, f"{name} could not overfit a batch: loss {loss:.3f}"


def test_unknown_model_names_the_choices() -> None:
    with pytest.raises(ValueError, match="unknown model 'resnet'.*samnet"):
        build_model("resnet", 10)
