"""Lazy access to an adapter's tensor file: headers first (to validate before loading), tensors on demand."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import KTChatError

WEIGHT_NAMES = ("adapter_model.safetensors", "adapter_model.bin")
# safetensors' dtype names -> torch's, so every layout reports dtypes the same way
_ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn",
              "F8_E5M2": "float8_e5m2", "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
              "BOOL": "bool"}
ST_NAMES = {torch_name: st_name for st_name, torch_name in _ST_DTYPES.items()}


def describe(exc: BaseException) -> str:
    """One line about a library exception: its type and the first line of its message (torch's run to pages)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    return f"{type(exc).__name__}: {text[:300]}" if text else type(exc).__name__


class AdapterWeights:
    """Shapes and dtypes of every tensor in the file, and loading of chosen tensors, with clear errors."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._bin: dict[str, torch.Tensor] | None = None
        self._handle = None
        try:
            if self.path.suffix == ".safetensors":
                from safetensors import safe_open

                with safe_open(str(self.path), framework="pt") as f:
                    slices = {k: f.get_slice(k) for k in f.keys()}
                    self.shapes = {k: tuple(s.get_shape()) for k, s in slices.items()}
                    self.dtypes = {k: _ST_DTYPES.get(s.get_dtype(), s.get_dtype().lower()) for k, s in slices.items()}
            else:
                self._bin = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
                if not isinstance(self._bin, dict) or not all(isinstance(v, torch.Tensor) for v in self._bin.values()):
                    raise ValueError("not a state dict of tensors")
                self.shapes = {k: tuple(v.shape) for k, v in self._bin.items()}
                self.dtypes = {k: str(v.dtype).removeprefix("torch.") for k, v in self._bin.items()}
        except KTChatError:
            raise
        except Exception as exc:  # safetensors and torch.load raise many types on corrupt files
            raise KTChatError(f"{self.path}: cannot read adapter weights ({describe(exc)})") from None

    def _opened(self):
        """One open handle for all loads: a per-expert adapter is loaded in dozens of parts, and each opening
        parses the whole header again (~10,000 entries at DeepSeek-V2-Lite size)."""
        if self._handle is None:
            from safetensors import safe_open

            self._handle = safe_open(str(self.path), framework="pt").__enter__()
        return self._handle

    def load(self, keys) -> dict[str, torch.Tensor]:
        """Loads the named tensors on the CPU; refuses NaN or Inf, which would poison every output."""
        keys = list(keys)
        try:
            if self._bin is not None:
                out = {k: self._bin[k] for k in keys}
            else:
                f = self._opened()
                out = {k: f.get_tensor(k) for k in keys}
        except Exception as exc:
            raise KTChatError(f"{self.path}: cannot load adapter tensors ({describe(exc)})") from None
        for k, t in out.items():
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise KTChatError(f"{self.path}: tensor {k} holds NaN or Inf values")
        return out


def find_weight_file(adapter_dir: Path) -> Path:
    for name in WEIGHT_NAMES:
        if (Path(adapter_dir) / name).is_file():
            return Path(adapter_dir) / name
    raise KTChatError(f"{adapter_dir}: no adapter weights found (expected one of {', '.join(WEIGHT_NAMES)})")
