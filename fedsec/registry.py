"""Name -> object registries, so every config name resolves in one place.

An unknown name raises :class:`UnknownNameError` listing the valid choices, which
the config validator turns into a one-line error naming the field.

Bring your own model, data and training loop
--------------------------------------------
Four config keys take the user's own code as well as fedsec's names:
``model.name``, ``data.dataset``, ``data.partition`` and ``client.train_fn``.
Each accepts

* a **dotted name** ``"package.module:factory"`` (``factory`` may be a dotted
  attribute path, ``"pkg.mod:Class.build"``): the module is imported in every
  process that reads the config -- the server, ``fedsec bench``'s worker
  processes and the Ray actors that run the clients -- so it works everywhere
  the module is importable (on ``sys.path`` or ``PYTHONPATH``: Flower's
  simulation engine passes the driver's ``sys.path`` to its actors, and the
  bench's workers start with the parent's);
* a **registered name**, added with :func:`register_model`,
  :func:`register_dataset`, :func:`register_partitioner` or
  :func:`register_train_fn`. A registration lives in the process that ran it:
  a Ray actor or a bench worker knows the name only if it imports the module
  that registers it. Use registered names in-process (``--engine inprocess``
  from a script that registers first) and the dotted form everywhere else.

The signatures (see each ``register_*`` function):

* model factory ``(input_shape, num_classes) -> torch.nn.Module``, with
  ``input_shape = (C, H, W)``; fedsec seeds torch's RNG around the call;
* data set factory ``(data_dir: pathlib.Path, seed: int)`` returning either a
  :class:`fedsec.data.SplitData` or the tuple fedsec's own loaders return,
  ``(train_x, train_y, test_x, test_y)``: float images ``[N, C, H, W]``
  (normalised) and integer labels ``[N]`` (numpy arrays or tensors);
* partitioner: :class:`fedsec.data.PartitionFn`;
* training function ``(model, x, y, cfg, *, device, seed)`` returning a
  :class:`fedsec.training.TrainResult` or a mapping with ``loss`` and
  ``accuracy`` (and optionally ``num_examples``, ``steps``).

Dotted names on a deployed node
-------------------------------
A config the user gives ``fedsec run`` or ``fedsec bench`` is the user's own,
and its dotted names import whatever it names. A deployed client is another
matter: it receives its config from the server with every message, so a
dotted name there would let the server (or whoever can reach the node) import
any module and call any callable on it (``shutil:rmtree`` with the config's
``data_dir``, a module with import-time side effects). Inside
:func:`restrict_user_code` a dotted name resolves only

* in a module under one of the allowed prefixes (the node operator's own
  packages, node config ``user-modules``; see :mod:`fedsec.client.app`),
* through public attributes (no ``_`` parts), never through another module,
* to a callable defined under an allowed prefix (not one merely imported there),

and anything else is a :class:`DottedNameError` before any import. fedsec's
ClientApp applies it to every config a server sends, except in a simulation
(:func:`fedsec.attacks.threat.simulated_adversary`), where the config is the
user's own.
"""

from __future__ import annotations

import importlib
import math
import pkgutil
import re
import sys
import types
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, Generic, TypeVar

if TYPE_CHECKING:
    import torch

    from fedsec.config import ExperimentConfig
    from fedsec.training import TrainResult

__all__ = [
    "TRAIN_FNS",
    "DottedNameError",
    "Registry",
    "UnknownNameError",
    "check_module_prefixes",
    "import_dotted",
    "is_dotted",
    "register_dataset",
    "register_model",
    "register_partitioner",
    "register_train_fn",
    "restrict_user_code",
    "run_train_fn",
]

T = TypeVar("T")

#: ``package.module:attribute`` (the attribute may be dotted).
_DOTTED = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
#: What a registered name may look like: no ``:`` (that marks a dotted name).
_REGISTERED_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")

#: Appended to unknown-name errors of the keys that take the user's own code.
USER_CODE_HINT = (
    "or a dotted 'package.module:factory' (imported in every process); a name "
    "registered with fedsec.registry.register_* exists only in processes that import "
    "the module registering it"
)


class UnknownNameError(ValueError):
    """A config name that no registry entry matches."""


class DottedNameError(UnknownNameError):
    """A dotted ``"package.module:factory"`` name that does not import or is not callable."""


def is_dotted(name: str) -> bool:
    """Whether ``name`` is meant as ``"package.module:factory"`` (it contains a colon)."""
    return ":" in name


