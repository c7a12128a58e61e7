"""The checks that a build into an existing knowledge base (``kb add``, a resumed ``kb build``) writes vectors of its
own encoders: by spec before the encoders load, by fingerprint after."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from retrofit.encoders import spec_identity
from retrofit.errors import FingerprintMismatchError
from retrofit.fingerprint import check_fingerprints
from retrofit.store import KBFingerprint

__all__ = ["check_encoder", "check_specs"]


def check_encoder(kb: Any, fp: KBFingerprint, part: str, path: Path, recorded: dict[str, Any], mode: str,
                   from_record: set[str]) -> None:
    """The ``part`` vectors this run would write must come from the KB's own encoder; the error names the spec that
    made them (recorded at build) and the option that takes it."""
    try:
        check_fingerprints(getattr(kb.fingerprint, part), getattr(fp, part), f"{part} vectors of {path}")
    except FingerprintMismatchError as e:
        raise _mismatch(kb.fingerprint, part, str(getattr(fp, part)), path, recorded, mode, from_record) from e


def check_specs(kb_fp: KBFingerprint, specs: dict[str, Any], path: Path, recorded: dict[str, Any], mode: str,
                 from_record: set[str]) -> None:
    """Before the encoders load (seconds): a spec whose family, name, checkpoint or input size is not that of the
    KB's vectors (``spec_identity``) names another encoder; the full fingerprint check follows the load."""
    for part, spec in specs.items():
        theirs = getattr(kb_fp, part)
        if not isinstance(spec, str) or theirs is None:
            continue  # an encoder object (checked by fingerprint once loaded), or a KB part of unknown origin
        ident = spec_identity(spec, part)
        size = theirs.input_size
        differs = [f for f, v in ident.items() if (size is not None and size[0] != v if f == "input_size"
                                                   else getattr(theirs, f) != v)]
        if differs:
            raise _mismatch(kb_fp, part, f"{ident['family']} vectors of another {' and '.join(differs)} ({spec!r})",
                            path, recorded, mode, from_record)


def _mismatch(kb_fp: KBFingerprint, part: str, theirs: str, path: Path, recorded: dict[str, Any], mode: str,
              from_record: set[str]) -> FingerprintMismatchError:
    """The error for ``part`` vectors of another encoder: names the spec that made the KB's (recorded at build) and
    the option that takes it."""
    separate_keys = part == "key" and not kb_fp.key.matches(kb_fp.image)
    option = "image_encoder" if part == "key" and not separate_keys else f"{part}_encoder"
    flag = "--" + option.replace("_", "-")
    which = option.split("_")[0]
    spec = recorded.get(which)
    if which in from_record:
        hint = (f"this run used the spec it was built with, {spec!r}, which now makes other vectors (a checkpoint "
                f"path that moved or changed?): pass the encoder that made them ({flag} SPEC; {option}=... in "
                "Python)")
    elif spec:
        hint = f"it was built with {flag} {spec}: pass that ({option}={spec!r} in Python)"
        if mode == "add":
            hint += f", or leave {flag} out to use the knowledge base's own encoders"
    else:
        hint = (f"pass the encoder that made them ({flag} SPEC; {option}=... in Python); `retrofit kb info {path}` "
                "shows their fingerprint")
    return FingerprintMismatchError(f"{part} vectors of {path}: the knowledge base holds vectors from "
                                    f"{getattr(kb_fp, part)}, this run's encoder makes {theirs}; {hint}")
