"""ONNX export of a medhybrid model, and the parity check against PyTorch through onnxruntime."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import torch

from medhybrid.errors import ModelError
from medhybrid.io.writers import atomic_write_bytes
from medhybrid.models.base import MedModel

logger = logging.getLogger(__name__)

OPSET = 18


def export_onnx(model: MedModel, example: torch.Tensor, path: str | Path, *, dynamic_batch: bool = True) -> Path:
    """Export ``model`` (in eval mode) to ``path``; the outputs are named after the model's dict keys.

    The spatial size is fixed to the example's (positional-embedding resizing and the decoder's
    interpolation sizes are traced as constants); the batch axis stays dynamic unless asked not to.
    The file is written atomically (``io.writers``), so a failed export leaves nothing.

    Raises:
        ModelError: the exporter failed (the message carries its reason).
    """
    path = Path(path)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        names = list(model(example).keys())
    dynamic = None
    if dynamic_batch:
        # torch.export specialises axes of size 1, so a batch-1 example is traced as a batch of 2.
        example = example.repeat(2, *([1] * (example.dim() - 1))) if example.shape[0] == 1 else example
        dynamic = {"x": {0: torch.export.Dim("batch", min=1)}}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's deprecation chatter is not the user's concern
            program = torch.onnx.export(
                model,
                (example,),
                None,  # kept in memory: the bytes go through the project's atomic writer
                input_names=["x"],
                output_names=names,
                opset_version=OPSET,
                dynamo=True,
                dynamic_shapes=dynamic,
                verbose=False,
            )
        assert program is not None  # the dynamo exporter returns its program when given no file
        data = program.model_proto.SerializeToString()
    except Exception as exc:  # the exporter raises many types; report them as one domain error
        raise ModelError(
            f"ONNX export failed: {exc}", path=path, fix="export in eval mode with a fixed input size"
        ) from exc
    finally:
        model.train(was_training)
    atomic_write_bytes(path, data)
    logger.info("exported %s (%d outputs) to %s", type(model).__name__, len(names), path)
    return path


def onnx_session(path: str | Path, threads: int | None = None) -> object:
    """An onnxruntime CPU session for ``path`` (intra-op threads as torch uses, unless given)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or torch.get_num_threads()
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def onnx_parity(model: MedModel, path: str | Path, x: torch.Tensor) -> dict[str, float]:
    """Largest absolute difference per output between PyTorch (eval) and onnxruntime on ``x``."""
    session = onnx_session(path)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        ref = {k: v.cpu() for k, v in model(x).items()}
    model.train(was_training)
    outputs = session.run(None, {"x": x.detach().cpu().numpy()})  # type: ignore[attr-defined]
    names = [o.name for o in session.get_outputs()]  # type: ignore[attr-defined]
    return {n: float(np.abs(ref[n].numpy() - o).max()) for n, o in zip(names, outputs, strict=True)}
