"""Vision Transformers through timm: each checkpoint layout (DINO, iBOT, DINOv2 with and without registers,
MoCo v3, plain backbones), built here from a random timm model saved the way its project saves it, must
give the source model's embeddings through the public loading path; the position embedding follows the
image size; a ViT-Tiny student distils and exports to ONNX with parity (CPU, 28-32 px images)."""

from __future__ import annotations

import json

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from compress_edge.errors import ModelError
from compress_edge.models.inspection import inspect_checkpoint
from compress_edge.models.layouts import load_backbone_weights
from compress_edge.models.resolve import (
    POOLS,
    create_model,
    list_models,
    load_model,
    resolve_model,
    save_model,
    spec_for,
)

TINY = "vit_tiny_patch16_224"  # the layouts do not depend on the width: the cheapest ViT carries them
SIZE = 32  # two 16 px patches a side: the smallest grid with more than one patch
DINOV2_SIZE = 28  # two 14 px patches a side


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def source_vit(name: str = TINY, img_size: int = SIZE, seed: int = 0, **kwargs):
    """A timm ViT with random weights everywhere (LayerScale and the tokens too, which timm starts near
    zero), as a trained one would have."""
    torch.manual_seed(seed)
    net = timm.create_model(name, pretrained=False, num_classes=0, img_size=img_size, **kwargs)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for k, p in net.named_parameters():
            if k.endswith(("gamma", "cls_token", "reg_token", "pos_embed")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return net.eval()


def images(size: int = SIZE, n: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(7))


def tokens(net, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return net.forward_features(x)  # (B, N, C) after the final norm: timm's own computation


def reference(net, x: torch.Tensor) -> torch.Tensor:
    """The source's embedding computed by timm alone: the L2-normalised class token."""
    return F.normalize(tokens(net, x)[:, 0], dim=1)


def loads_like(path, net, arch: str, size: int = SIZE, **kwargs):
    """Load ``path`` through resolve_model (what --teacher ARCH --teacher-weights FILE does) and check
    it embeds like ``net``; return the spec."""
    torch.manual_seed(123)  # another random init than the source's
    model, spec = resolve_model(arch, weights=path, image_size=size, **kwargs)
    with torch.no_grad():
        got = model(images(size))
    torch.testing.assert_close(got, reference(net, images(size)), atol=1e-5, rtol=0)
    assert spec.image_size == size and spec.arch == arch
    return spec


def prefixed(sd: dict, prefix: str) -> dict:
    return {prefix + k: v for k, v in sd.items()}


def dino_head(prefix: str, dim: int = 192, out: int = 64) -> dict:
    """DINO's projection head (MLP, then the weight-normalised last layer)."""
    return {f"{prefix}mlp.0.weight": torch.randn(32, dim), f"{prefix}mlp.0.bias": torch.randn(32),
            f"{prefix}mlp.2.weight": torch.randn(16, 32), f"{prefix}last_layer.weight_g": torch.ones(out, 1),
            f"{prefix}last_layer.weight_v": torch.randn(out, 16)}


def as_dinov2(net, chunks: int = 0) -> dict:
    """``net`` (a timm DINOv2 ViT) in DINOv2's own layout: ``mask_token``, ``register_tokens``, the class
    token's position inside ``pos_embed`` (timm folds it into the class token), optionally chunked blocks."""
    sd = {k: v.clone() for k, v in net.state_dict().items()}
    sd["mask_token"] = torch.zeros(1, sd["cls_token"].shape[-1])
    if "reg_token" in sd:
        cls_pos = torch.randn(1, 1, sd["cls_token"].shape[-1])
        sd["register_tokens"] = sd.pop("reg_token")
        sd["cls_token"] = sd["cls_token"] - cls_pos
        sd["pos_embed"] = torch.cat([cls_pos, sd["pos_embed"]], dim=1)
    if chunks:
        depth = len(net.blocks)
        per = depth // chunks
        sd = {(f"blocks.{int(k.split('.')[1]) // per}.{k[len('blocks.'):]}" if k.startswith("blocks.") else k): v
              for k, v in sd.items()}
    return sd


# --- the registry ------------------------------------------------------------------------------------
def test_the_vits_are_registered_beside_the_cnns():
    vits = set(list_models("vit"))
    assert {"vit_tiny_patch16_224", "vit_small_patch16_224", "vit_base_patch16_224", "vit_small_patch14_dinov2",
            "vit_small_patch14_reg4_dinov2", "vit_base_patch14_reg4_dinov2"} <= vits
    assert vits.isdisjoint(list_models("cnn")) and set(list_models()) == vits | set(list_models("cnn"))
    with pytest.raises(ModelError, match="choose one of: cnn, vit"):
        list_models("transformer")


@pytest.mark.parametrize("pool", POOLS)
def test_pooling_is_recorded_and_survives_save_and_load(tmp_path, pool):
    torch.manual_seed(0)
    model = create_model("vit_tiny_patch16_224", img_size=SIZE, patch_size=8, pool=pool).eval()
    spec = spec_for(model, image_size=SIZE)
    assert spec.arch_kwargs["pool"] == pool and spec.arch_kwargs["img_size"] == SIZE
    assert model.feature_dim == (384 if pool == "cls+mean" else 192)
    t = tokens(model.backbone, images())  # class token, then the 16 patches
    cls, mean = t[:, 0], t[:, 1:].mean(dim=1)
    expected = {"cls": cls, "mean": mean, "cls+mean": torch.cat([cls, mean], dim=1)}[pool]
    with torch.no_grad():
        torch.testing.assert_close(model(images()), F.normalize(expected, dim=1), atol=1e-6, rtol=0)
    save_model(model, spec, tmp_path / "m")
    loaded, loaded_spec = load_model(tmp_path / "m")
    assert loaded_spec.arch_kwargs["pool"] == pool
    with torch.no_grad():
        assert torch.equal(loaded(images()), model(images()))


def test_mean_pooling_leaves_the_register_tokens_out():
    torch.manual_seed(0)
    model = create_model("vit_small_patch14_reg4_dinov2", img_size=DINOV2_SIZE, pool="mean").eval()
    t = tokens(model.backbone, images(DINOV2_SIZE))
    assert t.shape[1] == 1 + 4 + 4  # class, 4 registers, 2x2 patches
    with torch.no_grad():
        torch.testing.assert_close(model(images(DINOV2_SIZE)), F.normalize(t[:, 5:].mean(dim=1), dim=1),
                                   atol=1e-6, rtol=0)


def test_bad_vit_options_say_what_to_pass():
    with pytest.raises(ModelError, match="pool must be one of cls, mean, cls\\+mean"):
        create_model("vit_tiny_patch16_224", pool="max")
    with pytest.raises(ModelError, match="dynamic_img_size must be true or false"):
        create_model("vit_tiny_patch16_224", dynamic_img_size="no")
    with pytest.raises(ModelError, match="multiple of patch_size .*got img_size=40: use img_size 32 or 48"):
        create_model("vit_tiny_patch16_224", img_size=40)
    with pytest.raises(ModelError, match="got img_size=8: use img_size 16 "):
        create_model("vit_tiny_patch16_224", img_size=8)
    model = create_model("vit_tiny_patch16_224", img_size=SIZE)
    with pytest.raises(ModelError, match="img_size=64"):
        spec_for(model, image_size=64)
    dynamic = create_model("vit_tiny_patch16_224", img_size=SIZE, dynamic_img_size=True)
    assert spec_for(dynamic, image_size=64).image_size == 64
    with pytest.raises(ModelError, match="no multiple of 16"):
        spec_for(dynamic, image_size=40)


# --- each layout ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("key", [None, "student"])
def test_dino_teacher_and_student(tmp_path, key):
    teacher, student = source_vit(seed=0), source_vit(seed=5)
    ckpt = {"teacher": {**prefixed(teacher.state_dict(), "backbone."), **dino_head("head.")},
            "student": {**prefixed(student.state_dict(), "module.backbone."), **dino_head("module.head.")}}
    torch.save(ckpt, tmp_path / "dino.pth")
    spec = loads_like(tmp_path / "dino.pth", student if key else teacher, TINY, weights_key=key)
    assert spec.source["format"] == "dino" and spec.source["key"] == (key or "teacher")


def test_one_dino_network_saved_alone(tmp_path):
    net = source_vit()  # what DINO's conversion advice writes: torch.save(ckpt["teacher"], ...)
    torch.save({**prefixed(net.state_dict(), "backbone."), **dino_head("head.")}, tmp_path / "teacher.pth")
    assert loads_like(tmp_path / "teacher.pth", net, TINY).source["format"] == "dino"


@pytest.mark.parametrize(("prefix", "suffix"), [("", ".pth"), ("module.", ".pth"), ("", ".safetensors")])
def test_plain_backbone_files(tmp_path, prefix, suffix):
    # DINO's and iBOT's released backbones: timm's keys, nothing else.
    net = source_vit()
    sd = prefixed({k: v.contiguous() for k, v in net.state_dict().items()}, prefix)
    path = tmp_path / f"dino_vitbase16_pretrain{suffix}"
    save_file(sd, str(path)) if suffix == ".safetensors" else torch.save(sd, path)
    assert loads_like(path, net, TINY).source["format"] == "timm"


def test_ibot_masked_embed_is_dropped(tmp_path):
    net = source_vit()
    sd = {**prefixed(net.state_dict(), "backbone."), "backbone.masked_embed": torch.zeros(192),
          **dino_head("head.")}
    torch.save({"teacher": sd}, tmp_path / "ibot.pth")
    torch.manual_seed(1)
    model = create_model(TINY, img_size=SIZE)
    report = load_backbone_weights(model, tmp_path / "ibot.pth")
    assert report.fits() and "backbone.masked_embed" in report.ignored


@pytest.mark.parametrize(
    ("arch", "chunks", "suffix"),
    [
        ("vit_small_patch14_dinov2", 0, ".pth"),
        ("vit_small_patch14_reg4_dinov2", 0, ".pth"),
        ("vit_small_patch14_reg4_dinov2", 0, ".safetensors"),
        ("vit_small_patch14_reg4_dinov2", 4, ".pth"),  # FSDP training checkpoints chunk the blocks
    ],
)
def test_dinov2_backbones_with_and_without_registers(tmp_path, arch, chunks, suffix):
    net = source_vit(arch, img_size=DINOV2_SIZE)
    sd = {k: v.contiguous() for k, v in as_dinov2(net, chunks).items()}
    path = tmp_path / f"dinov2{suffix}"
    save_file(sd, str(path)) if suffix == ".safetensors" else torch.save(sd, path)
    spec = loads_like(path, net, arch, size=DINOV2_SIZE)
    assert spec.source["format"] == "dinov2"
    info = inspect_checkpoint(path, arch=arch)
    assert info.report.fits() and "mask_token" in info.report.ignored


def test_moco_v3_vit_small_gets_its_twelve_heads(tmp_path):
    net = source_vit("vit_small_patch16_224", num_heads=12)  # MoCo v3's ViT-S: DINO's shapes, twice the heads
    momentum = source_vit("vit_small_patch16_224", num_heads=12, seed=3)
    state = {**prefixed(net.state_dict(), "module.base_encoder."),
             "module.base_encoder.head.0.weight": torch.randn(64, 384),
             **prefixed(momentum.state_dict(), "module.momentum_encoder."),
             "module.predictor.0.weight": torch.randn(64, 64)}
    torch.save({"epoch": 300, "arch": "vit_small", "state_dict": state}, tmp_path / "vit-s-300ep.pth.tar")
    spec = loads_like(tmp_path / "vit-s-300ep.pth.tar", net, "vit_small_patch16_224")
    assert spec.source["format"] == "moco-v3" and spec.arch_kwargs["num_heads"] == 12


# --- the position embedding follows the image size -------------------------------------------------------
@pytest.mark.parametrize("size", [32, 48, 96])  # fewer and more patches than the file's 4x4
def test_a_checkpoint_for_another_size_is_resampled(tmp_path, size):
    # A 64 px checkpoint (4x4 grid) at another size: timm's run-time resampling (dynamic_img_size) of the
    # same weights is the reference, so loading resamples exactly as timm does.
    net = source_vit(img_size=64)
    torch.save(net.state_dict(), tmp_path / "vit64.pth")
    model, spec = resolve_model(TINY, weights=tmp_path / "vit64.pth", image_size=size)
    assert model.backbone.pos_embed.shape == (1, 1 + (size // 16) ** 2, 192)
    dynamic = timm.create_model(TINY, num_classes=0, img_size=64, dynamic_img_size=True)
    dynamic.load_state_dict(net.state_dict())
    with torch.no_grad():
        got = model(images(size))
    torch.testing.assert_close(got, reference(dynamic, images(size)), atol=1e-5, rtol=0)
    assert spec.arch_kwargs["img_size"] == size


def test_a_dinov2_checkpoint_at_518_px_serves_28_px(tmp_path):
    net = source_vit("vit_small_patch14_reg4_dinov2", img_size=518)  # the 37x37 grid DINOv2 ships
    torch.save(as_dinov2(net), tmp_path / "dinov2_vits14_reg4_pretrain.pth")
    model, spec = resolve_model("vit_small_patch14_reg4_dinov2", weights=tmp_path / "dinov2_vits14_reg4_pretrain.pth",
                                image_size=DINOV2_SIZE)
    dynamic = timm.create_model("vit_small_patch14_reg4_dinov2", num_classes=0, img_size=518, dynamic_img_size=True)
    dynamic.load_state_dict(net.state_dict())
    with torch.no_grad():
        got = model(images(DINOV2_SIZE))
    torch.testing.assert_close(got, reference(dynamic, images(DINOV2_SIZE)), atol=1e-5, rtol=0)


# --- guessing and refusing ----------------------------------------------------------------------------
def test_inspect_guesses_the_vit(tmp_path):
    net = source_vit()
    torch.save(net.state_dict(), tmp_path / "vits16.pth")
    info = inspect_checkpoint(tmp_path / "vits16.pth")
    assert info.arch == TINY and info.arch_source == "guessed" and info.report.fits()


def test_a_vit_of_another_size_is_refused_with_the_right_name(tmp_path):
    torch.save(source_vit().state_dict(), tmp_path / "vitt16.pth")
    with pytest.raises(ModelError, match="looks like a vit_tiny_patch16_224 checkpoint"):
        resolve_model("vit_small_patch16_224", weights=tmp_path / "vitt16.pth", image_size=SIZE)


# --- a ViT student ---------------------------------------------------------------------------------------
def test_a_vit_tiny_student_distils_from_a_dino_vit_teacher(tmp_path, make_images):
    from compress_edge.train.config import TrainConfig
    from compress_edge.train.distill import DistillOptions, run_distill

    data = make_images(tmp_path / "imgs", classes=("a", "b"), per_class=8, size=SIZE)
    torch.save(source_vit("vit_small_patch16_224").state_dict(), tmp_path / "dino_deitsmall16_pretrain.pth")
    opts = DistillOptions(data=str(data), out=str(tmp_path / "run"), teacher="vit_small_patch16_224",
                          teacher_weights=str(tmp_path / "dino_deitsmall16_pretrain.pth"), image_size=SIZE,
                          student_arch="vit_tiny_patch16_224",
                          student_kwargs={"patch_size": 8, "depth": 4}, queue_size=8,  # img_size: --image-size
                          train=TrainConfig(epochs=1, batch_size=4, lr=0.01, workers=0, device="cpu",
                                            progress=False, max_steps_per_epoch=2, log_every=1))
    run_distill(opts)
    student, spec = load_model(tmp_path / "run" / "student")
    assert spec.arch == "vit_tiny_patch16_224" and spec.arch_kwargs["patch_size"] == 8
    assert spec.arch_kwargs["img_size"] == spec.image_size == SIZE
    assert len(student.backbone.blocks) == spec.arch_kwargs["depth"] == 4
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["loss"] for r in records if r["kind"] == "train"]  # step 1 fills the empty queue: loss 0
    assert len(steps) == 2 and all(torch.isfinite(torch.tensor(steps))) and max(steps) > 0, records
    with torch.no_grad():
        z = student(images())
    assert z.shape == (3, spec.embed_dim) and torch.isfinite(z).all()


def test_a_vit_student_exports_to_onnx_with_parity(tmp_path, make_images):
    from compress_edge.export import onnx as ce_onnx
    from compress_edge.export.parity import GOALS, compare, load_check_images
    from compress_edge.export.runtimes import open_embedder

    torch.manual_seed(0)
    model = create_model("vit_tiny_patch16_224", img_size=SIZE, patch_size=8, pool="cls+mean", depth=2,
                         head="linear", embed_dim=32).eval()
    spec = spec_for(model, image_size=SIZE)
    pixels, _ = load_check_images(make_images(tmp_path / "imgs", size=40), spec, 16)
    result = ce_onnx.export_onnx(model, spec, tmp_path / "vit.onnx")
    with torch.no_grad():
        ref = model(torch.from_numpy(pixels)).numpy()
    got = open_embedder(result.path).embed(pixels)
    check = compare(ref, got, name="onnxruntime", reference_name="torch", goal=GOALS["fp32"])
    assert check.passed and check.min_cosine >= 0.9999, check.line()
    assert result.exporter == "dynamo", result.fallback_reason


def test_a_vit_is_quantised_dynamically_when_that_keeps_it_closest(tmp_path, make_images):
    """A ViT's weights are mostly MatMul: auto also tries dynamic quantisation (activations quantised at
    run time), which keeps the embeddings where one static range clips the attention's outliers."""
    import onnx
    from compress_edge.export import onnx as ce_onnx
    from compress_edge.export import quantize as q
    from compress_edge.export.calibration import (
        CALIB_METHODS,
        DYNAMIC,
        candidate_methods,
        matmul_weight_share,
    )
    from compress_edge.export.parity import GOALS, compare, load_check_images
    from compress_edge.export.runtimes import open_embedder

    torch.manual_seed(0)
    model = create_model(TINY, img_size=SIZE, patch_size=8, depth=2).eval()
    spec = spec_for(model, image_size=SIZE)
    pixels, _ = load_check_images(make_images(tmp_path / "imgs", size=40), spec, 32)
    path = ce_onnx.export_onnx(model, spec, tmp_path / "vit.onnx").path
    proto = onnx.load(str(path))
    assert matmul_weight_share(proto) > 0.9
    assert candidate_methods("cpu", proto) == (*CALIB_METHODS, DYNAMIC)
    assert candidate_methods("trt", proto) == CALIB_METHODS  # TensorRT takes explicit Q/DQ only

    ref = open_embedder(path).embed(pixels)
    out = q.quantize_int8(path, tmp_path / "dyn.onnx", spec, pixels[:8], calib_method=DYNAMIC)
    assert out.settings["calibration"] == DYNAMIC and "run time" in out.settings["activations"]
    ops = {n.op_type for n in onnx.load(str(out.path)).graph.node}
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= ops and "QuantizeLinear" not in ops
    got = compare(ref, open_embedder(out.path).embed(pixels), name="dynamic", reference_name="fp32",
                  goal=GOALS["int8-cpu"])
    assert got.passed, got.line()

    auto = q.quantize_int8(path, tmp_path / "auto.onnx", spec, pixels[:8], calib_method="auto", parity_images=pixels)
    assert [c["method"] for c in auto.settings["calibration_candidates"]] == [*CALIB_METHODS, DYNAMIC]
    with pytest.raises(Exception, match="dynamic quantisation is for the CPU target only"):
        q.quantize_int8(path, tmp_path / "x.onnx", spec, pixels[:8], target="trt", calib_method=DYNAMIC)
