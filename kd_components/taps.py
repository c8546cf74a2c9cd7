"""Feature taps: capture the outputs of named submodules of any network with forward hooks."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["FeatureTaps", "TapNotFoundError", "unwrap_network", "resolve_module", "list_tap_candidates"]


class TapNotFoundError(KeyError):
    """A tap names a submodule the network does not have; the message lists the closest valid names."""

    def __str__(self) -> str:  # KeyError quotes its message; show it as written
        return str(self.args[0]) if self.args else ""


def unwrap_network(network: nn.Module) -> nn.Module:
    """Return the module inside a ``DistributedDataParallel`` / ``DataParallel`` wrapper, or ``network`` itself.

    Args:
        network: a network, possibly wrapped for data parallelism.
    """
    while isinstance(network, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        network = network.module
    return network


def resolve_module(network: nn.Module, name: str, owner: str = "network") -> nn.Module:
    """Find the submodule called ``name`` (as listed by ``named_modules()``) in ``network``.

    A ``module.`` prefix added by a data-parallel wrapper is accepted and ignored.

    Args:
        network: the network to search (a data-parallel wrapper is looked through).
        name: the submodule name, e.g. ``"model.1.submodule.0"``.
        owner: how to call the network in the error message, e.g. ``"teacher"``.

    Raises:
        TapNotFoundError: when no submodule has that name; the message lists the closest valid names.
    """
    net = unwrap_network(network)
    modules = dict(net.named_modules())
    key = name[len("module.") :] if name.startswith("module.") and name not in modules else name
    if key in modules and key != "":
        return modules[key]
    valid = [n for n in modules if n]
    close = difflib.get_close_matches(key, valid, n=5, cutoff=0.4)
    hint = f" Closest names: {', '.join(repr(c) for c in close)}." if close else ""
    raise TapNotFoundError(
        f"{owner} ({type(net).__name__}) has no submodule named {name!r}.{hint} "
        f"List every valid tap with its output shape by running "
        f"`python -m kd_components.list_taps --config_file <train.json> --net_id <id> --input_shape ...`."
    )


class FeatureTaps:
    """Record the outputs of named submodules of a network on every forward pass.

    Hooks are registered on the network inside any data-parallel wrapper, so the same names work for a plain
    network and for its ``DistributedDataParallel`` wrapper. Outputs are kept by reference (no copy) until
    :meth:`clear` is called, so they stay part of the autograd graph when the network is trained.

    Example::

        taps = FeatureTaps(student, ["model.1.submodule.0"], owner="student")
        logits = student(images)
        feature = taps["model.1.submodule.0"]
        taps.clear()

    Recording can be switched off with ``active = False`` (the hooks stay, nothing is kept): a trainer turns its
    student taps off outside its own training forward passes, so validation batches are not held in memory.

    Args:
        network: the network to tap (teacher or student).
        names: submodule names as listed by ``network.named_modules()``.
        owner: a label used in error messages (e.g. ``"teacher"``).
        active: whether forward passes are recorded from the start.

    Raises:
        TapNotFoundError: when a name is not a submodule of ``network``.
    """

    def __init__(self, network: nn.Module, names: Iterable[str], owner: str = "network", active: bool = True) -> None:
        self.owner = owner
        self.active = active
        self.names: tuple[str, ...] = tuple(dict.fromkeys(names))
        self.outputs: dict[str, torch.Tensor] = {}
        self._handles = []
        for name in self.names:
            module = resolve_module(network, name, owner)
            self._handles.append(module.register_forward_hook(self._make_hook(name)))

    def _make_hook(self, name: str):
        def hook(_module: nn.Module, _inputs: tuple, output) -> None:
            if not self.active:
                return
            if isinstance(output, (tuple, list)):
                output = output[0]
            self.outputs[name] = output

        return hook

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.outputs:
            if name in self.names:
                raise RuntimeError(
                    f"{self.owner} tap {name!r} holds no output: the network was not run since the last clear(), "
                    "or that submodule is not used in its forward pass."
                )
            raise KeyError(f"{name!r} is not a registered {self.owner} tap; registered: {list(self.names)}")
        return self.outputs[name]

    def __contains__(self, name: object) -> bool:
        return name in self.outputs

    def clear(self) -> None:
        """Release every recorded output (call after each step so activations are freed)."""
        self.outputs.clear()

    def remove(self) -> None:
        """Remove the hooks from the network and release the recorded outputs."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.clear()

    def __enter__(self) -> FeatureTaps:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


@contextmanager
def eval_mode(network: nn.Module) -> Iterator[nn.Module]:
    """Put ``network`` in eval mode for a probe, then restore every submodule's own train/eval flag.

    ``network.train(was_training)`` would not do: it would also flip submodules deliberately kept in the other
    mode (e.g. a frozen encoder in eval mode inside a training student).
    """
    modes = [(m, m.training) for m in network.modules()]
    network.eval()
    try:
        yield network
    finally:
        for module, training in modes:
            module.training = training


def list_tap_candidates(
    network: nn.Module, input_shape: Sequence[int], device: str | torch.device = "cpu"
) -> list[tuple[str, str, tuple[int, ...] | None]]:
    """Run ``network`` once on zeros of ``input_shape`` and list each submodule with its output shape.

    Args:
        network: any network (a data-parallel wrapper is looked through).
        input_shape: the input size including batch and channel, e.g. ``(1, 3, 256, 256)`` or ``(1, 1, 96, 96, 96)``.
        device: where to run the probe forward pass.

    Returns:
        ``(name, module type, output shape)`` for every named submodule in ``named_modules()`` order; the shape is
        ``None`` for modules not used in the forward pass or that return no tensor.
    """
    net = unwrap_network(network)
    names = [n for n, _ in net.named_modules() if n]
    taps = FeatureTaps(net, names)
    try:
        with eval_mode(net), torch.no_grad():
            net.to(device)(torch.zeros(*input_shape, device=device))
        modules = dict(net.named_modules())
        rows = []
        for name in names:
            out = taps.outputs.get(name)
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else None
            rows.append((name, type(modules[name]).__name__, shape))
        return rows
    finally:
        taps.remove()
