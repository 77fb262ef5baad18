"""The Coupled Mamba network: Mamba-1 mixers, coupling, masks, fusion, stability."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from model import CLASS_NAMES, CoupledMambaForSentiment, SentimentOutput, ops
from model.mamba import CoupledMambaLayer, MambaMixer, masked_pool, masked_softmax

# ---------------------------------------------------------------------------------------------
# An independent, literal implementation of one coupled layer for a single unpadded sample:
# nested loops over time, conv taps and modalities, written from the equations in README.md
# ("The model") and the docstring of model/ops/scan_ref.py.
# ---------------------------------------------------------------------------------------------


def literal_coupled_layer(layer: CoupledMambaLayer, hidden: Tensor) -> Tensor:
    """hidden: (M, L, d) one sample, every step valid. Returns the layer's output (M, L, d)."""
    M, L, _ = hidden.shape
    W = layer.coupling()
    if W is None:
        W = torch.eye(M, dtype=hidden.dtype)
    per_modality = []
    for i, name in enumerate(layer.modalities):
        mixer = layer.mixers[name]
        assert isinstance(mixer, MambaMixer)
        Dn, N, R = mixer.d_inner, mixer.d_state, mixer.dt_rank
        x = layer.norms[name](hidden[i])  # (L, d)
        xz = x @ mixer.in_proj.weight.T
        u, z = xz[:, :Dn], xz[:, Dn:]
        taps = mixer.conv1d.weight[:, 0, :]  # (D, k)
        k = taps.shape[-1]
        conv = torch.zeros(L, Dn, dtype=hidden.dtype)
        for t in range(L):
            acc = mixer.conv1d.bias.clone()
            for j in range(k):
                source = t - (k - 1) + j
                if source >= 0:
                    acc = acc + taps[:, j] * u[source]
            conv[t] = acc
        u = F.silu(conv)
        dbc = u @ mixer.x_proj.weight.T
        dt = F.softplus(dbc[:, :R] @ mixer.dt_proj.weight.T + mixer.dt_proj.bias)  # (L, D)
        B, C = dbc[:, R : R + N], dbc[:, R + N :]
        per_modality.append((u, z, dt, B, C, -torch.exp(mixer.A_log), mixer.D))

    Dn, N = per_modality[0][0].shape[1], per_modality[0][3].shape[1]
    h = torch.zeros(M, Dn, N, dtype=hidden.dtype)
    ys = torch.zeros(M, L, Dn, dtype=hidden.dtype)
    for t in range(L):
        new_h = []
        for i in range(M):
            u, _, dt, B, C, A, D = per_modality[i]
            mixed = sum(W[i, k] * h[k] for k in range(M))
            h_i = (
                torch.exp(dt[t][:, None] * A) * mixed
                + dt[t][:, None] * B[t][None, :] * u[t][:, None]
            )
            new_h.append(h_i)
            ys[i, t] = h_i @ C[t] + D * u[t]
        h = torch.stack(new_h)

    out = []
    for i, name in enumerate(layer.modalities):
        mixer = layer.mixers[name]
        assert isinstance(mixer, MambaMixer)
        y = ys[i] * F.silu(per_modality[i][1])
        out.append(hidden[i] + y @ mixer.out_proj.weight.T)
    return torch.stack(out)


@pytest.mark.parametrize(
    ("modalities", "coupling"),
    [(("text",), "none"), (("text", "audio", "visual"), "learned"), (("audio", "visual"), "sum")],
)
def test_layer_matches_literal_equations(make_model, modalities, coupling) -> None:
    model = make_model(modalities=modalities, state_coupling=coupling, scan_backend="ref")
    model = model.double()
    layer = model.layers[0]
    assert isinstance(layer, CoupledMambaLayer)
    if coupling == "learned":  # move away from the uniform init so W's rows differ
        with torch.no_grad():
            layer.coupling_logits.copy_(torch.randn(len(modalities), len(modalities)))
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(len(modalities), 1, 6, 16, generator=g, dtype=torch.float64)
    mask = torch.ones(len(modalities), 1, 6, dtype=torch.float64)
    with torch.no_grad():
        got = layer(hidden, mask, model.fast_path)[0][:, 0]
        want = literal_coupled_layer(layer, hidden[:, 0])
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_mamba_initialisation(make_model) -> None:
    model = make_model(d_model=32, d_state=12, dt_min=1e-3, dt_max=1e-1)
    config = model.config
    layer = model.layers[0]
    assert isinstance(layer, CoupledMambaLayer)
    mixer = layer.mixers["text"]
    assert isinstance(mixer, MambaMixer)
    assert mixer.dt_rank == math.ceil(32 / 8)
    dt = F.softplus(mixer.dt_proj.bias.detach())
    assert dt.min() >= config.dt_min * (1 - 1e-5) and dt.max() <= config.dt_max * (1 + 1e-5)
    assert dt.max() / dt.min() > 10  # spread log-uniformly, not a constant
    expected_A = -torch.arange(1, 13, dtype=torch.float32).expand(64, 12)
    torch.testing.assert_close(mixer.A(), expected_A)
    assert torch.equal(mixer.D.detach(), torch.ones(64))
    assert mixer.conv1d.groups == 64 and mixer.conv1d.kernel_size == (4,)
    W = layer.coupling()
    assert W is not None
    torch.testing.assert_close(W, torch.full((3, 3), 1 / 3))


