"""Lists that must agree where one cannot simply be derived from the other (two layers, or a torch-free side and a
torch side): each test fails the moment one drifts."""

from __future__ import annotations

import types
from dataclasses import fields

import pytest

from ktchat import formats
from ktchat.config import EXPERTS_BACKENDS, KT_METHODS, MOE_LORA_MODES, ModelArgs

# load_model settings that no YAML key sets: a dict of module -> device is Python's
PYTHON_ONLY = {"device_map"}


def test_model_args_stand_for_every_load_setting():
    """ModelArgs.load_kwargs (derived from its fields) names exactly LoadSettings' keyword settings: a field added
    to one and not the other fails here."""
    from ktchat.model.plan import LoadSettings

    args = ModelArgs(model_name_or_path="/m", adapter_name_or_path="/a", use_kt=True, infer_dtype="bfloat16",
                     kt_num_threads=3)
    kwargs = args.load_kwargs()
    positional = {"model_name_or_path", "adapter_name_or_path"}
    assert set(kwargs) | positional | PYTHON_ONLY == {f.name for f in fields(LoadSettings)}
    settings = LoadSettings.of(args)
    assert (settings.dtype, settings.num_threads, settings.experts_backend) == ("bfloat16", 3, "auto")
    assert LoadSettings.of(ModelArgs(model_name_or_path="/m", use_kt=False)).experts_backend == "torch"


def test_experts_backends_and_modes_agree():
    from ktchat.experts import BACKENDS, KTExperts, TorchExperts, kt_backend

    assert EXPERTS_BACKENDS == ("auto", *BACKENDS)
    assert set(BACKENDS.values()) == {KTExperts, TorchExperts}
    assert MOE_LORA_MODES == formats.MOE_LORA_MODES
    assert KT_METHODS == kt_backend.METHODS == tuple(formats.KT_METHODS)
    assert set(kt_backend.TRAINED_METHOD.values()) <= set(KT_METHODS)


def test_every_hook_names_a_wrapper_of_the_hook_module():
    """The startup hook watches HOOKS' modules by name; patch_module wraps each one's function with the wrapper
    HOOKS names, found in the hook module."""
    from ktchat.integrations import _startup
    from ktchat.integrations.llamafactory import HOOKS, hook

    assert _startup.HOOKS is HOOKS
    for module_name, (function, _) in HOOKS.items():
        module = types.ModuleType(module_name)
        setattr(module, function, lambda args=None: args)
        hook.patch_module(module)
        assert getattr(getattr(module, function), "__ktchat_original__", None) is not None, module_name


def test_a_request_returns_exactly_the_generation_fields():
    from ktchat.serve.protocol import GENERATION_FIELDS, parse_request

    req = parse_request({"model": "m", "messages": [{"role": "user", "content": "hi"}]}, "m")
    assert set(req) == {"messages", "stream", "include_usage", *GENERATION_FIELDS}


@pytest.mark.parametrize("command, option, allowed", [
    (["export", "--model", "b", "--adapter", "a", "--out", "o"], "--format", formats.EXPORT_FORMATS),
    (["convert", "a", "o"], "--to", formats.ADAPTER_LAYOUTS),
])
def test_the_cli_offers_what_the_library_takes(command, option, allowed, capsys):
    from ktchat.cli import build_parser
    from ktchat.model.export import FORMATS
    from ktchat.adapter.writer import FORMATS as LAYOUTS

    assert allowed in (FORMATS, LAYOUTS)
    for value in allowed:
        assert getattr(build_parser().parse_args([*command, option, value]), option[2:]) == value
    with pytest.raises(SystemExit):
        build_parser().parse_args([*command, option, "nope"])


def test_one_projection_list():
    from ktchat import adapter
    from ktchat.formats import kt_weights
    from ktchat.experts import kt_native

    assert adapter.PROJS is kt_weights.PROJS is kt_native.PROJS is formats.PROJS


def test_each_predict_flag_sets_a_predict_key_of_its_type():
    from ktchat.cli import build_parser
    from ktchat.cli.predict import FLAGS
    from ktchat.config import PredictArgs

    types_of = {f.name: f.type for f in fields(PredictArgs)}
    for flag, (key, kind, *_) in FLAGS.items():
        assert key in types_of and kind.__name__ in types_of[key], (flag, key, types_of.get(key))
        value = "7" if kind is int else "x"
        assert getattr(build_parser().parse_args(["predict", "c.yaml", flag, value]), key) == kind(value)
