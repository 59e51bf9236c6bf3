from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.domain.money import pro_rata_fen, voucher_refund_fen


def test_pro_rata_floors_to_the_fen() -> None:
    assert pro_rata_fen(10000, 2, 3) == 6666
    assert pro_rata_fen(10000, 1, 3) == 3333
    assert pro_rata_fen(1, 1, 2) == 0
    assert pro_rata_fen(999, 3, 3) == 999


def test_pro_rata_is_exact_for_amounts_beyond_float_precision() -> None:
    big = 2**60 + 1  # a float would round this
    assert pro_rata_fen(big, 1, 1) == big
    assert pro_rata_fen(big, 2, 3) == (2 * big) // 3


@pytest.mark.parametrize(("part", "whole"), [(4, 3), (-1, 3), (1, 0)])
def test_pro_rata_refuses_impossible_shares(part: int, whole: int) -> None:
    with pytest.raises(ValueError):
        pro_rata_fen(100, part, whole)


def test_voucher_refund_by_count_by_value_and_unused() -> None:
    assert voucher_refund_fen(10000, total_count=3, used_count=1) == 6666
    assert voucher_refund_fen(10000, used_fen=2501) == 7499
    assert voucher_refund_fen(10000) == 10000
    with pytest.raises(ValueError):
        voucher_refund_fen(10000, total_count=3, used_count=4)


@given(st.integers(0, 10**9), st.integers(1, 50), st.data())
def test_pro_rata_never_exceeds_the_exact_share(
    total: int, whole: int, data: st.DataObject
) -> None:
    part = data.draw(st.integers(0, whole))
    fen = pro_rata_fen(total, part, whole)
    assert fen * whole <= total * part < (fen + 1) * whole
