import pytest
import torch
from torch import nn

from leantrain.data import DatasetInfo
from leantrain.models import (
    DLRM,
    MLP,
    CharLSTM,
    Discriminator,
    Generator,
    LeNet,
    build,
    dataset_kwargs,
    load_model,
    model_spec,
    resnet20,
)
from leantrain.train import binary_cross_entropy, fit, sequence_cross_entropy


def _backward_reaches_every_parameter(model: nn.Module, out: torch.Tensor) -> None:
    out.float().square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.shape == p.shape, name
        assert torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("make,x,out_shape", [
    (lambda: MLP(64, 10, hidden=(16,)), torch.randn(5, 1, 8, 8), (5, 10)),
    (lambda: LeNet(1, 10, width=4), torch.randn(5, 1, 8, 8), (5, 10)),
    (lambda: LeNet(3, 7, width=4), torch.randn(2, 3, 32, 32), (2, 7)),
    (lambda: resnet20(width=4, in_channels=3, num_classes=10), torch.randn(3, 3, 32, 32), (3, 10)),
    (lambda: resnet20(width=4, in_channels=1, num_classes=10, depth=8), torch.randn(3, 1, 8, 8), (3, 10)),
    (lambda: CharLSTM(20, embed_dim=8, hidden_size=12, num_layers=2), torch.randint(0, 20, (4, 7)), (4, 7, 20)),
    (lambda: Generator(latent_dim=5, data_shape=(1, 8, 8), width=8), torch.randn(6, 5), (6, 1, 8, 8)),
    (lambda: Generator(latent_dim=5, data_shape=(3, 16, 16), width=8), torch.randn(6, 5), (6, 3, 16, 16)),
    (lambda: Generator(latent_dim=5, data_shape=(3, 32, 32), width=4), torch.randn(2, 5), (2, 3, 32, 32)),
    (lambda: Generator(latent_dim=3, data_shape=(2,), width=16), torch.randn(6, 3), (6, 2)),
    (lambda: Discriminator(data_shape=(1, 8, 8), width=8), torch.randn(6, 1, 8, 8), (6,)),
    (lambda: Discriminator(data_shape=(3, 16, 16), width=8), torch.randn(6, 3, 16, 16), (6,)),
    (lambda: Discriminator(data_shape=(2,), width=16), torch.randn(6, 2), (6,)),
])
def test_forward_backward_shapes(make, x, out_shape):
    torch.manual_seed(0)
    model = make()
    out = model(x)
    assert tuple(out.shape) == out_shape
    _backward_reaches_every_parameter(model, out)


def test_dlrm_shapes_and_backward():
    torch.manual_seed(0)
    model = DLRM(dense=3, cardinalities=(5, 4), embed_dim=6, bottom=(8,), top=(8, 4))
    x = torch.cat([torch.randn(10, 3), torch.randint(0, 4, (10, 2)).float()], 1)
    out = model(x)
    assert out.shape == (10,)
    _backward_reaches_every_parameter(model, out)


def test_char_lstm_matches_torch_lstm():
    # Oracle: torch.nn.LSTM with the same weights (our single bias goes into bias_ih, bias_hh = 0).
    torch.manual_seed(1)
    model = CharLSTM(11, embed_dim=6, hidden_size=9, num_layers=2).double()
    ref = nn.LSTM(6, 9, num_layers=2, batch_first=True).double()
    with torch.no_grad():
        for k, layer in enumerate(model.layers):
            getattr(ref, f"weight_ih_l{k}").copy_(layer.ih.weight)
            getattr(ref, f"weight_hh_l{k}").copy_(layer.hh.weight)
            getattr(ref, f"bias_ih_l{k}").copy_(layer.ih.bias)
            getattr(ref, f"bias_hh_l{k}").zero_()
    x = torch.randint(0, 11, (3, 13))
    h_ref, _ = ref(model.embed(x))
    expected = model.decoder(h_ref)
    torch.testing.assert_close(model(x), expected, rtol=1e-12, atol=1e-12)


def test_char_lstm_every_gemm_is_a_linear_module():
    torch.manual_seed(0)
    model = CharLSTM(10, embed_dim=4, hidden_size=5, num_layers=2)
    calls: dict[str, int] = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            m.register_forward_hook(lambda mod, inp, out, name=name: calls.__setitem__(name, calls.get(name, 0) + 1))
    t = 6
    model(torch.randint(0, 10, (2, t)))
    # ih once per layer (whole sequence), hh once per step per layer, decoder once.
    assert calls == {"layers.0.ih": 1, "layers.0.hh": t, "layers.1.ih": 1, "layers.1.hh": t, "decoder": 1}
    assert isinstance(model.embed, nn.Embedding)


