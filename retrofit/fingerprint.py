"""Which encoder made a set of vectors: the identity that keeps heads and knowledge bases compatible."""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from retrofit.errors import FingerprintMismatchError

__all__ = ["EncoderFingerprint", "check_fingerprints", "file_digest"]


@dataclass(frozen=True)
class EncoderFingerprint:
    """Identity of the encoder behind a vector space.

    Two vector spaces are interchangeable only if every field matches (``note`` excepted).
    """

    family: str  # encoder family: "timm", "torchvision", "open_clip", "darknet-tiny", "sentence-transformers", ...
    name: str  # architecture or model name within the family, e.g. "resnet50", "ViT-B-32", "all-MiniLM-L6-v2"
    weights: str  # pretrained tag or "sha256:<first 16 hex>" of the checkpoint file; "random" for untrained
    dim: int  # output dimension of the vectors
    normalized: bool = True  # vectors were L2-normalised
    note: str = ""  # free text (input size, layer); not compared

    def __post_init__(self) -> None:
        if self.note is None:  # a null note in older JSON reads as none
            object.__setattr__(self, "note", "")
        if not isinstance(self.note, str):
            raise ValueError(f"EncoderFingerprint.note must be a string, got {self.note!r}")
        if not isinstance(self.dim, int) or self.dim <= 0:
            raise ValueError(f"EncoderFingerprint.dim must be a positive int, got {self.dim!r}")
        for f in ("family", "name", "weights"):
            if not isinstance(getattr(self, f), str) or not getattr(self, f):
                raise ValueError(f"EncoderFingerprint.{f} must be a non-empty string, got {getattr(self, f)!r}")

    def key(self) -> tuple[str, str, str, int, bool]:
        """The fields that decide compatibility."""
        return (self.family, self.name, self.weights, self.dim, self.normalized)

    def matches(self, other: EncoderFingerprint | None) -> bool:
        return other is not None and self.key() == other.key()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EncoderFingerprint:
        known = {"family", "name", "weights", "dim", "normalized", "note"}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown EncoderFingerprint fields {sorted(unknown)}; allowed: {sorted(known)}")
        return cls(**d)

    @property
    def input_size(self) -> tuple[int, int] | None:
        """(H, W) of the images behind the vectors when ``note`` records it as retrofit's encoders write it
        ("input 64px", "input (3, 224, 224)"), else None."""
        import re

        if m := re.search(r"\binput (\d+)px\b", self.note):
            return int(m.group(1)), int(m.group(1))
        if m := re.search(r"\binput \(\d+, (\d+), (\d+)\)", self.note):
            return int(m.group(1)), int(m.group(2))
        return None

    def __str__(self) -> str:
        norm = "l2" if self.normalized else "raw"
        return f"{self.family}:{self.name}@{self.weights} (dim {self.dim}, {norm})"


def check_fingerprints(
    expected: EncoderFingerprint | None,
    actual: EncoderFingerprint | None,
    what: str,
    allow_mismatch: bool = False,
) -> None:
    """Raise :class:`FingerprintMismatchError` naming both sides when ``expected`` and ``actual`` differ.

    ``None`` on either side means "unknown" and is accepted. ``allow_mismatch=True`` is the caller's
    explicit override.
    """
    if expected is None or actual is None or allow_mismatch:
        return
    if not expected.matches(actual):
        head = (f"{what}: expected vectors from {expected}, but got vectors from {actual}. Rebuild the knowledge "
                "base with the same encoder, or, if you know the two spaces are compatible, ")
        raise FingerprintMismatchError(
            head + "pass allow_fingerprint_mismatch=True (command line: --allow-fingerprint-mismatch on "
            "`retrofit train`, `eval`, `calibrate` and `predict`).",
            cli_message=head + "add --allow-fingerprint-mismatch to the command.",
        )


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """The sha256 of a file's bytes (64 hex digits): the checksums of saved heads, checkpoints and cache entries."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def tensors_sha256(tensors: dict) -> str:
    """The sha256 (64 hex digits) of named tensors: names, dtypes, shapes and bytes, in name order."""
    import torch  # (here: ``import retrofit`` does not import torch)

    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def file_digest(path: str | Path, chunk: int = 1 << 20) -> str:
    """``sha256:<16 hex>`` of a file's bytes, for ``EncoderFingerprint.weights`` of a local checkpoint."""
    return "sha256:" + file_sha256(path, chunk)[:16]
