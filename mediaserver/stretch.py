"""Lengthening and shortening a decoded audio frame by whole periods of its sound: the playout's delay moved
without a frame concealed or dropped.

When a queue starts to fill on the listener's link, the playout buffer learns
that it needs more delay before the packets that the queue holds back come.
Waiting for a packet that is not there yet plays the decoder's concealment: a
gap a listener hears. Growing the delay ahead of need costs nothing audible
if it is done on sound that is there. A voice (or the bench's tone) repeats
itself every pitch period, so a frame is lengthened by playing a stretch of it
once more: from a point near the frame's end, the sound goes back by a whole
number of periods and plays on from there to the end. The two sides of the
jump are crossfaded. Where the jump lands, the sound is as it was where it
jumped, so no click is heard and the next frame follows on as before.

How far back to jump is chosen by matching: the few milliseconds just before
the end of the frame, against the same length a jump earlier, over every jump
between ``MIN_SHARE`` and ``MAX_SHARE`` of the length wanted. The best match
wins. For noise, or silence, no jump matches well and any one serves. The
last frame played is the history a jump may reach back into.

When the delay is to come down again, a frame is shortened the same way the
other way round: from its start, the sound jumps forward by a whole number of
periods (at most what the frame holds beyond the crossfade). What is left out
is a few periods of a sound that repeats them, not a 20 ms frame cut out whole.

NetEQ, the browser's playout buffer, does the same ("preemptive expand" and
"accelerate"), and its statistics count the samples it adds and removes so
(``insertedSamplesForDeceleration``, ``removedSamplesForAcceleration``) apart
from those it conceals. Nära's receive path does too: a lengthened or
shortened frame is played sound, not a gap.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

MATCH_TIME = 0.005  # seconds matched on either side of a jump, and crossfaded
# A jump of between these shares of the length wanted: a period of the lowest voices (12 ms, 80 Hz) or a
# whole number of any other's fits in, and the delay gained stays within a frame of what was wanted.
MIN_SHARE = 0.5
MAX_SHARE = 1.25


def _best_jump(mono: np.ndarray, at: int, shortest: int, longest: int, window: int, want: int) -> int:
    """The jump (``shortest``..``longest`` samples) whose ``window`` samples best match those at ``at``, seen from
    ``at`` backwards (a positive jump lands that much earlier: ``longest`` <= ``at``); among near-equals, the
    one closest to ``want``."""
    target = mono[at:at + window]
    # Candidate k starts ``longest - k`` samples before ``at``: rows run from the longest jump to the shortest.
    candidates = sliding_window_view(mono[at - longest:at - shortest + window], window)
    energy = np.einsum("ij,ij->i", candidates, candidates) * float(target @ target)
    match = candidates @ target / np.sqrt(np.maximum(energy, 1e-9))
    jumps = longest - np.arange(len(candidates))
    good = match >= match.max() - 0.005  # a tone repeats every period: many jumps match it alike
    return int(jumps[good][np.argmin(np.abs(jumps[good] - want))])


def _crossfade(outgoing: np.ndarray, incoming: np.ndarray, dtype: np.dtype[np.generic]) -> np.ndarray:
    fade_in = np.linspace(0.0, 1.0, len(outgoing), endpoint=False)[:, None]
    blend = outgoing.astype(np.float64) * (1 - fade_in) + incoming.astype(np.float64) * fade_in
    return np.clip(np.rint(blend), -32768, 32767).astype(dtype)


def _check(frame: np.ndarray, history: np.ndarray) -> None:
    if frame.ndim != 2 or history.ndim != 2 or (len(history) and history.shape[1] != frame.shape[1]):
        raise ValueError("frames are (samples, channels) arrays with the same channels")


def lengthen(history: np.ndarray, frame: np.ndarray, want: int, rate: int) -> np.ndarray:
    """``frame`` lengthened by about ``want`` samples (a whole number of its periods); as it was if it cannot be.

    ``frame`` and ``history`` (the sound played just before it, possibly empty) are int16 arrays shaped
    (samples, channels). The result has the same channels and dtype; its first samples are the frame's own,
    and so are its last ones.
    """
    _check(frame, history)
    window = max(1, int(rate * MATCH_TIME))
    n, h = len(frame), len(history)
    if n < 2 * window or want < 1:
        return frame
    sound = np.concatenate([history, frame]) if h else frame
    splice = h + n - window  # where the jump leaves: the last few milliseconds play again after it
    shortest = max(window, int(want * MIN_SHARE))
    longest = min(int(want * MAX_SHARE), splice)
    if longest < shortest:
        return frame
    jump = _best_jump(sound.astype(np.float64).mean(axis=1), splice, shortest, longest, window, want)
    # Out: the frame up to the splice, then a crossfade from its end into the same sound ``jump`` earlier,
    # which then plays on to the frame's end.
    land = splice - jump
    blend = _crossfade(sound[splice:splice + window], sound[land:land + window], frame.dtype)
    return np.concatenate([frame[:n - window], blend, sound[land + window:]])


def shorten(frame: np.ndarray, rate: int) -> np.ndarray:
    """``frame`` shortened by a whole number of its periods, as many as it holds beyond a crossfade (at most
    ``MATCH_TIME`` short of its length); as it was if it is too short. It begins with the frame's first sample
    and ends as the frame ends: it follows on from the frame before it, and the next frame from it."""
    _check(frame, frame)
    window = max(1, int(rate * MATCH_TIME))
    n = len(frame)
    if n < 2 * window:
        return frame
    # Matched backwards: the frame's start against the sound a jump later, seen from the end it lands at.
    reversed_mono = frame[::-1].astype(np.float64).mean(axis=1)
    at = n - window  # the frame's first ``window`` samples, reversed
    jump = _best_jump(reversed_mono, at, window, n - window, window, n - window)
    blend = _crossfade(frame[:window], frame[jump:jump + window], frame.dtype)
    return np.concatenate([blend, frame[jump + window:]])
