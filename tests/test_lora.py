"""LoRA: only adapters train, the merged model equals base + adapters, adapters save/load separately."""
from __future__ import annotations

import pytest
import torch

from pyllm.checkpoint import load_checkpoint
from pyllm.lora import (DEFAULT_TARGETS, adapter_state_dict, apply_lora, load_adapter, merge_lora, merged_state_dict,
                        save_adapter)
from pyllm.sft import plain_copy, save_stage

from chat_util import tiny_model


def _randomize_adapters(model, rng):
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=rng) * 0.1)


def test_only_adapters_train_and_count(capsys):
    model, _ = tiny_model()
    c = model.config
    n = apply_lora(model, r=4, alpha=8)
    kv = c.n_kv_heads * c.head_dim
    per_layer = 4 * ((c.dim + c.dim) + (c.dim + kv) * 2 + (c.dim + c.dim)) + \
        4 * (c.dim + c.hidden_dim) * 3
    assert n == c.n_layers * per_layer
    assert "trainable params" in capsys.readouterr().out
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    idx = torch.randint(0, c.vocab_size, (2, 10))
    _, loss = model(idx, targets=idx)
    loss.backward()
    assert all(p.grad is None for name, p in model.named_parameters() if "lora_" not in name)


def test_merged_equals_base_plus_adapters(tmp_path, rng):
    model, tok = tiny_model(seed=3)
    base_sd = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, r=3, alpha=5, verbose=False)
    _randomize_adapters(model, rng)
    idx = torch.randint(0, model.config.vocab_size, (2, 17), generator=rng)
    with torch.no_grad():
        want = model(idx)[0]
    # the merged weights are exactly W + alpha/r * B @ A for every target, the rest untouched (this only checked
    # that the targets changed: a scale of alpha for alpha/r passed)
    merged = merged_state_dict(model)
    assert set(merged) == set(base_sd)
    hand = {}
    for k, v in merged.items():
        if k.rsplit(".", 2)[-2] in DEFAULT_TARGETS:
            lora = model.get_submodule(k[:-len(".weight")]).parametrizations.weight[0]
            hand[k] = base_sd[k] + (5 / 3) * lora.lora_B.detach() @ lora.lora_A.detach()
            torch.testing.assert_close(v, hand[k], rtol=1e-5, atol=1e-6)
            assert not torch.allclose(v, base_sd[k])
        else:
            hand[k] = base_sd[k]
            assert torch.equal(v, base_sd[k]), k
    assert len([k for k in merged if k.rsplit(".", 2)[-2] in DEFAULT_TARGETS]) == 7 * model.config.n_layers
    # the adapted (unmerged) forward is the plain model with those hand-merged weights, and one projection alone is
    # x W^T + (alpha/r) x A^T B^T
    plain, _ = tiny_model(seed=3)
    plain.load_state_dict(hand)
    with torch.no_grad():
        torch.testing.assert_close(plain(idx)[0], want, rtol=1e-4, atol=1e-5)
        q = model.layers[0].self_attn.q_proj
        x = torch.randn(4, model.config.dim, generator=rng)
        A, B = q.parametrizations.weight[0].lora_A, q.parametrizations.weight[0].lora_B
        W = q.parametrizations.weight.original
        torch.testing.assert_close(x @ q.weight.T, x @ W.T + (5 / 3) * (x @ A.T) @ B.T, rtol=1e-5, atol=1e-5)
    # the saved checkpoint (what export sees) has the merged weights and gives the same logits
    save_stage(tmp_path / "ck", model, tok, step=1)
    loaded, _ = load_checkpoint(tmp_path / "ck")
    with torch.no_grad():
        got = loaded(idx)[0]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert (tmp_path / "ck" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "ck" / "adapter_config.json").is_file()
    # base + the saved adapter reproduces the adapted model too; merge_lora in place as well
    fresh, _ = tiny_model(seed=3)
    load_adapter(fresh, tmp_path / "ck")
    with torch.no_grad():
        torch.testing.assert_close(fresh(idx)[0], want, rtol=1e-4, atol=1e-5)
    merge_lora(fresh)
    assert not any("lora_" in n for n, _ in fresh.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(fresh(idx)[0], want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(plain_copy(model).state_dict()["layers.0.self_attn.q_proj.weight"],
                               merged["layers.0.self_attn.q_proj.weight"])


def test_adapter_names_are_peft_style(tmp_path):
    model, _ = tiny_model()
    apply_lora(model, r=2, targets="q_proj,v_proj", verbose=False)
    names = sorted(adapter_state_dict(model))
    assert names[0].startswith("base_model.model.model.layers.0.self_attn.q_proj.lora_A")
    assert len(names) == 2 * 2 * model.config.n_layers
    save_adapter(tmp_path, model)
    assert '"target_modules"' in (tmp_path / "adapter_config.json").read_text()
    # PEFT's file name (SAFETENSORS_WEIGHTS_NAME): pyllm wrote adapter.safetensors before session 30, which
    # PeftModel.from_pretrained does not look for; that old name is still read
    assert sorted(f.name for f in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    (tmp_path / "adapter_model.safetensors").rename(tmp_path / "adapter.safetensors")
    fresh, _ = tiny_model()
    load_adapter(fresh, tmp_path)
    for (n, a), (n2, b) in zip(sorted(adapter_state_dict(model).items()), sorted(adapter_state_dict(fresh).items())):
        assert n == n2 and torch.equal(a, b)


def test_bad_targets_and_rank():
    model, _ = tiny_model()
    with pytest.raises(ValueError, match="unknown module"):
        apply_lora(model, r=2, targets="q_proj,nope")
    with pytest.raises(ValueError, match=r"--lora-r must be >= 1, got 0"):
        apply_lora(model, r=0)
    # session 15: were errors from deep inside (2.5, "4", targets=5) or accepted (alpha NaN: a NaN model)
    for kw, exc, pattern in ((dict(r=2.5), TypeError, "--lora-r: expected an integer"),
                             (dict(r="4"), TypeError, "--lora-r: expected an integer"),
                             (dict(r=2, alpha=float("nan")), ValueError, "--lora-alpha must be a finite number"),
                             (dict(r=2, alpha="x"), TypeError, "--lora-alpha: expected a number"),
                             (dict(r=2, targets=5), TypeError, "--lora-targets: expected module names")):
        with pytest.raises(exc, match=pattern):
            apply_lora(model, **kw)
    assert not any(p.requires_grad is False for p in model.parameters())  # nothing was frozen by a refused call
    apply_lora(model, r=2, verbose=False)
    with pytest.raises(ValueError, match="already has adapters"):  # stacked a second adapter that saving dropped
        apply_lora(model, r=3, verbose=False)


def test_save_adapter_without_adapters_writes_nothing(tmp_path):
    """Session 30 audit: an AttributeError ('_lora_config') after an empty adapter file had been written."""
    model, _ = tiny_model()
    with pytest.raises(ValueError, match="save_adapter: the model has no LoRA adapters"):
        save_adapter(tmp_path / "a", model)
    assert not (tmp_path / "a").exists()


def test_a_corrupt_saved_adapter_is_one_line_naming_its_file(tmp_path):
    """Found by a mutation fuzz of adapter files (`sft --resume` of a LoRA run): lora_alpha null was float()'s
    TypeError traceback, target_modules 5 parse_targets' TypeError traceback, lora_alpha true a silent alpha of 1;
    an adapter tensor the config does not name was dropped without a word, an int32 one copied in truncated."""
    import json

    from pyllm.safetensors_io import load_file, save_file
    model, _ = tiny_model()
    apply_lora(model, r=2, targets="q_proj", verbose=False)
    save_adapter(tmp_path, model)
    cfg_path, st_path = tmp_path / "adapter_config.json", tmp_path / "adapter_model.safetensors"
    good_cfg, good_st = json.loads(cfg_path.read_text()), load_file(st_path)
    for key, value, pattern in (("lora_alpha", None, "lora_alpha is null, expected the number"),
                                ("lora_alpha", True, "--lora-alpha: expected a number, got True"),
                                ("r", 2.0, "--lora-r: expected an integer, got 2.0"),
                                ("target_modules", 5, "--lora-targets: expected module names"),
                                ("target_modules", ["q_proj", None], "--lora-targets: expected module names")):
        cfg_path.write_text(json.dumps({**good_cfg, key: value}))
        with pytest.raises(ValueError, match=pattern) as e:
            load_adapter(tiny_model()[0], tmp_path)
        assert str(e.value).startswith(f"{cfg_path}: ") and "\n" not in str(e.value)
    cfg_path.write_text(json.dumps(good_cfg))
    k_proj = {k.replace("q_proj", "k_proj"): v for k, v in good_st.items()}  # trained on more modules than named
    name = next(k for k in good_st if k.endswith("lora_A.weight"))
    for tensors, pattern in (({**good_st, **k_proj}, "unexpected adapter tensor base_model.model.model.layers.0."
                                                     "self_attn.k_proj.lora_A.weight"),
                             ({**good_st, name: good_st[name].to(torch.int32)},
                              f"adapter tensor {name} has dtype torch.int32, expected a float tensor")):
        save_file(tensors, st_path)
        with pytest.raises(ValueError, match=pattern) as e:
            load_adapter(tiny_model()[0], tmp_path)
        assert str(e.value).startswith(f"{st_path}: "), e.value


def test_merging_a_copy_leaves_the_original_working(rng):
    """merge_lora(copy.deepcopy(model)): a deep copy shares torch's generated ParametrizedLinear classes, and removing
    the parametrization deleted the `weight` property from the shared class: the original model's every forward
    then failed with "'ParametrizedLinear' object has no attribute 'weight'"."""
    import copy
    model, _ = tiny_model(seed=4)
    apply_lora(model, r=2, verbose=False)
    _randomize_adapters(model, rng)
    idx = torch.randint(0, model.config.vocab_size, (1, 6), generator=rng)
    before = model(idx)[0]
    merged = merge_lora(copy.deepcopy(model))
    torch.testing.assert_close(model(idx)[0], before, rtol=0, atol=0)
    torch.testing.assert_close(merged(idx)[0], before, rtol=1e-5, atol=1e-5)
    merge_lora(model)  # and the original still merges
    torch.testing.assert_close(model(idx)[0], before, rtol=1e-5, atol=1e-5)
