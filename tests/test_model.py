"""MobileNetV2 construction, weights sources, freezing rules of both phases."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.models import mobilenet_v2

from artifact_core import model as model_mod
from artifact_core.config import LOCAL_TRUNK_BLOCKS, MULTISCALE_TAP_BLOCK
from artifact_core.model import (IMAGENET_WEIGHTS, NUM_FEATURE_BLOCKS, WeightsUnavailableError, build_model,
                                 count_trainable, head_name, set_trainable, train_mode, unwrap)


def _head_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.classifier.parameters())


def test_build_model_has_binary_head():
    m = build_model(weights="none", dropout=0.3)
    assert isinstance(m.classifier[0], nn.Dropout) and m.classifier[0].p == 0.3
    assert m.classifier[-1].out_features == 1 and m.classifier[-1].in_features == 1280
    assert m(torch.randn(2, 3, 64, 64)).shape == (2, 1)
    assert build_model(weights="none", num_outputs=2).classifier[-1].out_features == 2


@pytest.mark.parametrize("depth", [0, 1, 3, 19])
def test_set_trainable_counts_match_depth(depth):
    m = build_model(weights="none")
    n = set_trainable(m, unfreeze_depth=depth)
    expected = _head_params(m) + sum(p.numel() for b in list(m.features)[NUM_FEATURE_BLOCKS - depth:] for p in b.parameters())
    assert n == expected == count_trainable(m)
    frozen = list(m.features)[: NUM_FEATURE_BLOCKS - depth]
    assert all(not p.requires_grad for b in frozen for p in b.parameters())
    if depth == 0:
        assert n == 1281


def test_set_trainable_rejects_bad_depth():
    with pytest.raises(ValueError, match="0..19"):
        set_trainable(build_model(weights="none"), unfreeze_depth=20)


def test_train_mode_keeps_frozen_batchnorm_in_eval():
    m = build_model(weights="none")
    set_trainable(m, unfreeze_depth=2)
    train_mode(m)
    bns = [(i, mod) for i, b in enumerate(m.features) for mod in b.modules() if isinstance(mod, nn.BatchNorm2d)]
    assert all(not mod.training for i, mod in bns if i < 17)
    assert all(mod.training for i, mod in bns if i >= 17)
    frozen_bn = m.features[0][1]
    before = frozen_bn.running_mean.clone()
    m(torch.randn(4, 3, 64, 64) * 5 + 3)
    assert torch.equal(frozen_bn.running_mean, before)  # ImageNet statistics untouched


def test_train_mode_can_keep_every_trunk_batchnorm_in_eval_but_not_the_heads():
    m = build_model(weights="none", head="multiscale")
    set_trainable(m, unfreeze_depth=2)
    train_mode(m, trunk_bn_frozen=True)
    trunk_bns = [mod for mod in m.features.modules() if isinstance(mod, nn.BatchNorm2d)]
    assert trunk_bns and not any(mod.training for mod in trunk_bns)
    assert m.classifier[0].training  # the head's BatchNorm follows its features
    unfrozen = m.features[13].conv[1][1]
    assert unfrozen.weight.requires_grad  # its scale and shift still train
    before = unfrozen.running_mean.clone()
    m(torch.randn(4, 3, 64, 64) * 5 + 3).sum().backward()
    assert torch.equal(unfrozen.running_mean, before) and unfrozen.weight.grad is not None
    train_mode(m)  # default: the unfrozen blocks' statistics follow the batches
    assert m.features[13].conv[1][1].training and not m.features[0][1].training


def test_weights_from_file_imagenet_layout(tmp_path):
    ref = mobilenet_v2(weights=None)  # 1000-class layout, as the ImageNet files have
    path = tmp_path / "w.pth"
    torch.save(ref.state_dict(), path)
    m = build_model(weights=str(path))
    assert torch.equal(m.features[3].conv[0][0].weight, ref.features[3].conv[0][0].weight)
    # our own head layout loads too
    own = build_model(weights="none")
    torch.save(own.state_dict(), path)
    assert torch.equal(build_model(weights=str(path)).features[0][0].weight, own.features[0][0].weight)


def test_weights_file_errors(tmp_path):
    with pytest.raises(WeightsUnavailableError, match="does not exist"):
        build_model(weights=str(tmp_path / "missing.pth"))
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsUnavailableError, match="cannot read"):
        build_model(weights=str(bad))
    torch.save({"foo": torch.zeros(1)}, bad)
    with pytest.raises(WeightsUnavailableError, match="does not fit"):
        build_model(weights=str(bad))


def test_imagenet_weights_come_from_the_hub_cache(tmp_path, monkeypatch):
    """No download: a state dict placed in TORCH_HOME under torchvision's file name is used."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    ref = mobilenet_v2(weights=None)
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(ref.state_dict(), cache / IMAGENET_WEIGHTS.url.rsplit("/", 1)[1])
    m = build_model(weights="imagenet")
    assert torch.equal(m.features[18][0].weight, ref.features[18][0].weight)