def test_learned_coupling_starts_equal_to_mean_coupling(make_model, batch_of) -> None:
    learned = make_model(state_coupling="learned")
    mean = make_model(state_coupling="mean", seed=99)
    missing, unexpected = mean.load_state_dict(learned.state_dict(), strict=False)
    assert missing == [] and sorted(unexpected) == [
        "layers.0.coupling_logits",
        "layers.1.coupling_logits",
    ]
    features, masks = batch_of([40, 25])
    with torch.no_grad():
        a, b = learned(features, masks), mean(features, masks)
    torch.testing.assert_close(a.score, b.score, rtol=0, atol=1e-6)
    # and coupling matters: independent scans give another answer on the same weights
    none = make_model(state_coupling="none", seed=99)
    none.load_state_dict(mean.state_dict())
    with torch.no_grad():
        coupled, _ = mean.encode(features, masks)
        independent, _ = none.encode(features, masks)
    assert (coupled - independent).abs().max() > 1e-3


def test_output_shapes_and_ranges(make_model, batch_of) -> None:
    model = make_model(label_scale=(-1.0, 1.0))
    with torch.no_grad():
        model.regression_head[-1].bias.fill_(50.0)  # saturate: score must still be in range
    features, masks = batch_of([7, 3, 5])
    with torch.no_grad():
        out = model(features, masks)
    assert isinstance(out, SentimentOutput)
    assert out.score.shape == (3,) and out.logits.shape == (3, len(CLASS_NAMES))
    assert out.probabilities.shape == (3, 3) and out.modality_weights.shape == (3, 3)
    assert (out.score.abs() <= 1.0).all() and (out.score > 0.99).all()
    torch.testing.assert_close(out.probabilities.sum(-1), torch.ones(3))
    torch.testing.assert_close(out.probabilities, torch.softmax(out.logits, -1))
    torch.testing.assert_close(out.modality_weights.sum(-1), torch.ones(3))
    assert out.labels() == [CLASS_NAMES[int(i)] for i in out.logits.argmax(-1)]


# ---------------------------------------------------------------------------------------------
# Padding and absent modalities never change an answer
# ---------------------------------------------------------------------------------------------


def _slice(batch: dict[str, Tensor], i: int, n: int) -> dict[str, Tensor]:
    return {m: t[i : i + 1, :n] for m, t in batch.items()}


def _assert_same(a: SentimentOutput, b: SentimentOutput, atol: float = 1e-5) -> None:
    for name in ("score", "logits", "probabilities", "modality_weights"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=0, atol=atol)


@pytest.mark.parametrize(
    "options",
    [
        {"pooling": "mean", "fusion": "gate", "state_coupling": "learned"},
        {"pooling": "last", "fusion": "concat", "state_coupling": "mean", "norm": "rmsnorm"},
        {"pooling": "max", "fusion": "mean", "state_coupling": "none", "feature_mixing": True},
        {"pooling": "mean", "fusion": "gate", "state_coupling": "learned", "feature_mixing": True},
    ],
)
def test_clip_alone_equals_clip_in_padded_batch(make_model, batch_of, options) -> None:
    model = make_model(**options)
    lengths = [5, 11, 8, 14]
    features, masks = batch_of(lengths, pad_to=16)
    masks["visual"][0, 1:3] = False  # a gap inside a clip (no face for two frames)
    masks["audio"][2] = False  # a clip without audio
    masks["text"][3, :4] = False  # speech starts late
    with torch.no_grad():
        batched = model(features, masks)
        for i, n in enumerate(lengths):
            alone = model(_slice(features, i, n), _slice(masks, i, n))
            row = SentimentOutput(
                *(
                    getattr(batched, f)[i : i + 1]
                    for f in ("score", "logits", "probabilities", "modality_weights", "present")
                )
            )
            _assert_same(alone, row)


