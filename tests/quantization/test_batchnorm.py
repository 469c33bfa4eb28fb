import pytest
import torch

from hf_oscq.quantization.batchnorm import calibration_batches, has_batchnorm


class Indices(torch.utils.data.Dataset):
    def __len__(self):
        return 50

    def __getitem__(self, i):
        return {"pixel_values": torch.tensor([float(i)]), "labels": torch.tensor(i)}


def test_calibration_batches_are_a_seeded_permutation_independent_of_the_batch_size():
    first = torch.cat([batch["labels"] for batch in calibration_batches(Indices(), 12, 12, seed=7)]).tolist()
    assert len(set(first)) == 12 and set(first) <= set(range(50)) and first != list(range(12))  # shuffled, no repeat
    permutation = first
    for batch_size in (4, 6, 12):
        batches = list(calibration_batches(Indices(), 12, batch_size, seed=7))
        assert [len(batch["labels"]) for batch in batches] == [batch_size] * (12 // batch_size)
        assert torch.cat([batch["labels"] for batch in batches]).tolist() == permutation[:12]
    # exactly `samples` images, the last batch holding the rest; a batch larger than that is one batch
    exact = list(calibration_batches(Indices(), 10, 4, seed=7))
    assert [len(batch["labels"]) for batch in exact] == [4, 4, 2]
    assert torch.cat([batch["labels"] for batch in exact]).tolist() == permutation[:10]
    assert [len(b["labels"]) for b in calibration_batches(Indices(), 10, 500, seed=7)] == [10]
    everything = torch.cat([b["labels"] for b in calibration_batches(Indices(), 80, 16, seed=7)])
    assert sorted(everything.tolist()) == list(range(50))  # more than the dataset holds: all of it, once
    other = torch.cat([batch["labels"] for batch in calibration_batches(Indices(), 12, 4, seed=8)]).tolist()
    assert other != permutation[:12]
    with pytest.raises(ValueError, match="samples > 0"):
        calibration_batches(Indices(), 0, 4, seed=0)


class Augmented(Indices):
    """A random flip and noise drawn from torch's generator per image, as torchvision's training transforms do."""

    def __getitem__(self, i):
        image = torch.full((4,), float(i))
        if torch.rand(()) < 0.5:
            image = image.flip(0) * -1
        return {"pixel_values": image + torch.randn(4), "labels": torch.tensor(i)}


def test_calibration_batches_augment_the_same_way_every_time_and_leave_the_callers_random_state_alone():
    def images(seed, batch_size=4):
        return torch.cat([b["pixel_values"] for b in calibration_batches(Augmented(), 12, batch_size, seed=seed)])

    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = images(seed=7)
    assert torch.equal(torch.get_rng_state(), before)  # the caller's stream is untouched: training goes on as before
    torch.manual_seed(999)  # whatever state the caller is in (a Trainer mid-run, a fresh CLI process)
    assert torch.equal(images(seed=7), first)
    assert torch.equal(images(seed=7, batch_size=6), first)  # augmentation drawn per image, in permutation order
    # the augmentation really is random, and drawn from the seed: a noise-free image would be +-i exactly
    labels = torch.cat([b["labels"] for b in calibration_batches(Augmented(), 12, 4, seed=7)]).float()
    assert not torch.allclose(first.abs(), labels[:, None].expand(-1, 4), atol=0.1)
    assert not torch.equal(images(seed=8)[:, :1].sort(0).values, first[:, :1].sort(0).values)


def test_has_batchnorm():
    assert has_batchnorm(torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2)))
    assert not has_batchnorm(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.LayerNorm(2)))