def test_torchvision_weights_offline_says_how_to_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*a, **k):
        raise OSError("network is unreachable")
    monkeypatch.setattr(model_mod, "_download", offline)
    with pytest.raises(WeightsUnavailableError) as err:
        build_model(weights="torchvision")
    msg = str(err.value)
    assert "mobilenet_v2-7ebf99e0.pth" in msg and str(tmp_path) in msg and "state-dict file path" in msg


def test_unwrap():
    m = build_model(weights="none")
    assert unwrap(nn.DataParallel(m)) is m and unwrap(m) is m


def test_local_head_scores_the_top_cells_of_its_evidence_map():
    m = build_model(weights="none", head="local", dropout=0.0).eval()
    assert len(m.features) == LOCAL_TRUNK_BLOCKS and m.features[-1].out_channels == 96
    x = torch.randn(2, 3, 448, 448)
    with torch.no_grad():
        cells = m.evidence_map(x)
        logit = m(x)
    assert cells.shape == (2, 1, 28, 28) and logit.shape == (2, 1)
    # 0.5 % of 784 cells -> the 4 strongest artifact logits, negated into the "artifact-free" logit
    expected = -cells.flatten(1).topk(4, dim=1).values.mean(dim=1, keepdim=True)
    assert torch.allclose(logit, expected)
    # a small image still has at least one cell
    assert m(torch.randn(1, 3, 32, 32)).shape == (1, 1)


def test_multiscale_head_reads_the_stride8_map_beside_the_stride16_one():
    m = build_model(weights="none", head="multiscale", dropout=0.0).eval()
    assert len(m.features) == LOCAL_TRUNK_BLOCKS and m.classifier[0].num_features == 32 + 96
    x = torch.randn(2, 3, 448, 448)
    with torch.no_grad():
        joined = m.features(x)
        stride8 = nn.Sequential(*list(m.features)[:MULTISCALE_TAP_BLOCK + 1])(x)
        stride16 = nn.Sequential(*m.features)(x)  # the plain chain: the local head's map
        logit = m(x)
    assert joined.shape == (2, 128, 28, 28) and logit.shape == (2, 1)
    assert torch.allclose(joined[:, 32:], stride16)
    assert torch.allclose(joined[:, :32], nn.functional.avg_pool2d(stride8, 2))
    # odd sizes: the pooled stride-8 map lands on the stride-16 grid
    with torch.no_grad():
        assert m.features(torch.randn(1, 3, 302, 310)).shape == (1, 128, 19, 20)
    # freezing counts blocks as for the local head; the slice of the trunk is only its blocks
    n = set_trainable(m, unfreeze_depth=2)
    assert n == _head_params(m) + sum(p.numel() for b in list(m.features)[12:] for p in b.parameters())
    assert head_name(m) == "multiscale" and head_name(build_model(weights="none", head="local")) == "local"
    assert head_name(build_model(weights="none")) == "global"


def test_local_head_keeps_only_the_stride16_trunk_of_imagenet_weights(tmp_path):
    ref = mobilenet_v2(weights=None)
    path = tmp_path / "w.pth"
    torch.save(ref.state_dict(), path)  # 19 blocks and a 1000-class classifier
    m = build_model(weights=str(path), head="local")
    assert torch.equal(m.features[13].conv[0][0].weight, ref.features[13].conv[0][0].weight)
    assert not any(k.startswith("features.14.") for k in m.state_dict())
    # its own layout (a local-head state dict) loads back whole, head included
    with torch.no_grad():
        for p in m.classifier.parameters():
            p.add_(1.0)  # a head no fresh initialisation could give
    own = build_model(weights=m.state_dict(), head="local")
    assert torch.equal(own.features[5].conv[0][0].weight, m.features[5].conv[0][0].weight)
    for k, v in m.classifier.state_dict().items():
        assert torch.equal(own.classifier.state_dict()[k], v), k
    # ImageNet's 1000-class head, and a head of another layout (5 members), start fresh
    assert build_model(weights=str(path), head="global").classifier[1].weight.shape == (1, 1280)
    other = build_model(weights=m.state_dict(), head="local", members=5)
    assert other.classifier[2].weight.shape[0] == 5 * 64
    glob = build_model(weights="none", head="global")
    with torch.no_grad():
        glob.classifier[1].weight.fill_(0.25)
    assert torch.equal(build_model(weights=glob.state_dict(), head="global").classifier[1].weight, glob.classifier[1].weight)


