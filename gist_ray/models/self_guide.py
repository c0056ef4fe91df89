"""The student as its own guide (``model.guide: self``), so no second model is loaded.

* ``frozen``: a copy of the student at step 0. It never changes, so the guide cache applies;
  its fingerprint is the student's files and settings plus ``self_guide: frozen``.
* ``ema``: the copy's weights follow an exponential moving average of the student's, updated
  after every optimizer step (``guide = decay * guide + (1 - decay) * student``); its
  embeddings are computed live and its weights are in every checkpoint.

The copy shares the student's frozen weights (the base model under LoRA: they never change) and
copies only what trains, so a LoRA student's self-guide costs the adapters' memory, not a model's.
"""

from __future__ import annotations

import copy

import torch

from gist_ray.models.encoder import Encoder


class SelfGuide:
    """A frozen copy of the student (eval mode, no gradient) and, for ``ema``, its update."""

    def __init__(self, student: Encoder, mode: str = "frozen", decay: float = 0.999) -> None:
        shared = {id(p): p for p in student.parameters() if not p.requires_grad}
        self.encoder: Encoder = copy.deepcopy(student, memo=shared)
        self.encoder.eval()
        self.encoder.requires_grad_(False)
        self.mode, self.decay = mode, decay
        ours = dict(self.encoder.named_parameters())
        # (name, guide tensor, student tensor) of every weight that trains
        self._pairs = [(n, ours[n], p) for n, p in student.named_parameters() if p.requires_grad]

    @property
    def live(self) -> bool:
        """Whether the guide changes during training (its embeddings cannot be cached)."""
        return self.mode == "ema"

    @torch.no_grad()
    def update(self) -> None:
        """One EMA step towards the student's current weights (no-op when frozen)."""
        if self.mode != "ema":
            return
        for _, ours, theirs in self._pairs:
            ours.lerp_(theirs.detach().to(ours.dtype), 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The guide weights that differ from the student's frozen ones (for checkpoints)."""
        return {n: ours.detach().cpu().clone() for n, ours, _ in self._pairs}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name, ours, _ in self._pairs:
            ours.copy_(state[name])
