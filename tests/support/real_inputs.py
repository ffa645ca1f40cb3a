"""Inputs that make real models do real work, for golden cases in tests and benchmarks:
a stream of audio chunks for silero-vad (the state carried from chunk to chunk), and
pictures of text lines for PaddleOCR's detector and classifier (on noise a detector finds
nothing, so a health check on noise tests nothing).

Both are keyed ``<case>/<input>``: the golden cases file format (docs/building.md).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

__all__ = ["CHUNK", "silero_stream_cases", "text_pages"]

CHUNK = 512  # samples per silero-vad request at 16 kHz


def silero_stream_cases(model: Path, chunks: int) -> dict[str, np.ndarray]:
    """Consecutive chunks of a noisy tone, each case carrying the state that the model
    returned for the chunk before (as a streaming caller sends them)."""
    t = np.arange(chunks * CHUNK) / 16000
    rng = np.random.default_rng(0)
    tone = 0.3 * np.sin(2 * np.pi * 220 * t) + 0.05 * rng.standard_normal(t.size)
    audio = tone.astype(np.float32)
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    state = np.zeros((2, 1, 128), np.float32)
    sr = np.array(16000, np.int64)
    cases: dict[str, np.ndarray] = {}
    for i in range(chunks):
        chunk = audio[i * CHUNK : (i + 1) * CHUNK][None, :]
        cases |= {f"{i}/input": chunk, f"{i}/state": state, f"{i}/sr": sr}
        _, state = session.run(None, {"input": chunk, "state": state, "sr": sr})
    return cases


def text_pages(count: int, h: int, w: int, name: str = "x") -> dict[str, np.ndarray]:
    """Pictures of text lines (dark strokes on white), normalised as PaddleOCR does."""
    cases = {}
    for i in range(count):
        rng = np.random.default_rng(i)
        img = np.full((h, w), 255.0)
        for row in range(max(2, h // 8), h - 10, 16):
            x = 6
            while x < w - 10:
                width = int(rng.integers(3, 7))
                img[row : row + 9, x : x + width] = rng.uniform(0, 60)
                x += width + int(rng.integers(1, 4))
        rgb = (np.repeat(img[None], 3, axis=0) / 255.0 - 0.5) / 0.5
        cases[f"{i}/{name}"] = rgb[None].astype(np.float32)
    return cases
