"""4-bit evaluation models: in-place writes, accuracy, memory, and actionable errors."""

from __future__ import annotations

import os
import sys
from typing import Any

import pytest
import torch

from search.errors import SoupError
from search.merge.quant import (
    QuantizationUnavailableError,
    QuantizedLinears,
    check_backend,
    quantize_model,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
CPU = torch.device("cpu")


def _llama(seed: int, tie: bool = False) -> Any:
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, tie_word_embeddings=tie)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).eval().requires_grad_(False)


def _load(model: Any, q: QuantizedLinears, state: dict[str, torch.Tensor]) -> None:
    """What ResidentModel does per candidate: 4-bit names via write, the rest via copy_."""
    targets = model.state_dict()
    with torch.no_grad():
        for name, value in state.items():
            if name in q.names:
                q.write(name, value)
            else:
                targets[name].copy_(value)


def _logits(model: Any, seed: int = 0) -> torch.Tensor:
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


@pytest.fixture
def bnb() -> Any:
    return pytest.importorskip("bitsandbytes")


def test_unknown_scheme_names_the_valid_ones() -> None:
    with pytest.raises(QuantizationUnavailableError, match=r"int3.*'nf4', 'fp4'"):
        check_backend("int3", CPU)


def test_missing_bitsandbytes_names_the_pip_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import raises ImportError
    fix = r"pip install 'soupsearch\[quant\]'.*evaluator\.quantize=null"
    with pytest.raises(QuantizationUnavailableError, match=fix):
        check_backend("nf4", CPU)
    with pytest.raises(QuantizationUnavailableError, match=fix):
        quantize_model(torch.nn.Sequential(torch.nn.Linear(64, 64)), "nf4")


