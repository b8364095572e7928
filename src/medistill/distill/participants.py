"""The participants of a run: frozen teachers (model, run or ensemble directories, weights files,
in-memory modules) and trainable students, each with its own preprocessing."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medistill.data import DataBundle
from medistill.classes import same_classes
from medistill.errors import ConfigError, ModelError
from medistill.io import sha256_file
from medistill.rundir import is_ensemble_dir, load_ensemble
from medistill.models.fold import fold_batchnorm
from medistill.models.modes import model_device
from medistill.models.taps import FeatureTaps
from medistill.models.factory import (
    ModelSpecRecord,
    Preprocess,
    create_model,
    data_size,
    load_model_dir,
    checkpoint_preprocessing,
    load_weights,
    read_checkpoint,
    resolve_norm,
    stated_preprocessing,
)

Tensor = torch.Tensor


@dataclass
class Participant:
    """A model in a run: its network, its own preprocessing, and whether it is trained."""

    name: str
    model: nn.Module
    pre: Preprocess
    spec: ModelSpecRecord
    trainable: bool
    checkpoint: str | None = None
    sha256: str | None = None
    intake: dict[str, Any] | None = None   # a teacher from elsewhere: how its input size and norm were chosen
    origin: str = ""                       # where its input size and normalisation came from (said at the start)
    test_overlap: int | None = None        # a teacher: how many of this run's test images it was trained on
    taps: set[str] = field(default_factory=set)

    def logits(self, x: Tensor, channels_last: bool = False) -> Tensor:
        """Logits ``[B, K]`` of a batch ``[B, C, S, S]`` in the data's layout, after this model's
        own preprocessing. A frozen teacher always takes channels-last input (its weights are
        converted when the run assembles it): 1.4–1.5× a ResNet-50's images/s on a CPU
        (docs/benchmarks.md "scale"), the layout cuDNN prefers too; ``channels_last`` asks the
        same for a student (``train.channels_last``)."""
        x = self.pre(x)
        if channels_last or not self.trainable:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.model(x)


def load_ensemble_teacher(spec: Any, path: Path, data: DataBundle) -> Participant:
    """An ensemble directory as one teacher: members keep their own preprocessing inside
    :class:`EnsembleModel`, so the participant's preprocessing only passes the batch on."""
    model, specs, digest, rec = load_ensemble(path)
    if rec["num_classes"] != data.num_classes:
        raise ModelError(f"teacher {spec.name!r} (ensemble {path}) predicts {rec['num_classes']} classes but the data "
                         f"has {data.num_classes} ({data.source.description})")
    check_teacher_data(spec, path, specs, data)
    size = data_size(data.source.native_size, specs, not data.source.in_memory)
    c = data.channels
    archs = sorted({s.arch for s in specs})
    rec0 = ModelSpecRecord(**{**specs[0].__dict__, "arch": f"ensemble({len(specs)}× {'+'.join(archs)})",
                              "in_chans": c, "data_chans": c, "input_size": size,
                              "mean": [0.0] * c, "std": [1.0] * c})
    for prm in model.parameters():
        prm.requires_grad_(False)
    return Participant(spec.name, model, Preprocess(c, c, size, (0.0,) * c, (1.0,) * c), rec0, trainable=False,
                       checkpoint=str(path), sha256=digest, origin="each member as trained (its model.json)")

