"""Typed run configuration: YAML in, validated pydantic models out.

Configs are data. Nothing in a config is executed or imported; components (models, loss
terms, aggregators) are looked up by name in allow-listed registries. Unknown keys are errors
that name the key and the file.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from medistill.errors import ConfigError
from medistill.overrides import Override, _set_dotted, apply_overrides, override_key, parse_override  # noqa: F401


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @model_validator(mode="before")
    @classmethod
    def _on_off_words(cls, data: Any) -> Any:
        """YAML reads on/off (and yes/no) as booleans, so ``--set train.amp=off`` arrives as
        False: for a field whose choices include "on"/"off", a boolean means that word."""
        if not isinstance(data, dict):
            return data
        out = dict(data)
        for name, value in data.items():
            field = cls.model_fields.get(name) if isinstance(name, str) else None
            if field is None or not isinstance(value, bool):
                continue
            words = set(get_args(field.annotation)) if get_origin(field.annotation) is Literal else set()
            if "on" in words and value:
                out[name] = "on"
            elif "off" in words and not value:
                out[name] = "off"
        return out


class SubsetConfig(_Strict):
    """Imbalance tools applied to the training split only (val/test are never touched)."""

    imbalance_ratio: float | None = Field(None, gt=1.0, description="long-tailed subsample: n_max / n_min")
    max_per_class: int | None = Field(None, ge=1, description="cap per class (balanced subset)")
    fraction: float | None = Field(None, gt=0.0, le=1.0, description="stratified fraction of train")
    max_samples: int | None = Field(None, ge=1, description="stratified cap on the train size (quick runs)")
    seed: int = 0


class DataConfig(_Strict):
    name: str = Field("retinamnist", description="MedMNIST name (e.g. retinamnist, breastmnist_64), .npz path, image folder or CSV manifest")
    format: Literal["auto", "medmnist", "folder", "csv"] = "auto"
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    test_fraction: float = Field(0.2, ge=0.0, lt=1.0)
    split_seed: int = 0
    tiny_class_policy: Literal["error", "train_only"] = "error"
    augment: Literal["none", "flip", "dihedral", "standard"] = "standard"
    balanced_sampler: bool = False
    skip_corrupt: bool = False
    duplicates: Literal["warn", "error", "drop", "off"] = Field(
        "warn", description="exact copies of an image in two splits and images under two labels (pixels of an .npz, "
        "bytes of image files): a one-line note printed and kept in split.json (warn), refused (error), removed — "
        "every label-conflicting image and the val/test copies of earlier splits' images, listed in split.json "
        "`dropped` (drop) — or not checked (off)")
    subset: SubsetConfig = SubsetConfig()
    max_eval_samples: int | None = Field(None, ge=1, description="stratified cap on val/test (smoke tests only)")
    protocol: Literal["none", "source-imbalanced", "target-imbalanced"] = "none"
    protocol_cap: dict[int, int] | None = Field(None, description="per-class caps of the balanced subset; default: the median class count of the training split")
    role: Literal["auto", "teacher", "student"] = Field("auto", description="protocol side; auto: teacher when the run has no teachers")
    num_workers: int | Literal["auto"] = Field(
        "auto", description="DataLoader worker processes; auto on a CPU device: 1 for image files (decoding "
        "overlaps the step), 0 for an in-memory array (a worker would only compete with the training threads; "
        "both measured in docs/benchmarks.md), min(8, CPUs/2) on CUDA/MPS")
    prefetch_factor: int = Field(2, ge=1, description="batches each worker loads ahead (with num_workers > 0)")
    resident: Literal["auto", "on", "off"] = Field(
        "auto", description="keep a MedMNIST .npz on the training device and gather, resize and augment "
        "(none/flip/dihedral, or standard's random crops and flips) whole batches there; auto: on for CUDA when the "
        "array takes under a quarter of the free device memory")

    @field_validator("num_workers", mode="before")
    @classmethod
    def _workers(cls, v: Any) -> Any:
        if isinstance(v, int) and not isinstance(v, bool) and v < 0:
            raise ValueError("must be ≥ 0 or auto")
        return v

    ordinal: Literal["auto"] | bool = Field("auto", description="labels are ordered grades (QWK reported); auto: "
                                           "true for RetinaMNIST, false otherwise")
    group_pattern: str | None = Field(None, description="regular expression on image file names whose first group "
                                      "(or match) is the patient/study id; a CSV `group` column does the same")
    group_by: Literal["auto", "dicom_patient_id"] = Field("auto", description="auto: a CSV `group` column or "
                                                           "group_pattern; dicom_patient_id: the DICOM PatientID tag")
    window: tuple[float, float] | None = Field(None, description="(center, width) for DICOM and 16-bit images; "
                                               "default: the DICOM file's window, else the image's range")
    dicom_frame: int | None = Field(None, ge=0, description="the frame read from multi-frame DICOM files")
    class_names: list[str] | None = Field(None, description="names of the class ids 0…K−1, shown wherever a class is "
                                          "(default: the file's `class_names` array, folder names, CSV labels, or ids)")
    unlabeled: str | None = Field(None, description="images without labels (a flat image folder, a CSV with a path "
                                  "column and no label, or an .npz with `images`): the student learns the teacher's "
                                  "outputs on them through every term that needs no label (kd, fitnet, …)")
    label_fraction: float | None = Field(None, gt=0.0, le=1.0, description="keep this stratified, seeded share of the "
                                         "training labels; the other training images join the unlabelled pool")
    unlabeled_ratio: float | None = Field(None, ge=0.0, lt=1.0, description="share of every training batch drawn from "
                                          "the unlabelled pool (an epoch is one pass over the labelled images); "
                                          "default: one shuffled pass over labelled and unlabelled images together")
    folds: int | None = Field(None, ge=2, description="cross-validation: K folds over train ∪ val; test untouched")
    fold: int = Field(0, ge=0, description="which fold is the validation part (with data.folds)")

    @model_validator(mode="after")
    def _folds_and_fractions(self) -> "DataConfig":
        if self.fold and (self.folds is None or self.fold >= self.folds):
            raise ValueError(f"data.fold={self.fold} needs data.folds > {self.fold} (folds are 0…K−1)")
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError(f"val_fraction + test_fraction = {self.val_fraction + self.test_fraction:g} leaves no "
                             "training images; their sum must be below 1")
        return self


class ModelSpec(_Strict):
    name: str = "student"
    model: str = "resnet18"
    input_size: int | None = Field(None, ge=8, le=4096, description="default: the dataset's native size")
    in_chans: int | None = Field(None, description="default: the dataset's channels")
    pretrained: str | bool = False
    small_input: Literal["auto", "on", "off", "stride8", "stride16"] = Field(
        "auto", description="stem adaptation for small inputs: auto (≤ 64 px; pooling kept from 48 px), on, off, "
        "or stride8/stride16 to force the adaptation without/with the stem's pooling")
    norm: Literal["auto", "imagenet", "half"] | tuple[list[float], list[float]] = "auto"
    kwargs: dict[str, Any] = Field(default_factory=dict)


class TeacherSpec(_Strict):
    name: str = "teacher"
    checkpoint: str = Field(..., description="run directory, model directory, ensemble directory or weights file")
    allow_other_data: bool = Field(False, description="accept a teacher whose model.json records another dataset "
                                   "(fingerprint or class names), e.g. one trained on a larger collection")
    model: str | None = Field(None, description="architecture; read from model.json when omitted. With a weights "
                              "file from elsewhere (ARCH=FILE), the size, mean and std come from the checkpoint's args "
                              "or the model's pretrained_cfg")
    input_size: int | None = Field(None, ge=8, le=4096, description="default: the model's own (model.json, "
                                   "checkpoint args, pretrained_cfg)")
    norm: Literal["auto", "imagenet", "half"] | tuple[list[float], list[float]] | None = None
    small_input: Literal["auto", "on", "off", "stride8", "stride16"] = Field(
        "off", description="weights file from elsewhere: its stem as trained (off), or medistill's small-input stem "
        "when the weights were trained with it")
    weights: Literal["raw", "ema"] = Field("raw", description="weights file from elsewhere: the raw weights, or timm's "
                                           "EMA weights (state_dict_ema)")


class TermSpec(BaseModel):
    """One loss term. Term-specific keys are validated by the term's own schema."""

    model_config = ConfigDict(extra="allow")
    type: str
    weight: float = 1.0
    student: str | None = Field(None, description="student the term trains; default: every student")
    warmup_epochs: float = Field(0.0, ge=0.0, description="linear ramp of the weight, min(epoch/warmup, 1)")

    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class OptimConfig(_Strict):
    name: str = Field("adamw", description="sgd, adam, adamw, or any optimizer of timm's factory (lamb, lars, adan, …)")
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(5e-4, ge=0)
    momentum: float = 0.9
    nesterov: bool = True
    head_lr: float | None = Field(None, description="learning rate of the classifier head (default: lr)")
    module_lr: float | None = Field(None, description="learning rate of method modules (projectors, CFL blocks)")

    @field_validator("name")
    @classmethod
    def _known_optimizer(cls, v: str) -> str:
        from timm.optim import list_optimizers

        names = list_optimizers()
        if v not in names:
            close = difflib.get_close_matches(v, names, n=4)
            raise ValueError(f"unknown optimizer {v!r}" + (f"; did you mean {', '.join(close)}?" if close else
                                                           "; see timm.optim.list_optimizers()"))
        return v