def test_masked_step_content_is_ignored(make_model, batch_of) -> None:
    """Values at masked steps (trailing padding, gaps inside a clip) never reach an output."""
    model = make_model()
    features, masks = batch_of([6, 11])
    masks["visual"][1, 2:5] = False  # a gap inside the longer clip
    masks["text"][0, :2] = False  # a late start
    poisoned = {m: f.clone() for m, f in features.items()}
    for m, f in poisoned.items():
        f[~masks[m]] = float("nan")
    poisoned["audio"][0, 6:] = float("-inf")
    replaced = {m: torch.where(masks[m][..., None], f, 1e4) for m, f in features.items()}
    with torch.no_grad():
        clean = model(features, masks)
        dirty = model(poisoned, masks)
        large = model(replaced, masks)
    assert torch.isfinite(dirty.score).all()
    _assert_same(clean, dirty, atol=0.0)
    _assert_same(clean, large, atol=0.0)


def test_masked_steps_neither_decay_nor_write_the_state(make_model) -> None:
    """At a masked step the mixer hands the scan dt = 0 and u = 0: exp(dt A) = 1 and
    dt B u = 0, so the state is carried over the gap unchanged (up to the coupling)."""
    model = make_model()
    layer = model.layers[0]
    assert isinstance(layer, CoupledMambaLayer)
    mixer = layer.mixers["audio"]
    assert isinstance(mixer, MambaMixer)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 9, 16, generator=g)
    mask = torch.ones(2, 9)
    mask[0, 3:6] = 0
    mask[1, 7:] = 0
    with torch.no_grad():
        u, dt, B, C, z, conv_state = mixer.scan_inputs(x, mask)
    assert conv_state is None  # nothing asked to carry
    off = mask[..., None].expand_as(u) == 0
    assert (u[off] == 0).all() and (dt[off] == 0).all()
    assert (dt[~off] > 0).all() and (u[~off] != 0).all()
    assert B.shape == C.shape == (2, 9, 8) and z.shape == u.shape == (2, 9, 32)  # rows (b, L, X)


def test_absent_modality_equals_fully_masked_modality(make_model, batch_of) -> None:
    model = make_model()
    features, masks = batch_of([6, 6])
    without = {m: f for m, f in features.items() if m != "audio"}
    without_masks = {m: k for m, k in masks.items() if m != "audio"}
    masked = dict(masks, audio=torch.zeros_like(masks["audio"]))
    with torch.no_grad():
        a = model(without, without_masks)
        b = model(features, masked)
        full = model(features, masks)
    _assert_same(a, b, atol=0.0)
    audio = model.modalities.index("audio")
    assert (a.modality_weights[:, audio] == 0).all()
    assert not a.present[:, audio].any() and full.present.all()
    assert (a.score - full.score).abs().max() > 1e-4  # the audio did matter when present


def test_no_modality_present_gives_finite_neutral_weights(make_model, batch_of) -> None:
    model = make_model()
    features, masks = batch_of([5])
    empty = {m: torch.zeros_like(k) for m, k in masks.items()}
    with torch.no_grad():
        out = model(features, empty)
    assert torch.isfinite(out.score).all() and torch.isfinite(out.probabilities).all()
    assert (out.modality_weights == 0).all()


def test_masked_pool_and_softmax() -> None:
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 5, 4, generator=g)
    mask = torch.tensor([[True, False, True, True, False], [False] * 5])
    mean = masked_pool(hidden, mask, "mean")
    torch.testing.assert_close(mean[0], hidden[0, [0, 2, 3]].mean(0))
    assert (mean[1] == 0).all()
    torch.testing.assert_close(masked_pool(hidden, mask, "last")[0], hidden[0, 3])
    torch.testing.assert_close(masked_pool(hidden, mask, "max")[0], hidden[0, [0, 2, 3]].amax(0))
    assert (masked_pool(hidden, mask, "max")[1] == 0).all()
    logits = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    present = torch.tensor([[True, False, True], [False, False, False]])
    weights = masked_softmax(logits, present)
    torch.testing.assert_close(weights[0], torch.softmax(torch.tensor([1.0, -1e9, 3.0]), -1))
    assert (weights[1] == 0).all()


# ---------------------------------------------------------------------------------------------
# Stability over long inputs
# ---------------------------------------------------------------------------------------------


