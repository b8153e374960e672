"""retain.integrations.transformers: a small randomly initialised model of each gated-delta-rule
family (built from its config, nothing downloaded) gives the same logits, gradients and greedy
generation (chunked prefill with the cache's initial_state, then one-token decodes) patched and
unpatched, the patched functions really run retain's kernel, other devices keep the original
path, and revert restores everything."""

from __future__ import annotations

import importlib

import pytest
import torch

transformers = pytest.importorskip("transformers")

import retain.integrations.transformers as integ  # noqa: E402
from tests.helpers import assert_close  # noqa: E402

LINEAR = dict(linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=8, linear_value_head_dim=8,
              linear_conv_kernel_dim=4)
COMMON = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
              head_dim=16, intermediate_size=64, max_position_embeddings=256,
              layer_types=["linear_attention", "full_attention"])


def qwen3_next():
    cfg = transformers.Qwen3NextConfig(**COMMON, **LINEAR, num_experts=4, num_experts_per_tok=2,
                                       moe_intermediate_size=32, shared_expert_intermediate_size=32)
    return transformers.Qwen3NextForCausalLM(cfg)


MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32)


def _family(family: str, config: str, model: str, **extra):
    """A small random model of ``family`` from its config classes (transformers.models.<family>)."""
    def build():
        c = importlib.import_module(f"transformers.models.{family}.configuration_{family}")
        m = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
        return getattr(m, model)(getattr(c, config)(**COMMON, **LINEAR, **extra))
    return build


MODELS = {
    "qwen3_next": qwen3_next,
    "qwen3_5": _family("qwen3_5", "Qwen3_5TextConfig", "Qwen3_5ForCausalLM"),
    "qwen3_5_moe": _family("qwen3_5_moe", "Qwen3_5MoeTextConfig", "Qwen3_5MoeForCausalLM", **MOE),
    "olmo_hybrid": _family("olmo_hybrid", "OlmoHybridConfig", "OlmoHybridForCausalLM", pad_token_id=0,
                           eos_token_id=1),
    "lara_mini": _family("lara_mini", "LaraMiniConfig", "LaraMiniForCausalLM", **MOE, eos_token_id=1),
}
# qwen4_exp (an experimental architecture with further required settings) is checked at the
# function level only, as every family is in test_every_familys_functions_equal_the_originals


@pytest.fixture(autouse=True)
def _unpatched():
    integ.revert()
    yield
    integ.revert()


def _run(model, x):
    model.zero_grad(set_to_none=True)
    out = model(x, labels=x)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", list(MODELS))
def test_logits_gradients_and_generation_equal_the_unpatched_model(family, monkeypatch):
    torch.manual_seed(0)
    model = MODELS[family]().float()
    x = torch.randint(0, 64, (2, 37))
    logits, grads = _run(model, x)
    gen = model.generate(x[:, :9], max_new_tokens=6, do_sample=False)

    calls = []
    real = integ.chunk_gated_delta_rule
    monkeypatch.setattr(integ, "chunk_gated_delta_rule", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    assert family in integ.apply_retain_kernels([family])
    logits2, grads2 = _run(model, x)
    assert calls and calls[0][1] == 37, "the patched model did not call retain's kernel"
    assert_close(logits2, logits)
    assert grads2.keys() == grads.keys()
    for name in grads:
        assert_close(grads2[name], grads[name], msg=name)
    calls.clear()
    gen2 = model.generate(x[:, :9], max_new_tokens=6, do_sample=False)
    assert torch.equal(gen2, gen)
    assert any(shape[1] == 1 for shape in calls), "decoding did not run retain's kernel one token at a time"


@pytest.mark.parametrize("family", integ.FAMILIES)
def test_every_familys_functions_equal_the_originals(family):
    module = integ._module(family)
    originals = {name: getattr(module, name) for name in integ.FUNCTIONS}
    integ.apply_retain_kernels([family])
    gen = torch.Generator().manual_seed(1)
    B, T, H, HV, K, V = 2, 9, 2, 4, 8, 6
    q, k = torch.randn(B, T, H, K, generator=gen), torch.randn(B, T, H, K, generator=gen)
    v = torch.randn(B, T, HV, V, generator=gen)
    g, beta = -torch.rand(B, T, HV, generator=gen), torch.rand(B, T, HV, generator=gen)
    S0 = torch.randn(B, HV, K, V, generator=gen) * 0.1
    for name, original in originals.items():
        patched = getattr(module, name)
        assert patched.retain_patched
        want = original(q, k, v, g=g, beta=beta, initial_state=S0, output_final_state=True,
                        use_qk_l2norm_in_kernel=True)
        got = patched(q, k, v, g=g, beta=beta, initial_state=S0, output_final_state=True, use_qk_l2norm_in_kernel=True)
        assert_close(got[0], want[0], msg=f"{family}.{name} o")
        assert_close(got[1], want[1], msg=f"{family}.{name} state")


def test_other_devices_keep_the_original_path_and_revert_restores(monkeypatch):
    module = integ._module("qwen3_next")
    original = module.torch_chunk_gated_delta_rule
    integ.apply_retain_kernels(["qwen3_next"])
    integ.apply_retain_kernels(["qwen3_next"])  # twice: still one layer of patching
    patched = module.torch_chunk_gated_delta_rule
    assert patched is not original and patched.retain_patched and patched.__wrapped__ is original
    monkeypatch.setattr(integ, "_served", lambda device: False)
    monkeypatch.setattr(integ, "chunk_gated_delta_rule", lambda *a, **k: pytest.fail("retain ran for a device it "
                                                                                     "does not serve"))
    q = torch.randn(1, 5, 1, 4)
    o, _ = patched(q, q, torch.randn(1, 5, 2, 4), g=-torch.rand(1, 5, 2), beta=torch.rand(1, 5, 2))
    assert o.shape == (1, 5, 2, 4)
    integ.revert()
    assert module.torch_chunk_gated_delta_rule is original


def test_unknown_family_is_refused():
    with pytest.raises(ValueError, match=r"apply_retain_kernels: families must be among .*got \['llama'\]"):
        integ.apply_retain_kernels(["llama"])
