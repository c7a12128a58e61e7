"""Quick start: bolt a retrieval head onto a torchvision classifier, attach a knowledge base, predict.

Runs offline in a few seconds: the classifier has random weights (use ``weights="DEFAULT"`` for the
real ImageNet ones) and the knowledge base is built on the spot in a temporary directory from the
host's own embeddings. Real knowledge bases come from ``retrofit kb build`` (see the README).

    python examples/quickstart.py
"""

from __future__ import annotations

import tempfile

import torch
import torchvision

import retrofit
from retrofit.store import KBFingerprint


def main(argv: list[str] | None = None) -> None:
    import argparse

    argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                            formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)  # --help
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()  # the classifier you already run (1000 classes)
    backbone = retrofit.EncoderFingerprint("torchvision", "resnet18", "random", 512)  # who makes the KB keys
    images = torch.rand(8, 3, 64, 64)  # a batch of preprocessed images

    cfg = retrofit.HeadConfig(query_dim=512, image_dim=512, text_dim=384, num_classes=1000, k=8)
    clf = retrofit.wrap(model, retrofit.RetrievalHead(cfg), fingerprint=backbone)  # one backbone pass: z + logits

    with tempfile.TemporaryDirectory() as tmp:
        # A small image-text knowledge base keyed by the host's own embeddings (real ones: `retrofit kb build`).
        kb = retrofit.KnowledgeBase.create(tmp + "/kb", key_dim=512, image_dim=512, text_dim=384,
                                           fingerprint=KBFingerprint(key=backbone, image=backbone))
        with torch.no_grad():
            z, _ = clf.features(torch.rand(200, 3, 64, 64))  # (200, 512) embeddings of 200 KB images
        kb.add(keys=z, image=z, text=torch.randn(200, 384), labels=torch.randint(0, 1000, (200,)))

        clf.head.attach(kb)  # swap in another KB any time, no retraining
        with torch.inference_mode():
            logits = clf(images)  # (8, 1000) fused logits, a drop-in for model(images)
            out = clf(images, return_output=True)  # + neighbours, host / retrieval logits, attention
        kb.close()

    print(f"fused logits {tuple(logits.shape)}; top-1 {logits.argmax(1).tolist()}")
    print(f"neighbour ids of image 0: {out.neighbors.ids[0].tolist()}")
    print(f"attention over them:      {[round(a, 3) for a in out.attention[0].tolist()]}")
    # An untrained head adds nothing: the fused logits equal the host's until the head is trained.
    print(f"max |fused - host| = {float((out.logits - out.host_logits).abs().max()):.2e}")


if __name__ == "__main__":
    main()