class SchedConfig(_Strict):
    name: Literal["cosine", "step", "constant"] = "cosine"
    warmup_epochs: float = Field(0.0, ge=0)
    step_size: int = 30
    gamma: float = 0.1
    min_lr: float = 0.0


class EMAConfig(_Strict):
    enabled: bool = False
    decay: float = Field(0.999, gt=0, lt=1)


class SWAConfig(_Strict):
    """Stochastic weight averaging from ``start_epoch``; the averaged model (BatchNorm statistics
    re-estimated on the training split) is what gets saved, evaluated and distilled from."""

    enabled: bool = False
    start_epoch: int = Field(0, ge=0)
    lr: float | None = Field(None, gt=0, description="constant learning rate during SWA (default: keep the schedule)")


class TrainConfig(_Strict):
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(64, ge=1)
    eval_batch_size: int = Field(256, ge=1)
    eval_batch_mb: float = Field(256, gt=0, description="evaluation and cache batches hold at most this many MiB of "
                                 "images (fewer than eval_batch_size at large image sizes)")
    seed: int = 0
    loss: Literal["ce", "focal", "cb_ce", "cb_focal", "logit_adjusted"] = "ce"
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    class_weights: Literal["none", "balanced", "class_balanced"] = "none"
    focal_gamma: float = 2.0
    grad_clip: float | None = Field(None, gt=0)
    ema: EMAConfig = EMAConfig()
    swa: SWAConfig = SWAConfig()
    channels_last: bool = False
    bf16: bool = Field(False, description="alias of amp: bf16 (kept for old configs)")
    amp: Literal["off", "bf16", "fp16"] = Field("off", description="mixed precision of forward passes; fp16 adds a "
                                                "checkpointed gradient scaler; losses stay float32")
    teacher_amp: Literal["auto", "off", "bf16", "fp16"] = Field(
        "auto", description="precision of the frozen teachers' forward passes, live and cached: auto follows amp when "
        "it is on, else bf16 where the device computes it natively (bf16 GPUs, CPUs with AVX512-BF16 or AMX), else off")
    device: str = Field("auto", pattern=r"^(auto|cpu|mps|cuda(:\d+)?)$",
                        description="auto (CUDA, then MPS, else CPU), cpu, cuda, cuda:N or mps")
    deterministic: bool = Field(False, description="deterministic kernels (cuDNN autotuning off); slower on GPUs")
    compile: Literal["off", "default", "reduce-overhead", "max-autotune", "eager"] = Field(
        "off", description="torch.compile the students' training forward with this mode (eager: capture only, "
        "no code generation; a check that a model compiles)")

    @model_validator(mode="before")
    @classmethod
    def _bf16_alias(cls, data: Any) -> Any:
        """``bf16: true`` (older configs) means ``amp: bf16``; set against ``amp: fp16`` it is an error."""
        if isinstance(data, dict) and data.get("bf16") is True:
            amp = data.get("amp", "off")
            if amp == "off":
                data = {**data, "amp": "bf16"}
            elif amp != "bf16":
                raise ValueError(f"train.bf16=true conflicts with train.amp={amp}; set only train.amp")
        return data
    mix: Literal["none", "mixup", "cutmix"] = Field(
        "none", description="mixing augmentation of each training batch, seen alike by teachers and students "
        "(function matching); the teacher then runs live (no cache); supervised terms mix their two labels")
    mix_alpha: float = Field(1.0, gt=0, description="mixing weight lam ~ Beta(mix_alpha, mix_alpha)")
    select_metric: Literal["balanced_accuracy", "accuracy", "macro_f1", "qwk", "auroc", "neg_nll"] = "balanced_accuracy"
    early_stopping_patience: int | None = Field(None, ge=1)
    update: Literal["simultaneous", "sequential"] = "simultaneous"
    teacher_cache: Literal["auto", "on", "off"] = "auto"
    teacher_cache_max_mb: float = Field(4096, gt=0, description="largest teacher cache (logits + taps, all views) kept in memory")
    teacher_views: int = Field(4, ge=1, description="with data.augment=standard and a cached teacher: fixed random crops "
                               "per image (seeded by data.split_seed) the student draws from, each cached")
    latency: bool = True
    cache_dir: str | None = Field(None, description="teacher cache directory (default: $MEDISTILL_CACHE_DIR or the user cache)")
    progress: bool = True
    threads: int | None = Field(None, ge=1)


