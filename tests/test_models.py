"""The model family: registry, output contract on every registered model, hybrid internals, ONNX parity."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from medhybrid.cli import app
from medhybrid.errors import DuplicateModelError, ModelError, ModelInputError, UnknownModelError
from medhybrid.infer.saliency import methods_for
from medhybrid.models import FAMILIES, TASKS, create_model, get_entry, list_models, register_model
from medhybrid.models.baselines import nnunet_plan
from medhybrid.models.context import ContextConfig, TransformerContext
from medhybrid.models.conv_context import ConvContext
from medhybrid.models.encoders import ResNetConfig, ResNetEncoder, plan_strides
from medhybrid.models.heads import segmentation_evidence
from medhybrid.models.profile import forward_gflops, summarize, token_grid
from medhybrid.runtime import prefer_memory_format, seed_everything

TINY = list_models(include_tiny=True)
TINY = [n for n in TINY if get_entry(n).tiny]
FULL = [n for n in list_models(include_tiny=False)]


def _input(name: str, size: int, batch: int = 2) -> torch.Tensor:
    dims = get_entry(name).spatial_dims
    return torch.randn(batch, 1, *(size,) * dims)


def _build(name: str, size: int) -> torch.nn.Module:
    # Fixed-size networks (ViT, UNETR) are built for the size they will see.
    return create_model(name, img_size=size) if get_entry(name).fixed_size else create_model(name)


def _check_outputs(model: torch.nn.Module, x: torch.Tensor, out: dict[str, torch.Tensor]) -> None:
    assert set(out) <= {"logits", "seg_logits"} and out
    entry = model.entry
    assert entry is not None
    assert ("logits" in out) == ("classification" in entry.tasks)
    assert ("seg_logits" in out) == ("segmentation" in entry.tasks)
    if "logits" in out:
        assert out["logits"].shape == (x.shape[0], model.num_classes)
    if "seg_logits" in out:
        assert out["seg_logits"].shape == (x.shape[0], model.seg_classes, *x.shape[2:])
    for value in out.values():
        assert torch.isfinite(value).all()


# --- registry -----------------------------------------------------------------------------------


def test_registry_entries_are_complete() -> None:
    assert len(FULL) >= 15 and len(TINY) >= 8
    for name in list_models():
        entry = get_entry(name)
        assert entry.family in FAMILIES and set(entry.tasks) <= set(TASKS) and entry.description
    families = {get_entry(n).family for n in FULL}
    assert families == set(FAMILIES)
    for dims in (2, 3):
        assert list_models(family="hybrid", spatial_dims=dims, include_tiny=False)


def test_duplicate_name_is_an_error() -> None:
    with pytest.raises(DuplicateModelError, match="hybrid_r18_3d"):

        @register_model(family="hybrid", spatial_dims=3, tasks=("classification",))
        def hybrid_r18_3d() -> None:  # same name as the real factory
            raise AssertionError("never built")


def test_unknown_name_lists_close_matches() -> None:
    with pytest.raises(UnknownModelError) as info:
        create_model("hybrid_r18_3")
    assert "hybrid_r18_3d" in str(info.value)


def test_unknown_option_names_the_valid_ones() -> None:
    with pytest.raises(ModelError, match="context_depht.*valid options.*context_depth"):
        create_model("hybrid_tiny_3d", context_depht=3)


def test_filters() -> None:
    assert list_models(family="unetr") == ["unetr_2d", "unetr_3d", "unetr_tiny_3d"]
    seg = list_models(task="segmentation")
    assert "hybrid_r18_3d" in seg and "vit_b16_3d" not in seg and "resnet18_2d" not in seg
    assert "hybrid_tiny_3d" not in list_models(include_tiny=False)


def test_baseline_options_are_checked() -> None:
    with pytest.raises(ModelError, match="unknown model option.*drop_path.*valid options.*feature_size"):
        create_model("unetr_tiny_3d", drop_path=0.1)
    with pytest.raises(ModelError, match="segmentation only, so num_classes does not apply"):
        create_model("unetr_3d", num_classes=3)
    with pytest.raises(ModelError, match="classification only"):
        create_model("vit_tiny_2d", seg_classes=2)
    with pytest.raises(ModelError, match="patch size 16"):
        create_model("unetr_tiny_3d", patch_size=8)


def test_fixed_size_models_take_exactly_their_size() -> None:
    vit = create_model("vit_tiny_3d", img_size=33)  # padded to 40 inside
    assert vit.fixed_size == (33, 33, 33)
    assert vit(torch.randn(1, 1, 33, 33, 33))["logits"].shape == (1, 2)
    for size in (32, 25, 40):
        with pytest.raises(ModelInputError, match=r"built for spatial size \(33, 33, 33\)"):
            vit(torch.randn(1, 1, size, size, size))


def test_dropout_and_drop_path_act_in_training_only() -> None:
    seed_everything(0)
    model = create_model("hybrid_tiny_2d", context_depth=1, drop_path=0.5, dropout=0.2)
    x = torch.randn(4, 1, 32, 32)
    model.train()
    a, b = model(x)["logits"], model(x)["logits"]
    assert not torch.equal(a, b)
    model.eval()
    assert torch.equal(model(x)["logits"], model(x)["logits"])


def test_group_norm_by_name() -> None:
    model = create_model("hybrid_tiny_3d", norm="group")
    assert isinstance(model.encoder.stem[1], torch.nn.GroupNorm)
    assert model(torch.randn(1, 1, 32, 32, 32))["seg_logits"].shape == (1, 2, 32, 32, 32)


# --- every registered model ---------------------------------------------------------------------


@pytest.mark.parametrize("size", [28, 33, 64])
@pytest.mark.parametrize("name", TINY)
def test_tiny_models_forward_backward(name: str, size: int) -> None:
    seed_everything(0)
    model = _build(name, size).train()
    x = _input(name, size)
    out = model(x)
    _check_outputs(model, x, out)
    sum(v.float().square().mean() for v in out.values()).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"parameters without gradient: {missing[:5]}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    dead = [n for n, p in model.named_parameters() if p.grad is not None and not p.grad.abs().sum()]
    assert len(dead) <= 0.05 * sum(1 for _ in model.parameters()), f"zero gradients: {dead[:5]}"


@pytest.mark.parametrize("size", [28, 33, 64])
@pytest.mark.parametrize("name", FULL)
def test_full_models_forward(name: str, size: int) -> None:
    model = _build(name, size).eval()
    x = _input(name, size, batch=1)
    with torch.no_grad():
        _check_outputs(model, x, model(x))


@pytest.mark.slow
@pytest.mark.parametrize("name", FULL)
def test_full_models_backward(name: str) -> None:
    model = _build(name, 33).train()
    x = _input(name, 33, batch=2)
    out = model(x)
    sum(v.float().square().mean() for v in out.values()).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", ["hybrid_tiny_3d", "vit_tiny_2d", "unetr_tiny_3d", "dynunet_tiny_3d"])
def test_same_seed_same_output(name: str) -> None:
    x = _input(name, 32)
    outs = []
    for seed in (7, 7, 8):
        seed_everything(seed)
        model = _build(name, 32).eval()
        with torch.no_grad():
            outs.append(model(x))
    for key in outs[0]:
        assert torch.equal(outs[0][key], outs[1][key])
        assert not torch.equal(outs[0][key], outs[2][key])


@pytest.mark.parametrize("name", ["hybrid_tiny_2d", "resnet_tiny_3d", "swinunetr_tiny_3d", "dynunet_tiny_3d"])
def test_forward_features_returns_the_encoder_shallow_to_deep(name: str) -> None:
    model = _build(name, 64).eval()
    with torch.no_grad():
        feats = model.forward_features(_input(name, 64, batch=1))
    assert isinstance(feats, list) and len(feats) >= 3
    sizes = [math.prod(f.shape[2:]) for f in feats]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] > sizes[-1]


def test_vit_features_are_hidden_states() -> None:
    model = create_model("vit_tiny_3d", img_size=32).eval()
    feats = model.forward_features(torch.randn(1, 1, 32, 32, 32))
    assert len(feats) == 2 and feats[0].shape == (1, 65, 32)  # 2 blocks, CLS + (32/8)^3 tokens, width 32


def test_hybrid_logits_come_from_the_last_feature_map() -> None:
    model = create_model("hybrid_tiny_3d").eval()
    x = torch.randn(1, 1, 32, 32, 32)
    fmap = model.forward_features(x)[-1]
    cls, _, _ = model.context(fmap)
    torch.testing.assert_close(model.cls_head(cls, fmap), model(x)["logits"])


def test_bad_inputs_raise_typed_errors() -> None:
    model = create_model("hybrid_tiny_3d")
    with pytest.raises(ModelInputError, match="input channel"):
        model(torch.randn(1, 2, 16, 16, 16))
    with pytest.raises(ModelInputError, match="5-D"):
        model(torch.randn(1, 1, 16, 16))
    vit = create_model("vit_tiny_3d", img_size=32)
    with pytest.raises(ModelInputError, match="built for spatial size"):
        vit(torch.randn(1, 1, 48, 48, 48))


def test_task_selection() -> None:
    cls_only = create_model("hybrid_tiny_2d", seg_classes=0)
    assert cls_only.decoder is None and set(cls_only(torch.randn(1, 1, 32, 32))) == {"logits"}
    seg_only = create_model("hybrid_tiny_2d", num_classes=0, seg_classes=4)
    out = seg_only(torch.randn(1, 1, 32, 32))
    assert set(out) == {"seg_logits"} and out["seg_logits"].shape[1] == 4
    with pytest.raises(ModelError, match="num_classes > 0 or seg_classes > 0"):
        create_model("hybrid_tiny_2d", num_classes=0, seg_classes=0)
    unfused = create_model("hybrid_tiny_2d", fuse_pooled=False)
    assert unfused.cls_head.fc.in_features == unfused.cfg.context_width


# --- encoder, context head ----------------------------------------------------------------------


@pytest.mark.parametrize(("depth", "blocks", "last"), [(10, 4, 512), (18, 8, 512), (34, 16, 512), (50, 16, 2048)])
def test_resnet_depths(depth: int, blocks: int, last: int) -> None:
    enc = ResNetEncoder(ResNetConfig(depth=depth, spatial_dims=2))
    assert sum(len(s) for s in enc.stages) == blocks and enc.out_channels[-1] == last
    feats = enc(torch.randn(1, 1, 64, 64))
    assert [f.shape[-1] for f in feats] == [32, 16, 8, 4, 2]


def test_anisotropic_strides_keep_the_slice_axis() -> None:
    model = create_model("hybrid_r18_3d_aniso", context_depth=1)
    assert model.encoder.reductions == [(2, 2, 1), (4, 4, 1), (8, 8, 1), (16, 16, 2)]
    feats = model.forward_features(torch.randn(1, 1, 64, 64, 16))
    assert feats[-1].shape[2:] == (4, 4, 8)
    assert model.encoder.stem[0].kernel_size == (7, 7, 3)


def test_small_stem_keeps_28px_resolution() -> None:
    model = create_model("hybrid_r18_2d_small", context_depth=1)
    feats = model.forward_features(torch.randn(1, 1, 28, 28))
    assert [f.shape[-1] for f in feats] == [28, 28, 14, 7]


def test_sdpa_and_explicit_attention_agree() -> None:
    seed_everything(0)
    ctx = TransformerContext(16, 3, ContextConfig(width=32, depth=3, heads=4, pos_grid=(2, 2, 2))).eval()
    fmap = torch.randn(2, 16, 3, 2, 5)  # a grid the embeddings were not stored for
    cls_a, tok_a, none = ctx(fmap)
    cls_b, tok_b, maps = ctx(fmap, return_attention=True)
    assert none is None and maps is not None and len(maps) == 3
    torch.testing.assert_close(cls_a, cls_b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tok_a, tok_b, atol=1e-5, rtol=1e-5)
    assert maps[0].shape == (2, 4, 31, 31)
    torch.testing.assert_close(maps[0].sum(-1), torch.ones(2, 4, 31))


def test_position_embedding_resizes_but_keeps_the_stored_grid() -> None:
    ctx = TransformerContext(8, 2, ContextConfig(width=16, depth=1, heads=2, pos_grid=(4, 4)))
    stored = ctx.position_embedding((4, 4))
    assert torch.equal(stored, ctx.pos_embed.flatten(2).transpose(1, 2))
    assert ctx.position_embedding((7, 3)).shape == (1, 21, 16)


def test_hybrid_attention_maps() -> None:
    model = create_model("hybrid_tiny_3d").eval()
    x = torch.randn(1, 1, 32, 32, 32)
    maps = model.attention_maps(x)
    grid = model.forward_features(x)[-1].shape[2:]
    n = math.prod(grid) + 1
    assert len(maps) == model.cfg.context_depth and maps[-1].shape == (1, model.cfg.context_heads, n, n)


def test_invalid_configs_raise() -> None:
    with pytest.raises(ModelError, match="depth must be one of"):
        create_model("hybrid_tiny_3d", depth=101)
    with pytest.raises(ModelError, match="not divisible by heads"):
        create_model("hybrid_tiny_3d", context_heads=5)
    with pytest.raises(ModelError, match="not divisible by heads"):
        create_model("hybrid_tiny_3d", context_heads=0)
    with pytest.raises(ModelError, match="standard stem only"):
        create_model("hybrid_tiny_2d", stem="small", stem_stride=4)
    with pytest.raises(ModelError, match="decoder_channels needs 4 entries"):
        create_model("hybrid_tiny_3d", decoder_channels=(8, 8))


# --- nnU-Net planning ---------------------------------------------------------------------------


def test_nnunet_plan_isotropic() -> None:
    kernels, strides = nnunet_plan((64, 64, 64), (1.0, 1.0, 1.0))
    assert strides == [[1, 1, 1]] + [[2, 2, 2]] * 4
    assert all(k == [3, 3, 3] for k in kernels)


def test_nnunet_plan_thick_slices_pool_in_plane_first() -> None:
    kernels, strides = nnunet_plan((128, 128, 32), (0.75, 0.75, 2.5))
    # 0.75/0.75/2.5 mm: z (3.3x the finest) waits one level; then x/y are at 1.5 mm and z joins;
    # at the end z (4 voxels) stops while x/y (8) pool once more
    assert strides == [[1, 1, 1], [2, 2, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 1]]
    assert kernels == [[3, 3, 1]] + [[3, 3, 3]] * 5


def test_nnunet_plan_bottleneck_and_single_axis() -> None:
    kernels, strides = nnunet_plan((8, 8, 64), (1.0, 1.0, 5.0))
    # x/y pool once (8 -> 4); then z pools alone while it is >= 12 voxels (64 -> 32 -> 16 -> 8)
    assert strides == [[1, 1, 1], [2, 2, 1], [1, 1, 2], [1, 1, 2], [1, 1, 2]]
    assert kernels[:-1] == [[3, 3, 1]] * 4 and kernels[-1] == [3, 3, 3]


# --- ONNX ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "size"), [("hybrid_tiny_2d", 33), ("hybrid_tiny_3d", 33), ("hybrid_r18_2d", 128), ("hybrid_r18_3d", 64)]
)
def test_onnx_parity(name: str, size: int, tmp_path) -> None:
    pytest.importorskip("onnxruntime")
    from medhybrid.models.export import export_onnx, onnx_parity

    seed_everything(0)
    model = create_model(name).eval()
    x = _input(name, size, batch=1)
    path = export_onnx(model, x, tmp_path / f"{name}.onnx")
    assert list(tmp_path.iterdir()) == [path]  # no temp file or external data left behind
    for batch in (1, 3):
        diffs = onnx_parity(model, path, _input(name, size, batch=batch))
        assert set(diffs) == {"logits", "seg_logits"}
        assert max(diffs.values()) < 1e-4, diffs


# --- CLI ----------------------------------------------------------------------------------------


def test_models_cli_json() -> None:
    result = CliRunner().invoke(app, ["models", "--family", "hybrid", "--input-size", "1", "33", "33", "33", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert {r["name"] for r in rows} == set(list_models(family="hybrid", spatial_dims=3))
    assert all(r["gflops"] > 0 and r["params_m"] > 0 and r["input_size"] == [1, 33, 33, 33] for r in rows)


def test_models_cli_rejects_bad_size() -> None:
    result = CliRunner().invoke(app, ["models", "--input-size", "1", "2"])
    assert result.exit_code == 1 and "C H W or C D H W" in result.output


# --- runtime helpers used for inference ---------------------------------------------------------


def test_autocast_is_a_no_op_on_cpu() -> None:
    from medhybrid.runtime import autocast

    with autocast("cpu"):
        y = torch.randn(4, 4) @ torch.randn(4, 4)
    assert y.dtype == torch.float32


@pytest.mark.slow
def test_compiled_model_matches_eager() -> None:
    from medhybrid.runtime import compile_for_inference

    seed_everything(0)
    model = create_model("hybrid_tiny_3d").eval()
    x = torch.randn(1, 1, 33, 33, 33)
    with torch.no_grad():
        ref = model(x)
        out = compile_for_inference(model)(x)
    for key in ref:
        torch.testing.assert_close(out[key], ref[key], atol=1e-4, rtol=1e-4)


def test_flop_count_includes_sdpa_attention() -> None:
    from medhybrid.models.profile import forward_gflops

    ctx = TransformerContext(16, 3, ContextConfig(width=64, depth=2, heads=4, pos_grid=(8, 8, 8)))

    class Explicit(torch.nn.Module):
        def forward(self, fmap: torch.Tensor) -> torch.Tensor:
            return ctx(fmap, return_attention=True)[0]

    fmap = torch.randn(1, 16, 8, 8, 8)
    sdpa, explicit = forward_gflops(ctx, fmap), forward_gflops(Explicit(), fmap)
    assert sdpa == pytest.approx(explicit, rel=0.01)


def test_context_depth_zero_is_the_hybrid_without_a_transformer() -> None:
    from medhybrid.infer.saliency import Explainer, methods_for

    model = create_model("hybrid_tiny_2d", context_depth=0, img_size=32).eval()
    assert len(model.context.blocks) == 0
    out = model(torch.randn(2, 1, 32, 32))
    assert out["logits"].shape == (2, 2) and out["seg_logits"].shape == (2, 2, 32, 32)
    assert methods_for(model) == ("gradcam",)
    maps = Explainer(model)(torch.randn(1, 1, 32, 32))
    assert set(maps) == {"outputs", "gradcam"}
    with pytest.raises(ModelError, match="depth must be >= 0"):
        create_model("hybrid_tiny_2d", context_depth=-1)


# --- decoder at full resolution, mask evidence in the classifier, memory format ------------------


def test_the_full_resolution_block_runs_at_the_input_size() -> None:
    model = create_model("hybrid_tiny_3d", decoder_full_res=4).eval()
    assert model.decoder.full_res is not None and model.decoder.head.conv.in_channels == 4
    seen: list[tuple[int, ...]] = []
    model.decoder.full_res.register_forward_hook(lambda _m, _i, out: seen.append(tuple(out.shape[2:])))
    out = model(torch.randn(1, 1, 32, 24, 16))["seg_logits"]
    assert seen == [(32, 24, 16)] and out.shape == (1, 2, 32, 24, 16)
    # The default: on when the stem is strided (the shallowest skip is at 1/2), off when it is not.
    assert create_model("hybrid_tiny_3d").decoder.full_res is not None
    assert create_model("hybrid_tiny_3d", stem_stride=1).decoder.full_res is None
    assert create_model("hybrid_tiny_3d", decoder_full_res=0).decoder.full_res is None


def test_deep_supervision_heads_the_coarser_blocks_in_training_only() -> None:
    plain = {"decoder_full_res": 0, "min_token_grid": 0}  # the strides as given, no full-resolution block
    model = create_model("hybrid_tiny_3d", deep_supervision=2, **plain).train()
    out = model(torch.randn(2, 1, 32, 32, 32))
    assert out["seg_logits"].shape == (2, 2, 32, 32, 32)
    # finest first: the head reads the stride-2 block, the aux heads the stride-4 and stride-8 ones
    assert out["seg_logits_aux1"].shape == (2, 2, 8, 8, 8)
    assert out["seg_logits_aux2"].shape == (2, 2, 4, 4, 4)
    assert "seg_logits_aux3" not in out
    assert set(model.eval()(torch.randn(1, 1, 32, 32, 32))) == {"logits", "seg_logits"}
    with pytest.raises(ModelError, match="deep_supervision must be 0..2"):
        create_model("hybrid_tiny_3d", deep_supervision=3, **plain)
    # with the full-resolution block the stride-2 block becomes the finest aux level
    full = create_model("hybrid_tiny_3d", deep_supervision=1, decoder_full_res=4).train()
    assert full(torch.randn(1, 1, 32, 32, 32))["seg_logits_aux1"].shape == (1, 2, 16, 16, 16)


def test_the_segmentation_heads_start_at_the_foreground_prior() -> None:
    """RetinaNet's prior bias: softmax of the biases alone is (1 - prior, prior), on every head."""
    model = create_model("hybrid_tiny_3d", deep_supervision=1, seg_prior=0.01)
    for head in (model.decoder.head, *model.decoder.aux_heads):
        torch.testing.assert_close(torch.softmax(head.conv.bias, 0), torch.tensor([0.99, 0.01]))
    three = create_model("hybrid_tiny_3d", seg_classes=3, seg_prior=0.1)
    torch.testing.assert_close(torch.softmax(three.decoder.head.conv.bias, 0), torch.tensor([0.9, 0.05, 0.05]))
    default_init = torch.softmax(create_model("hybrid_tiny_3d").decoder.head.conv.bias, 0)
    assert float(default_init[1]) > 0.2  # PyTorch's init: biases near 0, about half foreground
    with pytest.raises(ModelError, match="foreground_prior must lie in"):
        create_model("hybrid_tiny_3d", seg_prior=1.0)


