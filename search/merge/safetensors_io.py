"""Reading and writing safetensors one tensor at a time, with bounded memory.

Reads use positioned file reads into a fresh buffer (no memory map whose pages pile
up in the resident set); writes lay out each shard's header up front from the known
shapes and then stream tensor bytes, so only the tensor being written is in memory.

Example:
    >>> import torch, tempfile, pathlib
    >>> tmp = tempfile.TemporaryDirectory()
    >>> d = pathlib.Path(tmp.name)
    >>> w = ShardedWriter(d, [("a", torch.float32, (2,))], max_shard_bytes=1 << 20)
    >>> w.write("a", torch.ones(2)); w.close()
    >>> SafetensorsFile(d / w.files[0]).read("a")
    tensor([1., 1.])
    >>> tmp.cleanup()
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from io import BufferedReader, BufferedWriter
from pathlib import Path

import torch
from torch import Tensor

from search.errors import SoupError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
    "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
    "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
INDEX_NAME = "model.safetensors.index.json"


class SafetensorsFormatError(SoupError):
    """A safetensors file is truncated, corrupt or holds an unsupported dtype."""


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in a safetensors file."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


class SafetensorsFile:
    """The header of one safetensors file and positioned reads of its tensors."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        with open(self.path, "rb") as fh:
            raw = fh.read(8)
            size = self.path.stat().st_size
            (n,) = struct.unpack("<Q", raw) if len(raw) == 8 else (size,)
            if n > size - 8:
                raise SafetensorsFormatError(f"{self.path} is not a safetensors file "
                                             "(truncated header); re-save the model")
            try:
                header = json.loads(fh.read(n))
            except (ValueError, UnicodeDecodeError):
                raise SafetensorsFormatError(f"{self.path} has a corrupt safetensors header; "
                                             "re-save the model") from None
        header.pop("__metadata__", None)
        self.tensors: dict[str, TensorInfo] = {}
        for name, meta in header.items():
            if meta["dtype"] not in DTYPES:
                raise SafetensorsFormatError(
                    f"{self.path}: tensor {name} has dtype {meta['dtype']}, which soupsearch "
                    f"cannot merge; supported: {', '.join(DTYPES)}"
                )
            lo, hi = meta["data_offsets"]
            if 8 + n + hi > size:
                raise SafetensorsFormatError(f"{self.path}: tensor {name} lies past the end "
                                             "of the file (truncated download?)")
            self.tensors[name] = TensorInfo(self.path, DTYPES[meta["dtype"]],
                                            tuple(meta["shape"]), 8 + n + lo, 8 + n + hi)
        self._fh: BufferedReader | None = None

    def read(self, name: str) -> Tensor:
        """Reads one tensor into new CPU memory."""
        info = self.tensors[name]
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        if self._fh is None:
            self._fh = open(self.path, "rb")  # noqa: SIM115 - kept open across reads
        buf = bytearray(info.nbytes)
        self._fh.seek(info.start)
        got = self._fh.readinto(buf)
        if got != info.nbytes:
            raise SafetensorsFormatError(f"{self.path}: truncated data for tensor {name}")
        return torch.frombuffer(buf, dtype=info.dtype).reshape(info.shape)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def _nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n * torch.empty((), dtype=dtype).element_size()


class ShardedWriter:
    """Writes tensors, in the order given, into shards of at most ``max_shard_bytes``.

    ``close()`` writes ``model.safetensors.index.json``. Tensors must arrive in the
    declared order with the declared dtype and shape.
    """

    def __init__(self, folder: Path, specs: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 max_shard_bytes: int) -> None:
        self.folder = Path(folder)
        shards: list[list[tuple[str, torch.dtype, tuple[int, ...]]]] = [[]]
        size = 0
        for spec in specs:
            nb = _nbytes(spec[1], spec[2])
            if shards[-1] and size + nb > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(spec)
            size += nb
        total = len(shards)
        self.files = [f"model-{i + 1:05d}-of-{total:05d}.safetensors" for i in range(total)]
        self._shards = shards
        self._order = [(i, s) for i, shard in enumerate(shards) for s in shard]
        self._pos = 0
        self._open: int | None = None
        self._fh: BufferedWriter | None = None
        self.total_size = sum(_nbytes(s[1], s[2]) for s in specs)

    def _start_shard(self, i: int) -> None:
        if self._fh is not None:
            self._fh.close()
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, dtype, shape in self._shards[i]:
            nb = _nbytes(dtype, shape)
            header[name] = {"dtype": NAMES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + nb]}
            offset += nb
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        self._fh = open(self.folder / self.files[i], "wb")  # noqa: SIM115
        self._fh.write(struct.pack("<Q", len(text)))
        self._fh.write(text)
        self._open = i

    def write(self, name: str, tensor: Tensor) -> None:
        """Appends the next tensor's bytes."""
        shard, (want, dtype, shape) = self._order[self._pos]
        if name != want or tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
            raise ValueError(f"writer expected {want} {dtype} {shape}, got {name} "
                             f"{tensor.dtype} {tuple(tensor.shape)}")
        if self._open != shard:
            self._start_shard(shard)
        assert self._fh is not None
        if tensor.numel():
            data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
            self._fh.write(data.numpy().data)
        self._pos += 1

    def abort(self) -> None:
        """Closes the open shard without finishing (the caller removes the folder)."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def close(self) -> None:
        """Finishes the last shard and writes the index."""
        if self._pos != len(self._order):
            raise ValueError(f"writer closed after {self._pos} of {len(self._order)} tensors")
        if self._open is None and self._order:
            self._start_shard(0)
        if self._fh is not None:
            self._fh.flush()
            self._fh.close()
            self._fh = None
        weight_map = {s[0]: self.files[i] for i, s in self._order}
        index = {"metadata": {"total_size": self.total_size}, "weight_map": weight_map}
        (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
