"""Where the non-expert modules live: one device, or a device map that spreads whole decoder layers over several
GPUs. Routed experts are not module parameters (they live in the CPU backends), so a map never sees them."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import KTChatError


def resolve_device(device) -> torch.device:
    """`device` as load_model takes it (None or "auto": cuda where there is one), checked against the GPUs this
    process sees: a typo or a GPU that is not there is one line naming `device`, not a CUDA error midway."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return _parse_device("device", device, device, " (use cpu, cuda, cuda:N or auto)")


def _parse_device(what: str, value, shown, hint: str = "") -> torch.device:
    """`value` (a device string or a GPU index) as a cpu or visible cuda device; errors name `what`."""
    try:
        device = torch.device(f"cuda:{value}" if isinstance(value, int) and not isinstance(value, bool) else value)
    except (RuntimeError, TypeError):
        raise KTChatError(f"{what}: {value!r} is not a device{hint}") from None
    if device.type not in ("cpu", "cuda"):
        raise KTChatError(f"{what}: {value!r}: only cpu and cuda devices are supported")
    if device.type == "cuda":
        _check_visible(f"{what}: {shown or device}", device)
    return device


def _visible_gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _check_visible(what: str, device: torch.device) -> None:
    gpus = _visible_gpus()
    if gpus == 0:
        raise KTChatError(f"{what}: no CUDA device is visible (torch.cuda.is_available() is False); use cpu")
    if (device.index or 0) >= gpus:
        seen = "cuda:0" if gpus == 1 else f"cuda:0 to cuda:{gpus - 1}"
        raise KTChatError(f"{what} is not a visible CUDA device ({gpus} visible: {seen})")


def check_devices(device, device_map=None, cuda_graphs=None) -> tuple:
    """Everything about placement that is known from the arguments alone, checked before anything is read:
    `device` parses and exists, device and device_map do not clash, and cuda_graphs: true gets its one GPU.
    Returns (device, device_map) as plan_placement takes them: device="auto" with several visible GPUs spreads
    the layers (device_map "auto"); a lone device resolved (None or "auto": cuda where there is one)."""
    spread = device_map is None and device == "auto" and _visible_gpus() >= 2
    if device_map is not None and device not in (None, "auto"):
        raise KTChatError(f"give device or device_map, not both (device={device!r})")
    _check_map(device_map)
    resolved = None if device_map is not None or spread else resolve_device(device)
    obstacle = cuda_graphs and _graph_obstacle(device, device_map, spread)
    if obstacle:
        raise KTChatError(f"cuda_graphs: true needs every non-expert weight on one CUDA device ({obstacle}); "
                          "set cuda_graphs: false or leave it out")
    return resolved, "auto" if spread else device_map


def _check_map(device_map) -> None:
    """A device map's values, or its name: "auto" and "balanced" spread the layers over the visible GPUs."""
    if isinstance(device_map, dict):
        for name, value in device_map.items():
            _device(name, value)
    elif isinstance(device_map, str) and device_map not in ("auto", "balanced"):
        raise KTChatError(f"device_map must be 'auto', 'balanced' or a dict of module -> device, got {device_map!r}")
    elif isinstance(device_map, str) and _visible_gpus() == 0:
        raise KTChatError(f"device_map={device_map!r} spreads layers over GPUs, but no CUDA device is visible")


def _graph_obstacle(device, device_map, spread: bool) -> str | None:
    """Why the non-expert weights will not sit on one GPU, or None."""
    if _visible_gpus() == 0:
        return "no CUDA device is visible"
    if spread:
        return f"device: auto spreads the layers over the {_visible_gpus()} visible GPUs"
    if device_map is None:
        return None if resolve_device(device).type == "cuda" else f"device is {device}"
    if isinstance(device_map, str):
        return f"device_map={device_map!r} spreads them over {_visible_gpus()} GPUs" if _visible_gpus() > 1 else None
    devices = sorted({str(_device(name, value)) for name, value in device_map.items()})
    one_gpu = len(devices) == 1 and devices[0].startswith("cuda")
    return None if one_gpu else f"device_map puts them on {', '.join(devices)}"


def plan_placement(model: nn.Module, devices: tuple, dtype: torch.dtype):
    """A device, or {module name: device}, from check_devices' (device, device_map): device_map "auto" or
    "balanced" spreads whole decoder layers over the visible GPUs; a dict is checked and used as given."""
    device, device_map = devices
    if device_map is None:
        return device
    if isinstance(device_map, str):  # "auto" or "balanced" (check_devices)
        gpus = range(torch.cuda.device_count())
        device_map = balanced_device_map(model, {i: torch.cuda.mem_get_info(i)[0] for i in gpus}, dtype)
    return checked_device_map(model, device_map)