def test_local_head_freezing_and_errors():
    m = build_model(weights="none", head="local")
    n = set_trainable(m, unfreeze_depth=2)
    assert n == _head_params(m) + sum(p.numel() for b in list(m.features)[12:] for p in b.parameters())
    set_trainable(m, unfreeze_depth=LOCAL_TRUNK_BLOCKS)
    assert all(p.requires_grad for p in m.parameters())
    with pytest.raises(ValueError, match="0..14"):
        set_trainable(m, unfreeze_depth=15)
    with pytest.raises(ValueError, match="num_outputs"):
        build_model(weights="none", head="local", num_outputs=2)
    with pytest.raises(ValueError, match="head must be one of"):
        build_model(weights="none", head="patch")


def test_test_time_flip_keeps_the_stronger_artifact_evidence_in_eval_only():
    """With ``test_time_flip`` the model scores the image and its mirror in eval mode and
    returns the lower artifact-free logit; training sees the image alone."""
    torch.manual_seed(0)
    model = build_model(weights="none", head="multiscale", test_time_flip=True)
    x = torch.randn(3, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        both = model(x)
        model.test_time_flip = False
        plain, mirrored = model(x), model(x.flip(-1))
        model.test_time_flip = True
    assert both.shape == (3, 1)
    assert torch.equal(both, torch.minimum(plain, mirrored)) and not torch.equal(both, plain)
    model.train()
    torch.manual_seed(1)
    a = model(x)
    model.test_time_flip = False
    torch.manual_seed(1)
    assert torch.equal(a, model(x))  # same dropout draws: no mirror while training
    with pytest.raises(ValueError, match="test-time flip needs one of the heads"):
        build_model(weights="none", head="global", test_time_flip=True)


def test_head_members_learn_from_their_own_losses_and_are_averaged_in_eval():
    """Several per-cell classifiers: one logit each in training (each member's gradient comes
    from its own loss alone), their mean in eval; one member keeps the plain layout."""
    from artifact_core.train_loop import _weighted_bce

    torch.manual_seed(0)
    model = build_model(weights="none", head="multiscale", members=3)
    model.classifier[1].p = 0.0  # no dropout: the two backward passes below must see the same graph
    x, y = torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 1, 0])
    model.train()
    logits = model(x)
    assert logits.shape == (4, 3)
    # members differ (independent initialisation), so averaging them is not one model thrice
    assert not torch.allclose(logits[:, 0], logits[:, 1])
    weights = torch.tensor([2.0, 0.5])
    loss, _ = _weighted_bce(logits, y, weights)
    one, _ = _weighted_bce(logits[:, 1:2], y, weights)
    last = model.classifier[-1].weight
    g_all = torch.autograd.grad(loss, last, retain_graph=True)[0]
    g_one = torch.autograd.grad(one, last)[0]
    # the last (grouped) layer: member 1's weights see only member 1's loss, scaled by 1/3
    assert torch.allclose(g_all[1], g_one[1] / 3, atol=1e-6)
    assert torch.count_nonzero(g_one[0]) == 0 and torch.count_nonzero(g_one[2]) == 0
    model.eval()
    with torch.no_grad():
        out = model(x)
        cells = model.classifier(model.features(x)).flatten(2)
        k = max(1, int(model.top_fraction * cells.shape[2] + 0.5))
        per_member = -cells.topk(k, dim=2).values.mean(dim=2)
    assert out.shape == (4, 1) and torch.allclose(out, per_member.mean(dim=1, keepdim=True))
    assert model.evidence_map(x).shape == (4, 1, 4, 4)
    # one member: the state dict of the plain two-layer classifier (older bundles load)
    single = build_model(weights="none", head="multiscale")
    assert single.classifier[2].weight.shape == (64, 128, 1, 1) and single.classifier[4].weight.shape == (1, 64, 1, 1)
    assert model.classifier[2].weight.shape == (192, 128, 1, 1) and model.classifier[4].weight.shape == (3, 64, 1, 1)
    with pytest.raises(ValueError, match="a head ensemble needs one of the heads"):
        build_model(weights="none", head="global", members=2)
    with pytest.raises(ValueError, match="members must be at least 1"):
        build_model(weights="none", head="local", members=0)