def test_unusable_device_names_device_version_and_fix(bnb: Any,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    where = rf"bitsandbytes {bnb.__version__} cannot run nf4 4-bit matmuls on meta .*"
    with pytest.raises(QuantizationUnavailableError, match=where + "evaluator.quantize=null"):
        check_backend("nf4", torch.device("meta"))
    # A kernel that runs but computes garbage is refused too, never used silently.
    monkeypatch.setattr(bnb, "matmul_4bit", lambda x, w, quant_state: torch.zeros(
        x.shape[0], 64, device=x.device))
    with pytest.raises(QuantizationUnavailableError, match="returns wrong fp4 4-bit matmuls"):
        check_backend("fp4", CPU)


@pytest.mark.parametrize(("scheme", "double_quant", "bound"),
                         [("nf4", False, 0.15), ("nf4", True, 0.15), ("fp4", False, 0.20)])
def test_written_model_matches_fp32(bnb: Any, scheme: str, double_quant: bool,
                                    bound: float) -> None:
    import bitsandbytes.functional as bnb_f

    ref, model = _llama(0), _llama(1)
    q = quantize_model(model, scheme, double_quant=double_quant)
    state = ref.state_dict()
    _load(model, q, state)
    for name in q.names:
        w = state[name]
        expected = bnb_f.dequantize_4bit(*bnb_f.quantize_4bit(
            w, quant_type=scheme, compress_statistics=double_quant))
        assert torch.equal(q.read(name), expected), name
    # Gaussian weights lose ~9.7% (nf4) / ~12.8% (fp4) of their norm to 4 bits; measured
    # over 8 seeds the logits then differ by at most 12.2% / 17.2% (a random, unwritten
    # model differs by ~140%), so these bounds catch any wrong block, scale or layout.
    a, b = _logits(ref), _logits(model)
    assert float((a - b).norm() / a.norm()) < bound


def test_writes_are_in_place_real_and_deterministic(bnb: Any) -> None:
    ref, other, model = _llama(0), _llama(2), _llama(1)
    q = quantize_model(model, "nf4", double_quant=True)
    layer = model.model.layers[0].self_attn.q_proj
    name = "model.layers.0.self_attn.q_proj.weight"
    state = layer.weight.quant_state
    ptrs = (layer.weight.data_ptr(), state.absmax.data_ptr(), state.offset.data_ptr(),
            state.state2.absmax.data_ptr())
    nbytes = q.nbytes
    _load(model, q, ref.state_dict())
    first = _logits(model)
    for _ in range(20):  # many candidates: the same buffers, no growth
        _load(model, q, other.state_dict())
        _load(model, q, ref.state_dict())
    assert torch.equal(_logits(model), first)
    assert layer.weight.quant_state is state and q.nbytes == nbytes
    assert (layer.weight.data_ptr(), state.absmax.data_ptr(), state.offset.data_ptr(),
            state.state2.absmax.data_ptr()) == ptrs
    q.write(name, other.state_dict()[name])
    assert not torch.allclose(_logits(model), first)


def test_nbytes_is_under_a_quarter_of_fp32(bnb: Any) -> None:
    model = _llama(0)
    fp32 = sum(model.get_submodule(n.removesuffix(".weight")).weight.numel() * 4
               for n, m in model.named_modules() if isinstance(m, torch.nn.Linear))
    q = quantize_model(model, "nf4")
    assert len(q.names) == 14  # 7 projections x 2 layers; not the LM head
    assert 0 < q.nbytes < fp32 / 4


@pytest.mark.parametrize("tie", [False, True])
def test_head_embeddings_and_skipped_modules_stay_full_precision(bnb: Any, tie: bool) -> None:
    model = _llama(0, tie=tie)
    q = quantize_model(model, "nf4", skip=("lm_head", "mlp.down_proj"))
    assert not any("lm_head" in n or "embed" in n or "down_proj" in n for n in q.names)
    assert len(q.names) == 12
    assert type(model.lm_head) is torch.nn.Linear
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tie
    before = _logits(model)
    with torch.no_grad():  # the other parameters remain plain copy_ targets
        model.state_dict()["model.norm.weight"].copy_(torch.full((64,), 2.0))
    assert not torch.allclose(_logits(model), before)


def test_bias_storage_survives_another_compute_dtype(bnb: Any) -> None:
    import transformers

    cfg = transformers.Qwen2Config(vocab_size=64, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=2)
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(cfg).eval()
    q = quantize_model(model, "nf4", compute_dtype=torch.bfloat16)
    bias = model.state_dict()["model.layers.0.self_attn.q_proj.bias"]
    before = _logits(model)
    assert model.model.layers[0].self_attn.q_proj.bias.data_ptr() == bias.data_ptr()
    with torch.no_grad():
        bias.copy_(torch.full_like(bias, 3.0))
    assert not torch.allclose(_logits(model), before)
    assert "model.layers.0.self_attn.q_proj.bias" not in q.names


def test_greedy_generate_runs(bnb: Any) -> None:
    ref, model = _llama(0), _llama(1)
    q = quantize_model(model, "nf4")
    _load(model, q, ref.state_dict())
    ids = torch.tensor([[1, 5, 9, 13]])
    kwargs = {"attention_mask": torch.ones_like(ids), "max_new_tokens": 6,
              "do_sample": False, "pad_token_id": 0}
    out = model.generate(ids, **kwargs)
    assert out.shape == (1, 10) and torch.equal(out[:, :4], ids)
    assert torch.equal(model.generate(ids, **kwargs), out)


def test_bad_writes_and_models_fail_clearly(bnb: Any) -> None:
    import transformers

    model = _llama(0)
    q = quantize_model(model, "nf4")
    with pytest.raises(SoupError, match=r"\[64, 32\].*q_proj.weight of shape \[64, 64\]"):
        q.write("model.layers.0.self_attn.q_proj.weight", torch.zeros(64, 32))
    with pytest.raises(SoupError, match=r"model\.norm\.weight is not held in 4 bits"):
        q.write("model.norm.weight", torch.zeros(64))
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=64, n_embd=32, n_layer=1, n_head=2, n_positions=32))
    with pytest.raises(QuantizationUnavailableError, match=r"no torch\.nn\.Linear.*Conv1D"):
        quantize_model(gpt2, "nf4")