def test_the_classifier_reads_the_mask_evidence_detached() -> None:
    model = create_model("hybrid_tiny_3d", fuse_seg_evidence=True).eval()
    assert model.cls_head.fc.in_features == model.cfg.context_width + 1  # CLS, evidence (no pooled map by default)
    pooled = create_model("hybrid_tiny_3d", fuse_seg_evidence=True, fuse_pooled=True)
    assert pooled.cls_head.fc.in_features == model.cfg.context_width + 32 + 1
    x = torch.randn(1, 1, 32, 32, 32)
    out = model(x)
    evidence = segmentation_evidence(out["seg_logits"])
    margin = out["seg_logits"][:, 1] - out["seg_logits"][:, 0]
    torch.testing.assert_close(evidence, margin.flatten(1).amax(1, keepdim=True))
    # the evidence's weight moves the logits; the study label's gradient never reaches the decoder
    with torch.no_grad():
        model.cls_head.fc.weight[:, -1] += 1.0
    out2 = model(x)
    assert not torch.allclose(out2["logits"], out["logits"])
    out2["logits"][0, 1].backward()
    assert all(p.grad is None or not p.grad.any() for p in model.decoder.parameters())
    with pytest.raises(ModelError, match="fuse_seg_evidence needs"):
        create_model("hybrid_tiny_3d", fuse_seg_evidence=True, seg_classes=0)


