"""The one training loop of the detector and both segmenters (torchvision's
references/detection ``train_one_epoch`` shape): optimizer, schedule, AMP step, atomic
checkpoints (``epoch`` = the last finished epoch; a resume starts at +1), the ``model.pt``
format ``{"model", "meta"}``, the JSONL log and the resume hash."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from bbam.atomic import atomic_torch_save, remove_stale_temps
from bbam.checkpoint import load_weights, resume_checkpoint
from bbam.data.records import ImageRecord, SkipReport
from bbam.device import check_device

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"
MODEL_NAME = "model.pt"
LOG_NAME = "train_log.jsonl"
# Knobs that do not change the result: a run may resume on another device or worker count.
NOT_HASHED = frozenset({"device", "num_workers", "log_every"})
# Knobs a run may resume across: raising ``epochs`` continues a checkpoint, since nothing
# before the last epoch reads it (`make_scheduler`'s warm-up and MultiStep milestones, the
# detector's MultiStepLR and first-epoch warm-up, `seed_epoch`). A schedule that reads the
# total (poly, cosine) must take ``epochs`` back into the hash. Lowering it below the
# checkpoint's finished epochs starts over (see `setup_training`).
RESUMABLE = frozenset({"epochs"})


@dataclasses.dataclass(frozen=True)
class TrainSchedule:
    """The optimiser/loop knobs both segmenter configs share (their own dataclass adds the
    model, the data and the schedule numbers whose defaults differ)."""

    momentum: float = 0.9
    weight_decay: float = 1e-4
    lr_gamma: float = 0.1
    clip_grad_norm: float | None = 10.0
    hflip: bool = True
    amp: bool = True
    device: str = "auto"
    num_workers: int = 0
    seed: int = 0
    max_iters_per_epoch: int | None = None
    log_every: int = 10


def check_schedule(config: Any) -> None:
    """Range checks of the loop knobs every trainer config shares (the detector's and both
    segmenters'), raising ValueError naming ``<Config>.<field>``.

    Why: out of range they fail late and obscurely (batch_size 0 divides by zero, a
    warmup_factor of 0 is refused by torch's LinearLR) or train silently wrong (epochs 0
    writes an untrained model, a negative clip_grad_norm flips the gradients, a NaN lr
    trains to NaN). Fields a config lacks are skipped."""
    name = type(config).__name__
    rules: dict[str, tuple[Callable[[Any], bool], str]] = {
        "epochs": (lambda v: v >= 1, ">= 1"),
        "batch_size": (lambda v: v >= 1, ">= 1"),
        # 0 is a freeze (the test projects keep a detector's random init with it)
        "lr": (lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0"),
        "momentum": (lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0"),
        "weight_decay": (lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0"),
        "lr_gamma": (lambda v: math.isfinite(v) and v > 0, "a finite number > 0"),
        "warmup_iters": (lambda v: v >= 0, ">= 0"),
        "warmup_factor": (lambda v: 0 < v <= 1, "in (0, 1]"),
        "lr_steps": (lambda v: all(s >= 1 for s in v), "epoch numbers >= 1"),
        "clip_grad_norm": (
            lambda v: v is None or (math.isfinite(v) and v >= 0),
            "null, 0 (off) or a finite number > 0",
        ),
        "num_workers": (lambda v: v >= 0, ">= 0"),
        "max_iters_per_epoch": (lambda v: v is None or v >= 0, "null, 0 (no cap) or >= 1"),
        "max_size": (lambda v: v >= 1, ">= 1"),
        "crop_size": (lambda v: v >= 1, ">= 1"),
        "scale": (lambda v: math.isfinite(v) and v > 0, "a finite number > 0"),
    }
    for field, (ok, wanted) in rules.items():
        if hasattr(config, field) and not ok(getattr(config, field)):
            raise ValueError(f"{name}.{field} must be {wanted}, got {getattr(config, field)!r}")
    if hasattr(config, "device"):
        try:
            check_device(config.device)
        except ValueError as exc:
            raise ValueError(f"{name}.{exc}") from None


def check_choices(config: Any, **allowed: Iterable[str]) -> None:
    """Raise ValueError naming ``<Config>.<field>`` when a field is not one of its choices."""
    for name, choices in allowed.items():
        value = getattr(config, name)
        if value not in tuple(choices):
            raise ValueError(f"{type(config).__name__}.{name}: {value!r} not in {tuple(choices)}")


def check_min_size(config: Any) -> None:
    """Normalise ``config.min_size``: a short side, or several for multi-scale training (each
    training image takes one at random, evaluation the last), as torchvision's
    GeneralizedRCNNTransform reads it. Raise ValueError naming the field when it is not."""
    value = config.min_size
    sizes = (value,) if isinstance(value, int) else tuple(value)
    if not sizes or not all(
        isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in sizes
    ):
        raise ValueError(
            f"{type(config).__name__}.min_size: {value!r} is not a positive int or a list of them"
        )
    object.__setattr__(config, "min_size", value if isinstance(value, int) else sizes)


def hashed_config(config: Any) -> dict[str, Any]:
    """The config fields that decide a resume (``epochs`` included), as JSON values: stored in
    each checkpoint so a refused one can say which fields changed."""
    fields = {k: v for k, v in dataclasses.asdict(config).items() if k not in NOT_HASHED}
    return json.loads(json.dumps(fields, sort_keys=True, default=str))


def params_hash(config: Any, extra: dict[str, Any] | None = None) -> str:
    """Stable hash of the config (and data identity) deciding whether a checkpoint may resume
    (`RESUMABLE` fields left out)."""
    config_dict = {k: v for k, v in hashed_config(config).items() if k not in RESUMABLE}
    payload = {"config": config_dict, "extra": extra or {}}
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def data_digest(records: list[ImageRecord], files: Iterable[str | Path | None] = ()) -> str:
    """Digest of what a training reads besides its config: the records' annotations (ids,
    labels, boxes, crowd flags, mask areas) and the bytes of `files` (pseudo labels, weights
    to start from; None entries are skipped). It joins the params hash, so new pseudo labels
    or a retrained detector start a fresh training instead of resuming a finished one."""
    digest = hashlib.sha256()
    for record in records:
        rows = [
            [
                int(i.label),
                [round(float(v), 3) for v in i.box],
                bool(i.iscrowd),
                -1 if i.mask_area is None else i.mask_area,
            ]
            for i in record.instances
        ]
        digest.update(json.dumps([record.image_id, rows]).encode())
    for path in files:
        if path is None:
            continue
        path = Path(path)
        digest.update(path.name.encode())
        with path.open("rb") as handle:
            while block := handle.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()[:16]


def load_weights_file(path: str | Path, what: str) -> dict[str, torch.Tensor]:
    """Local weights only (no downloads); a missing, damaged or unsafe file is a clear error
    naming it (`bbam.checkpoint.load_weights`)."""
    path = Path(path)
    state = load_weights(path, f"{what} weights")
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: {what} weights file does not hold a state dict")
    return state


def load_exact(module: torch.nn.Module, state: dict, path: str | Path, what: str) -> None:
    """Load every key of a trained model's file, or ValueError naming the file (torch's own
    error lists the keys but not the file: a foreign model.pt would be a puzzle)."""
    try:
        module.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as exc:
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise ValueError(
            f"{path}: not a {what} model of this config ({first}); re-run the stage that trains it"
        ) from exc


def load_partial(module: torch.nn.Module, state: dict[str, torch.Tensor], path: str | Path) -> int:
    """Load the keys whose names and shapes match; raise when none do (wrong file).

    A file whose keys carry a wrapper prefix (a detector's ``backbone.body.`` when the
    module is a bare backbone, DataParallel's ``module.``) is matched without it.
    """
    own = module.state_dict()
    best: dict[str, torch.Tensor] = {}
    for prefix in ("", "module.", "backbone.body.", "backbone."):
        stripped = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        usable = {k: v for k, v in stripped.items() if k in own and own[k].shape == v.shape}
        if len(usable) > len(best):
            best = usable
    if not best:
        raise ValueError(f"{path}: no parameter in the weights file matches the model")
    module.load_state_dict(best, strict=False)
    return len(best)


RESNET_STAGES = ("layer4", "layer3", "layer2", "layer1", "conv1")  # top first


def freeze_resnet_stages(body: torch.nn.Module, trainable: int) -> None:
    """Keep the top ``trainable`` of a ResNet's 5 stages trainable (5: all, 0: none), as
    torchvision's ``trainable_backbone_layers``; the rest (stem norm included) get no gradient,
    so the backward pass also stops above them."""
    if not 0 <= trainable <= len(RESNET_STAGES):
        raise ValueError(f"trainable_backbone_layers must be in [0, 5], got {trainable}")
    keep = RESNET_STAGES[:trainable] + (("bn1",) if trainable == len(RESNET_STAGES) else ())
    for name, param in body.named_parameters():
        if not name.startswith(keep):
            param.requires_grad_(False)


def iters_per_epoch(n_items: int, batch_size: int, max_iters_per_epoch: int | None) -> int:
    """Batches per epoch, capped by `max_iters_per_epoch` when set (0/None: no cap)."""
    iters = math.ceil(n_items / batch_size)
    return min(iters, max_iters_per_epoch) if max_iters_per_epoch else iters


def seed_epoch(seed: int, epoch: int, stride: int = 1000) -> torch.Generator:
    """Reseed torch for this epoch (augmentation) with ``seed * stride + epoch`` and return
    the loader's shuffle generator: a resumed run sees the same batches as an uninterrupted
    one."""
    gen = torch.Generator().manual_seed(seed * stride + epoch)
    torch.manual_seed(seed * stride + epoch)
    return gen


def optimizer_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler,
    loss: torch.Tensor,
    clip_grad_norm: float | None,
) -> None:
    """Backward through the (possibly disabled) AMP scaler, optional clipping (None or 0: off),
    step, then one step of the per-iteration ``scheduler`` (None: no per-iteration schedule)."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if clip_grad_norm:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
    scaler.step(optimizer)
    scaler.update()
    if scheduler is not None:
        scheduler.step()


def make_optimizer(
    model: torch.nn.Module, lr: float, momentum: float, weight_decay: float
) -> torch.optim.Optimizer:
    """SGD with momentum over the trainable parameters (frozen stages stay out of it)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


def make_scheduler(
    optimizer: torch.optim.Optimizer,
    iters_per_epoch: int,
    lr_steps: tuple[int, ...],
    lr_gamma: float,
    warmup_iters: int,
    warmup_factor: float,
) -> torch.optim.lr_scheduler.LRScheduler:
    """Linear warm-up then MultiStepLR at epoch boundaries, stepped once per iteration."""
    milestones = [int(s) * iters_per_epoch for s in lr_steps]

    def factor(it: int) -> float:
        warm = 1.0
        if it < warmup_iters:
            alpha = it / max(1, warmup_iters)
            warm = warmup_factor * (1 - alpha) + alpha
        return warm * lr_gamma ** sum(it >= m for m in milestones)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class JsonlLog:
    """Append-only training log, one JSON object per line, flushed each write."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # A run that died mid-line (disk full, a lost node) left a torn last line: end it,
        # so this run's first record is a line of its own rather than glued onto it.
        if self.path.is_file() and self.path.stat().st_size:
            with self.path.open("rb+") as handle:
                handle.seek(-1, 2)
                if handle.read(1) != b"\n":
                    handle.write(b"\n")

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, sort_keys=True) + "\n")
            handle.flush()