def _scan_output_peak(model: CoupledMambaForSentiment, features, masks) -> float:
    """Largest |y| fed to any out_proj (the scan's gated output), via forward hooks."""
    peaks: list[float] = []
    hooks = [
        mixer.out_proj.register_forward_hook(
            lambda _m, args, _o: peaks.append(args[0].abs().nan_to_num(math.inf).max().item())
        )
        for layer in model.layers
        for mixer in layer.mixers.values()
    ]
    try:
        with torch.no_grad():
            out = model(features, masks)
    finally:
        for hook in hooks:
            hook.remove()
    assert torch.isfinite(out.score).all() and torch.isfinite(out.probabilities).all()
    return max(peaks)


@pytest.mark.parametrize("coupling", ["mean", "learned", "learned-trained"])
def test_row_stochastic_coupling_is_finite_over_4096_steps(make_model, batch_of, coupling):
    model = make_model(state_coupling=coupling.split("-")[0], d_model=32, d_state=16)
    if coupling == "learned-trained":  # any softmax W is row-stochastic, not only the init
        with torch.no_grad():
            for layer in model.layers:
                layer.coupling_logits.normal_(std=3.0)
    features, masks = batch_of([4096], dims=model.config.feature_dims)
    assert _scan_output_peak(model, features, masks) < 100


def test_sum_coupling_diverges(make_model, batch_of) -> None:
    """The paper's literal sum of states: the same weights that stay bounded with mean
    coupling overflow float32 within a few hundred steps (one layer, so that the overflow
    shows in the scan's output rather than as a non-finite input to the next scan)."""
    summed = make_model(state_coupling="sum", d_model=8, d_state=16, n_layers=1)
    mean = make_model(state_coupling="mean", d_model=8, d_state=16, n_layers=1)
    mean.load_state_dict(summed.state_dict())
    features, masks = batch_of([512], dims=summed.config.feature_dims)
    assert _scan_output_peak(mean, features, masks) < 1e3
    with torch.no_grad():
        hidden, _ = summed.encode(features, masks)
        out = summed(features, masks)
    assert not torch.isfinite(hidden).all()
    assert not torch.isfinite(out.score).all()


def test_backends_give_the_same_model(make_model, batch_of) -> None:
    """The fast CPU scan and the reference scan agree through the whole model, forward and
    backward."""
    if "torch" not in ops.BACKENDS:
        pytest.skip("no torch scan backend yet")
    features, masks = batch_of([12, 7])
    masks["visual"][0, 3:5] = False
    results = {}
    for backend in ("ref", "torch"):
        model = make_model(scan_backend=backend, state_coupling="learned").double()
        with torch.no_grad():
            for layer in model.layers:
                layer.coupling_logits.normal_()
        out = model({m: f.double() for m, f in features.items()}, masks)
        (out.score.sum() + out.logits.sum()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[backend] = (out, grads)
    (ref_out, ref_grads), (fast_out, fast_grads) = results["ref"], results["torch"]
    for name in ("score", "logits", "modality_weights"):
        torch.testing.assert_close(
            getattr(fast_out, name), getattr(ref_out, name), rtol=1e-9, atol=1e-10
        )
    assert ref_grads.keys() == fast_grads.keys()
    for name, grad in ref_grads.items():
        torch.testing.assert_close(fast_grads[name], grad, rtol=1e-8, atol=1e-10, msg=name)


@pytest.mark.parametrize(
    ("modalities", "coupling"),
    [(("text", "audio", "visual"), "learned"), (("text", "audio", "visual"), "none"),
     (("text",), "learned")],
    ids=["three-learned", "three-none", "text-learned"],
)  # fmt: skip
@pytest.mark.parametrize("chunk", [None, 5], ids=["whole", "chunked"])
def test_inference_path_equals_training_path(
    make_model, batch_of, modalities: tuple[str, ...], coupling: str, chunk: int | None
) -> None:
    """Without gradients the torch backend's scan takes its own loop (``_scan_rows``: the
    state held (N, D), one batched product per step for y); it answers what the autograd
    scan that training takes answers, through the same layer code."""
    dims = {m: d for m, d in {"text": 7, "audio": 5, "visual": 6}.items() if m in modalities}
    features, masks = batch_of([12, 7], dims=dims)
    masks["text"][0, 3:5] = False
    model = make_model(
        scan_backend="torch", modalities=modalities, feature_dims=dims, state_coupling=coupling
    ).double()
    if coupling == "learned":
        with torch.no_grad():
            for layer in model.layers:
                layer.coupling_logits.normal_()
    model.set_inference_chunk_size(chunk)
    features = {m: f.double() for m, f in features.items()}
    trained = model(features, masks)  # gradients on: the training path, never chunked
    assert trained.score.requires_grad
    with torch.no_grad():
        inferred = model(features, masks)
    for name in ("score", "logits", "modality_weights"):
        torch.testing.assert_close(
            getattr(inferred, name), getattr(trained, name).detach(), rtol=1e-9, atol=1e-10
        )


# ---------------------------------------------------------------------------------------------
# Training, validation, metadata
# ---------------------------------------------------------------------------------------------


def test_every_parameter_gets_a_gradient(make_model, batch_of) -> None:
    model = make_model(feature_mixing=True, dropout=0.1).train()
    with torch.no_grad():  # break the uniform init so the coupling gradient is generic
        for layer in model.layers:
            layer.coupling_logits.normal_()
    features, masks = batch_of([6, 4])
    out = model(features, masks)
    loss = (out.score**2).sum() + F.cross_entropy(out.logits, torch.tensor([0, 2]))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda f, k: f.update(smell=f["text"]), "no branch"),
        (lambda f, k: f.update(text=f["text"][..., :3]), "expects 7"),
        (lambda f, k: f.update(text=f["text"][:, :4]), "shared batch and L"),
        (lambda f, k: k.update(text=k["text"].float()), "bool"),
        (lambda f, k: k.update(text=k["text"][:, :3]), "masks['text']"),
        (lambda f, k: (f.clear(), k.clear()), "empty"),
        (lambda f, k: f.pop("text"), "without features"),
    ],
)
def test_bad_inputs_get_clear_errors(make_model, batch_of, change, message) -> None:
    model = make_model()
    features, masks = batch_of([6, 6])
    change(features, masks)
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        model(features, masks)