@pytest.mark.parametrize("head", ["multiscale", "local", "global"])
def test_trunk_prefix_then_suffix_is_the_whole_trunk(head):
    """Phase 2 caches the frozen blocks' output and continues from it: for every split point
    the two halves give the trunk's own output."""
    torch.manual_seed(0)
    model = build_model(weights="none", head=head).eval()
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        whole = model.features(x)
        for stop in range(len(model.features) + 1):
            h, skip = model_mod.trunk_prefix(model.features, stop, x)
            assert (skip is not None) == (head == "multiscale" and stop > MULTISCALE_TAP_BLOCK)
            out = model_mod.trunk_suffix(model.features, stop, h, skip)
            assert torch.allclose(out, whole, atol=1e-5), (head, stop)
    if head == "multiscale":
        # the tap's map is kept pooled only where no later block changes the grid (block 7 halves it)
        assert model_mod.trunk_prefix(model.features, 8, x)[1].shape[-1] == 6
        assert model_mod.trunk_prefix(model.features, 7, x)[1].shape[-1] == 12


@pytest.mark.parametrize("head, depth, frozen", [("multiscale", 6, 8), ("multiscale", 0, 14),
                                                  ("local", 14, 0), ("global", 6, 13)])
def test_frozen_prefix_counts_the_blocks_phase_2_leaves_frozen(head, depth, frozen):
    model = build_model(weights="none", head=head)
    set_trainable(model, unfreeze_depth=depth)
    assert model_mod.frozen_prefix(model) == frozen


def _scores_vary(model: nn.Module, x: torch.Tensor) -> None:
    """Head BatchNorm statistics from ``x`` (one cumulative pass), so that scores differ per image."""
    model.classifier[0].momentum = None
    model.train()
    with torch.no_grad():
        model(x)
    model.classifier[0].momentum = 0.1


@pytest.mark.parametrize("flip", [False, True])
def test_trunk_in_passes_of_fewer_images_scores_as_the_whole_batch(flip):
    """On CPU the trunk runs a few images at a time (cpu_memory.images_per_pass): each image
    gets the score it gets in the whole batch, its mirror too."""
    torch.manual_seed(0)
    model = build_model(weights="bundled", head="multiscale", test_time_flip=flip, members=3, dropout=0.0)
    x = torch.randn(5, 3, 64, 64)
    _scores_vary(model, x)
    model.eval()
    with torch.no_grad():
        whole = model(x)
        model.images_per_pass = 2
        parts = model(x)
    assert float(whole.std()) > 1e-3, "scores do not vary: the comparison would prove nothing"
    assert torch.allclose(parts, whole, atol=1e-5)


def test_phase_2_step_in_passes_of_fewer_images_has_the_whole_batchs_gradients():
    """Phase 2 runs its frozen blocks (BatchNorm in eval) a few images at a time without
    autograd, the trainable ones on the whole batch: the same logits and gradients."""
    torch.manual_seed(0)
    model = build_model(weights="bundled", head="multiscale", members=2, dropout=0.0)
    x = torch.randn(6, 3, 64, 64)
    _scores_vary(model, x)
    set_trainable(model, unfreeze_depth=6)
    results = []
    for n in (0, 2):
        model.images_per_pass = n
        train_mode(model)  # unfrozen blocks' and the head's BatchNorm learn from the whole batch
        model.zero_grad()
        logits = model(x)
        logits.sum().backward()
        results.append((logits.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]))
    (whole, g_whole), (parts, g_parts) = results
    assert torch.allclose(parts, whole, atol=1e-5)
    assert len(g_whole) == len(g_parts) > 0
    assert all(torch.allclose(a, b, atol=1e-5, rtol=1e-4) for a, b in zip(g_parts, g_whole))


def test_only_blocks_that_treat_each_image_alone_run_in_parts():
    model = build_model(weights="none", head="multiscale")
    prefix = model_mod._batch_independent_prefix
    model.train()  # every BatchNorm learns from the batch
    assert prefix(model.features) == 0
    model.eval()
    with torch.no_grad():
        assert prefix(model.features) == len(model.features)
    assert prefix(model.features) == 0  # with grad: every block trains
    set_trainable(model, unfreeze_depth=6)
    train_mode(model)
    assert prefix(model.features) == len(model.features) - 6
