import pytest
import torch

from cefam_lightning.models.interop import InteropError, load_official_translator

CHANNELS = {"layer1": 4, "layer2": 6, "layer3": 8, "layer4": 10}


def _official_state(gen: torch.Generator) -> dict[str, torch.Tensor]:
    """A state dict in the authors' layout: fc1..fc3, input = pooled layer4, layer3, layer2, layer1."""
    dims = [sum(CHANNELS.values()), 16, 12, 5]
    state = {}
    for i in range(3):
        state[f"fc{i + 1}.weight"] = torch.randn(dims[i + 1], dims[i], generator=gen)
        state[f"fc{i + 1}.bias"] = torch.randn(dims[i + 1], generator=gen)
    return state


def _official_forward(state: dict[str, torch.Tensor], pooled: dict[str, torch.Tensor]) -> torch.Tensor:
    x = torch.cat([pooled[layer] for layer in ("layer4", "layer3", "layer2", "layer1")], dim=1)
    x = torch.tanh(x @ state["fc1.weight"].T + state["fc1.bias"])
    x = torch.tanh(x @ state["fc2.weight"].T + state["fc2.bias"])
    return x @ state["fc3.weight"].T + state["fc3.bias"]


@pytest.mark.parametrize("wrap", ["plain", "module_prefix", "nested"])
def test_official_translator_computes_the_authors_function_on_our_layer_order(tmp_path, wrap):
    gen = torch.Generator().manual_seed(0)
    state = _official_state(gen)
    saved = {
        "plain": state,
        "module_prefix": {f"module.{k}": v for k, v in state.items()},
        "nested": {"state_dict": state, "epoch": 3},
    }[wrap]
    path = tmp_path / "translator.pth"
    torch.save(saved, path)
    translator = load_official_translator(path, CHANNELS).eval()
    pooled = {layer: torch.randn(7, c, generator=gen) for layer, c in CHANNELS.items()}
    ours = translator(torch.cat([pooled[layer] for layer in ("layer1", "layer2", "layer3", "layer4")], dim=1))
    torch.testing.assert_close(ours, _official_forward(state, pooled))
    assert translator.hidden_dims == [16, 12] and translator.out_dim == 5 and not translator.input_norm


def test_official_translator_errors_name_the_problem(tmp_path):
    state = _official_state(torch.Generator().manual_seed(1))
    with pytest.raises(InteropError, match="fc1 takes 28 inputs.*sum to 20"):
        load_official_translator(state, {**CHANNELS, "layer4": 2})
    with pytest.raises(InteropError, match="unexpected keys"):
        load_official_translator({**state, "classifier.weight": torch.zeros(1)}, CHANNELS)
    with pytest.raises(InteropError, match="missing"):
        load_official_translator({k: v for k, v in state.items() if k != "fc2.bias"}, CHANNELS)
    with pytest.raises(InteropError, match="not found"):
        load_official_translator(tmp_path / "nope.pth", CHANNELS)
    with pytest.raises(InteropError, match="not the checkpoint's layers"):
        load_official_translator(state, CHANNELS, layers=["layer2", "layer3", "layer4"])
