"""Training with Ray Train (V2 ``TorchTrainer``): one readable loop per worker, run the
same on a laptop (CPU workers, gloo) and on a cluster (GPU workers, nccl, bf16).

:func:`train` (the driver) builds or loads the tokenizer, starts the trainer and exports
the final model in ``save_pretrained`` layout. :func:`train_loop` (every worker) trains:
AdamW, warmup then linear/cosine decay, gradient accumulation and clipping, a
checkpoint every ``checkpoint_every`` optimizer steps and at each epoch's end, a valid
evaluation per epoch. A checkpoint holds all that decides the rest of the run: model,
optimizer, scheduler, step, the data position (epoch, batches of it trained on: the order
is a function of the seed and the epoch, so resuming skips them) and every rank's random
streams (torch CPU and CUDA, numpy, python ``random``: dropout), so a run resumed from it
ends with the same weights as one never stopped (bit for bit on CPU with pinned threads).
Checkpoints live under ``storage_path/run_name`` (outside DVC's
outputs); the run name is the task and a fingerprint (:func:`_fingerprint`) of the
settings, the content of the train and valid data, of the starting weights (``init``) and
of the code that trains, so rerunning a killed training with all of it unchanged continues from its last checkpoint (Ray Train
restores the run from storage), any change starts a new run, and ``FailureConfig``
restarts crashed workers from it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

STATE = "state.pt"
HISTORY = "history.json"
RNG = "rng-rank{rank}.pt"  # each rank's random streams


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10
    batch_size: int = 32            # per worker
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1       # share of the optimizer steps
    schedule: str = "linear"        # linear | cosine (after warmup)
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    seed: int = 0
    checkpoint_every: int = 200     # optimizer steps (and at every epoch's end)
    freeze_embedding: bool = False
    freeze_visual: bool = False
    freeze_vision: bool = False     # clip: the ViT's weights fixed (Chinese-CLIP's --freeze-vision)
    mask_prob: float = 0.15         # caption: share of caption tokens masked
    max_masked: int = 3             # caption: most masked tokens per caption
    mask_type: str = "mmcn"         # caption: mmcn | oscar (which tokens, how many: regions.inputs.CaptionCollator)
    workers: int = 1                # Ray Train workers (0: in the driver process, for tests)
    cpus_per_worker: int = 1        # CPU threads of each worker's torch
    use_gpu: bool = False
    max_failures: int = 2           # worker crashes survived (restart from the last checkpoint)
    train_fraction: float = 1.0     # train on the pairs of the first share of the train images (a smaller budget)

    def __post_init__(self) -> None:
        """Ranges and choices; messages start with the field (``mmcn.settings`` names the param)."""
        if self.schedule not in ("linear", "cosine"):
            raise ValueError(f"schedule: must be linear or cosine, got {self.schedule!r}")
        if self.mask_type not in ("mmcn", "oscar"):
            raise ValueError(f"mask_type: must be mmcn or oscar, got {self.mask_type!r}")
        for name in ("epochs", "batch_size", "grad_accum", "checkpoint_every", "max_masked", "cpus_per_worker"):
            if not getattr(self, name) >= 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)!r}")
        for name in ("workers", "max_failures", "weight_decay"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)!r}")
        if not 0 < self.lr < float("inf"):
            raise ValueError(f"lr: must be a number > 0, got {self.lr!r}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio: must be in [0, 1) (a share of the optimizer steps), got {self.warmup_ratio!r}")
        if not 0 < self.max_grad_norm < float("inf"):
            raise ValueError(f"max_grad_norm: must be > 0 (gradients are clipped to it), got {self.max_grad_norm!r}")
        if not 0 < self.train_fraction <= 1:
            raise ValueError(f"train_fraction: must be in (0, 1] (a share of the train images), got {self.train_fraction!r}")
        if not 0 < self.mask_prob <= 1:
            raise ValueError(f"mask_prob: must be in (0, 1] (a share of the caption tokens), got {self.mask_prob!r}")


@dataclass(frozen=True)
class ModelSpec:
    task: str                       # caption | retrieval | pretrain | clip
    size: str = "small"             # tiny | small | medium | base (ignored when init is given)
    init: str = ""                  # local pretrained BERT directory, or "" to train from scratch
    settings: dict = field(default_factory=dict)   # the task config's own fields (layout, loss options)


# --------------------------------------------------------------------------- the driver

def train(spec: ModelSpec, lmdb_dir: Path, out_dir: Path, cfg: TrainConfig, storage_path: Path) -> dict:
    """Train ``spec`` on ``lmdb_dir/train`` (valid on ``lmdb_dir/valid``), export the model to
    ``out_dir`` and return the summary (steps, final losses, valid metrics, history, ``oov``:
    the train captions' share of [UNK] tokens, :meth:`mmcn.models.tokenizer.Oov.metrics`)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from mmcn.data.lmdb_store import LmdbStore
    from mmcn.models.factory import family
    from mmcn.models.tokenizer import build_tokenizer, load_tokenizer, oov

    lmdb_dir, out_dir, storage_path = Path(lmdb_dir).resolve(), Path(out_dir).resolve(), Path(storage_path).resolve()
    train_store = LmdbStore(lmdb_dir / "train")
    _check_enough_pairs(spec.task, train_store, cfg)
    run_name = f"{spec.task}-{_fingerprint(spec, cfg, train_store)}"
    run_dir = storage_path / run_name
    tokenizer_dir = run_dir / "tokenizer"
    if not tokenizer_dir.is_dir():
        tokenizer = load_tokenizer(spec.init) if spec.init else build_tokenizer(
            family(spec.task).tokenizer_texts(spec.task, train_store))
        tokenizer.save_pretrained(str(tokenizer_dir))
    train_oov = oov(load_tokenizer(tokenizer_dir), [t.text for t in train_store.texts()])
    (log.warning if train_oov.unknown else log.info)("%s", train_oov.describe(f"{spec.task}: train captions under "
                                                                              "its tokenizer"))
    # the workers' spec names the starting weights by absolute path: a Ray worker runs in its own folder
    worker_spec = replace(spec, init=str(Path(spec.init).resolve())) if spec.init else spec
    # the family's own preparation (clip: its image processor beside the tokenizer; clipcap: the
    # frozen CLIP's image embeddings, once per run)
    worker_spec, embeddings = family(spec.task).prepare_run(worker_spec, lmdb_dir, run_dir, tokenizer_dir)
    loop_config = {"spec": asdict(worker_spec), "cfg": asdict(cfg), "lmdb_dir": str(lmdb_dir),
                   "tokenizer_dir": str(tokenizer_dir), "run_name": run_name, "embeddings": embeddings}
    trainer = TorchTrainer(
        train_loop, train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.use_gpu,
                                               resources_per_worker={"CPU": cfg.cpus_per_worker,
                                                                     **({"GPU": 1} if cfg.use_gpu else {})}),
        run_config=ray.train.RunConfig(
            name=run_name, storage_path=str(storage_path),
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            # Ray Train's own INFO/WARNING lines (a line per report, and a State-API warning every
            # second when the dashboard is off) would bury the loop's epoch lines
            logging_config=ray.train.LoggingConfig(log_level="ERROR")))
    start = time.perf_counter()
    ray_train_log = logging.getLogger("ray.train")  # in-process mode (workers 0): its INFO line per report
    level = ray_train_log.level
    ray_train_log.setLevel(max(level, logging.WARNING))
    try:
        result = trainer.fit()
    finally:
        ray_train_log.setLevel(level)
    if result.checkpoint is None:
        raise RuntimeError(f"training {run_name} produced no checkpoint")
    with result.checkpoint.as_directory() as ckpt:
        state = torch.load(Path(ckpt) / STATE, map_location="cpu", weights_only=True)
        history = json.loads((Path(ckpt) / HISTORY).read_text())
    model = _build(spec, len(load_tokenizer(tokenizer_dir)))
    model.load_state_dict(state["model"])
    summary = {"task": spec.task, "run": run_name, "steps": state["step"], "epochs": cfg.epochs,
               "seconds": round(time.perf_counter() - start, 1), "resumed_from_step": history["resumed_from"],
               "train": history["train"], "valid": history["valid"], "oov": train_oov.metrics()}
    export(model, tokenizer_dir, out_dir, {
        "task": spec.task, "model": asdict(spec), "train": _results_settings(cfg), "lmdb": str(lmdb_dir),
        "run": run_name, "steps": state["step"], "chain": train_store.meta.get("chain", {})})
    log.info("%s: %d steps in %.0fs (resumed from step %s), model in %s", spec.task, state["step"],
             summary["seconds"], history["resumed_from"], out_dir)
    return summary