def test_3d_models_run_channels_last_with_the_same_outputs() -> None:
    model = create_model("hybrid_tiny_3d").eval()
    x = torch.randn(2, 1, 32, 32, 32)
    expected = model(x)
    fast = prefer_memory_format(model)
    conv = fast.decoder.bridge.conv.weight  # (8, 32, 3, 3, 3): the layouts differ
    assert conv.is_contiguous(memory_format=torch.channels_last_3d) and not conv.is_contiguous()
    for key, value in fast(x).items():
        torch.testing.assert_close(value, expected[key], rtol=1e-4, atol=1e-4)
    flat = create_model("hybrid_tiny_2d")
    assert prefer_memory_format(flat).decoder.bridge.conv.weight.is_contiguous()


# --- token grid planning, defaults, the ResNet-only ablation ---------------------------------------


@pytest.mark.parametrize(
    ("name", "args", "size", "grid"),
    [
        # the shipped pipelines' inputs: hippocampus patches, AdrenalMNIST3D, PneumoniaMNIST
        ("hybrid_r18_3d", {}, (32, 48, 32), (4, 6, 4)),
        ("hybrid_r18_3d", {"widths": [32, 64, 128, 256]}, (28, 28, 28), (4, 4, 4)),
        ("hybrid_r18_2d", {"stem_stride": 2, "pool_stride": 1, "widths": [32, 64, 128, 256]}, (28, 28), (7, 7)),
        # large enough already: nothing is dropped
        ("hybrid_r18_3d", {}, (64, 64, 64), (4, 4, 4)),
        ("hybrid_r18_2d", {}, (128, 128), (8, 8)),
        # per axis: only the thin axis loses a stride
        ("hybrid_r18_3d", {}, (64, 64, 32), (4, 4, 4)),
    ],
)
def test_the_token_grid_is_planned_from_the_input_size(
    name: str, args: dict[str, object], size: tuple[int, ...], grid: tuple[int, ...]
) -> None:
    model = create_model(name, img_size=list(size), **args).eval()
    assert tuple(model.forward_features(torch.zeros(1, 1, *size))[-1].shape[2:]) == grid
    assert token_grid(model, size) == grid
    out = model(torch.zeros(1, 1, *size))
    assert out["seg_logits"].shape[2:] == size
    # min_token_grid 0 keeps the strides as given: 1/16 here
    fixed = create_model(name, img_size=list(size), min_token_grid=0, **args)
    reduction = fixed.encoder.reductions[-1]
    assert token_grid(fixed, size) == tuple(math.ceil(s / r) for s, r in zip(size, reduction, strict=True))
    assert math.prod(fixed.encoder.reductions[-1]) >= math.prod(model.encoder.reductions[-1])


