"""The twin's picks (least outstanding, random, power of two choices): mixed into
``_shared_py.SharedTable``, as ``_shared_pick.pxi`` is included in the compiled one."""

from __future__ import annotations

from collections import Counter

from tritonmesh._core import _segment
from tritonmesh._core._segment import ACTIVE
from tritonmesh._core._shared_words_py import (
    _CLASS_MIN,
    _CLASSES,
    _DRAW_MIN_BITS,
    _DRAW_MIN_WORDS,
    _DRAW_TRIES,
    _LOW,
    _ODD_MAX,
    _PICK_ATTEMPTS,
    _RANDOM_TRIES,
    SharedWords,
)


def _picture(weights: list[float], counts: Counter[float]) -> tuple[list[float], int]:
    """The compiled table's picture of the weights (``_weight_candidates`` and
    ``_picture_weights``), from the ACTIVE slots' weights in slot order (``counts``: how
    many slots each has): its classes' weights, the common one first, and how many slots
    are odd. Misra and Gries' candidates
    as it finds them, so that the classes are the same where more weights than classes
    make the choice depend on the order."""
    cand: list[list[float]] = []  # [weight, slots]
    for w in weights:
        for k in cand:
            if k[0] == w:
                k[1] += 1
                break
        else:
            if len(cand) < _CLASSES:
                cand.append([w, 1])
                continue
            c = 0
            while c < len(cand):
                cand[c][1] -= 1
                if cand[c][1] == 0:
                    cand[c] = cand[-1]
                    cand.pop()
                else:
                    c += 1
    tops = sorted((k[0] for k in cand), key=lambda w: -counts[w])  # stable, as its sort
    ranked = [counts[w] for w in tops]
    odd = sum(ranked) - ranked[0] if ranked else 0
    nclass = 1
    while nclass < len(ranked) and (ranked[nclass] >= _CLASS_MIN or odd > _ODD_MAX):
        odd -= ranked[nclass]
        nclass += 1
    classes = tops[:nclass]
    return classes, len(weights) - sum(counts[w] for w in classes)


