"""The SciTags flow-label bit layout (scitags.org packet marking specification).

20 bits, bit 19 most significant:
  bits 19-18  entropy
  bits 17-9   experiment id, 9 bits, bit-reversed (the id's least significant bit is bit 17)
  bit  8      entropy
  bits 7-2    activity id, 6 bits, as is (its least significant bit is bit 2)
  bits 1-0    entropy
The "scitag" integer of HTTP `SciTag` headers is `experiment << 6 | activity`.
"""
from __future__ import annotations

import secrets

EXPERIMENT_BITS, ACTIVITY_BITS = 9, 6
MAX_EXPERIMENT, MAX_ACTIVITY = (1 << EXPERIMENT_BITS) - 1, (1 << ACTIVITY_BITS) - 1
ENTROPY_MASK = 0b11 << 18 | 1 << 8 | 0b11       # the 5 bits left to entropy
LABEL_MASK = 0xFFFFF


def _reverse(value: int, bits: int) -> int:
    return int(format(value, f"0{bits}b")[::-1], 2)


def check_ids(experiment: int, activity: int) -> None:
    if not 0 <= experiment <= MAX_EXPERIMENT:
        raise ValueError(f"experiment id {experiment} does not fit in {EXPERIMENT_BITS} bits (0-{MAX_EXPERIMENT})")
    if not 0 <= activity <= MAX_ACTIVITY:
        raise ValueError(f"activity id {activity} does not fit in {ACTIVITY_BITS} bits (0-{MAX_ACTIVITY})")


def random_entropy() -> int:
    """Five random bits, spread into the entropy positions; drawn once per flow."""
    return spread_entropy(secrets.randbits(5))


def spread_entropy(bits5: int) -> int:
    """Five bits b4..b0 -> label bits 19-18 (b4 b3), 8 (b2), 1-0 (b1 b0)."""
    if not 0 <= bits5 < 32:
        raise ValueError(f"entropy {bits5} is not 5 bits")
    return (bits5 >> 3 & 0b11) << 18 | (bits5 >> 2 & 1) << 8 | (bits5 & 0b11)


def encode(experiment: int, activity: int, entropy: int = 0) -> int:
    """Flow label for EXPERIMENT/ACTIVITY; ENTROPY is a label value of which only the entropy
    positions are used (see random_entropy)."""
    check_ids(experiment, activity)
    return (_reverse(experiment, EXPERIMENT_BITS) << 9) | (activity << 2) | (entropy & ENTROPY_MASK)


def decode(label: int) -> tuple[int, int]:
    """(experiment, activity) carried by a 20-bit flow label."""
    if not 0 <= label <= LABEL_MASK:
        raise ValueError(f"flow label {label} does not fit in 20 bits")
    return _reverse(label >> 9 & MAX_EXPERIMENT, EXPERIMENT_BITS), label >> 2 & MAX_ACTIVITY


def scitag(experiment: int, activity: int) -> int:
    check_ids(experiment, activity)
    return experiment << ACTIVITY_BITS | activity


def split_scitag(value: int) -> tuple[int, int]:
    if not 0 <= value < 1 << (EXPERIMENT_BITS + ACTIVITY_BITS):
        raise ValueError(f"scitag {value} does not fit in {EXPERIMENT_BITS + ACTIVITY_BITS} bits")
    return value >> ACTIVITY_BITS, value & MAX_ACTIVITY