def test_plan_strides_drops_the_deepest_steps_first() -> None:
    pool, stages = plan_strides((32, 48, 32), 2, 2, (1, 2, 2), 4)
    assert pool == (2, 2, 2) and stages == ((1, 1, 1), (2, 2, 2), (1, 1, 1))
    pool, stages = plan_strides((8, 8), 2, 2, (1, 2, 2), 4)  # 8 px: only the stem conv's /2 is left
    assert pool == (1, 1) and stages == ((1, 1), (1, 1), (1, 1))
    assert plan_strides((32, 32), 2, 2, (1, 2, 2), 0) == ((2, 2), ((1, 1), (2, 2), (2, 2)))


def test_models_lists_the_token_grid() -> None:
    row = summarize("hybrid_r18_3d", (1, 32, 48, 32))
    assert row.token_grid == (4, 6, 4)
    assert summarize("resnet18_3d", (1, 32, 48, 32)).token_grid is None
    result = CliRunner().invoke(
        app, ["models", "--family", "hybrid", "--no-tiny", "--json", "--input-size", "1", "32", "48", "32"]
    )
    assert result.exit_code == 0, result.output
    rows = {r["name"]: r for r in json.loads(result.output)}
    assert rows["hybrid_r18_3d"]["token_grid"] == [4, 6, 4]


