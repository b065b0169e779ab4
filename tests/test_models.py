"""SiT + LSEP probe: sizes, keys, the one-batch probe branch, crop-and-pool, gradients."""
import math

import numpy as np
import pytest
import torch

from models import SIT_SIZES, SiT, SiT_models
from models.sit import get_2d_sincos_pos_embed, pool_tokens


def tiny(**kw):
    cfg = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=4, num_heads=2,
               num_classes=5, encoder_depth=2, crop_start=2)
    cfg.update(kw)
    torch.manual_seed(0)
    model = SiT(**cfg)
    # Non-zero adaLN/output weights so every path carries signal (the init zeroes them).
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "adaLN_modulation" in name or "final_layer.linear" in name:
                p.normal_(0, 0.05)
    return model


def expected_param_count(depth, hidden, patch, in_ch=4, input_size=32, num_classes=1000, mlp_ratio=4):
    """Closed-form count: embedders, blocks, final layer, probe."""
    tokens = (input_size // patch) ** 2
    mlp = int(hidden * mlp_ratio)
    x_emb = in_ch * patch * patch * hidden + hidden
    t_emb = 256 * hidden + hidden + hidden * hidden + hidden
    y_emb = (num_classes + 1) * hidden
    pos = tokens * hidden
    block = (hidden * 3 * hidden + 3 * hidden) + (hidden * hidden + hidden) \
        + (hidden * mlp + mlp) + (mlp * hidden + hidden) + (hidden * 6 * hidden + 6 * hidden)
    final = hidden * patch * patch * in_ch + patch * patch * in_ch + hidden * 2 * hidden + 2 * hidden
    probe = 2 * hidden + hidden * num_classes + num_classes
    return x_emb + t_emb + y_emb + pos + depth * block + final, probe


@pytest.mark.parametrize("name", sorted(SiT_models))
def test_param_counts_of_every_config(name):
    size, patch = name[len("SiT-"):].split("/")
    depth, hidden, heads = SIT_SIZES[size]
    with torch.device("meta"):
        model = SiT_models[name](input_size=32, num_classes=1000)
    backbone, probe = expected_param_count(depth, hidden, int(patch))
    total = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for p in model.classifier.parameters()) == probe
    assert total == backbone + probe
    assert len(model.blocks) == depth and model.blocks[0].attn.num_heads == heads


def test_sit_xl2_is_675m_plus_probe():
    with torch.device("meta"):
        model = SiT_models["SiT-XL/2"](input_size=32, num_classes=1000)
    backbone = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("classifier"))
    assert backbone == 675_111_184  # DiT-XL/2's 675,129,632 minus the learned-sigma output channels
    assert sum(p.numel() for p in model.classifier.parameters()) == 1152 * 2 + 1152 * 1000 + 1000


def test_sit_s_runs_forward_and_backward():
    model = SiT_models["SiT-S/2"](input_size=8, num_classes=10, crop_start=2).train()
    v, logits = model(torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2]))
    (v.square().mean() + logits.logsumexp(1).mean()).backward()
    assert v.shape == (2, 4, 8, 8) and logits.shape == (2, 10)


def test_state_dict_keys_match_the_authors_layout():
    model = tiny(qk_norm=True)
    keys = set(model.state_dict())
    expected = {"pos_embed", "x_embedder.proj.weight", "x_embedder.proj.bias",
                "t_embedder.mlp.0.weight", "t_embedder.mlp.0.bias", "t_embedder.mlp.2.weight",
                "t_embedder.mlp.2.bias", "y_embedder.embedding_table.weight",
                "final_layer.linear.weight", "final_layer.linear.bias",
                "final_layer.adaLN_modulation.1.weight", "final_layer.adaLN_modulation.1.bias",
                "classifier.0.weight", "classifier.0.bias", "classifier.1.weight", "classifier.1.bias"}
    for i in range(4):
        for part in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "adaLN_modulation.1", "attn.q_norm", "attn.k_norm"):
            expected |= {f"blocks.{i}.{part}.weight", f"blocks.{i}.{part}.bias"}
    assert keys == expected
    assert model.y_embedder.embedding_table.weight.shape == (6, 32)  # null row at index num_classes
    assert not model.pos_embed.requires_grad


def test_pos_embed_closed_form():
    emb = get_2d_sincos_pos_embed(8, 3)  # quarter width 2: frequencies 1 and 1/100
    row, col = 2, 1
    token = emb[row * 3 + col]
    expect = [math.sin(col), math.sin(col / 100), math.cos(col), math.cos(col / 100),
              math.sin(row), math.sin(row / 100), math.cos(row), math.cos(row / 100)]
    np.testing.assert_allclose(token, expect, rtol=1e-6, atol=1e-7)