def balanced_device_map(model: nn.Module, max_memory: dict[int, int], dtype: torch.dtype) -> dict[str, int]:
    """Whole decoder layers (and the modules around them), in order, over the GPUs in max_memory: each unit goes to
    the GPU whose equal share of the bytes holds its midpoint; tied output embeddings join the input embeddings.

    Not accelerate's balanced map: that one reserves a largest-layer buffer per GPU, and with the routed experts
    gone from the MoE layers a dense layer can be the largest by far (tiny DeepSeek-V3: all of it fit GPU 0's share).
    """
    from accelerate.utils import compute_module_sizes

    sizes = compute_module_sizes(model, dtype=dtype)
    units = _units(model, set(getattr(model, "_no_split_modules", None) or []))
    gpus, total, done = sorted(max_memory), max(1, sum(sizes[u] for u in units)), 0
    device_map = {}
    for unit in units:
        device_map[unit] = gpus[min(len(gpus) - 1, int(len(gpus) * (done + sizes[unit] / 2) / total))]
        done += sizes[unit]
    if getattr(model.config, "tie_word_embeddings", False):  # tied at load time (loader._tie_or_fail): one device
        names = {id(m): n for n, m in model.named_modules()}
        owner = [next(u for u in units if n == u or n.startswith(u + "."))
                 for n in (names[id(model.get_input_embeddings())], names[id(model.get_output_embeddings())])]
        device_map[owner[1]] = device_map[owner[0]]
    for gpu in gpus:
        need = sum(sizes[u] for u, d in device_map.items() if d == gpu)
        if need > max_memory[gpu]:
            raise KTChatError(f"the non-expert weights do not fit the GPUs' free memory (GPU {gpu} would need "
                              f"{need / 2**30:.1f} GiB, has {max_memory[gpu] / 2**30:.1f}); free memory or pass "
                              "a device_map")
    return device_map


def _units(module: nn.Module, no_split: set[str], prefix: str = "") -> list[str]:
    """Module names that move as one: no-split classes (decoder layers), leaves, modules with tensors of their own."""
    children = list(module.named_children())
    own = next(module.parameters(recurse=False), None) is not None or next(module.buffers(recurse=False), None) is not None
    if prefix and (type(module).__name__ in no_split or not children or own):
        return [prefix]
    return [u for name, child in children for u in _units(child, no_split, f"{prefix}.{name}" if prefix else name)]


def checked_device_map(model: nn.Module, device_map: dict) -> dict[str, torch.device]:
    """{module: device} with every value a usable cpu/cuda device and every parameter covered."""
    if not isinstance(device_map, dict) or not device_map:
        raise KTChatError(f"device_map must be a non-empty dict of module name -> device, got {device_map!r}")
    out = {}
    for name, value in device_map.items():
        out[name] = _device(name, value)
        if name:
            try:
                model.get_submodule(name)
            except AttributeError:
                raise KTChatError(f"device_map: {name!r} is not a module of the model") from None
    where_is = placement_of(out)
    for pname, _ in model.named_parameters():
        where_is(pname)
    return out


def _device(name: str, value) -> torch.device:
    return _parse_device(f"device_map[{name!r}]", value, None, " (no offloading: cpu, cuda or cuda:N)")


def placement_of(placement):
    """tensor name -> device: the device of the longest module prefix in the map."""
    if not isinstance(placement, dict):
        return lambda name: placement
    prefixes = sorted(placement, key=len, reverse=True)

    def where_is(name: str) -> torch.device:
        for p in prefixes:
            if p == "" or name == p or name.startswith(p + "."):
                return placement[p]
        raise KTChatError(f"device_map has no device for {name}")

    return where_is


def dispatch(model: nn.Module, placement) -> None:
    """With a device map: accelerate's hooks move activations to each mapped module's device (weights are already
    there), and the outputs back to the inputs' device. Values are torch.device objects, never the string "cpu",
    which accelerate and PEFT would read as CPU offloading."""
    if not isinstance(placement, dict):
        return
    from accelerate import dispatch_model

    main = placement_of(placement)(next(name for name, _ in model.named_parameters()))
    dispatch_model(model, device_map=placement, main_device=main, force_hooks=True,
                   skip_keys=getattr(model, "_skip_keys_device_placement", None))


def describe(placement) -> str:
    if not isinstance(placement, dict):
        return str(placement)
    counts: dict[str, int] = {}
    for device in placement.values():
        counts[str(device)] = counts.get(str(device), 0) + 1
    return ", ".join(f"{d} ({n} modules)" for d, n in counts.items())
