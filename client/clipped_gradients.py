"""Per-example clipped gradient sums without per-example gradients ("book-keeping").

DP-SGD needs Σ_i c_i g_i with c_i = min(1, C/|g_i|), g_i one example's gradient over every
trainable parameter. For the layers fedfin's model is built from, g_i is a cheap function of
the example's layer input a_i and output gradient δ_i, both at hand after one ordinary
backward pass; so |g_i| and the clipped sum need no B×P per-example buffers and no second
backward pass (Li et al. 2021, "ghost norm"; Bu et al. 2023, "book-keeping"):

- Linear on B×in: |g_i|² = |a_i|²|δ_i|² (weight) + |δ_i|² (bias); Σ c_i g_i = (c⊙δ)ᵀa, Σ c_i δ_i.
- LayerNorm over the last of two dims: g_i = δ_i⊙x̂_i (weight), δ_i (bias): B×H, formed directly.
- Embedding looked up once per example: g_i is δ_i at row idx_i; Σ c_i g_i is an index_add
  (examples sharing a row add up there, each clipped by its own c_i).

A trainable parameter anywhere else is refused (`UnsupportedLayerError`), never mis-clipped.
`tests/test_clipped_gradients.py` checks the sums against Opacus' per-example gradients.
"""

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from opacus.optimizers import DPOptimizer
from opacus.optimizers import optimizer as opacus_optimizer
from torch import nn
from torch.utils.hooks import RemovableHandle

# Opacus' clip factor C / (|g_i| + 1e-6), capped at 1: the same numbers as its optimizer's.
NORM_EPSILON = 1e-6


class UnsupportedLayerError(ValueError):
    """A trainable parameter sits in a layer whose per-example gradient is not book-kept."""


def clip_factors(norms: torch.Tensor, max_grad_norm: float) -> torch.Tensor:
    """c_i = min(1, C / |g_i|): each example's gradient scaled to norm at most C."""
    return (max_grad_norm / (norms + NORM_EPSILON)).clamp(max=1.0)