class EvalConfig(_Strict):
    """How results are reported: bootstrap intervals and a binary task's operating threshold."""

    bootstrap: int = Field(1000, ge=0, description="stratified bootstrap resamples for 95 % intervals (0: none)")
    bootstrap_seed: int = 0
    target_sensitivity: float | None = Field(None, gt=0, le=1, description="binary tasks: the threshold is the "
                                             "highest reaching this validation sensitivity (default: Youden's J)")
    degenerate_share: float = Field(0.5, gt=0, le=1, description="a model whose predictions cover fewer than this "
                                    "share of the classes (or one class) is named degenerate: warned at the epoch, "
                                    "in the summary and in the verdict")
    chance_epochs: int = Field(3, ge=1, description="a model at chance on validation (balanced accuracy 1/K) for this "
                               "many epochs in a row is said to be stuck")


class RunConfig(_Strict):
    """Everything a ``train`` or ``distill`` run needs."""

    data: DataConfig = DataConfig()
    students: list[ModelSpec] = Field(default_factory=lambda: [ModelSpec()])
    teachers: list[TeacherSpec] = Field(default_factory=list)
    terms: list[TermSpec] = Field(default_factory=list)
    optim: OptimConfig = OptimConfig()
    sched: SchedConfig = SchedConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    out: str = "runs/run"

    @model_validator(mode="after")
    def _unique_names(self) -> "RunConfig":
        names = [s.name for s in self.students] + [t.name for t in self.teachers]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"participant names must be unique; repeated: {sorted(dup)}")
        if not self.students:
            raise ValueError("at least one student is required")
        known = {s.name for s in self.students}
        for t in self.terms:
            if t.student is not None and t.student not in known:
                raise ValueError(f"term {t.type!r} names student {t.student!r}; students are {sorted(known)}")
        return self


