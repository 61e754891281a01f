"""One optimisation step of the training loop: called eagerly, or replayed from a CUDA graph.

On a GPU the report's small models at batch 32-64 are bound by kernel launches and host
synchronisations, not by the GPU: eagerly, a step (normalise, forward, backward, optimizer)
is a hundred or more launches for 32-64 images of 32x32. A CUDA graph launches the whole step
as one unit. It is captured once with fixed-address inputs (the batch's images in [0, 1] and
its labels); each step copies its inputs there and replays the graph.

The warm-up steps that capture needs (cuDNN picks its algorithms, the optimizer creates its
state) are undone afterwards, so the run trains on exactly the steps the loop asks for.
"""
from __future__ import annotations

from typing import Callable

import torch

StepFn = Callable[..., torch.Tensor]  # (*input tensors) -> loss
WARMUP_STEPS = 3  # eager steps before capture (cuDNN autotuning, optimizer state)


class EagerStep:
    """The step as plain PyTorch calls (the CPU, and any device without graphs)."""

    graphed = False

    def __init__(self, fn: StepFn) -> None:
        self.fn = fn

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.fn(*inputs).detach()


class _TrainingState:
    """A copy of everything a step changes (weights, buffers, optimizer state, CPU RNG), put
    back in place: tensors keep their addresses, which a captured graph depends on."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer
        self.weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.optim = {p: {k: v.detach().clone() for k, v in st.items() if torch.is_tensor(v)}
                      for p, st in optimizer.state.items()}
        self.cpu_rng = torch.get_rng_state()

    @torch.no_grad()
    def restore(self) -> None:
        for k, v in self.model.state_dict().items():
            v.copy_(self.weights[k])
        for p, st in self.optimizer.state.items():
            before = self.optim.get(p, {})
            for k, v in st.items():
                if torch.is_tensor(v):  # state made by the warm-up is a fresh state: zeros
                    v.copy_(before[k]) if k in before else v.zero_()
        torch.set_rng_state(self.cpu_rng)


class GraphedStep:
    """The step captured once, then replayed. ``capture=False`` runs the same static-buffer
    protocol without a graph (how the CPU tests check the warm-up is undone exactly)."""

    graphed = True

    def __init__(self, fn: StepFn, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 inputs: tuple[torch.Tensor, ...], capture: bool = True) -> None:
        self.fn = fn
        self.inputs = tuple(t.clone() for t in inputs)  # the graph reads its inputs here
        saved = _TrainingState(model, optimizer)
        self.graph: torch.cuda.CUDAGraph | None = None
        try:
            if capture:
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    for _ in range(WARMUP_STEPS):
                        fn(*self.inputs)
                torch.cuda.current_stream().wait_stream(side)
                optimizer.zero_grad(set_to_none=True)  # backward allocates the grads inside the graph
                self.graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(self.graph):
                    self.loss = fn(*self.inputs)
            else:
                for _ in range(WARMUP_STEPS):
                    fn(*self.inputs)
        finally:
            saved.restore()

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        for static, new in zip(self.inputs, inputs):
            static.copy_(new)
        if self.graph is None:
            return self.fn(*self.inputs).detach()
        self.graph.replay()
        return self.loss.detach().clone()  # the graph overwrites self.loss at the next replay
