"""4-bit (NF4/FP4) evaluation models whose weights are rewritten in place per candidate.

The merge is computed in full precision, tensor by tensor; only the resident evaluation
model holds its linear layers in 4 bits. :func:`quantize_model` swaps every
``torch.nn.Linear`` of a transformers model for a bitsandbytes ``Linear4bit`` once;
:meth:`QuantizedLinears.write` then quantizes a merged ``[out, in]`` weight straight into
that layer's packed buffer and block scales with ``copy_``, so thousands of candidates
allocate nothing that outlives one write. bitsandbytes is imported here only, lazily.

After :func:`quantize_model` the model's ``state_dict()`` holds packed ``uint8`` tensors
(plus ``.absmax``/``.quant_map`` entries) under the names in :attr:`QuantizedLinears.names`:
route those names to :meth:`QuantizedLinears.write` and take the ``copy_`` targets of every
other parameter (embeddings, norms, LM head, biases) from a ``state_dict()`` taken after.

Example:
    >>> import transformers
    >>> cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128,
    ...                                num_hidden_layers=1, num_attention_heads=4)
    >>> model = transformers.LlamaForCausalLM(cfg).eval()
    >>> q = quantize_model(model, "nf4")
    >>> q.write("model.layers.0.mlp.up_proj.weight", torch.zeros(128, 64))
    >>> float(q.read("model.layers.0.mlp.up_proj.weight").abs().max())
    0.0
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from search.errors import SoupError, one_line

SCHEMES = ("nf4", "fp4")
BLOCKSIZE = 64  # bitsandbytes' default for quantize_4bit and Linear4bit
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class QuantizationUnavailableError(SoupError):
    """A 4-bit scheme is unknown, or bitsandbytes is missing or cannot run on the device."""


def _import_bnb(scheme: str) -> Any:
    try:
        import bitsandbytes
    except ImportError:
        raise QuantizationUnavailableError(
            f"evaluator.quantize={scheme} needs bitsandbytes: pip install 'soupsearch[quant]' "
            "(or bitsandbytes>=0.46), or set evaluator.quantize=null") from None
    except Exception as e:  # a broken install can raise anything at import time
        raise QuantizationUnavailableError(
            f"evaluator.quantize={scheme}: bitsandbytes fails to import "
            f"({type(e).__name__}: {_first_line(e)}); reinstall it with "
            "pip install -U 'bitsandbytes>=0.46', or set evaluator.quantize=null") from None
    return bitsandbytes


def _check_scheme(scheme: str) -> str:
    if scheme not in SCHEMES:
        raise QuantizationUnavailableError(
            f"unknown evaluator.quantize={scheme!r}; use one of {list(SCHEMES)} or null")
    return scheme


def _first_line(e: BaseException) -> str:
    return one_line(e, empty="no message")


def check_backend(scheme: str, device: torch.device | str) -> None:
    """Fails unless bitsandbytes can quantize and multiply in ``scheme`` on ``device``.

    It really quantizes a small matrix on the device (with plain and double-quantized
    scales) and runs 4-bit matmuls (one row, as in generation, and a batch), compared
    with the dequantized weight. There is no silent fallback to full precision.

    Args:
        scheme: ``nf4`` or ``fp4``.
        device: the evaluation model's device.

    Raises:
        QuantizationUnavailableError: unknown scheme, bitsandbytes missing or unusable here.

    Example:
        >>> check_backend("nf4", torch.device("cpu"))
    """
    bnb = _import_bnb(_check_scheme(scheme))
    import bitsandbytes.functional as bnb_f

    dev = torch.device(device)
    version = getattr(bnb, "__version__", "?")
    fix = (f"install a bitsandbytes build that supports {dev.type} "
           "(pip install -U 'bitsandbytes>=0.46'), or set evaluator.quantize=null")
    gen = torch.Generator().manual_seed(0)
    w, x = torch.randn(64, 128, generator=gen), torch.randn(3, 128, generator=gen)
    for nested in (False, True):  # plain and double-quantized block scales
        try:
            packed, state = bnb_f.quantize_4bit(w.to(dev), blocksize=BLOCKSIZE,
                                                quant_type=scheme, compress_statistics=nested)
            xd = x.to(dev)
            got = torch.cat([bnb.matmul_4bit(xd[:1], packed, quant_state=state),
                             bnb.matmul_4bit(xd, packed, quant_state=state)]).float().cpu()
            ref = (xd @ bnb_f.dequantize_4bit(packed, state).t()).float().cpu()
        except Exception as e:
            raise QuantizationUnavailableError(
                f"bitsandbytes {version} cannot run {scheme} 4-bit matmuls on {dev} "
                f"({type(e).__name__}: {_first_line(e)}); {fix}") from None
        expected = torch.cat([ref[:1], ref])
        ok = got.shape == expected.shape
        err = float((got - expected).abs().max()) if ok else float("nan")
        if not err <= 1e-2 * float(expected.abs().max()):
            raise QuantizationUnavailableError(
                f"bitsandbytes {version} returns wrong {scheme} 4-bit matmuls on {dev} "
                f"(max error {err:.3g}); {fix}")


class QuantizedLinears:
    """The 4-bit linear layers of one model, rewritable in place.

    Built by :func:`quantize_model`; not meant to be constructed directly.

    Attributes:
        scheme: ``nf4`` or ``fp4``.
        names: the state-dict names of the weights now held in 4 bits, e.g.
            ``model.layers.0.self_attn.q_proj.weight``.
    """

    def __init__(self, scheme: str, layers: dict[str, Any]) -> None:
        self.scheme = scheme
        self._layers = layers
        # The exact storages every write goes into; a mismatch means someone replaced them.
        self._packed = {n: layer.weight.data for n, layer in layers.items()}
        self._states = {n: layer.weight.quant_state for n, layer in layers.items()}
        self.names: frozenset[str] = frozenset(layers)

    def _layer(self, name: str) -> Any:
        layer = self._layers.get(name)
        if layer is None:
            raise SoupError(f"tensor {name} is not held in 4 bits; write it with copy_ "
                            "into the model's state_dict() instead")
        w = layer.weight
        if (w.data_ptr() != self._packed[name].data_ptr() or w.quant_state
                is not self._states[name] or getattr(w.quant_state, "packing_format_for_cpu",
                                                     False)):
            raise SoupError(f"the 4-bit storage of {name} was replaced (model moved with "
                            ".to() or repacked); call quantize_model again after moving it")
        return layer

    def write(self, name: str, value: Tensor) -> None:
        """Quantizes ``value`` into ``name``'s existing 4-bit buffers, in place.

        Args:
            name: a state-dict name from :attr:`names`.
            value: the full-precision weight, shape ``[out_features, in_features]``, in
                float32, bfloat16 or float16 (quantized as given, without a cast first).

        Raises:
            SoupError: unknown name, wrong shape or dtype, or storage replaced.
        """
        import bitsandbytes.functional as bnb_f

        self._layer(name)
        state = self._states[name]
        if tuple(value.shape) != tuple(state.shape):
            raise SoupError(f"cannot write a {list(value.shape)} tensor into 4-bit weight "
                            f"{name} of shape {list(state.shape)}")
        if value.dtype not in FLOAT_DTYPES:
            raise SoupError(f"cannot quantize {name} from {value.dtype}; pass float32, "
                            "bfloat16 or float16")
        packed, new = bnb_f.quantize_4bit(
            value.to(self._packed[name].device).contiguous(), blocksize=state.blocksize,
            compress_statistics=state.nested, quant_type=state.quant_type,
            quant_storage=self._packed[name].dtype)
        with torch.no_grad():
            self._packed[name].copy_(packed)
            state.absmax.copy_(new.absmax)
            if state.nested:
                state.offset.copy_(new.offset)
                state.state2.absmax.copy_(new.state2.absmax)

    def read(self, name: str) -> Tensor:
        """Dequantizes ``name`` to its original dtype and ``[out, in]`` shape (a new tensor)."""
        import bitsandbytes.functional as bnb_f

        self._layer(name)
        return bnb_f.dequantize_4bit(self._packed[name], self._states[name])

    @property
    def nbytes(self) -> int:
        """Bytes of the packed weights plus their quantization states (scales, code books)."""
        total = 0
        for name, state in self._states.items():
            parts = [self._packed[name], state.absmax, state.code]
            if state.nested:
                parts += [state.offset, state.state2.absmax, state.state2.code]
            total += sum(t.numel() * t.element_size() for t in parts)
        return total


def _matches(name: str, skip: Sequence[str]) -> bool:
    return any(name == s or name.endswith("." + s) for s in skip)


def _targets(model: torch.nn.Module, skip: Sequence[str]) -> dict[str, torch.nn.Linear]:
    """The ``nn.Linear`` modules to quantize (untied, not skipped), checked before any swap."""
    uses: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    found = {n: m for n, m in model.named_modules()
             if type(m) is torch.nn.Linear and m is not head and not _matches(n, skip)
             and uses[id(m.weight)] == 1}
    if not found:
        raise QuantizationUnavailableError(
            f"{type(model).__name__} has no torch.nn.Linear layer to quantize (GPT-2 style "
            "Conv1D layers are not supported); set evaluator.quantize=null")
    for n, m in found.items():
        if m.weight.dtype not in FLOAT_DTYPES or m.weight.device.type == "meta":
            raise QuantizationUnavailableError(
                f"cannot quantize {n}.weight ({m.weight.dtype} on {m.weight.device}); build "
                "the model in float32, bfloat16 or float16 on a real device first")
    return found


def _swap(bnb: Any, model: torch.nn.Module, name: str, old: torch.nn.Linear, scheme: str,
          compute_dtype: torch.dtype | None, double_quant: bool) -> Any:
    import bitsandbytes.functional as bnb_f

    w = old.weight.detach()
    cdt = compute_dtype or w.dtype
    new = bnb.nn.Linear4bit(old.in_features, old.out_features, bias=old.bias is not None,
                            compute_dtype=cdt, compress_statistics=double_quant,
                            quant_type=scheme, device="meta")
    packed, state = bnb_f.quantize_4bit(w.contiguous(), blocksize=BLOCKSIZE,
                                        compress_statistics=double_quant, quant_type=scheme)
    new.weight = bnb.nn.Params4bit(packed, requires_grad=False, quant_state=state,
                                   blocksize=BLOCKSIZE, compress_statistics=double_quant,
                                   quant_type=scheme, module=new, bnb_quantized=True)
    new.quant_state = state
    # On AVX512-BF16 CPUs, forward would repack the weight into new tensors on first use,
    # orphaning the buffers that write() fills: keep bitsandbytes' standard layout.
    new.support_avx512bf16_for_cpu = False
    if old.bias is not None:
        # forward() replaces bias.data when its dtype differs from compute_dtype; cast now
        # so the Parameter the caller copy_()s into stays the one forward reads.
        old.bias.data = old.bias.data.to(cdt)
        new.bias = old.bias
    new.train(old.training)
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, new)
    return new


def quantize_model(model: torch.nn.Module, scheme: str, *,
                   compute_dtype: torch.dtype | None = None, skip: Sequence[str] = ("lm_head",),
                   double_quant: bool = False) -> QuantizedLinears:
    """Replaces the model's ``torch.nn.Linear`` layers by 4-bit ``Linear4bit``, in place.

    Left in full precision: modules whose qualified name equals a ``skip`` entry or ends
    with ``"." + entry``; the output embeddings (LM head), tied or not; any Linear whose
    weight is shared with another module; embeddings, norms and every non-``nn.Linear``
    module, including the transposed ``Conv1D`` of GPT-2 style models (so such models
    gain little). Biases stay ordinary parameters, cast to ``compute_dtype``. The
    current weights are quantized, so the model runs before the first write.

    Args:
        model: a model on its final device (CPU or CUDA), in float32/bfloat16/float16.
        scheme: ``nf4`` or ``fp4``.
        compute_dtype: the dtype the 4-bit layers compute in (default: each layer's
            original weight dtype). bfloat16 or float16 on CPU trade accuracy for speed.
        skip: module names (suffixes at a ``.`` boundary) to keep in full precision.
        double_quant: also quantize the block scales to 8 bits (bitsandbytes'
            ``compress_statistics``): ~0.37 fewer bits per weight, slightly slower writes.

    Returns:
        The quantized layers, to write candidates into and to report memory.

    Raises:
        QuantizationUnavailableError: see :func:`check_backend`; or a weight that cannot
            be quantized (meta device, integer or float64 dtype).

    Example:
        >>> q = quantize_model(model, "nf4")                      # doctest: +SKIP
        >>> q.write("model.layers.0.mlp.up_proj.weight", merged)  # doctest: +SKIP
    """
    if compute_dtype is not None and compute_dtype not in FLOAT_DTYPES:
        raise QuantizationUnavailableError(
            f"compute_dtype {compute_dtype} is not supported by 4-bit layers; use "
            "float32, bfloat16 or float16")
    bnb = _import_bnb(_check_scheme(scheme))
    targets = _targets(model, skip)
    for dev in sorted({str(m.weight.device) for m in targets.values()}):
        check_backend(scheme, torch.device(dev))
    layers = {f"{n}.weight": _swap(bnb, model, n, m, scheme, compute_dtype, double_quant)
              for n, m in targets.items()}
    return QuantizedLinears(scheme, layers)