@dataclasses.dataclass(frozen=True)
class TrainingSetup:
    """Everything the epoch loop needs besides the model and the data.

    ``scheduler`` is the checkpointed schedule, stepped once per iteration, or once per
    epoch when ``epoch_schedule`` (then ``warmup``, when set, steps per iteration in the
    first epoch). Epoch ``e`` reseeds with ``seed * seed_stride + e``. ``train_seconds`` is
    what the resumed checkpoint had already spent."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    use_amp: bool
    iters: int
    params_hash: str
    start_epoch: int
    log: JsonlLog
    epoch_schedule: bool = False
    warmup: torch.optim.lr_scheduler.LRScheduler | None = None
    seed_stride: int = 1000
    train_seconds: float = 0.0


def setup_training(
    model: torch.nn.Module,
    config: Any,
    n_items: int,
    out_dir: Path,
    device: torch.device,
    phash: str,
    skipped: SkipReport | None = None,
    schedule: Literal["iteration", "epoch"] = "iteration",
    seed_stride: int = 1000,
) -> TrainingSetup:
    """Optimizer, schedule, AMP scaler, resume and log, built the same way for every trainer
    so their checkpoints and logs cannot drift apart.

    A checkpoint in `out_dir` made with `phash` is loaded into the model, optimizer,
    scheduler and scaler ("resume" event); any other one (another hash, unreadable,
    foreign) starts over ("restart" event with its reason, and a warning naming the file;
    for another hash, the config fields that changed, as ``changed``: field -> [was, now]).
    One with more finished epochs than ``config.epochs`` also starts over, rather than
    write a model trained longer than asked. No checkpoint is a "start" event. Skipped
    records are logged once, as a "skipped" event. ``schedule``: "iteration" is
    `make_scheduler` (the segmenters); "epoch" is torchvision's detection reference (the
    detector): MultiStepLR stepped per epoch after a linear warm-up over the first epoch's
    iterations.
    """
    optimizer = make_optimizer(model, config.lr, config.momentum, config.weight_decay)
    max_iters = getattr(config, "max_iters_per_epoch", None)
    iters = iters_per_epoch(n_items, config.batch_size, max_iters)
    if schedule == "epoch":
        scheduler = torch.optim.lr_scheduler.MultiStepLR(
            optimizer, milestones=list(config.lr_steps), gamma=config.lr_gamma
        )
    else:
        scheduler = make_scheduler(
            optimizer,
            iters,
            config.lr_steps,
            config.lr_gamma,
            config.warmup_iters,
            config.warmup_factor,
        )
    use_amp = config.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    path = Path(out_dir) / CHECKPOINT_NAME
    for name in (CHECKPOINT_NAME, MODEL_NAME):  # temps of writes whose process died
        for tmp in remove_stale_temps(Path(out_dir) / name):
            logger.info("removed %s, left by a write whose process died", tmp)
    ckpt, why, changed = None, *_refusal(path, phash, config)
    if not why:
        ckpt, why = _resume(out_dir, phash, model, optimizer, scheduler, scaler)
    start = 0 if ckpt is None else int(ckpt["epoch"]) + 1
    spent = ckpt.get("train_seconds", 0.0) if ckpt is not None else 0.0
    spent = float(spent) if isinstance(spent, int | float) else 0.0  # older checkpoints: none
    warmup = None
    if schedule == "epoch":
        warmup = _first_epoch_warmup(optimizer, iters, config, start)
    log = JsonlLog(Path(out_dir) / LOG_NAME)
    if ckpt is not None:
        logger.info("resuming from %s after epoch %d", Path(out_dir) / CHECKPOINT_NAME, start - 1)
        log.write({"event": "resume", "epoch": start})
    else:
        event = {"event": "restart", "reason": why} if why else {"event": "start"}
        log.write({**event, "changed": changed} if changed else event)
    if skipped is not None and skipped.total:
        log.write({"event": "skipped", "counts": skipped.counts, "examples": skipped.examples})
    return TrainingSetup(
        optimizer,
        scheduler,
        scaler,
        use_amp,
        iters,
        phash,
        start,
        log,
        epoch_schedule=schedule == "epoch",
        warmup=warmup,
        seed_stride=seed_stride,
        train_seconds=spent,
    )


def _first_epoch_warmup(
    optimizer: torch.optim.Optimizer, iters: int, config: Any, start_epoch: int
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """torchvision's detection warm-up: linear over the first epoch's iterations only (capped
    to that epoch), none when a resume starts after it; it is not checkpointed."""
    warmup_iters = min(config.warmup_iters, iters - 1)
    if start_epoch > 0 or warmup_iters <= 0:
        return None
    return torch.optim.lr_scheduler.LinearLR(
        optimizer, start_factor=config.warmup_factor, total_iters=warmup_iters
    )


def _peek(path: Path) -> dict[str, Any] | None:
    """The checkpoint's numbers and stored config without reading its tensors (mmap), or None
    when there is none or it cannot be read (`resume_checkpoint` then says why)."""
    if not path.is_file():
        return None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return None
    return ckpt if isinstance(ckpt, dict) and "params_hash" in ckpt else None


def _config_changes(was: Any, now: dict[str, Any]) -> dict[str, list[Any]]:
    """Field -> [was, now] for each hashed config field that differs ({} when `was` is not a
    stored config)."""
    if not isinstance(was, dict):
        return {}
    keys = sorted(set(was) | set(now))
    return {k: [was.get(k), now.get(k)] for k in keys if was.get(k) != now.get(k)}


def _refusal(path: Path, phash: str, config: Any) -> tuple[str, dict[str, list[Any]]]:
    """(why, changed fields) when a readable checkpoint must not be resumed: made with another
    params hash, or with more finished epochs than ``config.epochs`` asks for (resuming it
    would write a model trained longer than asked). ("", {}) otherwise."""
    ckpt = _peek(path)
    if ckpt is None:
        return "", {}
    changed = _config_changes(ckpt.get("config"), hashed_config(config))
    if ckpt["params_hash"] != phash:
        if changed:
            what = ", ".join(f"{k} {was!r} -> {now!r}" for k, (was, now) in changed.items())
        elif "config" in ckpt:
            what = "no config field; the data, classes or weights it trains on"
        else:
            what = "unknown (a checkpoint without its config)"
        logger.warning(
            "%s was made with params_hash %s, not %s (changed: %s): starting over",
            path,
            ckpt["params_hash"],
            phash,
            what,
        )
        return "params_hash changed", changed
    done = ckpt.get("epoch")
    if isinstance(done, int) and done + 1 > config.epochs:
        logger.warning(
            "%s has %d finished epochs, more than epochs=%d: starting over, so that the model "
            "is trained for the epochs asked",
            path,
            done + 1,
            config.epochs,
        )
        return "checkpoint has more epochs than asked", changed
    return "", {}


def _resume(
    out_dir: Path,
    phash: str,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: Any,
) -> tuple[dict[str, Any] | None, str]:
    states = {"model": model, "optimizer": optimizer, "scheduler": scheduler}
    if scaler is not None:
        states["scaler"] = scaler
    return resume_checkpoint(Path(out_dir) / CHECKPOINT_NAME, phash, states)


def try_resume(
    out_dir: Path,
    phash: str,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: Any,
) -> tuple[int, str]:
    """(first epoch still to run, why it starts over): the checkpoint is loaded when its
    params_hash matches; anything else (another params hash, an unreadable or foreign file)
    starts over at 0 with the reason ("" when resumed or there is no checkpoint); see
    ``resume_checkpoint``."""
    ckpt, why = _resume(out_dir, phash, model, optimizer, scheduler, scaler)
    return (0, why) if ckpt is None else (int(ckpt["epoch"]) + 1, "")


def save_checkpoint(
    out_dir: Path,
    phash: str,
    epoch: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: Any,
    config: dict[str, Any] | None = None,
    **numbers: float,
) -> None:
    """An atomic ``checkpoint.pt``; ``epoch`` is the last finished one (a resume runs +1).
    ``config`` (`hashed_config`) and ``numbers`` (e.g. ``train_seconds``) are stored beside
    it; the config lets a refused resume name the fields that changed."""
    state = {
        **numbers,
        **({} if config is None else {"config": config}),
        "params_hash": phash,
        "epoch": epoch,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else {},
    }
    atomic_torch_save(state, Path(out_dir) / CHECKPOINT_NAME)


@dataclasses.dataclass
class TrainResult:
    """What a segmenter's training returns: the model, where it was written, every step's
    loss, the epoch it started at (> 0 after a resume) and the records it skipped."""

    model: torch.nn.Module
    out_dir: Path
    losses: list[float] = dataclasses.field(default_factory=list)
    start_epoch: int = 0
    skipped: SkipReport = dataclasses.field(default_factory=SkipReport)


StepLoss = Callable[[Any, int, int], tuple[torch.Tensor | None, dict[str, float]]]


def train_one_epoch(
    model: torch.nn.Module,
    loader: DataLoader,
    setup: TrainingSetup,
    epoch: int,
    step_loss: StepLoss,
    clip_grad_norm: float | None,
    log_every: int,
    desc: str = "train",
    progress: bool = True,
) -> tuple[list[float], dict[str, float]]:
    """One pass over `loader` (at most ``setup.iters`` steps), as torchvision's
    references/detection ``engine.train_one_epoch`` serves every model.

    ``step_loss(batch, epoch, iter)`` returns the loss to step on (None: skip the batch) and
    the loss terms to log; every ``log_every``-th step (and the last) is logged. Returns the
    loss of every step and the epoch's mean of each term and of the loss.
    """
    model.train()
    per_iter = setup.scheduler if not setup.epoch_schedule else None
    if setup.epoch_schedule and epoch == 0:
        per_iter = setup.warmup
    losses: list[float] = []
    sums: dict[str, float] = {}
    bar = tqdm(loader, total=setup.iters, desc=f"{desc} epoch {epoch}", disable=not progress)
    t0 = time.perf_counter()
    for it, batch in enumerate(bar):
        if it >= setup.iters:
            break
        loss, terms = step_loss(batch, epoch, it)
        if loss is None:
            continue
        optimizer_step(model, setup.optimizer, per_iter, setup.scaler, loss, clip_grad_norm)
        value = loss.item()
        losses.append(value)
        for key, term in {**terms, "loss": value}.items():
            sums[key] = sums.get(key, 0.0) + term
        bar.set_postfix(loss=f"{value:.3f}")
        if log_every > 0 and (it % log_every == 0 or it == setup.iters - 1):
            setup.log.write(
                {
                    **terms,
                    "epoch": epoch,
                    "iter": it,
                    "loss": value,
                    "lr": setup.optimizer.param_groups[0]["lr"],
                    "elapsed_s": round(time.perf_counter() - t0, 3),
                }
            )
    return losses, {key: total / max(len(losses), 1) for key, total in sums.items()}


def run_epochs(
    model: torch.nn.Module,
    dataset: torch.utils.data.Dataset,
    config: Any,
    setup: TrainingSetup,
    out_dir: Path,
    classes: list[str],
    step_loss: StepLoss,
    desc: str,
    progress: bool = True,
    **loader_kwargs: Any,
) -> tuple[list[float], float]:
    """The epoch loop every trainer uses; returns the loss of every step and the training
    seconds (those of the resumed checkpoint included).

    Each epoch shuffles with its own seeded generator (a redone epoch sees the same order),
    runs `train_one_epoch`, logs an "epoch_end" event with the mean losses, steps a per-epoch
    schedule, then writes the checkpoint (epoch = the last finished one); the end writes
    ``model.pt``. ``loader_kwargs`` go to the DataLoader (``collate_fn``, ``drop_last``,
    ``pin_memory``).
    """
    losses: list[float] = []
    seconds = setup.train_seconds
    for epoch in range(setup.start_epoch, config.epochs):
        loader = DataLoader(
            dataset,
            batch_size=config.batch_size,
            shuffle=True,
            generator=seed_epoch(config.seed, epoch, setup.seed_stride),
            num_workers=config.num_workers,
            **loader_kwargs,
        )
        tic = time.perf_counter()
        epoch_losses, means = train_one_epoch(
            model,
            loader,
            setup,
            epoch,
            step_loss,
            config.clip_grad_norm,
            config.log_every,
            desc,
            progress,
        )
        if setup.epoch_schedule:
            setup.scheduler.step()
        seconds += time.perf_counter() - tic
        losses += epoch_losses
        setup.log.write({"event": "epoch_end", "epoch": epoch, **means})
        save_checkpoint(
            out_dir,
            setup.params_hash,
            epoch,
            model,
            setup.optimizer,
            setup.scheduler,
            setup.scaler,
            config=hashed_config(config),
            train_seconds=seconds,
        )
    save_model(out_dir, model, classes, config)
    return losses, seconds


def save_model(out_dir: Path, model: torch.nn.Module, classes: list[str], config: Any) -> None:
    """The final `model.pt`: weights plus what is needed to rebuild the model."""
    meta = {
        "num_classes": len(classes) + 1,
        "classes": list(classes),
        "config": dataclasses.asdict(config),
    }
    atomic_torch_save({"model": model.state_dict(), "meta": meta}, Path(out_dir) / MODEL_NAME)
