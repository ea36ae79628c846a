"""How well a chunk size fits the TTT mini-batch grid: the work spent on padding slots.

A TTT layer lays a chunk out on its mini-batch grid starting at the stream's offset o inside the
current mini-batch: a chunk of S tokens occupies ceil((o + S) / b) mini-batches of b slots
(`ttt_speech.ops.scan`), the slots before o and after the chunk being padding. Chunks that are
multiples of b keep o = 0 and waste nothing; one frame per call (native mode) computes b slots
per token.
"""
from __future__ import annotations


def chunk_alignment(frames: int, chunk_size: int, mini_batch_size: int) -> dict:
    """Slots computed by TTT for a stream of `frames` fed in chunks of `chunk_size`.

    Returns {"chunk_size", "mini_batch_size", "aligned", "chunks", "slots", "padding_slots",
    "efficiency" (= frames / slots, 1.0 is perfect)}.
    """
    if frames < 1 or chunk_size < 1 or mini_batch_size < 1:
        raise ValueError("chunk_alignment: frames, chunk_size and mini_batch_size must be >= 1")
    b = mini_batch_size
    offset = slots = chunks = 0
    for start in range(0, frames, chunk_size):
        size = min(chunk_size, frames - start)
        slots += -(-(offset + size) // b) * b
        offset = (offset + size) % b
        chunks += 1
    return {"chunk_size": chunk_size, "mini_batch_size": b, "aligned": chunk_size % b == 0, "chunks": chunks,
            "slots": slots, "padding_slots": slots - frames, "efficiency": frames / slots}
