"""Reading and decoding knowledge-base images in DataLoader workers: :class:`DecodeDataset` turns the
:class:`~retrofit.sources.SampleRef` list of a source into preprocessed tensors (or the error that makes a sample
bad data, never fatal), :func:`collate_decoded` batches them; ``_to_rgb`` is the RGB / orientation fix every
image gets before an encoder's preprocess."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from retrofit.sources import SampleRef

__all__ = ["DecodeDataset", "collate_decoded"]


def _to_rgb(im: Any) -> Any:
    """RGB for the encoders, upright. 16-bit and 32-bit greyscale (PNG ``I;16``, TIFF ``I`` / ``F``) are scaled to
    8 bits first: PIL's convert("RGB") clips them, so a 16-bit photo came out all white. A photo's EXIF orientation
    is applied (a phone's portrait JPEG is stored sideways: it was classified sideways)."""
    try:
        if im.getexif().get(0x0112, 1) != 1:  # EXIF Orientation other than "normal"
            from PIL import ImageOps

            im = ImageOps.exif_transpose(im)
    except Exception:  # an EXIF block PIL cannot parse: the pixels are still good, decoded as they are stored
        pass
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        import numpy as np
        from PIL import Image

        a = np.asarray(im, dtype=np.float64)
        hi = 65535.0 if im.mode.startswith("I;16") or (im.mode == "I" and a.max(initial=0) > 255) else 255.0
        if im.mode == "F" and a.max(initial=0) <= 1.0:
            hi = 1.0
        im = Image.fromarray(np.clip(a / hi * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    out = im.convert("RGB")
    out.retrofit_rgb = True  # done: an encoder's preprocess (encoders._RGBFirst) does not convert it again
    return out


class DecodeDataset(torch.utils.data.Dataset):
    """Reads and decodes ``refs[i]`` in a DataLoader worker: ``(i, image tensor | None, sha1 | None, error | None)``."""

    def __init__(self, refs: Sequence[SampleRef], preprocess: Callable[[Any], torch.Tensor], offset: int = 0):
        self.refs = refs  # samples (the whole source)
        self.preprocess = preprocess  # picklable PIL -> tensor
        self.offset = offset  # dataset index 0 is refs[offset] (resume)
        self._files: dict[str, Any] = {}

    def __len__(self) -> int:
        return len(self.refs) - self.offset

    def _bytes(self, loc: tuple[str, int, int] | str) -> bytes:
        if isinstance(loc, str):
            with open(loc, "rb") as f:
                return f.read()
        path, off, size = loc
        f = self._files.get(path)
        if f is None:
            f = self._files[path] = open(path, "rb")  # kept open for the worker's lifetime
        f.seek(off)
        data = f.read(size)
        if len(data) != size:
            raise OSError(f"short read in {path} at {off}")
        return data

    def __getitem__(self, j: int) -> tuple[int, torch.Tensor | None, str | None, str | None]:
        from PIL import Image

        i = j + self.offset
        ref = self.refs[i]
        if ref.image is None:
            return i, None, None, "missing image member"
        try:
            data = self._bytes(ref.image)
        except OSError as e:
            return i, None, None, f"cannot read image: {e}"
        digest = hashlib.sha1(data).hexdigest()
        try:
            with Image.open(io.BytesIO(data)) as im:
                im.load()
                x = self.preprocess(_to_rgb(im))
        except Exception as e:  # any decoder failure is bad data: reported, never fatal
            return i, None, digest, f"undecodable image: {type(e).__name__}: {e}"
        return i, x, digest, None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_files": {}}


def collate_decoded(items: list[tuple[int, torch.Tensor | None, str | None, str | None]]) -> dict[str, Any]:
    """Batch of decoded samples: ``index`` (all), ``ok`` (positions with an image), ``images`` (n_ok, 3, H, W)."""
    ok = [n for n, it in enumerate(items) if it[1] is not None]
    images: torch.Tensor | tuple[torch.Tensor, ...] | None = None
    if ok and isinstance(items[ok[0]][1], tuple):  # several transforms per image
        images = tuple(torch.stack(parts) for parts in zip(*(items[n][1] for n in ok)))
    elif ok:
        images = torch.stack([items[n][1] for n in ok])  # (n_ok, 3, H, W)
    return {"index": [it[0] for it in items], "ok": ok, "images": images,
            "hash": [it[2] for it in items], "error": [it[3] for it in items]}
