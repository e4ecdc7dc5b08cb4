"""Paired per-seed intervals: Student's t by hand."""

import math

import pytest

from jas_prune.reporting.paired import paired_interval


def test_paired_interval_is_students_t():
    iv = paired_interval([1.0, 2.0, 3.0])
    half = 4.303 * 1.0 / math.sqrt(3)
    assert (iv.mean, iv.sd) == pytest.approx((2.0, 1.0))
    assert (iv.low, iv.high) == pytest.approx((2.0 - half, 2.0 + half))
    assert iv.detectable == pytest.approx((4.303 + 1.061) / math.sqrt(3)) and not iv.above_zero
    assert paired_interval([2.0, 2.5, 3.0]).above_zero
    assert not paired_interval([-1.0, 2.0, 0.5]).above_zero
