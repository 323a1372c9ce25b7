"""One training loop for every decoder, on HF accelerate.

Examples are (image feature, one reference caption) pairs, so one epoch visits every caption once.
The order is a permutation seeded by ``seed + epoch``; a global batch of ``batch_size x processes``
pairs is cut into one slice per process. Because order and RNG state are functions of the step,
a run resumed from ``checkpoint/last`` takes exactly the steps an uninterrupted run would have.

Layout under ``out``::

    train_log.jsonl        one JSON object per logged step / validation (also handed to the
                           experiment trackers of ``log_with``, at its step: tracking.py)
    checkpoint/last/       accelerate state (model, optimizer, scheduler, RNG, the weight average
                           with ``ema_decay``) + trainer_state.json
    checkpoint/best/       the decoder's save_pretrained at the lowest validation loss (the
                           weight average's, with ``ema_decay``)
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

import jsonlines
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from diffusion_captioner.consensus import consensus_targets
from diffusion_captioner.ema import WeightAverage
from diffusion_captioner.features import SplitFeatures
from registry import CaptionDecoder

logger = logging.getLogger(__name__)

LRSchedule = Literal["constant", "linear", "cosine_with_restarts", "linear_per_epoch"]
CheckpointRule = Literal["best_val", "first_overfit"]
MixedPrecision = Literal["no", "fp16", "bf16"]


@dataclass
class TrainConfig:
    """Optimisation settings shared by every decoder (AdamW).

    ``lr_schedule``: ``constant``, ``linear`` (to 0), ``cosine_with_restarts`` (transformers'
    schedules, after ``warmup_steps``), or ``linear_per_epoch``: epoch e of E trains at
    ``lr + (final_lr - lr) e / (E - 1)``, constant within the epoch (the original CLIP-DiffusionLM
    code's ``torch.linspace(1e-4, 5e-5, EPOCH_NUM)``; needs ``epochs``).
    ``checkpoint_rule``: which weights become ``checkpoint/best``: ``best_val`` (the lowest
    validation loss) or ``first_overfit`` (the original's rule: the weights at the first
    validation whose loss exceeds ``overfit_ratio`` x the mean training loss since the previous
    one; the last weights when that never happens). ``eval_every``: steps, or ``"epoch"``.
    ``consensus_targets``: the share of training pairs whose caption becomes its image's
    consensus reference (:mod:`diffusion_captioner.consensus`), applied when the trainer is made.
    ``ema_decay``: d > 0 keeps an exponential moving average of the trained weights
    (:mod:`diffusion_captioner.ema`); validation, and so ``checkpoint/best``, then use the average
    while training continues from the weights themselves. 0: off.
    """

    batch_size: int = 64
    lr: float = 1e-4
    weight_decay: float = 0.0
    lr_schedule: LRSchedule = "constant"
    final_lr: float | None = None  # linear_per_epoch: the last epoch's lr
    warmup_steps: int = 0
    num_cycles: int = 1  # cosine_with_restarts: number of hard restarts
    epochs: float | None = None  # train for this many passes over the captions ...
    max_steps: int | None = None  # ... or this many optimizer steps (the smaller wins)
    max_minutes: float | None = None  # wall-clock budget on top of the step budget
    eval_every: int | Literal["epoch"] = 500
    eval_batches: int | None = 20  # validation loss over at most this many batches
    checkpoint_rule: CheckpointRule = "best_val"
    overfit_ratio: float = 1.02  # first_overfit: validation / training loss ratio
    save_every: int | None = None  # last-checkpoint cadence; default: eval_every
    log_every: int = 25
    grad_accum: int = 1
    mixed_precision: MixedPrecision = "no"
    max_grad_norm: float | None = 1.0
    seed: int = 0
    consensus_targets: float = 0.0
    ema_decay: float = 0.0
    cpu: bool = False  # force CPU even when an accelerator is present

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown training option(s) {', '.join(unknown)}; "
                             f"known: {', '.join(sorted(known))}")
        config = cls(**values)
        choices = {"lr_schedule": LRSchedule, "checkpoint_rule": CheckpointRule}
        for name, literal in choices.items():
            if getattr(config, name) not in literal.__args__:
                raise ValueError(f"training option {name}={getattr(config, name)!r}; choose one "
                                 f"of: {', '.join(literal.__args__)}")
        if not 0.0 <= config.consensus_targets <= 1.0:
            raise ValueError("training option consensus_targets must be in [0, 1], got "
                             f"{config.consensus_targets}")
        if not 0.0 <= config.ema_decay < 1.0:
            raise ValueError("training option ema_decay must be in [0, 1) (0: off), got "
                             f"{config.ema_decay}")
        if config.lr_schedule == "linear_per_epoch" and (config.epochs is None
                                                         or config.final_lr is None):
            raise ValueError("training option lr_schedule='linear_per_epoch' needs epochs and "
                             "final_lr")
        if config.lr_schedule == "linear_per_epoch" and (config.warmup_steps or
                                                         config.num_cycles != 1):
            raise ValueError("training option lr_schedule='linear_per_epoch' takes no "
                             "warmup_steps or num_cycles")
        if config.lr_schedule != "linear_per_epoch" and config.final_lr is not None:
            raise ValueError(f"training option final_lr is for lr_schedule='linear_per_epoch', "
                             f"not {config.lr_schedule!r}")
        if not (config.eval_every == "epoch" or (isinstance(config.eval_every, int)
                                                 and config.eval_every >= 1)):
            raise ValueError(f"training option eval_every={config.eval_every!r}: a number of "
                             "steps >= 1, or 'epoch'")
        return config


class CaptionPairs:
    """(feature row, caption) pairs of a split; ``batch(indices)`` collates a decoder batch:
    ``{"features": (B, D), "captions": [str] * B, "references": [tuple[str, ...]] * B}`` (each
    pair's image's every caption, its own included) plus ``"text_features": (B, D)`` (the CLIP
    text feature of each caption) when ``text_features`` (one row per caption, in order) is given.
    """

    def __init__(self, features: torch.Tensor, captions: list[tuple[str, ...]],
                 text_features: torch.Tensor | None = None) -> None:
        self.features = features  # (N, D)
        self.captions = [tuple(refs) for refs in captions]
        self.pairs = [(row, c) for row, refs in enumerate(captions) for c in refs]
        self.text_features = text_features  # (P, D) or None
        if text_features is not None and len(text_features) != len(self.pairs):
            raise ValueError(f"{len(text_features)} text features for {len(self.pairs)} captions")

    def __len__(self) -> int:
        return len(self.pairs)

    def batch(self, indices: list[int]) -> dict[str, Any]:
        rows = torch.tensor([self.pairs[i][0] for i in indices])  # (B,)
        batch = {"features": self.features[rows], "captions": [self.pairs[i][1] for i in indices],
                 "references": [self.captions[self.pairs[i][0]] for i in indices]}
        if self.text_features is not None:
            batch["text_features"] = self.text_features[torch.tensor(indices)]  # (B, D)
        return batch

    def with_consensus_targets(self, ratio: float, seed: int = 0) -> CaptionPairs:
        """These pairs with each caption replaced by its image's consensus reference with
        probability ``ratio`` (:func:`~diffusion_captioner.consensus.consensus_targets`); the
        text features follow their captions."""
        if ratio == 0:
            return self
        captions, rows = consensus_targets(self.captions, ratio, seed)
        text = self.text_features
        if text is not None:
            text = text[torch.tensor(rows, device=text.device)]  # (P, D), each caption's own row
        return CaptionPairs(self.features, captions, text)

    @classmethod
    def from_split(cls, split: SplitFeatures) -> CaptionPairs:
        return cls(split.features, [r.captions for r in split.records], split.text_features)


class CrossEntropy:
    """The first phase's objective: the decoder's own loss on (feature, caption) pairs.

    An objective is what one training step minimises: ``objective(model, batch, draw)`` returns
    ``{"loss": scalar, ...parts to log}`` (``draw`` numbers the micro-batch, for an objective
    that draws random numbers: a function of the step, so a resumed run draws the same), and
    ``validation_loss(decoder, batch)`` gives (summed loss, examples) for the validation that
    picks ``checkpoint/best`` (lower is better). ``progress_keys``: parts shown on the bar.
    """

    progress_keys: tuple[str, ...] = ()

    def __call__(self, model: torch.nn.Module, batch: dict[str, Any],
                 draw: int) -> dict[str, torch.Tensor]:
        return model(batch)

    def validation_loss(self, decoder: CaptionDecoder, batch: dict[str, Any]) -> tuple[float, int]:
        return float(decoder.loss(batch)["loss"]) * len(batch["captions"]), len(batch["captions"])


@dataclass
class TrainerState:
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    best_val_loss: float = math.inf
    elapsed_seconds: float = 0.0
    finished: bool = False
    train_loss_sum: float = 0.0  # training loss since the last validation (first_overfit)
    train_loss_steps: int = 0
    overfit_kept: bool = False


class Trainer:
    """Trains any :class:`CaptionDecoder` on caption pairs; resumable, logged, checkpointed."""

    def __init__(
        self,
        decoder: CaptionDecoder,
        train: CaptionPairs,
        val: CaptionPairs | None,
        config: TrainConfig,
        out: str | Path,
        progress: bool = True,
        log_with: Sequence[str] = (),
        tracker_dir: str | Path | None = None,
        tracker_name: str | None = None,
        objective: Any = None,
    ) -> None:
        """``log_with``: accelerate tracker names (``tensorboard``, ``wandb``...; checked by
        :func:`~diffusion_captioner.tracking.check_trackers`), writing under ``tracker_dir``
        (default ``out/tracker``) as a run named ``tracker_name`` (default ``out``'s name).
        ``objective``: what a step minimises (default :class:`CrossEntropy`; the SCST phase's
        is :class:`~diffusion_captioner.scst.SelfCritical`), with ``train`` / ``val`` the
        datasets it takes (``__len__`` and ``batch(indices)``)."""
        self.config, self.out, self.progress = config, Path(out), progress
        self.objective = objective if objective is not None else CrossEntropy()
        self.log_with = list(log_with)
        self.tracker_dir = Path(tracker_dir) if tracker_dir is not None else self.out / "tracker"
        self.tracker_name = tracker_name or self.out.name
        self._tracking = False
        self.accelerator = Accelerator(
            mixed_precision=config.mixed_precision,
            gradient_accumulation_steps=config.grad_accum,
            # without CUDA, multi-process launches run on CPU with gloo
            cpu=config.cpu or not torch.cuda.is_available(),
            log_with=self.log_with or None,
            project_dir=str(self.tracker_dir) if self.log_with else None,
        )
        set_seed(config.seed)
        if config.consensus_targets > 0:
            if not isinstance(train, CaptionPairs):
                raise ValueError("training option consensus_targets replaces captions of "
                                 "(feature, caption) pairs; this phase trains on "
                                 f"{type(train).__name__}: drop it from the phase's settings")
            train = train.with_consensus_targets(config.consensus_targets)
        self.train_data, self.val_data = train, val
        trainable = [p for p in decoder.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
        self.total_steps = self._total_steps()
        from transformers import get_scheduler

        if config.lr_schedule == "linear_per_epoch":
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self._per_epoch_factor)
        else:
            name = ("constant_with_warmup" if config.lr_schedule == "constant"
                    else config.lr_schedule)
            scheduler = get_scheduler(
                name, optimizer, num_warmup_steps=config.warmup_steps,
                num_training_steps=self.total_steps,
                scheduler_specific_kwargs={"num_cycles": config.num_cycles}
                if config.lr_schedule == "cosine_with_restarts" else None,
            )
        self.model, self.optimizer = self.accelerator.prepare(decoder, optimizer)
        self.scheduler = scheduler
        self.accelerator.register_for_checkpointing(self.scheduler)
        self.average = None
        if config.ema_decay > 0:
            trained = [p for p in self.accelerator.unwrap_model(self.model).parameters()
                       if p.requires_grad]
            self.average = WeightAverage(trained, config.ema_decay)
            self.accelerator.register_for_checkpointing(self.average)
        self.state = TrainerState()

    def _per_epoch_factor(self, step: int) -> float:
        """linear_per_epoch: lr(step) / lr, constant within an epoch."""
        cfg = self.config
        epochs = max(1, math.ceil(cfg.epochs))
        epoch = min(epochs - 1, step * cfg.grad_accum // self.batches_per_epoch)
        fraction = epoch / (epochs - 1) if epochs > 1 else 0.0
        return (cfg.lr + (cfg.final_lr - cfg.lr) * fraction) / cfg.lr

    @property
    def eval_interval(self) -> int:
        """Steps between validations (``eval_every``; one epoch's steps for ``"epoch"``)."""
        if self.config.eval_every == "epoch":
            return max(1, self.batches_per_epoch // self.config.grad_accum)
        return int(self.config.eval_every)

    # ------------------------------------------------------------------ schedule of examples
    @property
    def global_batch(self) -> int:
        return self.config.batch_size * self.accelerator.num_processes

    @property
    def batches_per_epoch(self) -> int:
        return max(1, len(self.train_data) // self.global_batch)

    def _total_steps(self) -> int:
        limits = []
        if self.config.max_steps is not None:
            limits.append(self.config.max_steps)
        if self.config.epochs is not None:
            batches = self.config.epochs * len(self.train_data) / self.global_batch
            limits.append(math.ceil(batches / self.config.grad_accum))
        if not limits:
            raise ValueError("set epochs or max_steps for training")
        return max(1, min(limits))

    def _batch_indices(self, epoch: int, batch: int) -> list[int]:
        """This process's slice of global batch ``batch`` of ``epoch`` (a seeded permutation)."""
        generator = torch.Generator().manual_seed(self.config.seed * 100_003 + epoch)
        order = torch.randperm(len(self.train_data), generator=generator)  # (P,)
        start = batch * self.global_batch + self.accelerator.process_index * self.config.batch_size
        return order[start:start + self.config.batch_size].tolist()

    def _next_batch(self) -> dict[str, Any]:
        if self.state.batch_in_epoch >= self.batches_per_epoch:
            self.state.epoch += 1
            self.state.batch_in_epoch = 0
        indices = self._batch_indices(self.state.epoch, self.state.batch_in_epoch)
        self.state.batch_in_epoch += 1
        return self._to_device(self.train_data.batch(indices))

    def _to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {k: v.to(self.accelerator.device) if isinstance(v, torch.Tensor) else v
                for k, v in batch.items()}

    # ------------------------------------------------------------------ checkpoints
    @property
    def last_dir(self) -> Path:
        return self.out / "checkpoint" / "last"

    @property
    def best_dir(self) -> Path:
        return self.out / "checkpoint" / "best"

    def _save_last(self) -> None:
        """accelerate state + trainer state into checkpoint/last, atomically (temp dir, rename)."""
        partial = self.last_dir.with_name("last.partial")
        if self.accelerator.is_main_process and partial.exists():
            shutil.rmtree(partial)
        self.accelerator.wait_for_everyone()
        self.accelerator.save_state(str(partial))
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            (partial / "trainer_state.json").write_text(json.dumps(asdict(self.state)))
            stale = self.last_dir.with_name("last.old")
            if self.last_dir.exists():
                os.replace(self.last_dir, stale)
            os.replace(partial, self.last_dir)
            shutil.rmtree(stale, ignore_errors=True)
        self.accelerator.wait_for_everyone()

    def _save_best(self) -> None:
        """The weights validation judged (the moving average with ``ema_decay``) into
        checkpoint/best."""
        if self.accelerator.is_main_process:
            with self._judged_weights():
                self.accelerator.unwrap_model(self.model).save_pretrained(self.best_dir)
        self.accelerator.wait_for_everyone()

    def _judged_weights(self):
        """A block in which the model holds the weights that are validated and kept: the
        moving average with ``ema_decay``, else the trained weights (nothing to swap)."""
        return self.average.swapped_in() if self.average is not None else nullcontext()

    def _resume(self) -> bool:
        state_file = self.last_dir / "trainer_state.json"
        if not state_file.is_file():
            return False
        self.accelerator.load_state(str(self.last_dir))
        self.state = TrainerState(**json.loads(state_file.read_text()))
        self._trim_log(self.state.step)
        logger.info("resumed from %s at step %d", self.last_dir, self.state.step)
        return True

    def _trim_log(self, step: int) -> None:
        """Drop the log lines of steps after ``step`` (written after the last checkpoint, by a
        run that was then killed): the resumed run logs those steps again."""
        log_path = self.out / "train_log.jsonl"
        if not self.accelerator.is_main_process or not log_path.is_file():
            return
        lines = log_path.read_text().splitlines(keepends=True)

        def before(line: str) -> bool:  # a line cut by the kill is dropped too
            try:
                return json.loads(line).get("step", 0) <= step
            except json.JSONDecodeError:
                return False

        kept = [line if line.endswith("\n") else line + "\n" for line in lines if before(line)]
        if len(kept) != len(lines):
            partial = log_path.with_suffix(".partial")
            partial.write_text("".join(kept))
            os.replace(partial, log_path)

    # ------------------------------------------------------------------ loop
    @torch.no_grad()
    def validate(self) -> float | None:
        """Mean validation loss over at most ``eval_batches`` fixed batches."""
        if self.val_data is None or len(self.val_data) == 0:
            return None
        model = self.accelerator.unwrap_model(self.model)
        model.eval()
        total, count = 0.0, 0
        size = self.config.batch_size
        limit = len(self.val_data) if self.config.eval_batches is None else min(
            len(self.val_data), self.config.eval_batches * size)
        with self._judged_weights():
            for start in range(0, limit, size):
                indices = list(range(start, min(start + size, limit)))
                batch = self._to_device(self.val_data.batch(indices))
                with self.accelerator.autocast():
                    summed, examples = self.objective.validation_loss(model, batch)
                total, count = total + summed, count + examples
        model.train()
        return total / count

    def fit(self, resume: bool = True, stop_at_step: int | None = None,
            end_tracking: bool = True) -> TrainerState:
        """Train until the step/epoch/time budget is spent; ``stop_at_step`` stops early as an
        interruption would (checkpoint/last written), so a later ``fit`` resumes from there.
        ``end_tracking=False`` leaves the trackers open for more values (:meth:`track`)."""
        cfg = self.config
        resumed = resume and self._resume()
        if resumed and self.state.finished:
            logger.info("training already finished at step %d", self.state.step)
            return self.state
        if not resumed:  # a fresh start: the log of a run killed before its first checkpoint goes
            self._trim_log(-1)
        self.out.mkdir(parents=True, exist_ok=True)
        save_every = cfg.save_every or self.eval_interval
        log_path = self.out / "train_log.jsonl"
        log = (jsonlines.open(log_path, mode="a", flush=True)  # a kill loses no line
               if self.accelerator.is_main_process else None)
        if self.state.step == 0 and getattr(self.objective, "validate_at_start", False):
            self._validate_start(log)
        started = time.time() - self.state.elapsed_seconds
        self.model.train()
        bar = tqdm(total=self.total_steps, initial=self.state.step, unit="step",
                   desc=f"train {type(self.accelerator.unwrap_model(self.model)).__name__}",
                   disable=not (self.progress and self.accelerator.is_main_process))
        running: dict[str, float] = {}
        running_steps = 0
        # Subnormal floats are many times slower on x86 CPUs: at real size the rounding loss's
        # backward (random N(0, 1) word vectors, logits of +-150, softmax gradients of 1e-40)
        # spent most of its time on them. Flushed to zero while training on CPU, then restored.
        flush = self.accelerator.device.type == "cpu" and torch.set_flush_denormal(True)
        try:
            while self.state.step < self.total_steps:
                for micro in range(cfg.grad_accum):
                    with self.accelerator.accumulate(self.model):
                        parts = self.objective(self.model, self._next_batch(),
                                               self.state.step * cfg.grad_accum + micro)
                        self.accelerator.backward(parts["loss"])
                        if self.accelerator.sync_gradients and cfg.max_grad_norm:
                            self.accelerator.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
                        self.optimizer.step()
                        self.optimizer.zero_grad(set_to_none=True)
                    if self.average is not None and self.accelerator.sync_gradients:
                        self.average.update()
                    for name, value in parts.items():
                        running[name] = running.get(name, 0.0) + float(value.detach()) / cfg.grad_accum
                    self.state.train_loss_sum += float(parts["loss"].detach()) / cfg.grad_accum
                running_steps += 1
                self.state.train_loss_steps += 1
                self.scheduler.step()
                self.state.step += 1
                self.state.elapsed_seconds = time.time() - started
                bar.update(1)
                shown = ("loss", *self.objective.progress_keys)
                bar.set_postfix({k: f"{float(parts[k].detach()):.3f}" for k in shown if k in parts},
                                refresh=False)
                out_of_time = cfg.max_minutes is not None and \
                    self.state.elapsed_seconds >= cfg.max_minutes * 60
                last_step = self.state.step >= self.total_steps or out_of_time
                if self.state.step % cfg.log_every == 0 or self.state.step == 1 or last_step:
                    entry = {k: round(v / running_steps, 6) for k, v in running.items()}
                    running, running_steps = {}, 0
                    self._log(log, {"step": self.state.step, "epoch": self.state.epoch, **entry,
                                    "lr": self.scheduler.get_last_lr()[0],
                                    "elapsed_s": round(self.state.elapsed_seconds, 2)})
                if self.state.step % self.eval_interval == 0 or last_step:
                    self._evaluate(log)
                if last_step:
                    self.state.finished = True
                    self._save_last()
                    break
                if self.state.step % save_every == 0 or self.state.step == stop_at_step:
                    self._save_last()
                if self.state.step == stop_at_step:
                    break
        finally:
            if flush:
                torch.set_flush_denormal(False)
            bar.close()
            if log is not None:
                log.close()
            if end_tracking:
                self.end_tracking()
        last_is_kept = (self.config.checkpoint_rule == "first_overfit"
                        and not self.state.overfit_kept)  # never overfit: the last weights
        if self.state.finished and (last_is_kept or not self.best_dir.exists()):
            self._save_best()
        return self.state

    def _validate_start(self, log) -> None:
        """Validate the starting weights (a second phase's: the first phase's best) as step 0,
        so that ``checkpoint/best`` is never worse on validation than where the phase began."""
        val_loss = self.validate()
        if val_loss is None or self.config.checkpoint_rule != "best_val":
            return
        self.state.best_val_loss = val_loss
        self._save_best()
        self._log(log, {"step": 0, "val_loss": round(val_loss, 6),
                        "best_val_loss": round(val_loss, 6), "elapsed_s": 0.0})

    def _evaluate(self, log) -> None:
        val_loss = self.validate()
        state = self.state
        train_loss = state.train_loss_sum / max(1, state.train_loss_steps)
        state.train_loss_sum, state.train_loss_steps = 0.0, 0
        if self.accelerator.num_processes > 1:  # one verdict on every process (each saves)
            local = torch.tensor(train_loss, device=self.accelerator.device)
            train_loss = float(self.accelerator.reduce(local, reduction="mean"))
        if self.config.checkpoint_rule == "first_overfit":
            # the original's rule: keep the first weights whose validation loss exceeds
            # overfit_ratio x the training loss since the last validation (else the last ones)
            if val_loss is not None and not state.overfit_kept:
                state.best_val_loss = val_loss  # the kept weights' loss: these, or the last
                if val_loss > self.config.overfit_ratio * train_loss:
                    state.overfit_kept = True
                    self._save_best()
        elif val_loss is None or val_loss < state.best_val_loss:
            if val_loss is not None:
                state.best_val_loss = val_loss
            self._save_best()
        if val_loss is not None:
            self._log(log, {"step": state.step, "val_loss": round(val_loss, 6),
                            "train_loss": round(train_loss, 6),
                            "best_val_loss": round(state.best_val_loss, 6),
                            "elapsed_s": round(state.elapsed_seconds, 2)})

    def _log(self, log, entry: dict[str, Any]) -> None:
        if log is not None:
            log.write(entry)
        self.track(entry, int(entry["step"]))
        logger.debug("%s", entry)

    # ------------------------------------------------------------------ experiment trackers
    def track(self, entry: dict[str, Any], step: int, prefix: str = "") -> None:
        """Hand the numeric values of ``entry`` to the trackers at ``step`` (started on first use)."""
        if not self.log_with:
            return
        if not self._tracking:
            from diffusion_captioner.tracking import hyperparameters

            self.tracker_dir.mkdir(parents=True, exist_ok=True)
            self.accelerator.init_trackers(self.tracker_name,
                                           config=hyperparameters(asdict(self.config)))
            self._tracking = True
        from diffusion_captioner.tracking import scalars

        values = scalars(entry, prefix)
        if values:
            self.accelerator.log(values, step=step)

    def end_tracking(self) -> None:
        """Finish (flush and close) the trackers; not ``end_training``, which would also end the
        process group that the next decoder's training still needs."""
        if self._tracking:
            for tracker in self.accelerator.trackers:
                tracker.finish()
            self.accelerator.trackers.clear()
            self._tracking = False
