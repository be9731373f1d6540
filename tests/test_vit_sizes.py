"""vit.sizes: the size sets of multi-resolution training (validated against the patch size) and the
stateless per-batch draw."""

from __future__ import annotations

from collections import Counter

import pytest

import vit
from vit.sizes import check_image_sizes, draw_image_size, image_sizes_between

param = pytest.mark.parametrize


class TestCheckImageSizes:
    def test_sorted_and_validated(self):
        assert check_image_sizes([36, 20, 28], 4) == (20, 28, 36)
        assert check_image_sizes((12, 24), (4, 6)) == (12, 24)  # a multiple of every side of the patch

    @param("sizes, patch, message", [
        ([], 4, r"train_sizes=\[\] is empty: give at least one image size \(a multiple of patch_size=4\)"),
        ([20, 30], 4, r"train_sizes=\[20, 30\]: \[30\] not a positive multiple of patch_size=4; use multiples of 4"),
        ([0, 8], 4, r"\[0\] not a positive multiple"),
        ([12, 18], (4, 6), r"\[18\] not a positive multiple of patch_size=\(4, 6\); use multiples of 12"),
        ([28, 28], 4, r"train_sizes=\[28, 28\] repeats a size"),
    ])  # fmt: skip
    def test_bad_sets_name_the_argument(self, sizes, patch, message):
        with pytest.raises(ValueError, match=message):
            check_image_sizes(sizes, patch, name="train_sizes")

    @param("sizes, message", [(28, r"img_sizes=28 must be a list"), ("28", r"img_sizes='28' must be a list"),
                              ([28.0], r"28.0 is not an int image size"), ([True], r"True is not an int")])  # fmt: skip
    def test_not_a_list_of_ints(self, sizes, message):
        with pytest.raises(TypeError, match=message):
            check_image_sizes(sizes, 4)

    def test_bad_patch_size(self):
        with pytest.raises(ValueError, match="patch_size=0 must be an int >= 1"):
            check_image_sizes([28], 0)


class TestImageSizesBetween:
    def test_every_multiple_in_the_range(self):
        assert image_sizes_between(20, 44, 4) == (20, 24, 28, 32, 36, 40, 44)
        assert image_sizes_between(18, 45, 4) == (20, 24, 28, 32, 36, 40, 44)
        assert image_sizes_between(1, 8, 4) == (4, 8)

    def test_errors_name_the_arguments(self):
        with pytest.raises(ValueError, match="min_size=40 must be <= max_size=20"):
            image_sizes_between(40, 20, 4)
        with pytest.raises(ValueError, match=r"\[lo, hi\] = \[21, 23\] holds no multiple of patch_size=4"):
            image_sizes_between(21, 23, 4, names=("lo", "hi"))


class TestDrawImageSize:
    SIZES = (20, 28, 36)

    def test_determined_by_seed_epoch_and_batch_alone(self):
        """A resumed run (a fresh call, no state) draws what the first run drew."""
        first = [draw_image_size(self.SIZES, seed=7, epoch=2, batch_index=b) for b in range(50)]
        again = [draw_image_size(self.SIZES, seed=7, epoch=2, batch_index=b) for b in range(50)]
        assert first == again and set(first) == set(self.SIZES)
        assert first != [draw_image_size(self.SIZES, seed=8, epoch=2, batch_index=b) for b in range(50)]
        assert first != [draw_image_size(self.SIZES, seed=7, epoch=3, batch_index=b) for b in range(50)]

    def test_uniform_over_the_set(self):
        """3000 draws: each of 3 sizes within 5 standard deviations (sd = sqrt(3000 * 1/3 * 2/3) = 25.8) of 1000."""
        counts = Counter(
            draw_image_size(self.SIZES, seed=0, epoch=e, batch_index=b) for e in range(3) for b in range(1000)
        )
        assert all(abs(counts[size] - 1000) < 5 * 25.8 for size in self.SIZES), counts

    def test_bad_arguments(self):
        with pytest.raises(ValueError, match="sizes is empty"):
            draw_image_size((), seed=0, epoch=0, batch_index=0)
        with pytest.raises(ValueError, match="batch_index=-1 must be an int >= 0"):
            draw_image_size(self.SIZES, seed=0, epoch=0, batch_index=-1)


def test_exported() -> None:
    assert vit.check_image_sizes is check_image_sizes and vit.draw_image_size is draw_image_size
    assert vit.image_sizes_between is image_sizes_between
