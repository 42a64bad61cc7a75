"""Ray Train: the loop in-process and with 2 CPU workers (DDP over gloo), export in HF
layout, and a training killed mid-way resuming from its last checkpoint."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from mmcn.models.regions.datasets import CaptionDataset
from mmcn.data.lmdb_build import build_lmdb
from mmcn.data.lmdb_store import LmdbStore
from mmcn.models.factory import load_model
from mmcn.models.regions.inputs import CaptionCollator
from mmcn.models.tokenizer import load_tokenizer
from mmcn.train.loop import ModelSpec, TrainConfig, train

sys.path.insert(0, str(Path(__file__).parent))
from test_lmdb import make_dataset  # noqa: E402

LAYOUT = {"max_text_len": 16, "max_tag_len": 16, "max_regions": 6}


@pytest.fixture(scope="module")
def lmdb_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("train-data")
    for split, n in (("train", 12), ("valid", 5)):
        d = make_dataset(root / split, n_images=n, split=split)
        build_lmdb(d["tsv"], root / f"built-{split}", d["features"], d["tags"])
        (root / "lmdb").mkdir(exist_ok=True)
        (root / f"built-{split}" / split).rename(root / "lmdb" / split)
    return root / "lmdb"


def pairs(lmdb_dir: Path) -> int:
    return len(LmdbStore(lmdb_dir / "train").pairs)


def test_in_process_training_exports_a_model_that_loads(lmdb_dir, tmp_path):
    import torch

    threads = torch.get_num_threads()
    cfg = TrainConfig(epochs=2, batch_size=4, lr=1e-3, checkpoint_every=2, workers=0, cpus_per_worker=threads + 1)
    summary = train(ModelSpec("caption", "tiny", settings=LAYOUT), lmdb_dir, tmp_path / "model", cfg, tmp_path / "ray")
    assert torch.get_num_threads() == threads  # the in-process loop gives the caller its thread count back
    steps_per_epoch = pairs(lmdb_dir) // 4  # drop_last
    assert summary["steps"] == 2 * steps_per_epoch == len(summary["train"])
    assert [v["epoch"] for v in summary["valid"]] == [1, 2] and "valid_token_accuracy" in summary["valid"][0]
    assert summary["train"][0]["lr"] > 0 and summary["train"][-1]["step"] == summary["steps"]
    task, model = load_model(tmp_path / "model")
    tok = load_tokenizer(tmp_path / "model")
    meta = json.loads((tmp_path / "model" / "mmcn.json").read_text())
    assert task == "caption" and meta["steps"] == summary["steps"] and meta["train"]["lr"] == 1e-3
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in (tmp_path / "model").iterdir()}
    batch = CaptionCollator(tok, model.config, train=False)([CaptionDataset(lmdb_dir / "valid", per_image=True)[0]])
    ids, scores = model.eval().generate(batch["tag_ids"], batch["tag_mask"], batch["img_feats"], batch["img_mask"],
                                        tok.cls_token_id, tok.sep_token_id, tok.mask_token_id, max_length=5)
    assert len(ids) == 1 and scores[0] <= 0


def test_two_cpu_workers(ray_session, lmdb_dir, tmp_path):
    cfg = TrainConfig(epochs=1, batch_size=2, lr=1e-3, checkpoint_every=100, workers=2)
    summary = train(ModelSpec("retrieval", "tiny", settings=LAYOUT), lmdb_dir, tmp_path / "model", cfg,
                    tmp_path / "ray")
    assert summary["steps"] == pairs(lmdb_dir) // 2 // 2  # the pairs split over 2 workers, 2 per batch
    assert "valid_mean_recall" in summary["valid"][-1]
    assert load_model(tmp_path / "model")[0] == "retrieval"
    # a checkpoint holds both ranks' random streams (resuming restores each rank's own)
    last = max(d for d in (tmp_path / "ray" / summary["run"]).glob("checkpoint_*") if d.is_dir())
    assert {"state.pt", "history.json", "rng-rank0.pt", "rng-rank1.pt"} <= {p.name for p in last.iterdir()}


def registered_checkpoints(storage: Path, task: str) -> int:
    """Checkpoints Ray Train has recorded for the run (its controller's snapshot), not merely
    copied into storage: a run killed between the two has nothing to resume from."""
    for snapshot in storage.glob(f"{task}-*/checkpoint_manager_snapshot.json"):
        try:
            return len(json.loads(snapshot.read_text()).get("checkpoint_results") or [])
        except (json.JSONDecodeError, OSError):  # being written
            return 0
    return 0


@pytest.mark.parametrize(("task", "settings", "epochs"), [
    ("caption", LAYOUT, 3), ("pretrain", {"max_text_len": 24, "max_regions": 4}, 3)])
def test_killed_training_resumes_from_its_checkpoint_to_the_same_result(lmdb_dir, tmp_path, task, settings, epochs):
    """kill -9 once Ray has recorded a checkpoint, rerun: the run continues from it and ends
    with exactly the losses, valid metrics and weights of the same training never killed
    (the RNG streams of dropout, the data order and, for pretraining, the polluted pairs and
    masks are in the checkpoint or follow from it). Bit for bit: the Ray worker runs torch on
    one thread (``cpus_per_worker=1``)."""
    import torch
    from safetensors.torch import load_file

    script = textwrap.dedent(f"""
        import json, sys
        import ray
        from pathlib import Path
        from mmcn.train.loop import ModelSpec, TrainConfig, train
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        cfg = TrainConfig(epochs={epochs}, batch_size=4, lr=1e-3, checkpoint_every=4, workers=1, cpus_per_worker=1)
        for name in sys.argv[1:]:
            s = train(ModelSpec({task!r}, "tiny", settings={settings!r}), Path({str(lmdb_dir)!r}),
                      Path({str(tmp_path)!r}) / f"{{name}}-model", cfg, Path({str(tmp_path)!r}) / f"{{name}}-ray")
            print("SUMMARY", json.dumps({{"resumed_from": s["resumed_from_step"], "steps": s["steps"],
                  "train": [[r["step"], r["loss"], r["lr"]] for r in s["train"]], "valid": s["valid"]}}))
    """)
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", script, "killed"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and not registered_checkpoints(tmp_path / "killed-ray", task):
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[0][-3000:]
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and its Ray: killed mid-training
    proc.wait()
    assert not (tmp_path / "killed-model").exists()

    # the killed run again (it resumes), then the same training from scratch, uninterrupted
    out = subprocess.run([sys.executable, "-c", script, "killed", "whole"], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    resumed, whole = (json.loads(ln.split(" ", 1)[1]) for ln in out.stdout.splitlines() if ln.startswith("SUMMARY"))
    total = epochs * (pairs(lmdb_dir) // 4)
    assert whole["resumed_from"] is None and whole["steps"] == resumed["steps"] == total
    at = resumed["resumed_from"]
    assert 0 < at < total and (at % 4 == 0 or at % (pairs(lmdb_dir) // 4) == 0)  # a checkpoint
    assert [r[0] for r in resumed["train"]] == list(range(1, total + 1))  # no step lost or done twice
    assert resumed["train"] == whole["train"] and resumed["valid"] == whole["valid"]  # losses, lr, metrics
    weights, reference = (load_file(tmp_path / f"{name}-model" / "model.safetensors") for name in ("killed", "whole"))
    assert weights.keys() == reference.keys()
    assert all(torch.equal(weights[k], reference[k]) for k in weights), \
        [k for k in weights if not torch.equal(weights[k], reference[k])]
    assert load_model(tmp_path / "killed-model")[0] == task


def test_seeded_training_is_deterministic_on_cpu(lmdb_dir, tmp_path):
    cfg = TrainConfig(epochs=1, batch_size=4, lr=1e-3, workers=0, seed=7)
    runs = [train(ModelSpec("caption", "tiny", settings=LAYOUT), lmdb_dir, tmp_path / f"m{k}", cfg, tmp_path / f"r{k}")
            for k in range(2)]
    # same data order, masks, dropout and initialisation: the same losses, up to the float
    # summation order of CPU kernels (which may depend on memory alignment)
    first, second = ([r["loss"] for r in run["train"]] for run in runs)
    assert len(first) == len(second) > 2 and first == pytest.approx(second, rel=1e-3)
    other = train(ModelSpec("caption", "tiny", settings=LAYOUT), lmdb_dir, tmp_path / "m2",
                  TrainConfig(epochs=1, batch_size=4, lr=1e-3, workers=0, seed=8), tmp_path / "r2")
    assert [r["loss"] for r in other["train"]] != pytest.approx(first, rel=1e-3)


def test_a_fine_tune_starts_from_a_relative_init_folder_in_a_ray_worker(ray_session, lmdb_dir, tmp_path, monkeypatch):
    """``{task}.model.init: models/pretrain`` is relative to the project; Ray Train's workers
    run in their own folder, so the driver hands them the absolute path (a relative one made
    transformers look the name up on the Hugging Face hub)."""
    import torch

    from mmcn.models.factory import build_model
    from mmcn.models.tokenizer import build_tokenizer

    store = LmdbStore(lmdb_dir / "train")
    texts = [t.text for t in store.texts()]
    # a vocabulary without 描, which every train caption has: the summary's OOV rate says so
    tokenizer = build_tokenizer([t.replace("描", "") for t in texts] + [store.get(0, ("regions",)).tag_text])
    pretrained = build_model("pretrain", len(tokenizer), "tiny", max_text_len=24, max_regions=4)
    pretrained.save_pretrained(tmp_path / "models" / "pretrain")
    tokenizer.save_pretrained(str(tmp_path / "models" / "pretrain"))
    monkeypatch.chdir(tmp_path)
    cfg = TrainConfig(epochs=1, batch_size=4, lr=1e-3, workers=1, cpus_per_worker=1, checkpoint_every=1000)
    summary = train(ModelSpec("caption", "tiny", init="models/pretrain", settings=LAYOUT), lmdb_dir,
                    tmp_path / "caption", cfg, tmp_path / "ray")
    assert summary["steps"] > 0
    assert all(t.count("描") == 1 for t in texts)
    tokens = sum(len(tokenizer.tokenize(t)) for t in texts)
    assert summary["oov"] == {"oov_rate": round(len(texts) / tokens, 6), "oov_unk_tokens": len(texts),
                              "oov_total_tokens": tokens, "oov_top": f"描×{len(texts)}"}
    task, model = load_model(tmp_path / "caption")
    assert task == "caption" and model.config.hidden_size == pretrained.config.hidden_size
    assert json.loads((tmp_path / "caption" / "mmcn.json").read_text())["model"]["init"] == "models/pretrain"
    assert not torch.equal(model.bert.embeddings.word_embeddings.weight,
                           pretrained.bert.embeddings.word_embeddings.weight)  # trained on from there



class _Store:
    """What the check reads of an LmdbStore: pairs as (text position, image position), images."""

    def __init__(self, pair_positions: list[list[int]], images: int):
        self.pair_positions, self.images, self.path = np.array(pair_positions), images, "data/lmdb/train"

    def __len__(self) -> int:
        return self.images


def test_too_few_pairs_for_one_step_is_refused_before_training():
    """3 captions with batch 32 would train 0 steps (every worker drops its partial batch) and
    crash later: the driver refuses it, naming the count, the product and the param."""
    from mmcn.train.loop import _check_enough_pairs

    store = _Store([[0, 0], [1, 0], [2, 1]], images=2)
    with pytest.raises(ValueError, match=r"3 training pairs .* 32 x 1 x 1 = 32: lower caption.train.batch_size"):
        _check_enough_pairs("caption", store, TrainConfig(batch_size=32, workers=1))
    with pytest.raises(ValueError, match=r"= 4: lower"):   # 2 workers x 2
        _check_enough_pairs("caption", store, TrainConfig(batch_size=2, workers=2))
    _check_enough_pairs("caption", store, TrainConfig(batch_size=3, workers=1))  # exactly one step
    _check_enough_pairs("caption", store, TrainConfig(batch_size=3, workers=0))  # in-process: one worker
    with pytest.raises(ValueError, match="2 training pairs"):  # the first of 2 images has 2 captions
        _check_enough_pairs("caption", store, TrainConfig(batch_size=3, workers=1, train_fraction=0.5))