def test_scan_backend_is_chosen_once_and_changeable(make_model) -> None:
    model = make_model()
    assert model.scan_backend in ops.BACKENDS
    assert model.set_scan_backend("ref") == "ref" and model.scan_backend == "ref"
    with pytest.raises(ValueError, match="unknown scan backend"):
        model.set_scan_backend("cuda-magic")
    assert model.scan_backend == "ref"


def test_describe_is_json_ready_and_counts_parameters(make_model) -> None:
    model = make_model(state_coupling="learned")
    info = json.loads(json.dumps(model.describe()))
    assert info["parameters"] == sum(p.numel() for p in model.parameters())
    assert info["modalities"] == ["text", "audio", "visual"]
    assert info["dt_rank"] == 2 and info["d_inner"] == 32
    assert len(info["coupling_matrices"]) == 2
    assert info["coupling_matrices"][0][0] == pytest.approx([1 / 3] * 3)
    assert info["scan_backend"] == model.scan_backend
    assert model.count_parameters(trainable_only=True) == info["parameters"]
    model.class_head.requires_grad_(False)
    assert model.count_parameters(trainable_only=True) < info["parameters"]


def test_feature_mixing_adds_the_released_code_mix(make_model, batch_of) -> None:
    plain = make_model()
    mixed = make_model(feature_mixing=True)
    assert mixed.count_parameters() > plain.count_parameters()
    assert make_model(modalities=("text",), feature_mixing=True).feature_mixing is None
    features, masks = batch_of([6])
    mixed.load_state_dict(plain.state_dict(), strict=False)
    with torch.no_grad():
        assert (mixed(features, masks).score - plain(features, masks).score).abs().max() > 1e-5


def test_single_modality_model_and_dummy_inputs(make_model) -> None:
    model = make_model(modalities=("text",))
    features, masks = model.dummy_inputs(batch_size=2, length=5)
    assert set(features) == {"text"} and features["text"].shape == (2, 5, 7)
    with torch.no_grad():
        out = model(features, masks)
    assert out.modality_weights.shape == (2, 1) and (out.modality_weights == 1).all()


def test_emotion_head_answers_per_class_and_ignores_padding(make_model, batch_of) -> None:
    classes = ("neutral", "happy", "sad")
    model = make_model(emotion_classes=classes)
    features, masks = batch_of([5, 9], seed=3, pad_to=12)
    out = model(features, masks)
    assert out.emotion_logits is not None and out.emotion_probabilities is not None
    assert out.emotion_probabilities.shape == (2, len(classes))
    torch.testing.assert_close(out.emotion_probabilities.sum(-1), torch.ones(2))
    alone = model(
        {m: f[:1, :5] for m, f in features.items()}, {m: k[:1, :5] for m, k in masks.items()}
    )
    assert alone.emotion_probabilities is not None
    torch.testing.assert_close(alone.emotion_probabilities[0], out.emotion_probabilities[0])
    assert model.describe()["emotion_classes"] == list(classes)
    plain = make_model()(features, masks)
    assert plain.emotion_logits is None and plain.emotion_probabilities is None
