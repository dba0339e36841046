"""A shadow device on the CPU: which tensors would live on the GPU, and which host tensors would meet them.

Under ShadowDevice() every tensor carries a tag. A tensor made with an explicit `device=` (a factory, `.to(device)`,
`*_like` of a device tensor) or a module's parameter after `module.to(device)` is "device"; a tensor made by a
factory without one, `.cpu()`, or anything made outside the mode (a tokenizer's output, numpy) is "host".
Ops propagate the tag (device if any input is). An op that mixes a host tensor of more than 0 dimensions with a
device tensor is recorded as a violation, with the mirl frame that made the call: on a GPU it would fail (or copy
behind the user's back). Host synchronisations (`.item()`, `.tolist()`, `bool()` / `float()` / `int()` of a
device tensor, copying one to the host) are counted, per caller.

    with ShadowDevice() as sd:
        train(Config(device="cpu", ...))
    assert not sd.violations, sd.report()
"""

from __future__ import annotations

import collections
import traceback

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

TAG = "_shadow_tag"
FACTORIES = {
    torch.tensor,
    torch.as_tensor,
    torch.zeros,
    torch.ones,
    torch.full,
    torch.empty,
    torch.arange,
    torch.linspace,
    torch.rand,
    torch.randn,
    torch.randint,
    torch.randperm,
    torch.eye,
    torch.from_numpy,
}
LIKE = {torch.zeros_like, torch.ones_like, torch.full_like, torch.empty_like, torch.rand_like, torch.randn_like}
SYNCS = {
    torch.Tensor.item,
    torch.Tensor.tolist,
    torch.Tensor.__bool__,
    torch.Tensor.__float__,
    torch.Tensor.__int__,
    torch.Tensor.__index__,
    torch.Tensor.numpy,
    torch.Tensor.cpu,
}


# ops that take a host 0-dim tensor only as an elementwise scalar operand: not in these (an index, a list)
NOT_ELEMENTWISE = {
    torch.cat,
    torch.stack,
    torch.Tensor.__getitem__,
    torch.Tensor.__setitem__,
    torch.index_select,
    torch.Tensor.index_select,
    torch.gather,
    torch.Tensor.gather,
    torch.Tensor.scatter_,
    torch.Tensor.index_add_,
    torch.Tensor.index_put_,
}


def tag(t) -> str:
    return getattr(t, TAG, "host") if isinstance(t, torch.Tensor) else "host"


def _set(t, value: str) -> None:
    if isinstance(t, torch.Tensor):
        try:
            setattr(t, TAG, value)
        except (AttributeError, RuntimeError):  # (some internal tensors take no attributes)
            pass


def _outputs(out) -> list:
    """The tensors an op returned (a tensor, or tuples of them: torch.return_types too)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _outputs(o)]
    return []


def _caller() -> str:
    """The innermost frame in mirl's own code (not torch's) that made the call."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        if "/mirl/" in frame.filename and "/tests/" not in frame.filename:
            return f"{frame.filename.split('/mirl/', 1)[1]}:{frame.lineno} {frame.name}"
    return "?"


def _device_arg(func, args, kwargs):
    """The device a .to() call moves to (a device, a string, or another tensor's), None for a dtype-only call."""
    for a in list(args[1:]) + [kwargs.get("device"), kwargs.get("other")]:
        if isinstance(a, (torch.device, str)):
            return a
        if isinstance(a, torch.Tensor):
            return tag(a)
    return None


class ShadowDevice(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.violations: collections.Counter = collections.Counter()
        self.syncs: collections.Counter = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        if func in SYNCS:
            if tag(args[0]) == "device":
                self.syncs[f"{name} {_caller()}"] += 1
            if func is torch.Tensor.cpu:
                _set(out, "host")
            return out
        if func in FACTORIES:
            _set(out, "device" if kwargs.get("device") is not None else "host")
            return out
        if func in LIKE:
            _set(out, "device" if kwargs.get("device") is not None else tag(args[0]))
            return out
        if func in (torch.Tensor.to, torch.Tensor.cuda):  # (the run's device is the CPU: any device named is it)
            where = _device_arg(func, args, kwargs) if func is torch.Tensor.to else "cuda"
            if where is not None and out is args[0]:  # on the CPU .to(device) returns the host tensor itself: a
                out = out.view_as(out)  # new tensor object, so that the host original keeps its tag
            _set(out, tag(args[0]) if where is None else "host" if where == "host" else "device")
            return out
        if name in ("__set__", "_has_compatible_shallow_copy_type"):  # Module.to's bookkeeping (it tags below)
            return out
        if func is torch.Tensor.copy_:  # an explicit copy between host and device
            return out
        if name == "__get__" and getattr(func, "__self__", None) is not None:  # a property: .grad, .data, .T, ...
            _set(out, tag(args[0]))
            return out
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        tags = [tag(t) for t in tensors]
        if "device" in tags:
            scalar_ok = func not in NOT_ELEMENTWISE
            if any(tg == "host" and (t.dim() > 0 or not scalar_ok) for t, tg in zip(tensors, tags)):
                self.violations[f"{name or func} at {_caller()}"] += 1
            for o in _outputs(out):
                _set(o, "device")
        return out

    def __enter__(self):
        # nn.Parameter.__deepcopy__ builds a new Parameter without the tensor's attributes (a frozen copy of a
        # device model is on the device): keep the tag
        self._deepcopy = torch.nn.Parameter.__deepcopy__

        def deepcopy(param, memo, _orig=self._deepcopy):
            out = _orig(param, memo)
            _set(out, tag(param))
            return out

        torch.nn.Parameter.__deepcopy__ = deepcopy
        # Module.to(device): its parameters and buffers are then on the device (a dtype-only .to keeps the tags)
        self._module_to = torch.nn.Module.to

        def module_to(module, *args, _orig=self._module_to, **kwargs):
            out = _orig(module, *args, **kwargs)
            device = torch._C._nn._parse_to(*args, **kwargs)[0]
            if device is not None:
                for t in [*module.parameters(), *module.buffers()]:
                    _set(t, "device")
            return out

        torch.nn.Module.to = module_to
        return super().__enter__()

    def __exit__(self, *exc):
        torch.nn.Parameter.__deepcopy__ = self._deepcopy
        torch.nn.Module.to = self._module_to
        return super().__exit__(*exc)

    def report(self) -> str:
        return "host tensors meeting device tensors:\n" + "\n".join(
            f"  {n} x {where}" for where, n in self.violations.most_common()
        )
