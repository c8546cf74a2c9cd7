"""Tests of the cross-layer losses: CoCo cross-layer correlation, Graph Flow, LightVessel FSD."""

from __future__ import annotations

import pytest
import torch

from kd_components.losses import CrossLayerCorrelationLoss, FeatureSimilarityDistillationLoss, GraphFlowLoss
from kd_components.losses._grid import clip_grid
from kd_components.losses.correlation import channel_cosine
from tests.helpers import (
    assert_2d_3d_consistent,
    assert_finite_under_autocast,
    assert_positive,
    assert_student_only_gradients,
    assert_zero_at_identity,
)

DTYPES = (torch.bfloat16, torch.float16)
SPATIAL = [(12,), (8, 10), (6, 5, 4)]
LAYER_KEYS = ("student_shallow", "student_deep", "teacher_shallow", "teacher_deep")
PAIR_KEYS = ("student_encoder", "student_decoder", "teacher_encoder", "teacher_decoder")


def _random(keys: tuple[str, ...], shapes: tuple[tuple[int, ...], ...], seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {key: torch.randn(shape, generator=g) for key, shape in zip(keys, shapes, strict=True)}


def _identical(keys: tuple[str, ...], shapes: tuple[tuple[int, ...], ...]) -> dict[str, torch.Tensor]:
    """Teacher inputs equal to the student inputs (first two keys student, last two teacher)."""
    student = _random(keys[:2], shapes, seed=1)
    return {**student, keys[2]: student[keys[0]].clone(), keys[3]: student[keys[1]].clone()}


def _check_properties(loss, keys, identical_shapes, random_shapes) -> None:
    call = lambda t: loss(**t)  # noqa: E731
    assert_zero_at_identity(call, _identical(keys, identical_shapes))
    assert_positive(call, _random(keys, random_shapes))
    assert_student_only_gradients(call, _random(keys, random_shapes), keys[:2], keys[2:])


def _scale_positions(x: torch.Tensor, seed: int) -> torch.Tensor:
    """Multiply every position's channel vector by its own positive factor."""
    g = torch.Generator().manual_seed(seed)
    return x * (0.1 + 5 * torch.rand((x.shape[0], 1, *x.shape[2:]), generator=g))


# ---------------------------------------------------------------- CoCo cross-layer correlation

COCO = {
    "matmul": lambda: CrossLayerCorrelationLoss(grid=4),
    "elementwise": lambda: CrossLayerCorrelationLoss(grid=4, product="elementwise"),
    "max": lambda: CrossLayerCorrelationLoss(grid=4, pooling="max"),
}


@pytest.mark.parametrize("name", list(COCO))
@pytest.mark.parametrize("spatial", SPATIAL)
def test_coco_properties(name: str, spatial: tuple[int, ...]) -> None:
    deep = tuple(max(1, s // 2) for s in spatial)
    same = ((2, 4, *spatial), (2, 6, *deep))
    # channel counts may differ everywhere: the correlation lives on the spatial grid
    different = ((2, 4, *spatial), (2, 6, *deep), (2, 5, *spatial), (2, 3, *deep))
    _check_properties(COCO[name](), LAYER_KEYS, same, different)


@pytest.mark.parametrize("name", list(COCO))
def test_coco_2d_3d_consistent(name: str) -> None:
    loss = COCO[name]()
    inputs = _random(LAYER_KEYS, ((2, 4, 8, 8), (2, 6, 4, 6), (2, 5, 8, 8), (2, 3, 4, 4)))
    assert_2d_3d_consistent(lambda t: loss(**t), inputs)


@pytest.mark.parametrize("product", ["matmul", "elementwise"])
def test_coco_per_position_scale_invariance(product: str) -> None:
    loss = CrossLayerCorrelationLoss(grid=4, product=product)
    inputs = _random(LAYER_KEYS, ((2, 4, 4, 4), (2, 6, 4, 4), (2, 5, 4, 4), (2, 3, 4, 4)))
    scaled = {key: _scale_positions(value, i) for i, (key, value) in enumerate(inputs.items())}
    assert torch.allclose(loss(**scaled), loss(**inputs), rtol=1e-5, atol=1e-7)


def test_coco_hand_computed() -> None:
    # two positions, two channels. student: shallow positions e1, e2 (A = I); deep e1, e1 (A = ones).
    # teacher: shallow and deep e1, e1 (A = ones).
    e1e2 = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).view(1, 2, 1, 2)
    e1e1 = torch.tensor([[1.0, 1.0], [0.0, 0.0]]).view(1, 2, 1, 2)
    taps = {"student_shallow": e1e2, "student_deep": e1e1, "teacher_shallow": e1e1, "teacher_deep": e1e1}
    # matmul: C_S = I·ones/2 = ones/2, C_T = ones·ones/2 = ones -> (1/2)² everywhere
    assert torch.allclose(CrossLayerCorrelationLoss()(**taps), torch.tensor(0.25))
    # element-wise: C_S = I, C_T = ones -> two off-diagonal ones of four entries
    assert torch.allclose(CrossLayerCorrelationLoss(product="elementwise")(**taps), torch.tensor(0.5))


def test_coco_grid_and_autocast() -> None:
    inputs = _random(LAYER_KEYS, ((2, 4, 8, 8, 6), (2, 6, 4, 4, 4), (2, 5, 8, 8, 6), (2, 3, 4, 4, 4)))
    loss = CrossLayerCorrelationLoss(grid=(4, 4, 2))
    c = loss.correlation(inputs["student_shallow"], inputs["student_deep"], (4, 4, 2))
    assert c.shape == (2, 32, 32)
    assert torch.isfinite(loss(**inputs))
    with pytest.raises(ValueError):
        CrossLayerCorrelationLoss(grid=(4, 4))(**inputs)
    for dtype in DTYPES:
        assert_finite_under_autocast(lambda t: loss(**t), inputs, dtype)


def _written_out(loss: CrossLayerCorrelationLoss, taps: dict[str, torch.Tensor]) -> torch.Tensor:
    """The loss with the |g|×|g| correlations formed (the formulation before the factored matmul)."""
    grid = clip_grid(loss.grid, *(x.shape[2:] for x in taps.values()))
    c_s = loss.correlation(taps["student_shallow"], taps["student_deep"], grid)
    c_t = loss.correlation(taps["teacher_shallow"], taps["teacher_deep"], grid)
    return (c_t - c_s).pow(2).mean()


@pytest.mark.parametrize(
    "shapes, grid",
    [
        (((4, 8, 64, 64), (4, 32, 16, 16), (4, 8, 64, 64), (4, 32, 16, 16)), 16),  # CoCo's translated taps, 2D
        (((2, 3, 16, 12, 8), (2, 5, 8, 6, 4), (2, 7, 16, 12, 8), (2, 2, 8, 6, 4)), (8, 6, 4)),  # 3D, 4 widths
        (((3, 6, 20), (3, 4, 10), (3, 5, 20), (3, 3, 10)), 10),  # 1D
    ],
)
@pytest.mark.parametrize("pooling", ["avg", "max"])
def test_coco_factored_matmul_equals_written_out(shapes, grid, pooling: str) -> None:
    """Taps narrower than |g| take the channel×channel path: same value and gradients as the |g|×|g| form."""
    loss = CrossLayerCorrelationLoss(grid=grid, pooling=pooling)
    taps = {k: v.requires_grad_(k.startswith("student")) for k, v in _random(LAYER_KEYS, shapes, seed=3).items()}
    students = [taps["student_shallow"], taps["student_deep"]]
    value = loss(**taps)
    reference = _written_out(loss, taps)
    assert value.dtype == torch.float32
    assert torch.allclose(value, reference, rtol=1e-4, atol=1e-9)
    for got, want in zip(torch.autograd.grad(value, students), torch.autograd.grad(reference, students)):
        assert torch.allclose(got, want, rtol=1e-3, atol=1e-6 * want.abs().max())


def test_coco_factored_near_agreement() -> None:
    """A student close to the teacher: the three Gram terms nearly cancel; float64 keeps the small difference."""
    shapes = ((2, 4, 16, 16), (2, 6, 8, 8), (2, 4, 16, 16), (2, 6, 8, 8))
    taps = _random(LAYER_KEYS, shapes, seed=4)
    loss = CrossLayerCorrelationLoss(grid=8)
    near = {**taps, "student_shallow": taps["teacher_shallow"] + 1e-3 * taps["student_shallow"]}
    near["student_deep"] = taps["teacher_deep"] + 1e-3 * taps["student_deep"]
    reference = _written_out(loss, near)
    assert 0 < reference < 1e-5 and torch.allclose(loss(**near), reference, rtol=1e-3)


def test_coco_wide_taps_use_the_written_out_form() -> None:
    """Taps with at least |g| channels keep the |g|×|g| form (it is then the cheaper one)."""
    shapes = ((2, 20, 8, 8), (2, 20, 4, 4), (2, 20, 8, 8), (2, 20, 4, 4))  # |g| = 16 ≤ 20 channels
    taps = _random(LAYER_KEYS, shapes, seed=5)
    loss = CrossLayerCorrelationLoss(grid=4)
    assert torch.equal(loss(**taps), _written_out(loss, taps))


# ---------------------------------------------------------------- Graph Flow

GRAPH = {
    "pooled": lambda: GraphFlowLoss(grid=4),
    "patch": lambda: GraphFlowLoss(descriptor="patch"),
}


@pytest.mark.parametrize("name", list(GRAPH))
@pytest.mark.parametrize("spatial", SPATIAL)
def test_graph_flow_properties(name: str, spatial: tuple[int, ...]) -> None:
    shapes = ((2, 4, *spatial), (2, 4, *spatial))
    _check_properties(GRAPH[name](), LAYER_KEYS, shapes, shapes * 2)


@pytest.mark.parametrize("name", list(GRAPH))
def test_graph_flow_2d_3d_and_channel_scale_invariance(name: str) -> None:
    loss = GRAPH[name]()
    shapes = ((2, 5, 8, 8), (2, 5, 8, 8), (2, 5, 6, 6), (2, 5, 6, 6))
    inputs = _random(LAYER_KEYS, shapes)
    assert_2d_3d_consistent(lambda t: loss(**t), inputs)
    g = torch.Generator().manual_seed(5)
    scaled = {k: v * (0.1 + 5 * torch.rand((2, 5, 1, 1), generator=g)) for k, v in inputs.items()}
    assert torch.allclose(loss(**scaled), loss(**inputs), rtol=1e-5, atol=1e-7)


def test_graph_flow_hand_computed() -> None:
    # two channels over two positions. teacher: shallow channels [1,0], [0,1] (V = I, E = I);
    # deep [1,0], [1,0] (E = ones). ΔV_T = [[0,0],[1,-1]], ΔE_T = [[0,1],[1,0]]; the student has no flow.
    shallow = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).view(1, 2, 1, 2)
    deep = torch.tensor([[1.0, 0.0], [1.0, 0.0]]).view(1, 2, 1, 2)
    taps = {"student_shallow": shallow, "student_deep": shallow, "teacher_shallow": shallow, "teacher_deep": deep}
    # vertices: mean over channels of ‖ΔV‖² = (0 + 2)/2 = 1; edges: mean of squares = 2/4
    assert torch.allclose(GraphFlowLoss()(**taps), torch.tensor(1.5))
    assert torch.allclose(GraphFlowLoss(vertex_weight=2.0, edge_weight=0.0)(**taps), torch.tensor(2.0))
    assert torch.allclose(GraphFlowLoss(descriptor="patch", vertex_weight=0.0)(**taps), torch.tensor(0.5))


def test_graph_flow_salient_patches() -> None:
    fmap = torch.arange(25.0).view(1, 1, 5, 5)
    fmap[0, 0, 0, 4] = 100.0  # peak in a corner: the 3×3 window is shifted inward to rows 0-2, cols 2-4
    patch = GraphFlowLoss.salient_patches(fmap, (3, 3))
    expected = fmap[0, 0, 0:3, 2:5].reshape(1, 1, 9)
    assert torch.equal(patch, expected)
    vol = torch.randn(2, 3, 6, 5, 4)
    patch3d = GraphFlowLoss.salient_patches(vol, (3, 3, 2))
    for b in range(2):
        for c in range(3):
            z, y, x = (int(i) for i in torch.unravel_index(vol[b, c].argmax(), vol.shape[2:]))
            z0, y0, x0 = min(max(z - 1, 0), 3), min(max(y - 1, 0), 2), min(max(x - 1, 0), 2)
            assert torch.equal(patch3d[b, c], vol[b, c, z0 : z0 + 3, y0 : y0 + 3, x0 : x0 + 2].flatten())


def test_graph_flow_channel_mismatch_and_autocast() -> None:
    inputs = _random(LAYER_KEYS, ((2, 4, 6, 6), (2, 4, 6, 6), (2, 8, 6, 6), (2, 4, 6, 6)))
    with pytest.raises(ValueError, match="paraphraser"):
        GraphFlowLoss()(**inputs)
    inputs = _random(LAYER_KEYS, ((2, 4, 6, 6, 4),) * 4)
    for name in GRAPH:
        for dtype in DTYPES:
            assert_finite_under_autocast(lambda t, n=name: GRAPH[n]()(**t), inputs, dtype)


# ---------------------------------------------------------------- LightVessel FSD

FSD = {
    "cosine": lambda: FeatureSimilarityDistillationLoss(),
    "affinity": lambda: FeatureSimilarityDistillationLoss(mode="affinity", grid=4),
}


@pytest.mark.parametrize("name", list(FSD))
@pytest.mark.parametrize("spatial", SPATIAL)
def test_fsd_properties(name: str, spatial: tuple[int, ...]) -> None:
    same = ((2, 4, *spatial), (2, 4, *spatial))
    # student and teacher widths may differ; encoder and decoder of one network may not
    different = ((2, 4, *spatial), (2, 4, *spatial), (2, 6, *spatial), (2, 6, *spatial))
    _check_properties(FSD[name](), PAIR_KEYS, same, different)


@pytest.mark.parametrize("name", list(FSD))
def test_fsd_2d_3d_and_per_position_scale_invariance(name: str) -> None:
    loss = FSD[name]()
    inputs = _random(PAIR_KEYS, ((2, 3, 4, 4), (2, 3, 4, 4), (2, 5, 4, 4), (2, 5, 4, 4)))
    assert_2d_3d_consistent(lambda t: loss(**t), inputs)
    scaled = {key: _scale_positions(value, i) for i, (key, value) in enumerate(inputs.items())}
    assert torch.allclose(loss(**scaled), loss(**inputs), rtol=1e-5, atol=1e-7)


def test_fsd_hand_computed() -> None:
    # encoder positions e1, e2; student decoder e1, e1 (cosines [1, 0]); teacher decoder = encoder ([1, 1])
    enc = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).view(1, 2, 1, 2)
    dec = torch.tensor([[1.0, 1.0], [0.0, 0.0]]).view(1, 2, 1, 2)
    taps = {"student_encoder": enc, "student_decoder": dec, "teacher_encoder": enc, "teacher_decoder": enc}
    assert torch.allclose(FeatureSimilarityDistillationLoss()(**taps), torch.tensor(0.5))
    # affinity: student Êᵀ D̂ = [[1,1],[0,0]], teacher I -> two unit differences of four entries
    assert torch.allclose(FeatureSimilarityDistillationLoss(mode="affinity")(**taps), torch.tensor(0.5))


