"""Money arithmetic in integer fen (1 yuan = 100 fen). No floats anywhere."""

from __future__ import annotations


def pro_rata_fen(total_fen: int, part: int, whole: int) -> int:
    """`total_fen * part / whole`, floored to the fen (seed 004: 分单位仅计取整值)."""
    if whole <= 0:
        raise ValueError(f"whole must be positive, got {whole}")
    if not 0 <= part <= whole:
        raise ValueError(f"part must be within 0..{whole}, got {part}")
    if total_fen < 0:
        raise ValueError(f"total_fen must not be negative, got {total_fen}")
    return total_fen * part // whole


def voucher_refund_fen(
    amount_fen: int,
    *,
    total_count: int | None = None,
    used_count: int | None = None,
    used_fen: int | None = None,
) -> int:
    """What a (partly) unused local-life voucher order refunds.

    Either by count (`total_count` vouchers bought, `used_count` used: the unused share of
    the amount, floored) or by value (`used_fen` already consumed). Nothing given = unused.
    """
    if used_fen is not None:
        if not 0 <= used_fen <= amount_fen:
            raise ValueError(f"used_fen must be within 0..{amount_fen}, got {used_fen}")
        return amount_fen - used_fen
    if total_count is None and used_count is None:
        return amount_fen
    total = 1 if total_count is None else total_count
    used = 0 if used_count is None else used_count
    # pro_rata_fen refuses a used count outside 0..total (the unused part would be out of range)
    return pro_rata_fen(amount_fen, total - used, total)
