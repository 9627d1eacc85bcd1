"""Data-poisoning attacks: a malicious client trains honestly on poisoned data.

An attack rewrites the malicious client's local training set before local
training (``x, y = attack.poison(x, y, generator)``) and nothing else, so it
runs unchanged inside a deployed ClientApp. Inputs are the normalised
``[N, C, H, W]`` tensors of :mod:`fedsec.data`; new tensors are returned and the
inputs are never modified (the data sets are shared within a process).

References
----------
.. [1] V. Tolpegin, S. Truex, M. E. Gursoy and L. Liu, "Data Poisoning Attacks
   Against Federated Learning Systems", ESORICS 2020.
.. [2] B. Biggio, B. Nelson and P. Laskov, "Support Vector Machines Under
   Adversarial Label Noise", ACML 2011; "Poisoning Attacks against Support
   Vector Machines", ICML 2012.
.. [3] T. Gu, B. Dolan-Gavitt and S. Garg, "BadNets: Identifying
   Vulnerabilities in the Machine Learning Model Supply Chain", arXiv:1708.06733,
   2017.
.. [4] E. Bagdasaryan, A. Veit, Y. Hua, D. Estrin and V. Shmatikov, "How To
   Backdoor Federated Learning", AISTATS 2020.
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch
from torch import nn

from fedsec.registry import Registry
from fedsec.training import evaluate

__all__ = [
    "DATA_ATTACKS",
    "Backdoor",
    "DataPoisoningAttack",
    "LabelFlip",
]


def _check_class(value: int, name: str, num_classes: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < num_classes:
        raise ValueError(f"{name} must be an integer in [0, {num_classes}), got {value!r}")
    return value


def _check_labels(y: torch.Tensor, num_classes: int, what: str) -> None:
    if y.dim() != 1 or y.dtype.is_floating_point or y.dtype == torch.bool:
        raise ValueError(
            f"{what}: labels must be a 1-D integer tensor, got {y.dtype} {list(y.shape)}"
        )
    if y.numel() and not bool(((y >= 0) & (y < num_classes)).all()):
        raise ValueError(f"{what}: labels must be in [0, {num_classes})")


class DataPoisoningAttack:
    """Base class: rewrites a malicious client's local training set."""

    name: ClassVar[str] = "data-attack"

    def poison(
        self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return poisoned copies of inputs ``x [N, C, H, W]`` and labels ``y [N]``."""
        raise NotImplementedError

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({params})"


class LabelFlip(DataPoisoningAttack):
    """Label flipping (Tolpegin et al., ESORICS 2020; Biggio et al., ACML 2011).

    The inputs are left alone; only labels change:

    - ``"source-target"``: every sample labelled ``source`` is relabelled
      ``target``, the others keep theirs (Tolpegin et al.'s targeted attack).
    - ``"all-to-one"``: every label becomes ``target``.
    - ``"random"``: labels are mapped through one random permutation of the
      classes without fixed points (a uniformly random derangement, by
      rejection sampling from ``generator``), so every sample is mislabelled and
      consistently so -- the same class always goes to the same wrong class,
      which poisons more than independent per-sample noise would. The
      permutation is drawn at each :meth:`poison` call; a generator seeded the
      same way in every round gives the same mapping in every round.

    Parameters
    ----------
    mode : {"source-target", "all-to-one", "random"}
        Which labels change, as above.
    source : int, default 1
        Class relabelled in ``"source-target"`` mode (ignored otherwise).
    target : int, default 7
        Class the labels go to in ``"source-target"`` and ``"all-to-one"``
        (ignored by ``"random"``).
    num_classes : int, default 10
        Labels are ``0 .. num_classes - 1``; >= 2.
    """

    name: ClassVar[str] = "label-flip"

    def __init__(
        self,
        mode: Literal["source-target", "all-to-one", "random"] = "source-target",
        source: int = 1,
        target: int = 7,
        num_classes: int = 10,
    ) -> None:
        if mode not in ("source-target", "all-to-one", "random"):
            raise ValueError(
                f"mode must be 'source-target', 'all-to-one' or 'random', got {mode!r}"
            )
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
        # Only the classes the mode uses are checked: "random" ignores both.
        if mode == "source-target":
            _check_class(source, "source", num_classes)
        if mode != "random":
            _check_class(target, "target", num_classes)
        if mode == "source-target" and source == target:
            raise ValueError(f"source and target must differ, got {source} and {target}")
        self.mode = mode
        self.source = source
        self.target = target
        self.num_classes = num_classes

    def permutation(self, generator: torch.Generator) -> torch.Tensor:
        """A uniformly random derangement of the classes, ``[num_classes]`` int64."""
        identity = torch.arange(self.num_classes)
        while True:  # ~e tries on average for any num_classes
            perm = torch.randperm(self.num_classes, generator=generator)
            if not bool((perm == identity).any()):
                return perm

    def poison(
        self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(x.clone(), flipped labels)``; see the class docstring."""
        _check_labels(y, self.num_classes, self.name)
        if self.mode == "source-target":
            y_new = torch.where(y == self.source, torch.full_like(y, self.target), y)
        elif self.mode == "all-to-one":
            y_new = torch.full_like(y, self.target)
        else:
            y_new = self.permutation(generator).to(y.device, y.dtype)[y]
        return x.clone(), y_new


class Backdoor(DataPoisoningAttack):
    """BadNets pixel-pattern backdoor (Gu et al. 2017; in FL: Bagdasaryan et al. 2020).

    A fixed trigger is stamped on a random ``poison_fraction`` of the local
    samples, which are relabelled ``target``; the rest stay clean, so the
    poisoned model keeps its main-task accuracy while learning "trigger ->
    target". Trigger pixels are set (in every channel) to the brightest valid
    input, ``high`` of ``bounds`` per channel, or to ``value``.

    The trigger occupies a ``size x size`` box in a corner of the image:

    - ``"square"``: the whole box (BadNets' white square);
    - ``"plus"``: the middle row and column of the box (``size`` odd, >= 3).

    Parameters
    ----------
    target : int, default 0
        Label of triggered samples.
    pattern : {"square", "plus"}
        Trigger shape.
    size : int, default 2
        Side of the trigger box in pixels, >= 1 (2 is visible on 8x8 digits).
    position : {"bottom-right", "bottom-left", "top-right", "top-left"}
        Corner the box touches.
    poison_fraction : float, default 0.5
        In ``(0, 1]``: :meth:`poison` triggers ``floor(poison_fraction * N)``
        samples (rounded down; 1e-9 of slack absorbs float error, so 0.3 of 10
        is 3), chosen uniformly without replacement.
    bounds : (torch.Tensor, torch.Tensor), optional
        ``(low, high)`` from :func:`fedsec.data.datasets.pixel_bounds`; the
        trigger value is ``high`` (per channel, ``[C, 1, 1]``).
    value : float, optional
        Trigger value for every channel, in input units; overrides ``bounds``.
        With neither, the trigger takes the per-channel maximum of the inputs
        being stamped, which for the bundled data sets is the brightest valid
        pixel as soon as a few images are present (8x8 digits reach 16/16,
        MNIST 255); pass ``bounds`` to make it independent of the data.
    num_classes : int, default 10
        For validating ``target``.
    """

    name: ClassVar[str] = "backdoor"

    def __init__(
        self,
        target: int = 0,
        pattern: Literal["square", "plus"] = "square",
        size: int = 2,
        position: Literal["bottom-right", "bottom-left", "top-right", "top-left"] = "bottom-right",
        poison_fraction: float = 0.5,
        bounds: tuple[torch.Tensor, torch.Tensor] | None = None,
        value: float | None = None,
        num_classes: int = 10,
    ) -> None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
        _check_class(target, "target", num_classes)
        if pattern not in ("square", "plus"):
            raise ValueError(f"pattern must be 'square' or 'plus', got {pattern!r}")
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be an integer >= 1, got {size!r}")
        if pattern == "plus" and (size < 3 or size % 2 == 0):
            raise ValueError(f"size must be odd and >= 3 for the 'plus' pattern, got {size}")
        if position not in ("bottom-right", "bottom-left", "top-right", "top-left"):
            raise ValueError(
                "position must be 'bottom-right', 'bottom-left', 'top-right' or 'top-left', "
                f"got {position!r}"
            )
        if not 0.0 < poison_fraction <= 1.0:
            raise ValueError(f"poison_fraction must be in (0, 1], got {poison_fraction}")
        if value is not None and not math.isfinite(value):
            raise ValueError(f"value must be finite, got {value}")
        self.target = target
        self.pattern = pattern
        self.size = size
        self.position = position
        self.poison_fraction = poison_fraction
        self.value = value
        self.num_classes = num_classes
        # value wins; else the per-channel maximum of the valid range; else
        # (None) the per-channel maximum of the stamped data, see apply_trigger.
        self._trigger_value: torch.Tensor | None = None
        if value is not None:
            self._trigger_value = torch.tensor(float(value))
        elif bounds is not None:
            self._trigger_value = bounds[1].detach().clone()

    def mask(self, height: int, width: int) -> torch.Tensor:
        """Boolean ``[height, width]`` map of the trigger pixels."""
        if self.size > min(height, width):
            raise ValueError(f"trigger size {self.size} does not fit {height}x{width} images")
        box = torch.ones(self.size, self.size, dtype=torch.bool)
        if self.pattern == "plus":
            mid = self.size // 2
            box = torch.zeros_like(box)
            box[mid, :] = True
            box[:, mid] = True
        top = height - self.size if self.position.startswith("bottom") else 0
        left = width - self.size if self.position.endswith("right") else 0
        out = torch.zeros(height, width, dtype=torch.bool)
        out[top : top + self.size, left : left + self.size] = box
        return out

    def _value_for(self, x: torch.Tensor) -> torch.Tensor:
        """Trigger value, broadcastable to ``x [N, C, H, W]``, on its device and dtype."""
        if self._trigger_value is not None:
            return self._trigger_value.to(device=x.device, dtype=x.dtype)
        if x.shape[0] == 0:
            return torch.zeros((), device=x.device, dtype=x.dtype)  # nothing to stamp
        return x.amax(dim=(0, 2, 3)).reshape(-1, 1, 1)

    def _stamp(self, x: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        mask = self.mask(int(x.shape[2]), int(x.shape[3])).to(x.device)
        return torch.where(mask, value, x)

    def apply_trigger(self, x: torch.Tensor) -> torch.Tensor:
        """Return a copy of ``x [N, C, H, W]`` with the trigger stamped on every sample."""
        if x.dim() != 4:
            raise ValueError(f"backdoor needs [N, C, H, W] inputs, got {list(x.shape)}")
        return self._stamp(x, self._value_for(x))

    def poison(
        self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Trigger and relabel ``floor(poison_fraction * N)`` random samples.

        Returns new tensors; the chosen samples are any of the N, including
        those already labelled ``target`` (as in BadNets' random poisoning).
        """
        _check_labels(y, self.num_classes, self.name)
        n = int(y.shape[0])
        if x.dim() != 4 or int(x.shape[0]) != n:
            raise ValueError(
                f"backdoor needs [N, C, H, W] inputs and [N] labels, got {list(x.shape)} "
                f"and {list(y.shape)}"
            )
        count = math.floor(self.poison_fraction * n + 1e-9)
        chosen = torch.randperm(n, generator=generator)[:count].to(x.device)
        x_new, y_new = x.clone(), y.clone()
        # The value comes from all of x, in case it is data-derived.
        x_new[chosen] = self._stamp(x[chosen], self._value_for(x))
        y_new[chosen] = self.target
        return x_new, y_new

    def triggered_test_set(
        self, x_test: torch.Tensor, y_test: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Triggered copies of the test samples whose true label is not ``target``.

        Returns
        -------
        x_trig, y_target : torch.Tensor
            The triggered inputs and a label tensor filled with ``target``.
        """
        keep = y_test != self.target
        x_trig = self.apply_trigger(x_test[keep])
        return x_trig, torch.full_like(y_test[keep], self.target)

    def attack_success_rate(
        self,
        model: nn.Module,
        x_test: torch.Tensor,
        y_test: torch.Tensor,
        device: torch.device | str = "cpu",
    ) -> float:
        """Fraction of triggered non-target test samples classified as ``target``.

        Raises
        ------
        ValueError
            If every test sample is of the target class.
        """
        x_trig, y_target = self.triggered_test_set(x_test, y_test)
        if int(y_target.shape[0]) == 0:
            raise ValueError(f"no test samples outside the target class {self.target}")
        return evaluate(model, x_trig, y_target, device=device).accuracy


DATA_ATTACKS: Registry[type[DataPoisoningAttack]] = Registry("data attack")
for _attack in (LabelFlip, Backdoor):
    DATA_ATTACKS.add(_attack.name, _attack)
