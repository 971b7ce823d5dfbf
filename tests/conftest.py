"""Fixtures shared by several test modules."""

import dataclasses

import pytest


@pytest.fixture
def coco_sized_as(monkeypatch):
    """``coco_sized_as(n)``: let a small synthetic ``testall`` stand in for COCO's 5,000 images:
    the two COCO protocols are defined (and refuse any other size) for ``n`` images in this test."""
    from itmkit.evaluate import protocols

    def resize(n_images: int) -> None:
        for name in ("coco-5k", "coco-5fold-1k"):
            sized = dataclasses.replace(protocols.PROTOCOLS[name], expected_images=n_images)
            monkeypatch.setitem(protocols.PROTOCOLS, name, sized)

    return resize
