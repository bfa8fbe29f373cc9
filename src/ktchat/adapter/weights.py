"""Lazy access to an adapter's tensor file: headers first (to validate before loading), tensors on demand."""

from __future__ import annotations

from pathlib import Path

import torch

from ..formats.checkpoint import read_header
from ..errors import KTChatError

WEIGHT_NAMES = ("adapter_model.safetensors", "adapter_model.bin")


def describe(exc: BaseException) -> str:
    """One line about a library exception: its type and the first line of its message (torch's run to pages)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    return f"{type(exc).__name__}: {text[:300]}" if text else type(exc).__name__


class AdapterWeights:
    """Shapes and dtypes of every tensor in the file, and loading of chosen tensors, with clear errors.

    Dtypes are torch's names ("bfloat16") for either file type, or the safetensors name where torch has none.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self._bin: dict[str, torch.Tensor] | None = None
        self._handle = None
        try:
            if self.path.suffix == ".safetensors":
                tensors = read_header(self.path).tensors
                self.shapes = {k: tensors[k].shape for k in sorted(tensors)}
                self.dtypes = {k: tensors[k].dtype.torch_name or tensors[k].dtype.name for k in sorted(tensors)}
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