#: Module prefixes dotted names may resolve in, inside :func:`restrict_user_code`;
#: None outside it (the process's own config: anything importable).
_ALLOWED_MODULES: ContextVar[tuple[str, ...] | None] = ContextVar(
    "fedsec_allowed_user_modules", default=None
)
#: A module prefix: a dotted module name.
_MODULE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


def check_module_prefixes(
    prefixes: Iterable[str], *, where: str = "user-modules"
) -> tuple[str, ...]:
    """Validate module prefixes for :func:`restrict_user_code`.

    Raises
    ------
    ValueError
        One line naming ``where``: an entry that is not a dotted module name,
        or a standard-library module (its functions are not the user's code:
        ``os``, ``shutil`` or ``subprocess`` would hand the sender a shell).
    """
    checked = []
    for prefix in prefixes:
        if not isinstance(prefix, str) or not _MODULE.match(prefix):
            raise ValueError(f"{where}: {prefix!r} is not a module name (e.g. 'mypkg.models')")
        top = prefix.split(".")[0]
        if top in sys.stdlib_module_names or top == "builtins":
            raise ValueError(
                f"{where}: '{prefix}' is a standard-library module; list your own packages"
            )
        checked.append(prefix)
    return tuple(checked)


@contextmanager
def restrict_user_code(allowed: Iterable[str]) -> Iterator[None]:
    """Within the block, dotted names resolve only in the ``allowed`` module prefixes.

    For configs that come from elsewhere (a deployed node's server): a dotted
    name outside the prefixes, with a private attribute part, reaching through
    another module, or naming a callable defined outside the prefixes is a
    :class:`DottedNameError`, raised before anything is imported where the
    module is not allowed. Registered names are unaffected (the process
    registered them itself). ``allowed`` empty: no dotted name resolves.

    Raises
    ------
    ValueError
        If a prefix is malformed or a standard-library module
        (:func:`check_module_prefixes`).
    """
    token = _ALLOWED_MODULES.set(check_module_prefixes(allowed))
    try:
        yield
    finally:
        _ALLOWED_MODULES.reset(token)