def test_hybrid_defaults_keep_the_transformer_on_the_only_path() -> None:
    model = create_model("hybrid_tiny_3d")
    assert model.cls_head.pooled_channels == 0  # no pooled-CNN shortcut around the Transformer
    assert isinstance(model.context, TransformerContext)
    inst = create_model("hybrid_tiny_3d", norm="instance")
    norms = [m for m in inst.modules() if isinstance(m, torch.nn.InstanceNorm3d)]
    assert norms and all(m.affine for m in norms)  # nnU-Net's instance norm, with scale and shift


@pytest.mark.parametrize(
    ("name", "args", "size"),
    [
        ("hybrid_r18_3d", {"num_classes": 0, "seg_classes": 3}, (32, 48, 32)),
        ("hybrid_r18_2d", {"stem_stride": 2, "pool_stride": 1, "widths": [32, 64, 128, 256], "context_width": 192,
                           "context_heads": 4, "context_depth": 2, "seg_classes": 0}, (28, 28)),
    ],
)  # fmt: skip
def test_the_resnet_only_ablation_costs_what_the_transformer_costs(
    name: str, args: dict[str, object], size: tuple[int, ...]
) -> None:
    x = torch.zeros(1, 1, *size)
    hybrid = create_model(name, img_size=list(size), **args)
    conv = create_model(name, img_size=list(size), context="conv", **args)
    assert isinstance(conv.context, ConvContext) and len(conv.context.convs) == hybrid.cfg.context_depth
    ratio = forward_gflops(conv, x) / forward_gflops(hybrid, x)
    assert 0.9 < ratio < 1.1, ratio  # equal FLOPs (not "no bottleneck at all")
    # the same encoder and decoder, module for module
    for part in ("encoder", "decoder"):
        a, b = getattr(hybrid, part), getattr(conv, part)
        if a is not None:
            assert [(k, v.shape) for k, v in a.state_dict().items()] == [
                (k, v.shape) for k, v in b.state_dict().items()
            ]
    out = conv.eval()(x)
    assert set(out) == set(hybrid.eval()(x))
    assert methods_for(conv) == ("gradcam",)  # no attention to roll out
    with pytest.raises(ModelError, match="context must be"):
        create_model(name, context="lstm")
