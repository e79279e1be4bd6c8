"""The GPU check (``tools/gpu_check.sh``; ``pytest -m gpu``): every CUDA path against the CPU
loader, batch by batch as the batches arrive, with the side stream slowed (a GPU sleep in
the finishing step) and the consumer slowed (a GPU sleep on its stream before it reads
each batch), so that a missing stream wait, event or ``record_stream`` shows as wrong
bits. Skipped without CUDA."""

import json

import pytest
import torch
from torchvision import transforms

from fastmnist import FastMNISTLoader, convert
from fastmnist.conversion.synth import write_raw

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available here")]

SLEEP = 2_000_000  # GPU cycles (about 1 ms): long enough for a host that does not wait to run ahead
STEPS = {
    "affine": transforms.RandomAffine(10, translate=(0.1, 0.1), scale=(0.9, 1.1)),
    "affine bilinear": transforms.RandomAffine(15, shear=10,
                                               interpolation=transforms.InterpolationMode.BILINEAR),
    "rotation": transforms.RandomRotation(30),
    "crop": transforms.RandomCrop(28, padding=4),
    "perspective": transforms.RandomPerspective(0.5, p=1.0),
    "elastic": transforms.ElasticTransform(alpha=34.0, sigma=4.0),
}


def _transform(step, erase: bool = False):
    parts = [step, transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))]
    return transforms.Compose(parts + ([transforms.RandomErasing(p=0.5)] if erase else []))


def _slowed_side_stream(loader):
    """The loader with a GPU sleep at the start of its finishing step (which runs on the
    side stream): a copy the consumer does not wait for is still under way when it reads."""
    finish = loader._delivery.finish

    def slowed(x, idx, epoch, out=None):
        torch.cuda._sleep(SLEEP)
        return finish(x, idx, epoch) if out is None else finish(x, idx, epoch, out)

    loader._delivery.finish = slowed
    return loader


def _compare(cpu, gpu, slow_consumer: bool, epochs: int = 1) -> int:
    """Each GPU batch, as it arrives, against the CPU loader's; with ``slow_consumer`` the
    consumer's stream sleeps first, then the batch is cloned and dropped at once (a buffer
    reused too early, or memory freed without ``record_stream``, changes the clone)."""
    batches = 0
    for _ in range(epochs):
        for (x, y), (gx, gy) in zip(cpu, gpu, strict=True):
            assert gx.is_cuda and gy.is_cuda
            if slow_consumer:
                torch.cuda._sleep(SLEEP)
            gx, gy = gx.clone(), gy.clone()
            assert torch.equal(gx.cpu(), x) and torch.equal(gy.cpu(), y), f"batch {batches}"
            batches += 1
    return batches


MODES = [{"prefetch": p, "images": images} for p in (1, 2, 4) for images in ("float32", "uint8")]
MODES += [{"normalize": False}, {"resident": True}, {"resident": True, "images": "uint8"}]


@pytest.mark.parametrize("mode", MODES, ids=lambda mode: "_".join(f"{k}{v}" for k, v in mode.items()))
@pytest.mark.parametrize("slow", ["side stream", "consumer"])
def test_every_cuda_mode_gives_the_cpu_bits_under_slowed_streams(real_shards, mode, slow):
    def loader(**device):
        return FastMNISTLoader(real_shards, "test", batch_size=256, seed=4, **mode, **device)

    gpu = loader(device="cuda")
    if slow == "side stream" and not mode.get("resident"):
        gpu = _slowed_side_stream(gpu)
    assert _compare(loader(), gpu, slow == "consumer", epochs=2) == 2 * 40  # two epochs


@pytest.mark.parametrize("name", list(STEPS))
def test_every_augmentation_step_on_the_device_is_the_cpus(real_shards, name):
    tf = _transform(STEPS[name], erase=name == "affine")
    cpu = FastMNISTLoader(real_shards, "test", batch_size=256, seed=3, transform=tf)
    gpu = _slowed_side_stream(FastMNISTLoader(real_shards, "test", batch_size=256, seed=3, transform=tf,
                                              device="cuda"))
    assert _compare(cpu, gpu, slow_consumer=True) == 40


def test_resume_mid_epoch_on_the_device_continues_the_cpu_epoch(real_shards):
    cpu = FastMNISTLoader(real_shards, "test", batch_size=128, seed=6)
    gpu = FastMNISTLoader(real_shards, "test", batch_size=128, seed=6, device="cuda")
    it = iter(gpu)
    head = [next(it) for _ in range(9)]
    state = json.loads(json.dumps(gpu.state_dict()))
    resumed = FastMNISTLoader(real_shards, "test", batch_size=128, seed=6, device="cuda")
    resumed.load_state_dict(state)
    expected = list(cpu)
    assert len(head) + len(resumed) == len(expected)
    for (gx, gy), (x, y) in zip([*head, *resumed], expected, strict=True):
        assert torch.equal(gx.cpu(), x) and torch.equal(gy.cpu(), y)


def test_eight_column_labels_on_the_device(tmp_path):
    write_raw(tmp_path / "raw", 600, 300, dataset="qmnist")
    convert(tmp_path / "raw", tmp_path / "set", dataset="qmnist-extended", progress=False)
    cpu = FastMNISTLoader(tmp_path / "set", "test", batch_size=64, seed=1)
    gpu = FastMNISTLoader(tmp_path / "set", "test", batch_size=64, seed=1, device="cuda")
    assert _compare(cpu, _slowed_side_stream(gpu), slow_consumer=True) == 5
    assert next(iter(gpu))[1].shape == (64, 8)


def test_device_index_and_the_dataset_on_the_device(real_shards):
    torch.cuda.set_device(torch.cuda.device_count() - 1)
    loader = FastMNISTLoader(real_shards, "test", device="cuda", resident=True)
    assert loader.device == torch.device("cuda", torch.cuda.device_count() - 1)
    x, y = loader.dataset[5]
    reference = FastMNISTLoader(real_shards, "test")
    assert x.device.type == loader.dataset.targets.device.type == "cpu"
    assert torch.equal(x, reference.dataset[5][0]) and y == reference.dataset[5][1]