def test_timestep_embedding_closed_form():
    from models.sit import TimestepEmbedder
    emb = TimestepEmbedder.timestep_embedding(torch.tensor([0.5]), 4, max_period=10000)
    freqs = [1.0, 10000 ** -0.5]
    expect = [math.cos(0.5 * f) for f in freqs] + [math.sin(0.5 * f) for f in freqs]
    torch.testing.assert_close(emb[0], torch.tensor(expect), rtol=1e-6, atol=1e-7)


def two_pass_reference(model, x, t, y_main, y_probe, window):
    """The authors' structure: the probe branch as a second pass, crop by a per-sample loop."""
    tokens = model.x_embedder(x) + model.pos_embed
    t_emb = model.t_embedder(t)
    c = t_emb + model.y_embedder(y_main)
    c_probe = t_emb + model.y_embedder(y_probe)
    h, h_probe, logits = tokens, tokens.clone(), None
    for i, block in enumerate(model.blocks):
        h = block(h, c)
        if i < model.encoder_depth:
            h_probe = block(h_probe, c_probe)
            if i + 1 == model.encoder_depth:
                logits = model.classifier(loop_pool(h_probe, window))
    out = model.unpatchify(model.final_layer(h, c))
    return out, logits


def loop_pool(tokens, window):
    batch, num_tokens, dim = tokens.shape
    grid = math.isqrt(num_tokens)
    grid_tokens = tokens.view(batch, grid, grid, dim)
    if window is None:
        return tokens.float().mean(1)
    size, top, left = (w.tolist() for w in window)
    return torch.stack([
        grid_tokens[b, top[b]:top[b] + size[b], left[b]:left[b] + size[b]].reshape(-1, dim).float().mean(0)
        for b in range(batch)
    ])


def test_batched_probe_branch_equals_two_pass_reference():
    model = tiny().train()
    torch.manual_seed(1)
    x, t = torch.randn(6, 4, 8, 8), torch.rand(6)
    y = torch.randint(0, 5, (6,))
    y_probe = torch.where(torch.rand(6) < 0.5, torch.full_like(y, 5), y)
    window = model.sample_crop_window(6, "cpu")

    out, logits = model.forward_conditioned(x, t, y, y_probe, window)
    (out.square().mean() + logits.square().mean()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    ref_out, ref_logits = two_pass_reference(model, x, t, y, y_probe, window)
    (ref_out.square().mean() + ref_logits.square().mean()).backward()

    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-6)
    ref_grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_vectorised_crop_pool_equals_per_sample_loop():
    torch.manual_seed(0)
    tokens = torch.randn(7, 36, 5, dtype=torch.float16)
    for size in (1, 3, 6):
        s = torch.full((7,), size)
        top = torch.randint(0, 6 - size + 1, (7,))
        left = torch.randint(0, 6 - size + 1, (7,))
        window = (s, top, left)
        torch.testing.assert_close(pool_tokens(tokens, window), loop_pool(tokens, window), rtol=1e-6, atol=1e-6)
    assert pool_tokens(tokens).dtype == torch.float32
    torch.testing.assert_close(pool_tokens(tokens), tokens.float().mean(1))


def test_crop_windows_stay_inside_the_grid_and_cover_the_range():
    model = tiny(input_size=16, crop_start=3, crop_end=6)  # grid 8, sides 3..5
    torch.manual_seed(0)
    sizes, corners = set(), set()
    for _ in range(300):
        size, top, left = model.sample_crop_window(16, "cpu")
        assert (size == size[0]).all()  # one side per step
        assert ((top >= 0) & (left >= 0) & (top + size <= 8) & (left + size <= 8)).all()
        sizes.add(int(size[0]))
        corners |= {(int(s), int(a)) for s, a in zip(size, top)}
    assert sizes == {3, 4, 5}
    assert corners == {(s, a) for s in (3, 4, 5) for a in range(8 - s + 1)}


def test_crop_off_at_or_above_grid_and_too_large_window_refused():
    assert tiny(crop_start=4).crop_start is None  # grid side 4: crop off, pool all tokens
    assert tiny(crop_start=None).sample_crop_window(2, "cpu") is None
    assert tiny(crop_start=2).crop_end == 5  # default end = grid + 1
    with pytest.raises(ValueError, match=r"larger than the 4x4 token grid.*--crop-end <= 5"):
        tiny(crop_start=2, crop_end=7)
    with pytest.raises(ValueError, match="--crop-start"):
        tiny(crop_start=3, crop_end=3)
    with pytest.raises(ValueError, match="--encoder-depth"):
        tiny(encoder_depth=5)


