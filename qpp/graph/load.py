"""Turn what a user names on the command line into a ``torch.nn.Module``.

Accepted: an ``.onnx`` file, a Hugging Face model folder, or ``file.py:function`` returning a
module (zoo names are resolved one level up, in ``qpp.sources``).
"""

from __future__ import annotations

import importlib.util
import inspect
import sys
from pathlib import Path

import torch

from qpp.errors import ModelLoadError


def load_user_model(
    reference: str, input_shapes: list[tuple[int, ...]] | None = None
) -> torch.nn.Module:
    """The module ``reference`` points to, in eval mode.

    ``input_shapes`` (batch first) pins the symbolic non-batch dimensions of an ONNX file, so
    its shape computations fold and the converted module captures with a dynamic batch.
    """
    path_part, function = _split_function(reference)
    path = Path(path_part)
    if function is not None:
        return load_python_function(path, function)
    if not path.exists():
        raise ModelLoadError(
            f"{path} does not exist; pass a zoo name (qpp models), a .onnx file, a Hugging Face "
            "model folder or file.py:function"
        )
    if path.is_dir():
        from qpp.graph.hf_import import load_hf_folder, looks_like_hf_folder

        if not looks_like_hf_folder(path):
            raise ModelLoadError(
                f"folder {path} has no config.json, so it is not a Hugging Face model folder; "
                "pass the folder written by save_pretrained()"
            )
        return load_hf_folder(path)
    if path.suffix.lower() == ".onnx":
        from qpp.graph.onnx_import import load_onnx

        model = load_onnx(path, input_shapes=input_shapes)
        specs = onnx_input_specs(path)
        model.qpp_input_names = list(specs)  # type: ignore[assignment]
        model.qpp_input_specs = specs  # type: ignore[assignment]
        return model
    raise ModelLoadError(
        f"{path} is not a model qpp can read; pass a .onnx file, a Hugging Face model folder or "
        "file.py:function (a function returning a torch.nn.Module)"
    )


def _split_function(reference: str) -> tuple[str, str | None]:
    """``"models/net.py:build"`` -> ``("models/net.py", "build")``."""
    head, sep, tail = reference.rpartition(":")
    if sep and head.endswith(".py") and tail.isidentifier():
        return head, tail
    return reference, None


def load_python_function(path: Path, function: str) -> torch.nn.Module:
    """Import ``path`` as a module and call ``function()``; it must return a ``nn.Module``."""
    if not path.is_file():
        raise ModelLoadError(f"{path} does not exist; pass file.py:function with an existing file")
    spec = importlib.util.spec_from_file_location(f"qpp_user_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise ModelLoadError(f"cannot import {path} as Python; pass a .py file")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent.resolve()))
    try:
        spec.loader.exec_module(module)
    except Exception as error:
        raise ModelLoadError(
            f"importing {path} raised {type(error).__name__}: {error}; fix the file so it imports"
        ) from None
    finally:
        sys.path.pop(0)
    factory = getattr(module, function, None)
    if factory is None or not callable(factory):
        names = [
            n for n, v in vars(module).items() if inspect.isfunction(v) and not n.startswith("_")
        ]
        raise ModelLoadError(
            f"{path} has no function '{function}'"
            + (f" (functions there: {', '.join(names[:5])})" if names else "")
            + "; name a function that returns a torch.nn.Module"
        )
    try:
        model = factory()
    except Exception as error:
        raise ModelLoadError(
            f"{path.name}:{function}() raised {type(error).__name__}: {error}; "
            "make it return a torch.nn.Module without arguments"
        ) from None
    if not isinstance(model, torch.nn.Module):
        raise ModelLoadError(
            f"{path.name}:{function}() returned {type(model).__name__}, not a torch.nn.Module; "
            "return the model object itself"
        )
    return model.eval()


def input_names(model: torch.nn.Module) -> list[str]:
    """The names of ``model``'s positional inputs (the keys expected in npz data)."""
    names = getattr(model, "qpp_input_names", None)
    if names:
        return list(names)
    forward = getattr(model, "forward", None)
    if isinstance(model, torch.fx.GraphModule):
        return [n.name for n in model.graph.nodes if n.op == "placeholder"]
    parameters = inspect.signature(forward).parameters.values() if forward else []
    return [
        p.name
        for p in parameters
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
    ]


def onnx_input_specs(path: Path) -> dict[str, tuple[str, list[int | None]]]:
    """The ONNX graph's inputs: name -> (numpy dtype name, shape with None for symbolic dims)."""
    import onnx
    from onnx import helper

    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception as error:
        raise ModelLoadError(
            f"{path} is not a valid ONNX model ({type(error).__name__}); "
            "pass a file written by torch.onnx.export or another ONNX exporter"
        ) from None
    initializers = {i.name for i in graph.initializer}
    specs: dict[str, tuple[str, list[int | None]]] = {}
    for value in graph.input:
        if value.name in initializers:
            continue
        tensor_type = value.type.tensor_type
        dtype = helper.tensor_dtype_to_np_dtype(tensor_type.elem_type).name
        shape = [d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim]
        specs[value.name] = (dtype, shape)
    return specs
