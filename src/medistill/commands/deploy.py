"""Deployable students: ONNX / TorchScript export checked against PyTorch, and prediction on
image files preprocessed exactly as in training."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medistill.data.imageio import read_image
from medistill.data.transforms import image_tensor, resize_matrix, unit
from medistill.errors import ModelError
from medistill.io import atomic_path, write_json
from medistill.models.factory import ModelSpecRecord, Preprocess, data_size, load_model_dir
from medistill.rundir import resolve, resolve_model_dir


class Deployable(nn.Module):
    """Preprocess + network: takes images ``[B, C_data, S, S]`` in [0, 1], returns logits ``[B, C]``."""

    def __init__(self, pre: Preprocess, model: nn.Module):
        super().__init__()
        self.pre, self.model = pre, model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.pre(x))


class ExportPreprocess(nn.Module):
    """The same preprocessing for a fixed input side ``size``, with the resize as two matrix
    products (:func:`resize_matrix`): what the ONNX graph holds. Equal to ``pre`` up to float
    rounding (checked by every export)."""

    def __init__(self, pre: Preprocess, size: int):
        super().__init__()
        self.pre = pre
        self.register_buffer("a", resize_matrix(size, pre.input_size, pre.interpolation), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.pre
        # the channel rule of Preprocess, decided by the recorded channel counts (no shape test in the graph)
        if p.data_chans == 1 and p.in_chans > 1:
            x = x.expand(-1, p.in_chans, -1, -1)
        elif p.data_chans == 3 and p.in_chans == 1:
            x = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
        x = torch.matmul(torch.matmul(self.a, x), self.a.t())
        return (x - p.mean) / p.std


def _model_of(target: str | Path) -> tuple[Path, Path]:
    """(model directory, what to load) of a run (its first student), a model directory or a
    weights file: a weights file named on the command line is the one used, not its folder's
    ``model.safetensors``."""
    t = resolve(target)
    d = resolve_model_dir(t.path)
    return d, (t.path if t.kind == "weights" else d)


def export_model(target: str | Path, fmt: str = "onnx", out: str | Path | None = None, check_batch: int = 4,
                 force: bool = False) -> dict[str, Any]:
    """Export the (first) student of ``target``; the export is run on random inputs at batch 1
    and ``check_batch`` and compared with PyTorch. Returns the path and the max |difference|.
    A file the user named in ``out`` that already exists is replaced only with ``force``."""
    if fmt not in ("onnx", "torchscript"):
        raise ModelError(f"unknown export format {fmt!r} (onnx, torchscript)")
    d, weights = _model_of(target)
    model, pre, spec = load_model_dir(weights)
    size = data_size(None, [spec])
    reference = Deployable(pre, model).eval()
    # the exported graph resizes with matrices when the model's side is not the data's
    net = Deployable(ExportPreprocess(pre, size), model).eval() if size != pre.input_size else reference
    example = torch.rand(1, spec.data_chans, size, size)
    name = "model.onnx" if fmt == "onnx" else "model.torchscript.pt"
    dest = Path(out) if out else d / name
    if dest.is_dir():      # an existing folder: the file goes inside it
        dest = dest / name
    if out and dest.exists() and not force:
        raise ModelError(f"{dest} already exists; pass --force to replace it, or choose another --out")
    if fmt == "onnx":
        with atomic_path(dest) as tmp:
            # The TorchScript-based exporter: robust for CNNs and needs no onnxscript dependency.
            torch.onnx.export(net, (example,), str(tmp), dynamo=False, input_names=["images"], output_names=["logits"],
                              dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17)
            import onnx

            m = onnx.load(str(tmp))
            for k, v in {"medistill_spec": json.dumps(spec.__dict__)}.items():
                m.metadata_props.add(key=k, value=v)
            onnx.save(m, str(tmp))
        run = _onnx_runner(dest)
    else:
        with atomic_path(dest) as tmp:
            torch.jit.save(torch.jit.trace(net, example), str(tmp))
        ts = torch.jit.load(str(dest))
        run = lambda x: ts(torch.from_numpy(x)).detach().numpy()  # noqa: E731
    diffs = []
    for b in (1, check_batch):
        x = torch.rand(b, spec.data_chans, size, size)
        with torch.no_grad():
            ref = reference(x).numpy()
        diffs.append(float(np.abs(run(x.numpy()) - ref).max()))
    result = {"path": str(dest), "format": fmt, "max_abs_diff": max(diffs), "batches_checked": [1, check_batch]}
    write_json(dest.with_name(dest.name + ".check.json"), result)
    return result


def _onnx_runner(path: Path):
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda x: sess.run(None, {"images": x.astype(np.float32)})[0]


def load_image(path: str | Path, spec: ModelSpecRecord) -> torch.Tensor:
    """One image file → ``[C_data, S, S]`` in [0, 1], as the data pipeline made it in training."""
    arr = read_image(path, spec.data_chans)   # DICOM: the file's own window
    return unit(image_tensor(arr, data_size(None, [spec])))


def cam_name(path: str | Path, images: list[str | Path]) -> str:
    """``NAME_cam.png``, with a short hash of the full path when another input has the same file
    name (``a/x.png`` and ``b/x.png`` must not write one overlay over the other)."""
    import hashlib

    stem = Path(path).stem
    if sum(Path(i).stem == stem for i in images) > 1:
        stem += "_" + hashlib.sha1(str(Path(path).resolve()).encode()).hexdigest()[:8]
    return f"{stem}_cam.png"


def predict_files(model_path: str | Path, images: list[str | Path], cam: bool = False, out_dir: str | Path | None = None,
                  device: str = "cpu") -> list[dict[str, Any]]:
    """Class and probabilities per image; with ``cam``, a Grad-CAM overlay PNG per image
    (PyTorch models only). ``model_path``: run dir, model dir, weights file or ``.onnx``;
    ``device`` runs a PyTorch model there (ONNX files run on onnxruntime's CPU provider)."""
    p = Path(model_path)
    if resolve(p).kind == "onnx":
        import onnx

        try:
            meta = {m.key: m.value for m in onnx.load(str(p)).metadata_props}
        except Exception as e:  # noqa: BLE001 - protobuf's decode errors have no common public base
            raise ModelError(f"{p}: not a readable ONNX file ({type(e).__name__}); export it again with "
                             "`medistill export RUN`") from None
        if "medistill_spec" not in meta:
            raise ModelError(f"{p}: not exported by medistill (no medistill_spec metadata)")
        spec = ModelSpecRecord(**json.loads(meta["medistill_spec"]))
        runner = _onnx_runner(p)
        forward = lambda x: torch.from_numpy(runner(x.numpy()))  # noqa: E731
        model = pre = None
        if cam:
            raise ModelError("--cam needs the PyTorch model (a run or model directory), not an ONNX file")
    else:
        from medistill.device import resolve_device

        dev = resolve_device(device)
        model, pre, spec = load_model_dir(_model_of(p)[1])
        model, pre = model.to(dev), pre.to(dev)
        forward = lambda x: model(pre(x.to(dev))).cpu()  # noqa: E731
    x = torch.stack([load_image(i, spec) for i in images])
    with torch.no_grad():
        probs = torch.softmax(forward(x).float(), 1)
    results = []
    # A binary model's operating threshold (chosen on validation, saved in model.json and the
    # ONNX metadata) replaces the argmax.
    thr = spec.threshold if spec.num_classes == 2 else None
    for path, pr in zip(images, probs):
        k = int(pr[1] >= thr) if thr is not None else int(pr.argmax())
        results.append({"image": str(path), "class": k, "class_name": spec.class_names[k] if spec.class_names else str(k),
                        "probabilities": [round(float(v), 6) for v in pr],
                        **({"threshold": thr} if thr is not None else {})})
    if cam and model is not None:
        from medistill.explain.cam import default_target_layer, grad_cam
        from medistill.explain.run import _overlay_grid

        model, pre = model.cpu(), pre.cpu()   # CAMs are computed on the CPU
        layer = default_target_layer(model, spec.input_size, spec.in_chans)
        maps = torch.nn.functional.interpolate(grad_cam(model, pre(x), layer)[:, None], size=x.shape[-2:], mode="bilinear")[:, 0]
        dest = Path(out_dir or ".")
        for i, (path, r) in enumerate(zip(images, results)):
            png = dest / cam_name(path, images)
            _overlay_grid(x[i:i + 1].permute(0, 2, 3, 1).numpy(), {f"Grad-CAM {layer}": maps[i:i + 1].numpy()},
                          [r["class_name"]], png)
            r["cam"] = str(png)
    return results
