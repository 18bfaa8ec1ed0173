"""The bottom floor: what both stages share (frozen CLIP, datasets and the protocol, the stage-one cache)."""