class _Picks(SharedWords):
    """The picks: least outstanding, random, power of two choices."""

    def _pickable(self, s: int) -> tuple[int, int] | None:
        """``(status, count)`` of a pickable slot, or None."""
        status = self._load(self._statusp(s))
        if status & _LOW != ACTIVE:
            return None
        gens, ejected = self._view_gen, self._view_ejected
        if gens is not None and (gens[s] != status >> 32 or (ejected is not None and ejected[s])):
            return None
        count = self._load(self._word(s)) & _LOW
        lim = self._load32(self._limitp(s))
        return (status, count) if lim == 0 or count < lim else None

    def _take(self, s: int, status: int) -> bool:
        if not self._update(s, True, self._load32(self._limitp(s))):
            return False
        if self._load(self._statusp(s)) == status:
            return True
        self._drop(s)
        return False

    def _scan_least(self) -> int:
        """The pickable slot with the lowest (count + 1) / weight, uniform among ties: the
        same draws as the compiled table. Where its index draws by rejection (``_draws``),
        that is DRAW_TRIES uniform slot ids first, the first tied one kept; then, as its
        snapshot and its scan, the two passes."""
        best, best_count, best_w, best_status, ties = -1, 0, 0.0, 0, 0
        buf = self._buf()
        high = self._high()
        lowest: dict[float, int] = {}  # per weight class, its least count (self._classes)
        for s in range(high):
            found = self._pickable(s)
            if found is None:
                continue
            status, count = found
            w = self._weight(buf, s)
            if (self._classes or self._common) and count < lowest.get(w, count + 1):
                lowest[w] = count
            lhs = (count + 1) * best_w
            rhs = (best_count + 1) * w
            if lhs < rhs or best < 0:
                best, best_count, best_w, best_status, ties = s, count, w, status, 1
            else:
                ties += lhs == rhs
        if ties and self._draws(high, best, best_count, best_w, lowest):
            for _ in range(_DRAW_TRIES):
                s = self._below(high)
                found = self._pickable(s)
                if found is not None and \
                        (found[1] + 1) * best_w == (best_count + 1) * self._weight(buf, s):
                    self._scanned = found[0]
                    return s
        self._scanned = best_status
        if ties <= 1:
            return best
        r = self._below(ties)
        for s in range(best, high):
            found = self._pickable(s)
            if found is None:
                continue
            status, count = found
            w = self._weight(buf, s)
            r -= (count + 1) * best_w == (best_count + 1) * w
            if r < 0:
                self._scanned = status
                return s
        return best

    def _draws(self, high: int, best: int, count: int, weight: float,
               lowest: dict[float, int]) -> bool:
        """Whether the compiled table's pick draws by rejection first, ``best`` being the
        first tied slot (``count`` requests, ``weight``): its index decides (equal weights,
        the least count below the last level; or weight classes and no odd slot, and the
        class pick finds its ties, ``_class_pick_finds``; or one class and odd slots,
        ``_odd_draws``), the row has DRAW_MIN_WORDS words or more, and the ties' first
        non-empty word DRAW_MIN_BITS slots or more."""
        if (high + 63) >> 6 < _DRAW_MIN_WORDS:
            return False
        if self._even:
            if count >= _segment.INDEX_LEVELS - 1:
                return False
        elif self._common:
            return self._odd_draws(high, lowest)
        elif not self._classes or not self._class_pick_finds(lowest):
            return False
        tied = 0
        buf = self._buf()
        for s in range(best, min((best | 63) + 1, high)):
            found = self._pickable(s)
            tied += found is not None and \
                (found[1] + 1) * weight == (count + 1) * self._weight(buf, s)
        return tied >= _DRAW_MIN_BITS

    def _odd_draws(self, high: int, lowest: dict[float, int]) -> bool:
        """Whether the compiled table's pick draws beside its odd slots (``_draw_with_odd``):
        the common weight's least count below the last level, its first word with a slot at
        that count holding DRAW_MIN_BITS of them or more, and no odd slot below it."""
        common = self._common
        level = lowest.get(common or 0.0, _segment.INDEX_LEVELS)
        if common is None or level >= _segment.INDEX_LEVELS - 1:
            return False
        buf = self._buf()
        first, at_level = -1, 0
        for s in range(high):
            found = self._pickable(s)
            if found is None:
                continue
            w = self._weight(buf, s)
            if w != common:
                if (found[1] + 1) * common < (level + 1) * w:
                    return False
            elif found[1] == level and first in (-1, s >> 6):
                first = s >> 6
                at_level += 1
        return at_level >= _DRAW_MIN_BITS

    def _class_pick_finds(self, lowest: dict[float, int]) -> bool:
        """Whether the compiled class pick (``_least_by_class``) finds its ties in the
        index: it reads the levels upward, each class's lowest (``lowest``: its least count)
        found in turn, until no class left can tie the best so far; it answers -1 (the scan
        decides) when it found nothing, or a class it still needed in the last level."""
        last = _segment.INDEX_LEVELS - 1
        level_of = {w: min(c, last) for w, c in lowest.items()}
        pending = set(self._classes)
        best = 0.0  # the best class's weight; 0.0: none yet
        for level in range(last + 1):
            if best:
                pending = {w for w in pending
                           if not (level + 1) * best > (level_of[best] + 1) * w}
            if not pending:
                break
            found = [w for w in pending if level_of.get(w) == level]
            if not found:
                continue
            if level == last:
                return False
            for w in found:
                if not best or (level + 1) * best < (level_of[best] + 1) * w:
                    best = w
            pending.difference_update(found)
        return best != 0.0

    def pick(self) -> int:
        """LEAST_OUTSTANDING_REQUESTS on the fleet-wide counts; -1 when nothing is pickable."""
        self._read_weights()
        for _ in range(_PICK_ATTEMPTS):
            self.scans += 1
            s = self._scan_least()
            if s < 0:
                return -1
            if self._take(s, self._scanned):
                return s
        return -1

    def _scan_random(self) -> int:
        chosen, total = -1, 0.0
        buf = self._buf()
        for s in range(self._high()):
            found = self._pickable(s)
            if found is None:
                continue
            w = self._weight(buf, s)
            total += w
            if (self._next() >> 11) * (1.0 / 9007199254740992.0) * total < w:
                chosen, self._scanned = s, found[0]
        return chosen

    def _read_weights(self) -> None:
        """Whether every ACTIVE slot has the same weight, the largest, the weight classes
        where the compiled table's picture has no odd slot, and its common weight where it
        has one class and odd slots (fewer than it reads one by one), once per membership
        generation (as the compiled table: they decide pick_random's draws, and whether a
        least-outstanding pick's index draws by rejection)."""
        gen = self._load(_segment.H_GENERATION)
        if gen == self._weights_gen:
            return
        buf = self._buf()
        active = [self._weight(buf, s)
                  for s in range(self._high())
                  if self._load(self._statusp(s)) & _LOW == ACTIVE]
        weights = Counter(active)
        self._even = len(weights) <= 1
        self._top_weight = max(weights, default=0.0)
        classes, odd = _picture(active, weights)
        self._classes = tuple(classes) if len(classes) > 1 and not odd else ()
        self._common = classes[0] if len(classes) == 1 and 0 < odd <= _ODD_MAX else None
        self._weights_gen = gen

    def _sample_random(self) -> int:
        """RANDOM by rejection, with the compiled table's draws: a uniform slot id, kept if
        pickable and then with probability weight / the largest; the scan after
        _RANDOM_TRIES misses."""
        high = self._high()
        if high == 0:
            return -1
        self._read_weights()
        for _ in range(_RANDOM_TRIES):
            s = self._below(high)
            found = self._pickable(s)
            if found is None:
                continue
            if not self._even and (self._next() >> 11) * (1.0 / 9007199254740992.0) * \
                    self._top_weight >= self._weight(self._buf(), s):
                continue
            self._scanned = found[0]
            return s
        return self._scan_random()

    def pick_random(self) -> int:
        """RANDOM: a pickable slot with probability proportional to its weight."""
        for _ in range(_PICK_ATTEMPTS):
            s = self._sample_random()
            if s < 0:
                return -1
            if self._take(s, self._scanned):
                return s
        return -1

    def _sample(self, high: int, skip: int) -> tuple[int, int, int]:
        for _ in range(high + 8):
            s = self._below(high)
            if s != skip:
                found = self._pickable(s)
                if found is not None:
                    return s, found[0], found[1]
        return -1, 0, 0

    def pick_two(self) -> int:
        """POWER_OF_TWO_CHOICES on the fleet-wide counts; -1 when nothing is pickable."""
        buf = self._buf()
        for _ in range(_PICK_ATTEMPTS):
            high = self._high()
            if high == 0:
                return -1
            a, sa, ca = self._sample(high, -1)
            if a < 0:
                a = self._scan_random()
                if a < 0:
                    return -1
                sa, ca = self._scanned, self._load(self._word(a)) & _LOW
            b, sb, cb = self._sample(high, a)
            s, self._scanned = a, sa
            if b >= 0:
                lhs = (ca + 1) * self._weight(buf, b)
                rhs = (cb + 1) * self._weight(buf, a)
                if rhs < lhs or (rhs == lhs and self._next() & 1):
                    s, self._scanned = b, sb
            if self._take(s, self._scanned):
                return s
        return -1
