"""Standby ingest in step with the leader, and the takeover decision: continue the epoch or start a new one.

Pure: no I/O, no clock. The standby runs its own ``BookEngine`` on the same upstream (its own epoch, its own
local seq) and does not publish. ``StepTracker`` is fed both streams:

* ``local(instrument, seq, key, checksum)`` for each delta the standby's engine produced (``seq`` local),
* ``leader(instrument, epoch, seq, key, checksum)`` for each delta the leader published (seen on NATS),

where ``key`` identifies a delta's content (its changes and checksum; see ``delta_key``). When the same
content appears in both, the tracker learns the **offset** ``leader_seq - local_seq`` of the instrument;
it is *confirmed* once ``confirm_after`` further deltas agree, and dropped on any disagreement (the same
mapped seq with different content).

``plan(instrument, local_seq)`` at takeover gives, per instrument:

* ``Continue(epoch, offset, from_local_seq)``: the standby's book is provably the leader's at the leader's
  last published seq ``S`` (the local delta ``S - offset`` has the checksum the leader published at ``S``);
  publish the local deltas after ``S - offset`` renumbered by ``offset``, in the leader's epoch: clients
  see no gap and no resync.
* ``WaitFor(local_seq)``: the standby is behind the leader's last published seq; keep applying upstream
  (not publishing) until it reaches it, then plan again.
* ``NewEpoch(reason)``: no proof (no confirmed offset, a checksum mismatch, the leader's seq fell out of the
  standby's ring): keep the standby's own epoch, so gateways resync every client with one snapshot.
"""
from __future__ import annotations

import zlib
from collections import deque
from dataclasses import dataclass, field


def delta_key(changes: list, checksum: int) -> int:
    """A 32-bit fingerprint of a delta's content: CRC-32 of its wire ``changes`` and its checksum.
    ``changes`` are the wire form ``[[side, price, size], ...]`` (canonical decimals, PROTOCOL.md s.6)."""
    text = ";".join(f"{c[0]},{c[1]},{c[2]}" for c in changes) + f"|{checksum}"
    return zlib.crc32(text.encode())


@dataclass(frozen=True, slots=True)
class Continue:
    epoch: str
    offset: int          # leader seq = local seq + offset
    from_local_seq: int  # republish local deltas with seq > this (renumbered); == local seq: nothing to republish


@dataclass(frozen=True, slots=True)
class WaitFor:
    local_seq: int


@dataclass(frozen=True, slots=True)
class NewEpoch:
    reason: str


Plan = Continue | WaitFor | NewEpoch


@dataclass
class _Instrument:
    local: deque = field(default_factory=deque)   # (local_seq, key, checksum), oldest first
    leader: deque = field(default_factory=deque)  # (leader_seq, key, checksum), oldest first
    leader_epoch: str | None = None
    leader_seq: int = 0
    leader_checksum: int | None = None
    offset: int | None = None
    agreed: int = 0


class StepTracker:
    """Per-instrument alignment of the standby's local seq with the leader's published seq.

    ``ring`` bounds both histories per instrument (deltas). Raises nothing; unknown instruments plan
    ``NewEpoch("never seen from the leader")``.
    """

    def __init__(self, ring: int = 4096, confirm_after: int = 2) -> None:
        self.ring = ring
        self.confirm_after = confirm_after
        self._by_instrument: dict[str, _Instrument] = {}

    def _get(self, instrument: str) -> _Instrument:
        st = self._by_instrument.get(instrument)
        if st is None:
            st = self._by_instrument[instrument] = _Instrument()
        return st

    def offset(self, instrument: str) -> int | None:
        """The confirmed offset (leader seq - local seq) of ``instrument``, or None."""
        st = self._by_instrument.get(instrument)
        return st.offset if st is not None and st.agreed >= self.confirm_after else None

    def in_step(self) -> dict[str, bool]:
        return {i: self.offset(i) is not None for i in self._by_instrument}

    def local(self, instrument: str, seq: int, key: int, checksum: int) -> None:
        st = self._get(instrument)
        st.local.append((seq, key, checksum))
        if len(st.local) > self.ring:
            st.local.popleft()
        self._check(st, local=(seq, key))

    def leader(self, instrument: str, epoch: str, seq: int, key: int, checksum: int) -> None:
        st = self._get(instrument)
        if epoch != st.leader_epoch:  # a new history on the leader: what we learnt does not carry over
            st.leader.clear()
            st.leader_epoch, st.offset, st.agreed = epoch, None, 0
        st.leader_seq, st.leader_checksum = seq, checksum
        st.leader.append((seq, key, checksum))
        if len(st.leader) > self.ring:
            st.leader.popleft()
        self._check(st, leader=(seq, key))

    @staticmethod
    def _find(ring: deque, seq: int) -> tuple[int, int, int] | None:
        """The entry of ``seq`` in ``ring`` (seqs ascending), or None: O(1) when the seqs are contiguous (the
        usual case), else a binary search; a seq outside the ring's range (the other side is not there yet,
        or it fell out) is answered without a scan."""
        if not ring or seq < ring[0][0] or seq > ring[-1][0]:
            return None
        i = seq - ring[0][0]
        if i < len(ring) and ring[i][0] == seq:
            return ring[i]
        lo, hi = 0, len(ring) - 1
        while lo <= hi:
            mid = (lo + hi) // 2
            at = ring[mid][0]
            if at == seq:
                return ring[mid]
            if at < seq:
                lo = mid + 1
            else:
                hi = mid - 1
        return None

    def _check(self, st: _Instrument, *, local: tuple[int, int] | None = None,
               leader: tuple[int, int] | None = None) -> None:
        if st.offset is not None:
            if local is not None:
                other = self._find(st.leader, local[0] + st.offset)
                mine = local[1]
            else:
                assert leader is not None
                other = self._find(st.local, leader[0] - st.offset)
                mine = leader[1]
            if other is None:
                return  # the other side has not got there yet
            if other[1] == mine:
                st.agreed += 1
            else:
                st.offset, st.agreed = None, 0  # disagreement: relearn
            return
        # no offset: look for the same content on the other side (newest first)
        if local is not None:
            for seq, key, _ in reversed(st.leader):
                if key == local[1]:
                    st.offset, st.agreed = seq - local[0], 0
                    return
        else:
            assert leader is not None
            for seq, key, _ in reversed(st.local):
                if key == leader[1]:
                    st.offset, st.agreed = leader[0] - seq, 0
                    return

    def plan(self, instrument: str, local_seq: int) -> Plan:
        """The takeover decision for ``instrument`` whose standby book is at local seq ``local_seq``."""
        st = self._by_instrument.get(instrument)
        if st is None or st.leader_epoch is None:
            return NewEpoch("never seen from the leader")
        offset = self.offset(instrument)
        if offset is None:
            return NewEpoch("not in step with the leader (no confirmed seq offset)")
        at = st.leader_seq - offset
        if at > local_seq:
            return WaitFor(at)
        mine = self._find(st.local, at)
        if mine is None:
            return NewEpoch(f"leader's last seq {st.leader_seq} is out of the standby's ring")
        if mine[2] != st.leader_checksum:
            return NewEpoch(f"checksum at leader seq {st.leader_seq}: standby {mine[2]} != leader {st.leader_checksum}")
        return Continue(st.leader_epoch, offset, at)

    def forget(self, instrument: str) -> None:
        self._by_instrument.pop(instrument, None)