def export(model, tokenizer_dir: Path, out_dir: Path, metadata: dict) -> None:
    """``save_pretrained`` layout: config.json + model.safetensors + tokenizer + mmcn.json."""
    from transformers.utils import logging as hf_logging

    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # its "Writing model shards" bar of one shard says nothing
    try:
        model.save_pretrained(str(tmp))
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    for f in Path(tokenizer_dir).iterdir():
        shutil.copy(f, tmp / f.name)
    (tmp / "mmcn.json").write_text(json.dumps(metadata, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)


def _fingerprint(spec: ModelSpec, cfg: TrainConfig, store) -> str:
    """The hash in the run name: the model spec and training settings (not ``max_failures`` or
    ``cpus_per_worker``: they change how, not what), the content of the data (the XXH3-128
    source checksums in the meta of ``store``, the train split, and of the valid split next
    to it when there is one) and the code that trains (every mmcn file this module runs, from
    :func:`mmcn.provenance.code_files`, the same walk that checks dvc.yaml's deps, and the
    task's family package, which this module imports by name). A rerun resumes a run only
    when all of it is unchanged."""
    from mmcn import provenance
    from mmcn.data.lmdb_store import LmdbStore
    from mmcn.models.factory import family, family_code

    settings = {**asdict(spec), **_results_settings(cfg)}
    try:
        valid = LmdbStore(Path(store.path).parent / "valid").meta["sources"]
    except FileNotFoundError:  # no valid split
        valid = None
    sources = {"train": store.meta["sources"], "valid": valid}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    digest.update(json.dumps(sources, sort_keys=True).encode())
    code = provenance.code_files(__name__) + family_code(spec.task)
    digest.update(json.dumps(provenance.digests(sorted(set(code))), sort_keys=True).encode())
    for path in family(spec.task).run_inputs(spec):  # e.g. clipcap's CLIP model's content (models/clip reruns)
        digest.update(json.dumps(list(provenance.digests([path]).values())).encode())
    if spec.init:  # the starting weights' content, not only their folder's name (models/pretrain reruns)
        digest.update(json.dumps(list(provenance.digests([Path(spec.init)]).values())).encode())
    return digest.hexdigest()[:12]


def _results_settings(cfg: TrainConfig) -> dict:
    """The training settings that decide the model (not how many threads or retries made it)."""
    return {k: v for k, v in asdict(cfg).items() if k not in ("max_failures", "cpus_per_worker")}


def _build(spec: ModelSpec, vocab_size: int):
    from mmcn.models.factory import build_model

    return build_model(spec.task, vocab_size, spec.size, spec.init, **spec.settings)


# --------------------------------------------------------------------------- every worker

def train_loop(config: dict) -> None:
    """One worker's training: its own CPU thread count while it runs, the caller's afterwards."""
    from mmcn.models.runtime import torch_threads

    with torch_threads(TrainConfig(**config["cfg"]).cpus_per_worker):
        _train_worker(config)


def _train_worker(config: dict) -> None:
    import ray.train
    import ray.train.torch
    from torch.utils.data import DataLoader
    from torch.utils.data.distributed import DistributedSampler
    from transformers import get_scheduler

    from mmcn.models.factory import family
    from mmcn.models.runtime import autocast
    from mmcn.models.tokenizer import load_tokenizer

    spec, cfg = ModelSpec(**config["spec"]), TrainConfig(**config["cfg"])
    _quiet_reports()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)
    device = ray.train.torch.get_device()
    tokenizer = load_tokenizer(config["tokenizer_dir"])

    tasks = family(spec.task)
    model = _build(spec, len(tokenizer))
    tasks.freeze(model, spec.task, cfg)
    dataset, collate = tasks.task_data(spec.task, Path(config["lmdb_dir"]) / "train", tokenizer, model.config, cfg,
                                       seed=cfg.seed, embeddings=config.get("embeddings"))
    dataset = _fraction(dataset, cfg.train_fraction)
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed, drop_last=True)
    # the loader's own generator (reseeded per epoch): starting an epoch then draws nothing from
    # torch's global stream, which dropout uses and a checkpoint restores
    order = torch.Generator()
    loader = DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler, collate_fn=collate, drop_last=True,
                        generator=order)
    loader = ray.train.torch.prepare_data_loader(loader, add_dist_sampler=False)

    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim <= 1]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    steps_per_epoch = max(1, len(loader) // cfg.grad_accum)
    total_steps = steps_per_epoch * cfg.epochs
    scheduler = get_scheduler(cfg.schedule, optimizer, num_warmup_steps=int(cfg.warmup_ratio * total_steps),
                              num_training_steps=total_steps)

    step, history = 0, {"train": [], "valid": [], "resumed_from": None}
    start_epoch, skip, streams = 0, 0, None  # skip: batches of start_epoch already trained on
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:  # continue where the last run (or a crashed worker) stopped
        with checkpoint.as_directory() as ckpt:
            state = torch.load(Path(ckpt) / STATE, map_location="cpu", weights_only=True)
            streams = torch.load(Path(ckpt) / RNG.format(rank=rank), map_location="cpu", weights_only=True)
            history = json.loads((Path(ckpt) / HISTORY).read_text())
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step = history["resumed_from"] = state["step"]
        start_epoch, skip = state["data"]["epoch"], state["data"]["batch"]
        if hasattr(model, "train_forwards"):  # the caption loss's drop_worst_after counter (a forward per batch)
            model.train_forwards = state.get("train_forwards", step * cfg.grad_accum)
    model = ray.train.torch.prepare_model(model)
    core = model.module if hasattr(model, "module") else model
    bf16 = autocast(device)
    train_step = tasks.STEPS.get(spec.task, step_micro_batches)
    started = time.perf_counter()

    staging = Path(tempfile.gettempdir()) / "mmcn-checkpoints" / config["run_name"]
    if streams is not None:  # last: building the model above drew from them
        _set_rng_state(streams, device)

    def save(metrics: dict, epoch: int, batch: int) -> None:
        """Report metrics with a checkpoint (Ray gathers every rank's files into one folder of the
        run's storage): each rank's random streams, and from rank 0 the training state, with the
        data position to continue from (``batch`` batches of ``epoch`` trained on)."""
        path = staging / f"step-{step:08d}-rank{rank}"  # each rank its own folder
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        torch.save(_rng_state(device), path / RNG.format(rank=rank))
        if rank == 0:
            torch.save({"model": core.state_dict(), "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(), "step": step, "data": {"epoch": epoch, "batch": batch},
                        "train_forwards": getattr(core, "train_forwards", 0)}, path / STATE)
            (path / HISTORY).write_text(json.dumps(history))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(path)))
        # keep the last two (the in-process mode reads them in place)
        for old in sorted(staging.glob(f"step-*-rank{rank}"))[:-2]:
            shutil.rmtree(old, ignore_errors=True)

    for epoch in range(start_epoch, cfg.epochs):
        # the data order (sampler), masks and negatives (collate): seeded streams per epoch and rank
        sampler.set_epoch(epoch)
        order.manual_seed(cfg.seed * 100_003 + epoch * world + rank)
        if getattr(collate, "generator", None) is not None:
            collate.generator.manual_seed(cfg.seed * 100_003 + epoch * world + rank)
        model.train()
        pending = []  # the micro-batches of one optimizer step
        for i, batch in enumerate(loader):
            if i < skip:
                continue
            if i >= steps_per_epoch * cfg.grad_accum:
                break
            pending.append(batch)
            if len(pending) < cfg.grad_accum:
                continue
            loss, pending = train_step(model, pending, bf16), []  # the last micro-batch's loss
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            history["train"].append({"step": step, "epoch": round(epoch + (i + 1) / len(loader), 4),
                                     "loss": round(loss.item(), 5),
                                     "lr": scheduler.get_last_lr()[0],
                                     "seconds": round(time.perf_counter() - started, 3)})
            if step % cfg.checkpoint_every == 0 and step % steps_per_epoch:
                save({"step": step, "loss": history["train"][-1]["loss"]}, epoch, i + 1)
        skip = 0
        valid = _validate(tasks, spec.task, core, Path(config["lmdb_dir"]) / "valid", tokenizer, cfg, device,
                          config.get("embeddings")) \
            if rank == 0 else {}
        history["valid"].append({"epoch": epoch + 1, "step": step, **valid})
        if rank == 0:  # one line per epoch, forwarded to the driver's log by Ray
            recent = [r["loss"] for r in history["train"][-steps_per_epoch:]]
            when = _epoch_timing(step, total_steps, steps_per_epoch, history["resumed_from"] or 0,
                                 time.perf_counter() - started)
            # logged, not print()ed: Ray Train's workers patch print to log the line as well, so the
            # driver showed each epoch twice
            log.info("[mmcn.train] %s epoch %d/%d: step %d/%d, loss %.4f, %s%s", spec.task, epoch + 1, cfg.epochs,
                     step, total_steps, sum(recent) / max(len(recent), 1),
                     "".join(f"{k} {v}, " for k, v in valid.items()), when)
        save({"step": step, "epoch": epoch + 1, **valid}, epoch + 1, 0)