def test_probe_gradient_reaches_only_blocks_up_to_encoder_depth():
    model = tiny().train()
    torch.manual_seed(2)
    x, t, y = torch.randn(4, 4, 8, 8), torch.rand(4), torch.randint(0, 5, (4,))
    _, logits = model.forward_conditioned(x, t, y, y, model.sample_crop_window(4, "cpu"))
    torch.nn.functional.cross_entropy(logits, y).backward()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        got = p.grad is not None and p.grad.abs().sum() > 0
        after = name.startswith(("final_layer",)) or any(name.startswith(f"blocks.{i}.") for i in (2, 3))
        if after:
            assert not got, f"probe gradient leaked into {name}"
        elif name.startswith(("blocks.0.", "blocks.1.", "classifier", "x_embedder", "t_embedder.mlp.2")):
            assert got, f"no probe gradient in {name}"


def test_eval_velocity_does_not_depend_on_the_probe():
    model = tiny()
    torch.manual_seed(3)
    x, t, y = torch.randn(4, 4, 8, 8), torch.rand(4), torch.randint(0, 5, (4,))
    with torch.no_grad():
        v_plain, none = model.eval()(x, t, y)
        v_probe, logits = model.forward_conditioned(x, t, y, torch.full_like(y, 5), model.sample_crop_window(4, "cpu"))
    assert none is None and logits.shape == (4, 5)
    torch.testing.assert_close(v_plain, v_probe, rtol=1e-5, atol=1e-6)


def test_training_label_dropout_rates():
    model = tiny(class_dropout_prob=0.1, uncond_prob=0.9)
    torch.manual_seed(0)
    y = torch.zeros(20000, dtype=torch.long)
    assert abs((model.y_embedder.drop(y, 0.1) == 5).float().mean().item() - 0.1) < 0.01
    assert abs((model.y_embedder.drop(y, 0.9) == 5).float().mean().item() - 0.9) < 0.01
    assert torch.equal(model.y_embedder.drop(y, 0.0), y)


def test_pooled_block_features_match_forward_tokens():
    model = tiny().eval()
    x, t, y = torch.randn(3, 4, 8, 8), torch.rand(3), torch.tensor([0, 1, 2])
    feats = model.pooled_block_features(x, t, y)
    assert len(feats) == 4 and feats[0].shape == (3, 32)
    with torch.no_grad():
        _, logits = model.forward_conditioned(x, t, y, y, None)
    torch.testing.assert_close(model.classifier(feats[1]), logits, rtol=1e-5, atol=1e-6)


def test_baseline_switch_runs_no_probe_branch():
    model = tiny(probe=False).train()
    torch.manual_seed(0)
    v, logits = model(torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([0, 1]))
    assert logits is None and v.shape == (2, 4, 8, 8)
    assert set(model.state_dict()) == set(tiny().state_dict())
    v.square().mean().backward()  # the classifier is frozen: no parameter is left without a gradient
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert not any(p.requires_grad for p in model.classifier.parameters())


def test_authors_constructor_keywords():
    model = SiT_models["SiT-S/2"](input_size=8, num_classes=10, use_cfg=True, path_type="linear",
                                  random_crop_kwargs=[True, 2, 4])
    assert (model.crop_start, model.crop_end) == (2, 4)
    off = SiT_models["SiT-S/2"](input_size=8, num_classes=10, random_crop_kwargs=[False, 2, 4])
    assert off.crop_start is None
    with pytest.raises(TypeError, match="unexpected keyword"):
        SiT_models["SiT-S/2"](input_size=8, num_classes=10, crop_size=3)


def test_grad_checkpoint_gives_equal_loss_and_gradients():
    """--grad-checkpoint recomputes block activations in the backward pass: same numbers, probe branch included."""
    from loss import LSEPLoss

    torch.manual_seed(0)
    model = SiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=3, num_heads=2, num_classes=10,
                encoder_depth=2, crop_start=2)
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    x, y = torch.randn(4, 4, 8, 8), torch.randint(0, 10, (4,))
    loss_fn = LSEPLoss(weights_type="steps", weight_start=0.1, weight_end=0.3)
    results = []
    for checkpointed in (False, True):
        model.grad_checkpoint = checkpointed
        model.zero_grad()
        torch.manual_seed(1)
        terms = loss_fn(model.train(), x, dict(y=y))
        denoising, probe = terms.denoising, terms.probe
        (denoising.mean() + probe).backward()
        results.append((denoising.detach(), probe.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                                             if p.grad is not None}))
    (d0, p0, g0), (d1, p1, g1) = results
    assert torch.equal(d0, d1) and torch.equal(p0, p1) and g0.keys() == g1.keys() and len(g0) > 20
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=0, atol=1e-7, msg=name)
    assert g0["blocks.0.attn.qkv.weight"].abs().sum() > 0 and g0["classifier.1.weight"].abs().sum() > 0