def memory_teacher(spec: Any, model: nn.Module, data: DataBundle) -> Participant:
    """A teacher passed as an ``nn.Module``: frozen, identified by a hash of its weights."""
    c = data.channels
    size = spec.input_size or data.source.default_size
    mean, std = resolve_norm(spec.norm or "half", False, c)
    pre = Preprocess(c, c, size, tuple(mean), tuple(std))
    model.eval()
    with torch.no_grad():
        dev = model_device(model)
        try:
            out = model(pre.to(dev)(torch.zeros(1, c, size, size, device=dev)))
        except Exception as e:  # noqa: BLE001 - any failure on the data's image shape is the module's, said with it
            raise ModelError(f"teacher {spec.name!r} (in-memory {type(model).__name__}) cannot take this data's images "
                             f"[B, {c}, {size}, {size}] ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                             "pass a module that maps images to logits, or set its input size") from None
    if not isinstance(out, torch.Tensor):
        raise ModelError(f"teacher {spec.name!r} (in-memory {type(model).__name__}) returns a {type(out).__name__}; "
                         f"expected a tensor of [B, {data.num_classes}] logits")
    if out.ndim != 2 or out.shape[1] != data.num_classes:
        raise ModelError(f"teacher {spec.name!r} (in-memory {type(model).__name__}) returns shape {tuple(out.shape)}; "
                         f"expected [B, {data.num_classes}] logits for {data.source.description}")
    for prm in model.parameters():
        prm.requires_grad_(False)
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    rec = ModelSpecRecord(arch=type(model).__name__, num_classes=data.num_classes, in_chans=c, data_chans=c,
                          input_size=size, small_input="off", mean=mean, std=std, class_names=data.class_names)
    origin = ("teachers.N.input_size" if spec.input_size else "the images' own size") + \
        f", norm {spec.norm or 'half'} (an in-memory module records no preprocessing)"
    return Participant(spec.name, model, pre, rec, trainable=False, checkpoint="<memory>", sha256=h.hexdigest(),
                       origin=origin)

def check_teacher_data(spec: Any, path: Path, recs: list[ModelSpecRecord], data: DataBundle) -> None:
    """A teacher records the dataset it was trained on; another dataset with the same class
    count (blood-cell types distilled into retinal grades) is refused unless allowed."""
    if spec.allow_other_data:
        return
    for rec in recs:
        if rec.class_names and not same_classes(rec.class_names, data.class_names):
            raise ModelError(f"teacher {spec.name!r} ({path}) was trained on classes {rec.class_names} but the data "
                             f"has {data.class_names}; set teachers.N.allow_other_data=true if that is intended")
        fp = data.source.fingerprint
        if rec.data_fingerprint and fp and rec.data_fingerprint != fp:
            raise ModelError(f"teacher {spec.name!r} ({path}) was trained on another dataset than "
                             f"{data.source.description} (fingerprints {rec.data_fingerprint[:12]}… vs {fp[:12]}…); "
                             "set teachers.N.allow_other_data=true if that is intended")

def load_teacher(spec: Any, path: Path, data: DataBundle) -> Participant:
    """A frozen teacher from a model, run or ensemble directory, or a named architecture plus a
    weights file; its preprocessing adapted to the data's channels and the spec's size/norm."""
    if is_ensemble_dir(path):
        return load_ensemble_teacher(spec, path, data)
    intake = None
    if spec.model is not None and not (path.is_dir() or (path.parent / "model.json").is_file()):
        model, pre, rec, intake = external_teacher(spec, path, data)
        wfile = path
    else:
        model, pre, rec = load_model_dir(path)
        wfile = path if path.is_file() else path / "model.safetensors"
    if rec.num_classes != data.num_classes:
        raise ModelError(f"teacher {spec.name!r} ({path}) predicts {rec.num_classes} classes but the data has "
                         f"{data.num_classes} ({data.source.description})")
    check_teacher_data(spec, path, [rec], data)
    origin = intake["source"] if intake is not None else "as trained (its model.json)"
    if intake is None:   # a medistill model: its recorded preprocessing, adapted where the spec asks
        if spec.input_size and spec.input_size != rec.input_size or spec.norm not in (None, "auto"):
            origin = f"its model.json, with {'teachers.N.input_size' if spec.input_size else 'teachers.N.norm'} stated"
        if rec.data_chans != data.channels:
            pre = Preprocess(data.channels, rec.in_chans, rec.input_size, tuple(rec.mean), tuple(rec.std))
        if spec.input_size and spec.input_size != rec.input_size:
            pre = Preprocess(data.channels, rec.in_chans, spec.input_size, tuple(rec.mean), tuple(rec.std))
        if spec.norm not in (None, "auto"):
            mean, std = resolve_norm(spec.norm, False, rec.in_chans)
            pre = Preprocess(data.channels, rec.in_chans, pre.input_size, tuple(mean), tuple(std))
    check_fixed_size(model, pre.input_size, spec.name)
    model.eval()
    for prm in model.parameters():
        prm.requires_grad_(False)
    sha = sha256_file(wfile)
    if intake is not None and intake["weights"] == "ema":   # other weights from the same file: another cache key
        sha = hashlib.sha256(f"{sha}:ema".encode()).hexdigest()
    return Participant(spec.name, model, pre, rec, trainable=False, checkpoint=str(wfile), sha256=sha, intake=intake,
                       origin=origin)


def check_fixed_size(model: nn.Module, size: int, name: str) -> None:
    """A timm transformer (ViT, Swin, DeiT) accepts only the image size its patch embedding was
    built for; feeding it another one fails deep inside the first forward. Refused before any
    training, naming the setting."""
    pe = getattr(model, "patch_embed", None)
    built = getattr(pe, "img_size", None)
    if pe is None or not getattr(pe, "strict_img_size", False) or not built:
        return
    if tuple(built) != (size, size):
        raise ModelError(f"teacher {name!r} accepts only {built[0]}×{built[1]} images (its patch embedding was built "
                         f"for the size it was trained at) but is asked for {size}×{size}: leave teachers.N.input_size "
                         f"out, or train the teacher at {size} px (--input-size {size})")


def external_teacher(spec: Any, path: Path, data: DataBundle) -> tuple[nn.Module, Preprocess, ModelSpecRecord, dict[str, Any]]:
    """A timm architecture and a weights file trained elsewhere, kept as it was trained: its own
    stem (``small_input: off`` unless asked), and fed at its own size, mean, std and
    interpolation (:func:`checkpoint_preprocessing`; ``input_size``/``norm`` of the spec win).
    Returns the model, its preprocessing, its record and how the input was chosen (run_info)."""
    import timm

    state, args = read_checkpoint(path, spec.weights)
    if not timm.is_model(spec.model):
        create_model(spec.model, data.num_classes)   # raises the unknown-model error with close matches
    probe = timm.create_model(spec.model, pretrained=False, num_classes=data.num_classes)
    fallback = data.source.default_size
    stated = stated_preprocessing(path, spec.model) if not args else None
    intake = stated or checkpoint_preprocessing(args, probe, fallback)
    if stated and spec.small_input == "off":   # the stem it was exported with (medistill's own config.json)
        spec = spec.model_copy(update={"small_input": stated.pop("small_input")})
    stated_args = stated.pop("model_args", {}) if stated else {}
    size = spec.input_size or intake["input_size"]
    in_chans = intake["in_chans"]
    mean, std = (intake["mean"], intake["std"]) if spec.norm in (None, "auto") else resolve_norm(spec.norm, False, in_chans)
    if len(mean) != in_chans:
        mean, std = resolve_norm((mean, std), False, in_chans)
    rec = ModelSpecRecord(arch=spec.model, num_classes=data.num_classes, in_chans=in_chans, data_chans=data.channels,
                          input_size=size, small_input=spec.small_input, mean=list(mean), std=list(std),
                          class_names=data.class_names, kwargs=stated_args)
    model, _ = rec.build()
    try:
        load_weights(model, path, strict=True, state=state)
    except ModelError as e:
        raise ModelError(f"teacher {spec.name!r}: {e}. Check the architecture (teachers.N.model={spec.model}), the "
                         f"class count ({data.num_classes} in the data), and the stem: the weights are loaded into "
                         f"the stem as trained (teachers.N.small_input={spec.small_input}); a file trained with "
                         "medistill's small-input stem needs small_input=on, stride8 or stride16") from None
    pre = Preprocess(data.channels, in_chans, size, tuple(mean), tuple(std), intake["interpolation"])
    stated_now = bool(spec.input_size) or spec.norm not in (None, "auto")
    intake = {**intake, "input_size": size, "mean": list(mean), "std": list(std), "weights": spec.weights,
              "small_input": spec.small_input, "guessed": intake.get("guessed", False) and not stated_now}
    if stated_now:
        intake["source"] += " (with teachers.N.input_size/norm as stated)"
    return model, pre, rec, intake

def input_side(p: Participant) -> int:
    """The side a participant's network sees (an ensemble: its largest member's)."""
    pres = getattr(p.model, "pres", None)
    return max(int(q.input_size) for q in pres) if pres is not None else int(p.pre.input_size)


def student_side(s: Any, teachers: list[Participant], native: int | None) -> tuple[int, str]:
    """A student's input side and where it comes from: ``input_size`` when stated; else its
    teachers' (the largest when they differ), so a student does not silently train at a
    folder's 512 px beside a 32-px teacher; else the images' own size (224 where they differ)."""
    if s.input_size:
        return s.input_size, "stated (--input-size / students.N.input_size)"
    if teachers:
        sides = {t.name: input_side(t) for t in teachers}
        which = ", ".join(f"{n} {v} px" for n, v in sides.items())
        return max(sides.values()), (f"its teacher's ({which})" if len(sides) == 1 else
                                     f"the largest of its teachers' ({which})") + "; --input-size chooses another"
    return (native, "the images' own size") if native else (224, "timm's usual 224 px (the images differ in size)")


def make_student(s: Any, size: int, data: DataBundle, channels_last: bool = False) -> Participant:
    """A trainable student built from its spec at side ``size`` (:func:`student_side`)."""
    in_chans = s.in_chans or data.channels
    mean, std = resolve_norm(s.norm, s.pretrained, in_chans)
    model = create_model(s.model, data.num_classes, in_chans, size, pretrained=s.pretrained,
                         small_input=s.small_input, **s.kwargs)
    rec = ModelSpecRecord(arch=s.model, num_classes=data.num_classes, in_chans=in_chans,
                          data_chans=data.channels, input_size=size, small_input=s.small_input, mean=mean,
                          std=std, class_names=data.class_names, kwargs=dict(s.kwargs),
                          adaptation=getattr(model, "medistill_adaptation", None))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return Participant(s.name, model, Preprocess(data.channels, in_chans, size, tuple(mean), tuple(std)), rec, trainable=True)


def training_forwards(students: list[Participant], compile_mode: str, device: torch.device,
                      world: int) -> tuple[dict[str, nn.Module], dict[str, FeatureTaps]]:
    """The module each student's training forward goes through: DDP under torchrun (students
    only; frozen teachers run plain), then ``torch.compile`` (``train.compile``). Compiled
    students keep their taps registered for the whole run (returned, to remove at the end):
    adding and removing hooks every step would make dynamo recompile every step."""
    nets: dict[str, nn.Module] = {s.name: s.model for s in students}
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [device.index] if device.type == "cuda" else None
        nets = {s.name: DDP(s.model, device_ids=ids) for s in students}
    fixed: dict[str, FeatureTaps] = {}
    if compile_mode != "off":
        for s in students:
            if s.taps:
                fixed[s.name] = FeatureTaps(s.model, sorted(s.taps)).__enter__()
            nets[s.name] = (torch.compile(nets[s.name], backend="eager") if compile_mode == "eager"
                            else torch.compile(nets[s.name], mode=compile_mode))
    return nets, fixed


def check_test_overlap(teachers: list[Participant], checkpoints: dict[str, str], data: DataBundle, console: Any) -> None:
    """A teacher trained on images of this run's test split scores optimistically on it: count
    them (by index, on the same data fingerprint), warn, and record the count on the teacher."""
    from medistill.rundir import teacher_training_images

    test = {int(i) for i in data.splits["test"]}
    for t in teachers:
        got = teacher_training_images(checkpoints[t.name]) if t.name in checkpoints else None
        if got is None or not got[0] or got[0] != data.source.fingerprint:
            continue
        n = len(got[1] & test)
        if n:
            t.test_overlap = n
            console.print(f"[yellow]warning:[/] teacher {t.name!r} was trained on {n} of the {len(test)} test images of "
                          "this run (another split of the same data): its test metrics here are optimistic, and the "
                          "students learn from its predictions on images they are later tested on")


def assemble_participants(cfg: Any, teacher_modules: dict[str, nn.Module], device: torch.device, console: Any,
                          download: bool = False, fixed_splits: dict[str, Any] | None = None
                          ) -> tuple[DataBundle, list[Participant], list[Participant]]:
    """The run's data (its saved split when resuming) and its participants, complete and on
    ``device``: frozen teachers (directories, files, in-memory modules; checked against the data
    and for test-split overlap), then students; the data size follows the one rule
    (:func:`data_size`) and is recorded with each student."""
    from medistill.data import build_data
    from medistill.rundir import resolve_teacher

    teacher_dirs = {t.name: resolve_teacher(t.checkpoint) for t in cfg.teachers if t.name not in teacher_modules}
    role = cfg.data.role if cfg.data.role != "auto" else ("student" if cfg.teachers else "teacher")
    data = build_data(cfg.data, None, role=role, download=download, fixed_splits=fixed_splits)
    for note in data.split_notes or []:   # the data audit's one line, label fractions, group splits
        console.print(f"[yellow]data:[/] {note}")
    teachers = [memory_teacher(t, teacher_modules[t.name], data) if t.name in teacher_modules
                else load_teacher(t, teacher_dirs[t.name], data) for t in cfg.teachers]
    check_test_overlap(teachers, {n: str(d) for n, d in teacher_dirs.items()}, data, console)
    students = []
    for s in cfg.students:
        size, why = student_side(s, teachers, data.source.native_size)
        students.append(make_student(s, size, data, cfg.train.channels_last))
        students[-1].origin = f"size: {why}; norm {s.norm}"
    # Images stay at their native size; each model resizes the shared batch for itself. The
    # bundle the run trains on is a new, complete one (size and device known only now).
    data = replace(data, image_size=data_size(data.source.native_size, [p.spec for p in teachers + students],
                                                     not data.source.in_memory),
                   pin_memory=device.type == "cuda", device=device)
    say_inputs(teachers, students, console)
    for s in students:
        s.spec.data_size = data.image_size
        s.spec.data_fingerprint = data.source.fingerprint or None
    for p in teachers + students:   # before optimizers, EMA/SWA copies and term modules exist
        p.model.to(device)
        if not p.trainable:
            p.model.to(memory_format=torch.channels_last)
        p.pre.to(device)
    return data, teachers, students


def say_inputs(teachers: list[Participant], students: list[Participant], console: Any) -> None:
    """One line per participant: the side, mean/std and interpolation it is fed, and where each
    came from; a warning for a teacher fed timm's defaults because nothing recorded how it was
    trained (a bare weights file)."""
    def fmt(v: Any) -> str:
        return "(" + ", ".join(f"{float(x):.3g}" for x in v.flatten().tolist()) + ")"

    for role, group in (("teacher", teachers), ("student", students)):
        for p in group:
            side = input_side(p)
            fed = (f"{side} px, mean {fmt(p.pre.mean)} std {fmt(p.pre.std)}, {p.pre.interpolation}"
                   if not hasattr(p.model, "pres") else f"{side} px at most, each member its own mean/std")
            console.print(f"input of {role} {p.name!r}: {fed} — {p.origin}")
            if p.intake is not None and p.intake.get("guessed"):
                console.print(f"[yellow]warning:[/] teacher {p.name!r}: nothing beside its weights says how it was "
                              f"trained, so it is fed {p.intake['source']}. If it was trained otherwise, state it "
                              "(--set teachers.0.input_size=32 --set teachers.0.norm=half, or put the config.json "
                              "medistill exports beside the weights file)")


def fold_teachers(teachers: list[Participant], in_memory: set[str]) -> None:
    """Fold each teacher's BatchNorms into the convolutions before them (:func:`fold_batchnorm`),
    keeping the convolutions its taps read; once the terms have named those taps. Not a module
    passed in memory (``in_memory``): that is the caller's object."""
    for t in teachers:
        if t.name not in in_memory and fold_batchnorm(t.model, t.taps):
            t.model.to(memory_format=torch.channels_last)   # the folded convolutions' new weights


def check_training_data(data: Any, cfg: Any, console: Any) -> torch.Tensor:
    """The training split's class counts ``[K]`` (float); warns on classes without images and
    refuses QWK selection on nominal labels."""
    counts = torch.as_tensor(data.counts("train"), dtype=torch.float32)
    if (counts == 0).any():
        missing = [data.class_names[i] for i in torch.nonzero(counts == 0).flatten().tolist()]
        console.print(f"[yellow]warning: classes {missing} have no training images[/]")
    if cfg.train.select_metric == "qwk" and not data.ordinal:
        raise ConfigError("train.select_metric=qwk needs ordinal labels; this data is nominal "
                          "(set data.ordinal=true if its class ids are ordered grades)")
    return counts