def _quiet_reports() -> None:
    """Ray Train's "Reporting training result N: TrainingReport(...)" INFO line at every
    checkpoint off (the epoch line says it all): Ray names that logger by its file path
    (``getLogger(__file__)``), outside ``ray.train``, so its LoggingConfig does not reach it."""
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray: its lines stay
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def _epoch_timing(step: int, total_steps: int, steps_per_epoch: int, resumed: int, seconds: float) -> str:
    """``12s/epoch, ETA 1m36s`` (``done in 2m00s`` at the end): the rate is this run's steps
    (those since ``resumed``) over its time, validation included."""
    from mmcn.logs import duration

    per_step = seconds / max(step - resumed, 1)
    left = f"ETA {duration(per_step * (total_steps - step))}" if step < total_steps else f"done in {duration(seconds)}"
    return f"{duration(per_step * steps_per_epoch)}/epoch, {left}"


def _rng_state(device: torch.device) -> dict:
    """This process's random streams as tensors and plain lists (``torch.load(weights_only=True)``
    reads them back): torch's CPU stream, the device's CUDA stream, numpy's and python's."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(gauss)},
             "python": {"version": version, "state": list(internal), "gauss_next": gauss_next}}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    """Restore what :func:`_rng_state` saved."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _check_enough_pairs(task: str, store, cfg: TrainConfig) -> None:
    """Refuse a run that could not make one optimiser step: every worker drops its last partial
    batch, so fewer than ``batch_size x workers x grad_accum`` training pairs train nothing."""
    pairs = store.pair_positions.tolist()
    if cfg.train_fraction < 1:
        cut = max(1, round(cfg.train_fraction * len(store)))
        pairs = [p for p in pairs if p[1] < cut]
    workers = max(1, cfg.workers)  # 0: in-process, one worker
    need = cfg.batch_size * workers * cfg.grad_accum
    if len(pairs) < need:
        raise ValueError(f"{task}: {len(pairs)} training pairs (image, caption) in {store.path}, but one step needs "
                         f"batch_size x workers x grad_accum = {cfg.batch_size} x {workers} x {cfg.grad_accum} "
                         f"= {need}: lower {task}.train.batch_size (or grad_accum, train.workers) or add captions")


