"""Engine replicas on Ray: GPU placement and the model allow-list (issue 17.1).

A local Ray cluster that declares 2 GPUs on this CPU-only machine (Ray hands out GPU ids
and sets CUDA_VISIBLE_DEVICES whether or not the GPUs exist; torch finds no CUDA, so each
replica's engine runs on the CPU).  Slow: Ray and each replica start once per test."""

from __future__ import annotations

import collections

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("ray")
pytest.importorskip("zmq")

from sdkit.bridge import BridgeError, Client, serve  # noqa: E402

pytestmark = pytest.mark.slow
PROMPT = "a red circle on a blue background"
FAST = {"num_inference_steps": 2, "width": 64, "height": 64}


@pytest.fixture(scope="module")
def ray_2_gpus():
    from sdkit.bridge.ray_engines import start_ray

    ray = start_ray(num_cpus=2, num_gpus=2)
    assert ray.cluster_resources().get("GPU") == 2  # not a cluster left over without GPUs
    yield ray
    ray.shutdown()


def _cpu_only() -> bool:
    import torch

    return not torch.cuda.is_available()


def test_one_gpu_per_replica_by_default_distinct_ids_and_cpu_fallback(ray_2_gpus):
    from sdkit.bridge.ray_engines import RayEngines

    from sdkit.request import Request

    engines = RayEngines(None, 2, cpus_per_replica=0.5)
    try:
        assert engines.gpus_per_replica == 1.0  # the default where the cluster has GPUs
        ids = [p["gpu_ids"] for p in engines.placements]
        assert sorted(ids) == [["0"], ["1"]], engines.placements
        for p in engines.placements:
            assert p["cuda_visible_devices"] == p["gpu_ids"][0]
            if _cpu_only():
                assert p["device"] == "cpu"
        assert ray_2_gpus.available_resources().get("GPU", 0) == 0  # both GPUs held
        request = engines.check(Request(prompt=PROMPT, seed=5, **FAST))
        assert engines.submit(request).result(300)[0].size == (64, 64)
    finally:
        engines.close()


def test_half_a_gpu_each_packs_4_replicas_on_2_gpus(ray_2_gpus):
    from sdkit.bridge.ray_engines import RayEngines

    engines = RayEngines(None, 4, gpus_per_replica=0.5, cpus_per_replica=0.5)
    try:
        per_gpu = collections.Counter(g for p in engines.placements for g in p["gpu_ids"])
        assert per_gpu == {"0": 2, "1": 2}, engines.placements
        assert all(p["cuda_visible_devices"] in ("0", "1") for p in engines.placements)
    finally:
        engines.close()


def test_more_replicas_than_the_cluster_holds_fail_at_once(ray_2_gpus):
    from sdkit.bridge.ray_engines import RayEngines

    with pytest.raises(ValueError, match=r"3 replicas x 1 GPU need 3 GPUs; the Ray cluster has 2"):
        RayEngines(None, 3, gpus_per_replica=1, cpus_per_replica=0.5)
    with pytest.raises(ValueError, match=r"need 3 CPUs"):
        RayEngines(None, 3, gpus_per_replica=0, cpus_per_replica=1)


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    import tiny

    folder = tmp_path_factory.mktemp("ray-models") / "sd"
    return tiny.save(tiny.sd_pipeline(folder), folder, tiny.TINY_DEFAULTS)


def test_allow_model_holds_on_ray_and_allowed_models_load_on_the_replicas(ray_2_gpus, tiny_sd):
    import torch
    from sdkit.bridge.ray_engines import RayModel

    import sdkit

    allowed = {"tiny": str(tiny_sd)}
    # one torch thread, as each CPU replica: a CPU's float sums depend on the thread count
    # (this module alone, with torch's default 2 threads here, differed in a few last bits)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    local = sdkit.load()
    ray_server = serve(None, "tcp://127.0.0.1:0", ray="auto", replicas=2, models=allowed)
    try:
        with serve(local, "tcp://127.0.0.1:0", models=allowed) as local_server:
            refusals, inpainted = [], []
            image = Image.new("RGB", (64, 64), (200, 30, 30))
            mask = Image.new("L", (64, 64), 0)
            mask.paste(255, (16, 16, 48, 48))
            for address in (local_server.address, ray_server.address):
                with Client(address, timeout=600) as c:
                    assert "tiny" in c.hello()["models"]
                    with pytest.raises(BridgeError) as e:
                        c.txt2img(PROMPT, model="/etc/passwd", **FAST)
                    refusals.append((e.value.code, e.value.field, e.value.message))
                    # pictures in: a replica's check sends unchanged ones back as None and
                    # the job runs on the server's own
                    result = c.inpaint(image, mask, PROMPT, seed=4, num_inference_steps=2)
                    inpainted.append(np.asarray(result[0].convert("RGB")))
            assert refusals[0] == refusals[1]  # the same error, word for word
            assert refusals[0][:2] == ("model_not_allowed", "request.model")
            assert np.array_equal(inpainted[0], inpainted[1])
        with Client(ray_server.address, timeout=600) as c:
            job = c.submit(prompt=PROMPT, seed=9, model="tiny")
            result = job.result(600)
            assert job.worker in ray_server.server.engine.names
            mine = sdkit.load(tiny_sd).txt2img(PROMPT, seed=9, progress=False)
            assert result[0].size == mine[0].size == (32, 32)  # the tiny model's default size
            assert np.array_equal(
                np.asarray(result[0].convert("RGB")), np.asarray(mine[0].convert("RGB"))
            )
            loaded = ray_server.server._jobs.engines._loaded["tiny"]
            assert isinstance(loaded, RayModel)  # loaded on the replicas, not in the server
            assert c.submit(prompt=PROMPT, seed=1, **FAST).result(600)[0].size == (64, 64)
    finally:
        ray_server.stop()
        torch.set_num_threads(threads)