def _close_keys(loc: tuple[Any, ...]) -> str:
    """``; did you mean 'epochs'?`` for a mistyped key, from the fields of the model it is in."""
    model: Any = RunConfig
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return ""
        ann = field.annotation
        args = [a for a in (get_args(ann) or (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)]
        args += [b for a in get_args(ann) for b in get_args(a) if isinstance(b, type) and issubclass(b, BaseModel)]
        if not args:
            return ""
        model = args[0]
    close = difflib.get_close_matches(str(loc[-1]), list(getattr(model, "model_fields", {})), n=3)
    return f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""


def _format_validation_error(e: ValidationError, source: str) -> str:
    lines = [f"invalid configuration ({source}):"]
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "<root>"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key" + _close_keys(err["loc"])
        lines.append(f"  {loc}: {msg}" + (f" (got {err.get('input')!r})" if err["type"] != "extra_forbidden" and "input" in err and not isinstance(err.get("input"), dict) else ""))
    return "\n".join(lines)


def load_config(path: str | Path | None = None, overrides: list[Override] | None = None,
                base: dict[str, Any] | None = None) -> RunConfig:
    """Load YAML (safe loader only), apply dotted overrides, validate.

    Raises :class:`ConfigError` naming the file and the offending key. The tree starts from the
    defaults, so that overrides can address list items (``students.0.model=...``)."""
    tree: dict[str, Any] = _deep_merge(RunConfig().model_dump(mode="json"), dict(base or {}))
    source = "command line"
    if path is not None:
        p = Path(path)
        source = str(p)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from e
        except UnicodeDecodeError as e:
            raise ConfigError(f"{p}: not a UTF-8 text file (byte {e.start}); a config is YAML text") from None
        if loaded is None:   # an empty file is a mistake, not a request for every default (a RetinaMNIST run)
            raise ConfigError(f"{p} is empty; a config names at least its data and students (examples in configs/)")
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: top level must be a mapping, got {type(loaded).__name__}")
        tree = _deep_merge(tree, loaded)
    for item in overrides or []:
        key, value = parse_override(item)
        _set_dotted(tree, key, value)
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, source)) from None


def _deep_merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