def _fraction(dataset, share: float):
    """The pairs of ``dataset`` whose image is among the first ``share`` of its store's images."""
    if share >= 1:
        return dataset
    from torch.utils.data import Subset

    cut = max(1, round(share * len(dataset.store)))
    keep = [i for i, (_, image_pos) in enumerate(dataset.store.pair_positions.tolist()) if image_pos < cut]
    log.info("training on %d of %d pairs (the first %d of %d images: train_fraction %s)", len(keep), len(dataset),
             cut, len(dataset.store), share)
    return Subset(dataset, keep)


@torch.no_grad()
def _validate(tasks, task: str, model, store_path: Path, tokenizer, cfg: TrainConfig, device,
              embeddings: dict | None = None) -> dict:
    """The valid split's metrics after an epoch, as ``task``'s family (``tasks``) measures them
    (its ``validate``); nothing when there is no valid split."""
    if not (store_path / "data.mdb").exists() and not list(store_path.glob("shard-*")):
        return {}
    model.eval()
    return tasks.validate(task, model, store_path, tokenizer, cfg, device, embeddings)


def step_micro_batches(model, batches: list[dict], autocast) -> torch.Tensor:
    """One optimizer step's gradients: a forward and backward per micro-batch (``grad_accum``
    of them, their losses averaged into the gradient); returns the last one's loss. A family
    whose step differs gives its own (``STEPS``: Chinese-CLIP's accumulated contrastive batch)."""
    loss = None
    for batch in batches:
        with autocast:
            loss = model(**batch).loss
        (loss / len(batches)).backward()
    return loss.detach()