class ClippedGradients:
    """The clipped sum of one batch's per-example gradients over `model`'s trainable parameters.

    Construct it after setting `requires_grad`; call `backward(per_example_losses)` in place of
    `loss.backward()`, then `clipped_sum(C)`. It leaves `p.grad` untouched.
    """

    def __init__(self, model: nn.Module) -> None:
        self.params = [p for p in model.parameters() if p.requires_grad]
        self._layers: list[nn.Module] = []
        owners: dict[int, str] = {}
        for name, module in model.named_modules():
            own = [p for p in module.parameters(recurse=False) if p.requires_grad]
            if not own:
                continue
            _check_supported(name or type(module).__name__, module)
            for parameter in own:
                if id(parameter) in owners:
                    raise UnsupportedLayerError(
                        f"{name} shares a trainable parameter with {owners[id(parameter)]}"
                    )
                owners[id(parameter)] = name
            self._layers.append(module)
        self._inputs: dict[nn.Module, torch.Tensor] = {}
        self._outputs: dict[nn.Module, torch.Tensor] = {}
        self._output_grads: dict[nn.Module, torch.Tensor] = {}
        self._handles: list[RemovableHandle] = [
            layer.register_forward_hook(self._capture) for layer in self._layers
        ]

    def _capture(self, module: nn.Module, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        if module in self._outputs:
            raise UnsupportedLayerError(
                f"{type(module).__name__} ran twice in one forward pass: its per-example "
                "gradient is a sum over the calls, which book-keeping does not track"
            )
        self._inputs[module] = inputs[0].detach()
        self._outputs[module] = output

    def backward(self, losses: torch.Tensor) -> None:
        """Each trainable layer's output gradient δ of Σ losses, one entry per example."""
        layers = [layer for layer in self._layers if layer in self._outputs]
        grads = torch.autograd.grad(
            losses.sum(), [self._outputs[layer] for layer in layers], allow_unused=True
        )
        self._outputs.clear()
        self._output_grads = {
            layer: grad for layer, grad in zip(layers, grads, strict=True) if grad is not None
        }

    def clipped_sum(self, max_grad_norm: float) -> list[torch.Tensor]:
        """Σ_i min(1, C/|g_i|) g_i, one tensor per trainable parameter (`self.params` order)."""
        books = [
            _book(layer, self._inputs[layer], grad) for layer, grad in self._output_grads.items()
        ]
        self._inputs.clear()
        self._output_grads.clear()
        sums: dict[int, torch.Tensor] = {}
        if books:
            norms = torch.stack([squared for squared, _ in books]).sum(0).sqrt()
            factors = clip_factors(norms, max_grad_norm).unsqueeze(1)
            for _, clipped_sums in books:
                sums.update((id(p), total) for p, total in clipped_sums(factors))
        return [sums[id(p)] if id(p) in sums else torch.zeros_like(p) for p in self.params]

    def remove(self) -> None:
        """Detach the forward hooks: the model is an ordinary module again."""
        for handle in self._handles:
            handle.remove()


def _check_supported(name: str, module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        return
    if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1:
        return
    if isinstance(module, nn.Embedding) and (
        module.padding_idx is None
        and module.max_norm is None
        and not module.scale_grad_by_freq
        and not module.sparse
    ):
        return
    raise UnsupportedLayerError(
        f"{name} ({module!r}) has trainable parameters but fedfin's per-example clipping "
        "supports only Linear, LayerNorm over one dimension and plain Embedding"
    )


ClippedSums = Callable[[torch.Tensor], list[tuple[torch.Tensor, torch.Tensor]]]


def _book(
    layer: nn.Module, x: torch.Tensor, delta: torch.Tensor
) -> tuple[torch.Tensor, ClippedSums]:
    """One layer's |g_i|² per example, and how to form its Σ c_i g_i given c (a B×1 column)."""
    _check_shapes(layer, x, delta)
    if isinstance(layer, nn.Embedding):
        rows = layer.weight
        return torch.linalg.vecdot(delta, delta), lambda c: [
            (rows, torch.zeros_like(rows).index_add_(0, x, delta * c))
        ]
    if isinstance(layer, nn.LayerNorm):  # its per-example gradients are only B×H: form them
        x = F.layer_norm(x, layer.normalized_shape, eps=layer.eps) * delta
    weight, bias = _trainable(layer.weight), _trainable(layer.bias)
    linear = isinstance(layer, nn.Linear)
    delta_squared = torch.linalg.vecdot(delta, delta)
    squared = delta_squared if bias is not None else torch.zeros_like(delta_squared)
    if weight is not None:
        input_squared = torch.linalg.vecdot(x, x)
        squared = squared + (input_squared * delta_squared if linear else input_squared)

    def clipped_sums(c: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        factors = c.squeeze(1)
        out = []
        if weight is not None:
            out.append((weight, (delta * c).t() @ x if linear else factors @ x))
        if bias is not None:
            out.append((bias, factors @ delta))
        return out

    return squared, clipped_sums


def _trainable(parameter: object) -> torch.Tensor | None:
    """The parameter if this phase trains it, else None (absent or frozen)."""
    if isinstance(parameter, torch.Tensor) and parameter.requires_grad:
        return parameter
    return None


def _check_shapes(layer: nn.Module, x: torch.Tensor, delta: torch.Tensor) -> None:
    wanted = 1 if isinstance(layer, nn.Embedding) else 2
    if x.dim() != wanted or delta.dim() != 2:
        raise UnsupportedLayerError(
            f"{type(layer).__name__} got a {x.dim()}-D input; book-keeping needs one "
            f"{'index' if wanted == 1 else 'vector'} per example"
        )


class ClippedSumOptimizer(DPOptimizer):
    """Opacus' `DPOptimizer` fed fedfin's clipped sums instead of per-example gradients.

    Only the clipping is fedfin's: `add_noise` (σC from the secret generator, `secure_mode`),
    `scale_grad` (÷ the public expected batch size), the step hook (the accountant) and the
    wrapped optimizer's step are Opacus' own, unchanged.
    """

    def __init__(
        self, optimizer: torch.optim.Optimizer, clipped: ClippedGradients, **kwargs: Any
    ) -> None:
        super().__init__(optimizer, **kwargs)
        if [id(p) for p in self.params] != [id(p) for p in clipped.params]:
            raise ValueError("the optimizer and the clipping must cover the same parameters")
        self.clipped = clipped

    def clip_and_accumulate(self) -> None:
        for parameter, total in zip(
            self.params, self.clipped.clipped_sum(self.max_grad_norm), strict=True
        ):
            summed = parameter.summed_grad
            parameter.summed_grad = total if summed is None else summed + total

    def add_noise(self) -> None:
        """Opacus' `add_noise`, its Gaussian drawn in one call for all parameters at once.

        The same law and code: i.i.d. N(0, σ²C²) per coordinate from Opacus' own
        `_generate_noise` (`secure_mode`: 2n draws each), from the same generator; one call
        instead of one per parameter tensor halves the noise's cost on this small model.
        """
        sizes = [p.numel() for p in self.params]
        noise = opacus_optimizer._generate_noise(
            std=self.noise_multiplier * self.max_grad_norm,
            reference=torch.empty(sum(sizes), dtype=self.params[0].dtype),
            generator=self.generator,
            secure_mode=self.secure_mode,
        )
        for parameter, draws in zip(self.params, noise.split(sizes), strict=True):
            parameter.grad = parameter.summed_grad + draws.view_as(parameter)

    @property
    def accumulated_iterations(self) -> int:
        return 1  # one forward/backward per step: fedfin never accumulates batches

    def pre_step(self, closure: Callable[[], float] | None = None) -> bool:
        """Opacus' `pre_step` without its checks of per-example gradients (there are none)."""
        self.clip_and_accumulate()
        self.add_noise()
        self.scale_grad()
        if self.step_hook:
            self.step_hook(self)
        return True