def test_char_lstm_state_carries_across_windows():
    torch.manual_seed(0)
    model = CharLSTM(10, embed_dim=4, hidden_size=5)
    x = torch.randint(0, 10, (2, 8))
    whole = model(x)
    first, state = model.forward_with_state(x[:, :3])
    second, _ = model.forward_with_state(x[:, 3:], state)
    torch.testing.assert_close(torch.cat([first, second], 1), whole)
    s = model.sample(torch.tensor([1, 2]), 5, generator=torch.Generator().manual_seed(0))
    assert s.shape == (7,) and s[:2].tolist() == [1, 2] and int(s.max()) < 10


def test_dlrm_interaction_matches_explicit_dot_products():
    torch.manual_seed(0)
    model = DLRM(dense=2, cardinalities=(3, 4, 5), embed_dim=3, bottom=(), top=())
    x = torch.cat([torch.randn(4, 2), torch.tensor([[0, 1, 2], [2, 3, 4], [1, 0, 0], [0, 3, 1]]).float()], 1)
    b = model.bottom(x[:, :2])
    vecs = [b] + [model.embeddings[j](x[:, 2 + j].long()) for j in range(3)]
    feats = [b] + [(vecs[p] * vecs[q]).sum(1, keepdim=True) for p in range(4) for q in range(p + 1, 4)]
    expected = model.top(torch.cat(feats, 1)).reshape(-1)
    torch.testing.assert_close(model(x), expected)


def test_bad_inputs_raise_value_errors():
    with pytest.raises(ValueError, match="ids"):
        DLRM(dense=2, cardinalities=(3,))(torch.tensor([[0.0, 0.0, 3.0]]))
    with pytest.raises(ValueError, match="input must be"):
        DLRM(dense=2, cardinalities=(3,))(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="data_shape"):
        Generator(data_shape=(1, 12, 12))
    with pytest.raises(ValueError, match="data_shape"):
        Discriminator(data_shape=(1, 8))
    with pytest.raises(ValueError, match="token ids"):
        CharLSTM(5)(torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="vocab_size"):
        CharLSTM(1)
    with pytest.raises(ValueError, match="model must be one of"):
        build("no-such-model")


def test_generator_image_range_is_tanh_bounded():
    torch.manual_seed(0)
    g = Generator(latent_dim=4, data_shape=(1, 16, 16), width=4)
    out = g(g.sample_latent(8) * 100)
    assert out.abs().max() <= 1.0


def test_dataset_kwargs_fit_models_to_data():
    lang = DatasetInfo("t", (16,), 30, "language", "")
    assert dataset_kwargs("charlstm", lang) == {"vocab_size": 30}
    img = DatasetInfo("i", (3, 8, 8), 10, "classification", "")
    assert dataset_kwargs("resnet20", img) == {"in_channels": 3, "num_classes": 10}
    assert dataset_kwargs("mlp", img) == {"in_features": 192, "num_classes": 10}
    binary = DatasetInfo("b", (30,), 2, "binary", "")
    assert dataset_kwargs("mlp", binary)["num_classes"] == 1
    clicks = DatasetInfo("c", (6,), 2, "binary", "", extra={"dense": 4, "cardinalities": [3, 5]})
    model = build("dlrm", **dataset_kwargs("dlrm", clicks))
    assert model(torch.tensor([[0.0, 0, 0, 0, 2, 4]])).shape == (1,)
    with pytest.raises(ValueError, match="language"):
        dataset_kwargs("charlstm", img)
    with pytest.raises(ValueError, match="channels"):
        dataset_kwargs("lenet", binary)
    with pytest.raises(ValueError, match="dlrm"):
        dataset_kwargs("dlrm", img)


@pytest.mark.parametrize("name,kwargs,x,y,loss", [
    ("charlstm", {"vocab_size": 7, "embed_dim": 4, "hidden_size": 6}, torch.randint(0, 7, (8, 5)),
     torch.randint(0, 7, (8, 5)), sequence_cross_entropy),
    ("dlrm", {"dense": 2, "cardinalities": (3, 2), "embed_dim": 4},
     torch.cat([torch.randn(8, 2), torch.randint(0, 2, (8, 2)).float()], 1), torch.randint(0, 2, (8,)),
     binary_cross_entropy),
])
def test_checkpoint_rebuilds_model(tmp_path, name, kwargs, x, y, loss):
    torch.manual_seed(0)
    model = build(name, **kwargs)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ds = torch.utils.data.TensorDataset(x, y)
    fit(model, opt, loss, ds, epochs=1, batch_size=4, eval_train=False, checkpoint=tmp_path / "m.pt",
        model_spec=model_spec(name, **kwargs))
    again = load_model(tmp_path / "m.pt")
    assert type(again) is type(model)
    for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k