def _under(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def _refusal(kind: str, name: str, why: str, allowed: tuple[str, ...]) -> DottedNameError:
    listed = ", ".join(allowed) if allowed else "none"
    return DottedNameError(
        f"{kind} '{name}' refused: {why}; this node resolves dotted names only in the "
        f"modules its operator allowed (node config 'user-modules': {listed})"
    )


def _check_name_allowed(name: str, kind: str) -> None:
    """Refuse ``name`` before any import when the policy does not allow its module."""
    allowed = _ALLOWED_MODULES.get()
    if allowed is None:
        return
    module_name, _, attribute = name.partition(":")
    if not _under(module_name, allowed):
        raise _refusal(kind, name, f"module '{module_name}' is not allowed", allowed)
    if any(part.startswith("_") for part in attribute.split(".")):
        raise _refusal(kind, name, "private attributes are not resolved", allowed)


def _check_object_allowed(name: str, kind: str, obj: Any, path: list[Any]) -> None:
    """Refuse a resolved callable that lies outside the allowed modules."""
    allowed = _ALLOWED_MODULES.get()
    if allowed is None:
        return
    if any(isinstance(step, types.ModuleType) for step in path):
        raise _refusal(kind, name, "the attribute path reaches into another module", allowed)
    defined_in = getattr(obj, "__module__", None)
    if not isinstance(defined_in, str) or not _under(defined_in, allowed):
        raise _refusal(
            kind, name, f"it is defined in '{defined_in}', not an allowed module", allowed
        )


def import_dotted(name: str, *, kind: str = "object") -> Callable[..., Any]:
    """Import ``"package.module:attr"`` and return the callable it names.

    Parameters
    ----------
    name : str
        ``"package.module:attribute"``; the attribute may be dotted
        (``"pkg.mod:Class.method"``).
    kind : str
        What the callable is for ("model", "dataset", ...), for the message.

    Raises
    ------
    DottedNameError
        One line naming the problem: a malformed name, a module that does not
        import (with the import's own error), a missing attribute, or an
        attribute that is not callable.
    """
    if not _DOTTED.match(name):
        raise DottedNameError(
            f"{kind} '{name}' is not a dotted name of the form 'package.module:factory'"
        )
    _check_name_allowed(name, kind)  # before the import: importing can itself act
    module_name, _, attribute = name.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as err:  # the user's module may raise anything while importing
        first = str(err).splitlines()[0] if str(err) else ""
        raise DottedNameError(
            f"{kind} '{name}': cannot import module '{module_name}' ({type(err).__name__}: {first})"
        ) from None
    path: list[Any] = []  # the objects passed through on the way to the attribute
    for part in attribute.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise DottedNameError(
                f"{kind} '{name}': module '{module_name}' has no attribute '{attribute}'"
            ) from None
        path.append(obj)
    _check_object_allowed(name, kind, obj, path[:-1])
    if not callable(obj):
        raise DottedNameError(
            f"{kind} '{name}' names an object of type '{type(obj).__name__}', not a callable"
        )
    return obj  # type: ignore[no-any-return]


class Registry(Generic[T]):
    """A small ordered mapping from config names to objects.

    Parameters
    ----------
    kind : str
        What the entries are ("dataset", "model", ...), used in error messages.
    resolve : callable, optional
        ``resolve(name)`` builds the entry for a name that is not registered
        (a dotted ``"package.module:factory"``, say) or returns None when it
        cannot; entries it builds are not listed by :meth:`names`.
    """

    def __init__(self, kind: str, resolve: Callable[[str], T | None] | None = None) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._resolve = resolve

    def add(self, name: str, obj: T) -> T:
        """Register ``obj`` under ``name``; a name can be registered once."""
        if name in self._entries:
            raise ValueError(f"{self.kind} '{name}' is already registered")
        self._entries[name] = obj
        return obj

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator form of :meth:`add`."""

        def decorator(obj: T) -> T:
            return self.add(name, obj)

        return decorator

    def get(self, name: str) -> T:
        """Return the entry for ``name`` or raise with the valid choices.

        Raises
        ------
        UnknownNameError
            Listing the registered names; :class:`DottedNameError` when a
            dotted name does not resolve.
        """
        try:
            return self._entries[name]
        except KeyError:
            pass
        if self._resolve is not None:
            found = self._resolve(name)
            if found is not None:
                return found
        choices = ", ".join(self.names()) or "none registered"
        raise UnknownNameError(f"unknown {self.kind} '{name}'; valid choices: {choices}")

    def names(self) -> list[str]:
        """Registered names, in registration order."""
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


def dotted_callables(kind: str) -> Callable[[str], Callable[..., Any] | None]:
    """A :class:`Registry` ``resolve`` hook importing dotted names as callables."""
    cache: dict[str, Callable[..., Any]] = {}

    def resolve(name: str) -> Callable[..., Any] | None:
        if not is_dotted(name):
            return None
        if name not in cache:
            cache[name] = import_dotted(name, kind=kind)
        elif _ALLOWED_MODULES.get() is not None:
            # Imported earlier, perhaps under another policy: this one decides now.
            import_dotted(name, kind=kind)
        return cache[name]

    return resolve


def _check_registered_name(kind: str, name: str) -> None:
    if not isinstance(name, str) or not _REGISTERED_NAME.match(name):
        raise ValueError(
            f"{kind} name must be letters, digits, '.', '_' or '-' (no ':', which marks "
            f"a dotted name), got {name!r}"
        )


# ---- training functions -----------------------------------------------------

#: The user's training functions by registered name (``client.train_fn``); dotted
#: names resolve by import. fedsec's own loop is the default (``train_fn = ""``).
TRAIN_FNS: Registry[Callable[..., Any]] = Registry(
    "training function", dotted_callables("training function")
)


def register_train_fn(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a client training function under ``name`` (for ``client.train_fn``).

    The function is called on every client, every round, as
    ``train_fn(model, x, y, cfg, *, device, seed)``:

    * ``model``: the received global model (``torch.nn.Module`` on CPU); train
      it in place, its ``state_dict()`` afterwards is the client's reply;
    * ``x``, ``y``: the client's partition (float ``[n, C, H, W]``, int64 ``[n]``);
    * ``cfg``: the :class:`~fedsec.config.ExperimentConfig` (``cfg.client``
      holds batch size, learning rate, epochs);
    * ``device``: the node's ``torch.device``; ``seed``: per client and round.

    It returns a :class:`fedsec.training.TrainResult` or a mapping with
    ``loss`` and ``accuracy`` (optional ``num_examples``, default ``len(y)``,
    the FedAvg weight; ``steps``).

    Registration reaches only processes that import the registering module; in
    configs run on Ray or by ``fedsec bench`` use the dotted form.
    """
    _check_registered_name("training function", name)
    return TRAIN_FNS.register(name)


def run_train_fn(
    cfg: ExperimentConfig,
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    device: torch.device,
    seed: int,
) -> TrainResult:
    """Train with ``cfg.client.train_fn`` and normalise what it returns.

    Raises
    ------
    TypeError
        If the function returns neither a ``TrainResult`` nor a mapping with
        finite ``loss`` and ``accuracy``.
    """
    from fedsec.training import TrainResult

    name = cfg.client.train_fn
    result = TRAIN_FNS.get(name)(model, x, y, cfg, device=device, seed=seed)
    model.to("cpu")  # the reply is read from the model's state on CPU
    if isinstance(result, TrainResult):
        return result
    if not isinstance(result, Mapping) or "loss" not in result or "accuracy" not in result:
        raise TypeError(
            f"training function '{name}' must return a TrainResult or a mapping with "
            f"'loss' and 'accuracy', got {type(result).__name__}"
        )
    try:
        values = TrainResult(
            loss=float(result["loss"]),
            accuracy=float(result["accuracy"]),
            num_examples=int(result.get("num_examples", len(y))),
            steps=int(result.get("steps", 0)),
        )
    except (TypeError, ValueError) as err:
        raise TypeError(f"training function '{name}' returned unusable metrics: {err}") from None
    if not (math.isfinite(values.loss) and math.isfinite(values.accuracy)):
        raise TypeError(
            f"training function '{name}' returned a non-finite loss or accuracy "
            f"({values.loss}, {values.accuracy})"
        )
    if values.num_examples < 1:
        raise TypeError(
            f"training function '{name}' returned num_examples={values.num_examples}; must be >= 1"
        )
    return values


# ---- models, data sets, partitioners ----------------------------------------


def register_model(
    name: str, *, image_sizes: tuple[int, ...] | None = None, description: str = ""
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a model factory under ``name``, usable as ``model.name`` in-process.

    ``factory(input_shape, num_classes) -> torch.nn.Module`` with
    ``input_shape = (C, H, W)``; fedsec seeds torch's RNG around the call, so
    the factory needs no seed. ``image_sizes`` lists the spatial sizes it
    accepts (None: any). Returns the factory unchanged (a decorator).
    Registration reaches only processes that import the registering module:
    on Ray and in ``fedsec bench`` use ``model.name = "package.module:factory"``.
    """
    from fedsec.models import MODELS, ModelSpec

    _check_registered_name("model", name)

    def decorator(factory: Callable[..., Any]) -> Callable[..., Any]:
        doc = description or (factory.__doc__ or "").strip().split("\n")[0]
        MODELS.add(name, ModelSpec(name, factory, image_sizes, doc))
        return factory

    return decorator


def register_dataset(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a data set factory under ``name``, usable as ``data.dataset`` in-process.

    ``factory(data_dir: pathlib.Path, seed: int)`` returns a
    :class:`fedsec.data.SplitData` or ``(train_x, train_y, test_x, test_y)``;
    see :func:`fedsec.data.load_dataset`. Registration reaches only processes
    that import the registering module: on Ray and in ``fedsec bench`` use
    ``data.dataset = "package.module:factory"``.
    """
    from fedsec.data.datasets import DATASET_FACTORIES, DATASETS

    _check_registered_name("dataset", name)
    if name in DATASETS:
        raise ValueError(f"dataset '{name}' is already registered")
    return DATASET_FACTORIES.register(name)


def register_partitioner(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a partitioner under ``name``, usable as ``data.partition`` in-process.

    The function has the signature of :class:`fedsec.data.PartitionFn`:
    ``fn(labels, num_partitions, *, seed, alpha, shards_per_partition,
    min_partition_size) -> list of index arrays`` (disjoint, one per client).
    Registration reaches only processes that import the registering module:
    on Ray and in ``fedsec bench`` use ``data.partition = "package.module:fn"``.
    """
    from fedsec.data.partition import PARTITIONERS

    _check_registered_name("partitioner", name)
    return PARTITIONERS.register(name)


def import_package_modules(package: str, path: Iterable[str]) -> list[str]:
    """Import every module of ``package`` (its ``__path__``), so each registers itself.

    The extension point of the packages whose modules register by import
    (model-poisoning attacks, privacy modes): a new module is picked up with no
    edit elsewhere. Modules already imported are skipped (Python caches them),
    so calling this again only picks up modules added to the path since.

    Returns
    -------
    list of str
        The package's module names, in ``pkgutil`` order.
    """
    names = [info.name for info in pkgutil.iter_modules(path) if not info.ispkg]
    for name in names:
        importlib.import_module(f"{package}.{name}")
    return names
