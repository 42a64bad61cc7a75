"""Shared test setup: no DVC analytics, a git identity for the temp repos the tests create."""
import os

os.environ.setdefault("DVC_NO_ANALYTICS", "1")
for key, value in {"GIT_AUTHOR_NAME": "mmcn-tests", "GIT_AUTHOR_EMAIL": "tests@mmcn.invalid",
                   "GIT_COMMITTER_NAME": "mmcn-tests", "GIT_COMMITTER_EMAIL": "tests@mmcn.invalid"}.items():
    os.environ.setdefault(key, value)


import pytest  # noqa: E402
from contextlib import contextmanager  # noqa: E402


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session (startup is about 4 s)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"DVC_NO_ANALYTICS": "1"}})
    yield ray
    ray.shutdown()


@contextmanager
def pinned_numerics(seed: int = 0):
    """Training numerics pinned for a block: 1 CPU thread (float sums then have one order,
    whatever the machine's load or what ran before), the seed, deterministic algorithms; the
    previous settings come back afterwards, so no test leaks them into the next."""
    import torch

    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    rng = torch.get_rng_state()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
        torch.set_rng_state(rng)


@pytest.fixture
def pinned_torch():
    """:func:`pinned_numerics` around one test."""
    with pinned_numerics():
        yield


TINY_LAYOUT = {"max_text_len": 16, "max_tag_len": 12, "max_regions": 6}


@pytest.fixture(scope="session")
def chain_project(tmp_path_factory, ray_session):
    """The pipeline's chain on a few demo images, by library calls: raw layout -> ingest
    (re-encoded to 48 px, to exercise ``max_side``) -> an untrained small detector's region
    features -> Chinese tags -> LMDB -> tiny caption and retrieval models -> test-split
    evaluation outputs. Returns the folder (``raw``, ``tsv``, ``lmdb``, ``models/*``, ``reports/*``)."""
    import csv
    import json
    from pathlib import Path

    import torch

    from mmcn.data.demo import DemoConfig, generate
    from mmcn.data.ingest import IngestConfig, ingest
    from mmcn.data.lmdb_build import build_lmdb
    from mmcn.eval.evaluate import EvalConfig, evaluate_captions, evaluate_retrieval
    from mmcn.text.translate import LabelTable, TranslateConfig, translate_features
    from mmcn.train.loop import ModelSpec, TrainConfig, train
    from mmcn.vision.config import detector_config
    from mmcn.vision.detector import build_detector, save_detector
    from mmcn.vision.extract import ExtractConfig, extract_features

    root = tmp_path_factory.mktemp("chain")
    generate(root / "raw", DemoConfig(train=10, valid=2, test=12, image_size=64))
    ingest(root / "raw", root / "tsv", IngestConfig(workers=1, max_side=48))
    torch.manual_seed(0)
    save_detector(build_detector(detector_config("small")), root / "models/detector")
    extract_features(root / "models/detector", root / "tsv", root / "features",
                     ExtractConfig(min_boxes=3, max_boxes=6, batch_size=4))
    overrides = Path(__file__).resolve().parents[1] / "data/labels_zh_overrides.tsv"
    translate_features(root / "features", root / "labels_zh", LabelTable.load(overrides),
                       TranslateConfig(max_attributes=2))
    build_lmdb(root / "tsv", root / "lmdb", root / "features", root / "labels_zh")
    (root / "plots").mkdir()
    (root / "metrics").mkdir()
    for task in ("caption", "retrieval"):
        summary = train(ModelSpec(task, "tiny", settings=TINY_LAYOUT), root / "lmdb", root / f"models/{task}",
                        TrainConfig(epochs=2, batch_size=8, lr=1e-3, workers=0), root / "ray")
        for kind in ("train", "valid"):
            with open(root / f"plots/{kind}_{task}.csv", "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(summary[kind][0]))
                writer.writeheader()
                writer.writerows(summary[kind])
    cfg = EvalConfig(batch_size=4, num_beams=2, max_length=8, rerank_k=0)
    for task, evaluate in (("caption", evaluate_captions), ("retrieval", evaluate_retrieval)):
        metrics = evaluate(root / f"models/{task}", root / "lmdb", root / f"reports/{task}", cfg)
        (root / f"metrics/{task}.json").write_text(json.dumps(metrics, ensure_ascii=False), encoding="utf-8")
    return root