def test_fsd_resize_errors_autocast() -> None:
    loss = FeatureSimilarityDistillationLoss()
    # a student map at half resolution is resized to the teacher's
    student = _random(PAIR_KEYS[:2], ((2, 3, 4, 4), (2, 3, 4, 4)))
    value = loss(**student, teacher_encoder=torch.ones(2, 5, 8, 8), teacher_decoder=torch.ones(2, 5, 8, 8))
    assert torch.isfinite(value) and value > 0
    with pytest.raises(ValueError, match="adapters"):
        loss(torch.randn(2, 3, 4, 4), torch.randn(2, 4, 4, 4), torch.randn(2, 5, 4, 4), torch.randn(2, 5, 4, 4))
    inputs = _random(PAIR_KEYS, ((2, 3, 6, 5, 4),) * 2 + ((2, 5, 6, 5, 4),) * 2)
    for name in FSD:
        for dtype in DTYPES:
            assert_finite_under_autocast(lambda t, n=name: FSD[n]()(**t), inputs, dtype)


@pytest.mark.parametrize("shape", [(2, 3, 7), (2, 5, 6, 4), (2, 4, 3, 5, 2)])
def test_channel_cosine_equals_torch_cosine_similarity_in_value_and_gradient(shape) -> None:
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(2))
    upstream = torch.randn((shape[0], *shape[2:]), generator=g, dtype=torch.float64)
    grads = []
    for fn in (channel_cosine, lambda x, y, eps: torch.nn.functional.cosine_similarity(x, y, dim=1, eps=eps)):
        x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
        value = fn(x, y, 1e-8)
        (value * upstream).sum().backward()
        grads.append((value.detach(), x.grad, y.grad))
    for mine, theirs in zip(*grads):
        torch.testing.assert_close(mine, theirs)
    a[0, :, 0] = 0.0  # a zero vector: the eps floor keeps the value finite, 0 as torch's
    torch.testing.assert_close(channel_cosine(a, b, 1e-8), torch.nn.functional.cosine_similarity(a, b, dim=1, eps=1e-8))
