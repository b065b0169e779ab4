"""Checkpoint I/O: round trips, the formats of other codebases, clear errors, atomic writes."""
import argparse
import os

import pytest
import torch

from models import SiT
from models.checkpoint import (CheckpointError, atomic_save, extract_state_dict, load_checkpoint_file,
                               load_model_weights, load_state_into)


def make(hidden=32, **kw):
    torch.manual_seed(kw.pop("seed", 0))
    return SiT(input_size=8, patch_size=2, in_channels=4, hidden_size=hidden, depth=2, num_heads=2,
               num_classes=5, encoder_depth=1, **kw)


def randomize(model):
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    return model


def assert_same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_round_trip_of_our_format_strict(tmp_path):
    model, ema = randomize(make()), randomize(make(seed=1))
    path = tmp_path / "0000100.pt"
    atomic_save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": {}, "steps": 100,
                 "args": argparse.Namespace(model="SiT-B/2", seed=0)}, str(path))
    fresh = make(seed=5)
    report = load_model_weights(fresh, str(path), which="ema", strict=True)
    assert report.summary() == "all keys matched"
    assert_same(fresh, ema)
    load_model_weights(fresh, str(path), which="model", strict=True)
    assert_same(fresh, model)
    assert load_checkpoint_file(str(path))["args"].model == "SiT-B/2"


def test_bare_state_dict_and_wrapper_prefixes(tmp_path):
    model = randomize(make())
    wrapped = {f"module._orig_mod.{k}": v for k, v in model.state_dict().items()}
    torch.save(wrapped, tmp_path / "bare.pt")
    fresh = make(seed=3)
    load_model_weights(fresh, str(tmp_path / "bare.pt"), strict=True)
    assert_same(fresh, model)


def test_official_sit_and_repa_checkpoints_load_with_a_report(tmp_path):
    model = randomize(make())
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("classifier")}
    torch.save({"ema": state}, tmp_path / "sit.pt")  # SiT: no probe head
    repa = dict(state, **{"projectors.0.0.weight": torch.zeros(3, 32), "projectors.0.0.bias": torch.zeros(3)})
    torch.save({"model": repa, "ema": repa, "opt": {}, "args": argparse.Namespace(), "steps": 4}, tmp_path / "repa.pt")

    fresh = make(seed=4)
    init_classifier = fresh.classifier[1].weight.clone()
    report = load_model_weights(fresh, str(tmp_path / "sit.pt"))
    assert sorted(report.missing) == ["classifier.0.bias", "classifier.0.weight", "classifier.1.bias", "classifier.1.weight"]
    assert report.unexpected == [] and "missing 4 keys" in report.summary()
    assert torch.equal(fresh.classifier[1].weight, init_classifier)
    assert torch.equal(fresh.blocks[1].attn.qkv.weight, model.blocks[1].attn.qkv.weight)

    report = load_model_weights(fresh, str(tmp_path / "repa.pt"))
    assert report.ignored == ["projectors.0.0.weight", "projectors.0.0.bias"] and report.unexpected == []
    with pytest.raises(CheckpointError, match="by name.*missing 4 keys"):
        load_model_weights(fresh, str(tmp_path / "repa.pt"), strict=True)


def test_wrong_model_size_gives_one_clear_line(tmp_path):
    torch.save({"ema": make(hidden=64).state_dict()}, tmp_path / "big.pt")
    with pytest.raises(CheckpointError) as err:
        load_model_weights(make(hidden=32), str(tmp_path / "big.pt"))
    msg = str(err.value)
    assert "\n" not in msg
    assert "pos_embed expected (1, 16, 32), found (1, 16, 64)" in msg and "--model" in msg


def test_unreadable_and_missing_files(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint_file(str(tmp_path / "nope.pt"))
    good = tmp_path / "good.pt"
    torch.save({"ema": make().state_dict()}, good)
    bad = tmp_path / "truncated.pt"
    bad.write_bytes(good.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint_file(str(bad))
    with pytest.raises(CheckpointError, match="no state dict"):
        extract_state_dict({"steps": 3})


def test_atomic_save_leaves_previous_file_on_crash(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    atomic_save({"steps": 1, "w": torch.ones(3)}, str(path))
    real_save = torch.save

    def crash(obj, f):
        real_save(obj, f)
        f.write(b"partial")
        raise KeyboardInterrupt("killed mid-write")
    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        atomic_save({"steps": 2, "w": torch.zeros(3)}, str(path))
    monkeypatch.setattr(torch, "save", real_save)
    assert load_checkpoint_file(str(path))["steps"] == 1
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # no temporary left behind


def test_other_models_keys_are_refused_unless_optional():
    model = make()
    state = make().state_dict()
    deeper = dict(state, **{"blocks.2.attn.qkv.bias": torch.ones(96)})
    with pytest.raises(CheckpointError, match="does not fit this model by name.*unexpected 1 keys"):
        load_state_into(model, deeper)
    shallower = {k: v for k, v in state.items() if not k.startswith("blocks.1.")}
    with pytest.raises(CheckpointError, match="does not fit this model by name.*missing"):
        load_state_into(model, shallower)


def test_checkpoint_model_kwargs_from_namespace_or_dict():
    from models.checkpoint import checkpoint_args, checkpoint_model_kwargs
    kwargs = {"depth": 2, "hidden_size": 32}
    assert checkpoint_model_kwargs({"args": argparse.Namespace(model_kwargs=kwargs)}) == kwargs
    assert checkpoint_model_kwargs({"args": {"model_kwargs": kwargs}}) == kwargs
    assert checkpoint_model_kwargs({"args": argparse.Namespace(model="SiT-XL/2")}) is None
    assert checkpoint_model_kwargs({"ema": {}}) is None
    assert checkpoint_args({"args": argparse.Namespace(num_classes=7)}, "num_classes") == 7


def test_checkpoints_load_from_many_threads_at_once(tmp_path):
    """The Namespace allow-list is process-wide, not a context manager that threads could undo for each other."""
    from concurrent.futures import ThreadPoolExecutor

    path = str(tmp_path / "c.pt")
    atomic_save({"ema": {"w": torch.arange(4.0)}, "args": argparse.Namespace(model="SiT-S/2"), "steps": 3}, path)
    with ThreadPoolExecutor(8) as pool:
        loaded = list(pool.map(lambda _: load_checkpoint_file(path), range(64)))
    assert all(c["args"].model == "SiT-S/2" and torch.equal(c["ema"]["w"], torch.arange(4.0)) for c in loaded)
