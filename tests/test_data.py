import numpy as np
import torch

from fashionlabel.data import IMAGENET_MEAN, IMAGENET_STD, augment, cutmix, to_input


def test_to_input_normalises_per_channel_in_channels_last():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 8, 6, 3), dtype=np.uint8)
    x = to_input(images, IMAGENET_MEAN, IMAGENET_STD)
    want = (images / 255.0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    assert x.shape == (3, 3, 8, 6) and x.is_contiguous(memory_format=torch.channels_last)
    assert np.allclose(x.permute(0, 2, 3, 1).numpy(), want, atol=1e-6)
    again = to_input(images, IMAGENET_MEAN, IMAGENET_STD)  # the cached moments are not modified by use
    assert torch.equal(x, again)


def test_augment_flips_or_keeps_each_image_and_crops_within_the_padding():
    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).view(2, 3, 4, 5)
    out = augment(x, pad=0, generator=torch.Generator().manual_seed(1))
    for i in range(2):  # no padding: each image is itself or its mirror
        assert torch.equal(out[i], x[i]) or torch.equal(out[i], x[i].flip(2))
    seen = {tuple(augment(x, pad=0)[0].flatten().tolist()) for _ in range(40)}
    assert len(seen) == 2  # device-side draws give both outcomes
    a = augment(x, generator=torch.Generator().manual_seed(7))
    b = augment(x, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and a.shape == x.shape


def test_each_image_gets_its_own_crop_of_its_padded_self():
    x = torch.rand(1, 3, 10, 8).expand(16, 3, 10, 8).contiguous()  # 16 copies of one image
    out = augment(x, pad=2, generator=torch.Generator().manual_seed(3))
    xp = torch.nn.functional.pad(x[:1], (2, 2, 2, 2), mode="replicate")[0]
    crops = {}
    for dy in range(5):
        for dx in range(5):
            c = xp[:, dy : dy + 10, dx : dx + 8]
            crops[(dy, dx, False)], crops[(dy, dx, True)] = c, c.flip(2)
    found = [next(k for k, c in crops.items() if torch.equal(out[i], c)) for i in range(16)]
    assert len({(dy, dx) for dy, dx, _ in found}) > 4  # shifts drawn per image, not one per batch
    assert augment(torch.zeros(2, 3, 80, 60)).shape == (2, 3, 80, 60)  # default pad: 5% of the height


def test_cutmix_pastes_one_box_from_another_image_and_returns_the_share_kept():
    n, h, w = 6, 20, 15
    x = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, h, w).contiguous()  # image i is i
    shares = []
    for seed in range(30):
        out, perm, own = cutmix(x, generator=torch.Generator().manual_seed(seed))
        assert sorted(perm.tolist()) == list(range(n))
        for i in range(n):
            mine, theirs = out[i] == i, out[i] == perm[i]
            assert torch.all(mine | theirs)  # every pixel is the image's own or its partner's
            if perm[i] != i:  # the share of its own pixels is the weight of its own labels
                assert abs(mine.float().mean().item() - own) < 1e-6
            box = (~mine[0]).nonzero()
            if len(box):  # what was replaced is one rectangle, the same for every image
                (y0, x0), (y1, x1) = box.min(0).values.tolist(), box.max(0).values.tolist()
                assert (~mine[0])[y0 : y1 + 1, x0 : x1 + 1].all()
        shares.append(own)
    assert torch.equal(
        x, torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, h, w)
    )  # input kept
    assert min(shares) < 0.5 < max(shares) <= 1.0  # area drawn over the whole range
